"""scripts/install-offline.sh on a wheelhouse with a file in parts, run for real into a fresh virtual environment."""

from __future__ import annotations

import base64
import hashlib
import io
import site
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # real quantization, installs or Slurm jobs: minutes in all

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "install-offline.sh"
WHEEL = "tinypkg-0.1-py3-none-any.whl"


def _record_line(name: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{name},sha256={digest},{len(data)}"


def make_wheel() -> bytes:
    """A real (tiny) wheel: one module and its dist-info, as pip expects it."""
    files = {
        "tinypkg/__init__.py": b"ANSWER = 42\n" + b"# padding so the wheel spans several parts\n" * 200,
        "tinypkg-0.1.dist-info/METADATA": b"Metadata-Version: 2.1\nName: tinypkg\nVersion: 0.1\n",
        "tinypkg-0.1.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = "\n".join([_record_line(n, d) for n, d in files.items()] + ["tinypkg-0.1.dist-info/RECORD,,"]) + "\n"
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        for name, data in files.items():
            zf.writestr(name, data)
        zf.writestr("tinypkg-0.1.dist-info/RECORD", record)
    return buf.getvalue()


@pytest.fixture(scope="module")
def venv(tmp_path_factory):
    """A fresh environment that sees the packages of the environment running the tests (the launcher's
    dependencies) but not tinypkg. `--system-site-packages` alone would show the base interpreter's packages
    when the tests run inside a virtual environment, so the running environment's site folders are added
    with a .pth file (processed like site folders: editable installs in them work too)."""
    path = tmp_path_factory.mktemp("venv")
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(path)], check=True)
    python = path / "bin" / "python"
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    outer = [p for p in site.getsitepackages() if Path(p).is_dir()]
    (Path(purelib) / "outer-environment.pth").write_text(
        "".join(f"import site; site.addsitedir({p!r})\n" for p in outer)
    )
    return python


def wheelhouse_in_parts(folder: Path, parts: int = 3) -> bytes:
    folder.mkdir()
    data = make_wheel()
    size = len(data) // parts + 1
    for i in range(parts):
        (folder / f"{WHEEL}.part{i:02d}").write_bytes(data[i * size : (i + 1) * size])
    (folder / f"{WHEEL}.sha256").write_text(f"{hashlib.sha256(data).hexdigest()}  {WHEEL}\n")
    return data


def install(wheelhouse: Path, python: Path, home: Path, *options: str) -> subprocess.CompletedProcess:
    env = {"PATH": "/usr/bin:/bin", "PYTHON": str(python), "PTQ_HOME": str(home), "HOME": str(home)}
    return subprocess.run(
        ["bash", str(SCRIPT), str(wheelhouse), *options], capture_output=True, text=True, env=env, timeout=600
    )


def test_parts_are_joined_checked_and_installed(tmp_path, venv):
    wheelhouse = tmp_path / "wheelhouse"
    data = wheelhouse_in_parts(wheelhouse)
    done = install(wheelhouse, venv, tmp_path / "home", "--exact")
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"joined {WHEEL} from 3 parts, sha256 checked" in done.stdout
    assert (tmp_path / "home" / "wheelhouse-joined" / WHEEL).read_bytes() == data
    answer = subprocess.run([str(venv), "-c", "import tinypkg; print(tinypkg.ANSWER)"], capture_output=True, text=True)
    assert answer.stdout.strip() == "42"
    assert "launcher: ok" in done.stdout
    # Run again: the joined file is reused, nothing fails.
    again = install(wheelhouse, venv, tmp_path / "home", "--exact")
    assert again.returncode == 0 and f"{WHEEL} already joined" in again.stdout


def test_a_damaged_part_is_refused_and_nothing_is_left_joined(tmp_path, venv):
    wheelhouse = tmp_path / "wheelhouse"
    wheelhouse_in_parts(wheelhouse)
    part = wheelhouse / f"{WHEEL}.part01"
    part.write_bytes(part.read_bytes()[:-10])  # a copy that stopped early
    done = install(wheelhouse, venv, tmp_path / "home", "--exact")
    assert done.returncode == 1
    assert f"{WHEEL} joined from 3 parts has sha256" in done.stderr and "a part is missing or damaged" in done.stderr
    assert not list((tmp_path / "home" / "wheelhouse-joined").iterdir())


def test_megatron_scripts_are_unpacked_and_a_missing_megatron_stack_is_named(tmp_path, venv):
    """This machine has no Megatron-Bridge: --megatron unpacks the scripts' archive, then stops with a message
    that says what is missing and what it needs."""
    wheelhouse = tmp_path / "wheelhouse"
    wheelhouse_in_parts(wheelhouse)
    with tarfile.open(wheelhouse / "Megatron-Bridge-abc123.tar.gz", "w:gz") as tar:
        for name in ("quantize.py", "quantize_utils.py"):
            info = tarfile.TarInfo(f"Megatron-Bridge-abc123/examples/quantization/{name}")
            body = b"# stand-in file: only its presence is checked\n"
            info.size = len(body)
            tar.addfile(info, io.BytesIO(body))
    done = install(wheelhouse, venv, tmp_path / "home", "--exact", "--megatron")
    assert (tmp_path / "home" / "Megatron-Bridge-abc123" / "examples" / "quantization" / "quantize.py").is_file()
    assert done.returncode == 1
    assert "Megatron-Bridge does not import (it needs Python 3.12, a CUDA GPU and Transformer Engine" in done.stderr


def test_a_folder_that_does_not_exist_is_named(tmp_path):
    done = subprocess.run(["bash", str(SCRIPT), str(tmp_path / "nowhere")], capture_output=True, text=True)
    assert done.returncode == 2 and "nowhere is not a folder" in done.stderr
