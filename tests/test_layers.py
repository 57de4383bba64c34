"""The shape of the code: ptq/'s layers (pyproject.toml's import-linter contract) hold, every module has a
layer, and nothing imports the project's own modules from inside a function (which would hide a cycle)."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Code of the project that may import ptq: the package, the entry point, the Slurm plugin, the benchmarks.
SOURCES = [
    *sorted((REPO / "ptq").rglob("*.py")),
    REPO / "launch.py",
    *sorted((REPO / "hydra_plugins" / "ptq_slurm_launcher").glob("*.py")),
    *sorted((REPO / "bench").glob("*.py")),
]


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())",
        ],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
    )


def contract_layers() -> list:
    config = tomllib.loads((REPO / "pyproject.toml").read_text())
    (contract,) = config["tool"]["importlinter"]["contracts"]
    return contract["layers"]


def test_the_layers_contract_is_kept():
    done = lint_imports(REPO)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "1 kept, 0 broken" in done.stdout


def test_a_lower_layer_importing_a_higher_one_breaks_the_contract(tmp_path):
    """The contract bites: the same tree with ptq/errors.py importing the planner fails the check."""
    shutil.copytree(REPO / "ptq", tmp_path / "ptq", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    errors = tmp_path / "ptq" / "errors.py"
    errors.write_text(errors.read_text() + "\nimport ptq.plan  # noqa: E402,F401\n")
    done = lint_imports(tmp_path)
    assert done.returncode != 0
    assert "BROKEN" in done.stdout and "ptq.errors -> ptq.plan" in done.stdout


def test_every_module_of_ptq_has_a_layer():
    placed = {name.strip() for layer in contract_layers() for name in layer.split("|")}
    modules = {p.stem for p in (REPO / "ptq").glob("*.py") if p.stem != "__init__"}
    modules |= {p.name for p in (REPO / "ptq").iterdir() if (p / "__init__.py").is_file()}
    assert {f"ptq.{m}" for m in modules} == placed


def _function_local_project_imports(path: Path, root: Path = REPO) -> list:
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for inner in ast.walk(node):
            names = []
            if isinstance(inner, ast.Import):
                names = [a.name for a in inner.names]
            elif isinstance(inner, ast.ImportFrom) and inner.level == 0 and inner.module:
                names = [inner.module]
            names = [n for n in names if n == "ptq" or n.startswith("ptq.") or n.startswith("bench")]
            if names:
                found.append(f"{path.relative_to(root)}:{inner.lineno} imports {', '.join(names)}")
    return found


def test_no_function_imports_the_projects_own_modules():
    found = [hit for path in SOURCES for hit in _function_local_project_imports(path)]
    assert found == []


def test_the_check_for_function_local_imports_finds_one(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text(
        "import os\nfrom ptq.errors import ConfigError\n\n\ndef f():\n    from ptq.plan import make_plan\n"
        "    import json\n    return make_plan, ConfigError, os, json\n"
    )
    assert _function_local_project_imports(sample, tmp_path) == ["sample.py:6 imports ptq.plan"]


def test_planning_a_run_and_checking_sweep_points_import_no_torch(tmp_path):
    """Composing, planning and describing a run (dry runs) are cheap: torch, ModelOpt and transformers stay unimported
    until a backend runs. The runs are planned under a fresh output_root, so what earlier runs left in the
    checkout's runs/ does not matter."""
    root = f"output_root={tmp_path / 'runs'}"
    code = (
        "import sys\n"
        "from hydra import compose, initialize_config_dir\n"
        "from omegaconf import OmegaConf\n"
        "from ptq.schema import register_schemas\n"
        "from ptq.run import prepare\n"
        "from ptq.sweep import Point, check_point\n"
        "from ptq.backends import describe_steps\n"
        "register_schemas()\n"
        f"with initialize_config_dir(config_dir={str(REPO / 'conf')!r}, version_base='1.3'):\n"
        f"    for overrides in ([{root!r}], ['hardware=h100', 'recipe=nvfp4', 'dry_run=true', {root!r}],\n"
        f"                      ['recipe=int4_awq', {root!r}]):\n"
        "        cfg = compose(config_name='config', overrides=overrides)\n"
        "        assert describe_steps(prepare(OmegaConf.to_object(cfg)))[0].startswith('in process on ')\n"
        "        point = Point(index=0, overrides=overrides, config=OmegaConf.to_container(cfg, resolve=True),\n"
        "                      cfg=OmegaConf.to_object(cfg))\n"
        "        assert check_point(point, True, {}).state == 'submitted', point.reason\n"
        "print(sorted(m for m in ('torch', 'modelopt', 'transformers', 'lm_eval') if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"


BACKEND_NAMES = ("hf_modelopt", "megatron_bridge")


def _backend_name_comparisons(path: Path, root: Path = REPO) -> list:
    """`<x> == "<backend>"`, `backend.name != ...` and `hasattr(backend, ...)` in a module: what only
    ptq/backends/ and ptq/backend_spec.py may ask."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare) and any(
            isinstance(op, (ast.Eq, ast.NotEq, ast.In, ast.NotIn)) for op in node.ops
        ):
            parts = [node.left, *node.comparators]
            names = {p.value for p in parts if isinstance(p, ast.Constant)} & set(BACKEND_NAMES)
            attribute = any(
                isinstance(p, ast.Attribute)
                and p.attr == "name"
                and isinstance(p.value, ast.Attribute)
                and p.value.attr == "backend"
                for p in parts
            )
            if names or attribute:
                found.append(f"{path.relative_to(root)}:{node.lineno}")
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id == "hasattr"
            and node.args
            and isinstance(node.args[0], ast.Name)
            and node.args[0].id == "backend"
        ):
            found.append(f"{path.relative_to(root)}:{node.lineno}")
    return found


def test_no_module_outside_the_backends_compares_a_backends_name():
    outside = [
        p for p in SOURCES if "ptq/backends/" not in p.as_posix() and not p.as_posix().endswith("ptq/backend_spec.py")
    ]
    assert [hit for path in outside for hit in _backend_name_comparisons(path)] == []


def test_the_check_for_backend_name_comparisons_finds_them(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text(
        "def f(cfg, backend):\n    if cfg.backend.name == x:\n        pass\n"
        "    if y != 'megatron_bridge':\n        pass\n    return hasattr(backend, 'run_worker')\n"
    )
    assert _backend_name_comparisons(sample, tmp_path) == ["sample.py:2", "sample.py:4", "sample.py:6"]


def test_the_code_is_formatted_and_passes_the_linter():
    """`ruff format` and `ruff check` as configured in pyproject.toml (line length 120; pyflakes, pycodestyle,
    import order): run `ruff format . && ruff check --fix .` before committing when this fails."""
    for command in (["format", "--check", "."], ["check", "."]):
        done = subprocess.run([sys.executable, "-m", "ruff", *command], cwd=REPO, capture_output=True, text=True)
        assert done.returncode == 0, f"ruff {' '.join(command)}:\n{done.stdout}{done.stderr}"
