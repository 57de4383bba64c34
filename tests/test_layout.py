"""The repository layout must not shadow packages the launcher's dependencies import."""

import subprocess
import sys

import pytest

from conftest import REPO


@pytest.mark.slow
def test_evaluate_folder_does_not_shadow_huggingface_evaluate():
    # Run from the repository root, where `evaluate/` sits on sys.path first.
    proc = subprocess.run([sys.executable, "-c", "import evaluate, sys; print(evaluate.__file__); print(hasattr(evaluate, 'load'))"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    path, has_load = proc.stdout.split()
    assert "site-packages" in path and has_load == "True"
    assert not (REPO / "evaluate" / "__init__.py").exists()
