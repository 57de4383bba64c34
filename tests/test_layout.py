"""The repository layout must not shadow packages the launcher's dependencies import."""

import subprocess
import sys

import pytest
from conftest import REPO


@pytest.mark.slow
def test_evaluate_folder_does_not_shadow_huggingface_evaluate():
    # Run from the repository root, where `evaluate/` sits on sys.path first.
    proc = subprocess.run(
        [sys.executable, "-c", "import evaluate, sys; print(evaluate.__file__); print(hasattr(evaluate, 'load'))"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    path, has_load = proc.stdout.split()
    assert "site-packages" in path and has_load == "True"
    assert not (REPO / "evaluate" / "__init__.py").exists()


def test_a_published_folder_gives_every_file_the_same_mode(tmp_path):
    import os

    from ptq.files import default_file_mode, publish_folder

    partial = tmp_path / "checkpoint.partial"
    (partial / "sub").mkdir(parents=True)
    for name, mode in (("model.safetensors", 0o600), ("config.json", 0o644), ("sub/tokenizer.json", 0o640)):
        (partial / name).write_text("x")
        os.chmod(partial / name, mode)
    publish_folder(partial, tmp_path / "checkpoint")
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "checkpoint").rglob("*") if p.is_file()}
    assert modes == {
        "model.safetensors": default_file_mode(),
        "config.json": default_file_mode(),
        "tokenizer.json": default_file_mode(),
    }
