"""Read-back of an exported checkpoint (ptq/exported/) against ModelOpt called directly, on one GPU.

For each model shape (random weights, real shapes) and recipe, in one process:
  - ModelOpt called directly, as the in-process backend runs it: load the BF16 checkpoint, BF16 reference
    log-probs over the fidelity tokens, mtq.quantize over the calibration tokens, the in-memory fidelity
    comparison, export_hf_checkpoint;
  - the read-back of the written checkpoint (load_exported, then the same fidelity comparison), with its
    parts: the dequantization of the quantized layers (simulate), the rest of the load (model build from the
    plain tensors, tokenizer), the comparison; where the read-back goes through AutoModelForCausalLM (the
    earlier one does), its from_pretrained is timed too;
  - the stored-weight check (check_stored_weights against the source checkpoint);
  - optionally the read-back as it was before (a copy of the earlier ptq/exported/, `--before`), on the
    same checkpoint, for its time and to show that both give the same figures.
Each stage is timed after a CUDA synchronisation. A warm-up point on a one-layer model pays ModelOpt's CUDA
extension builds and first imports first. The JSON is rewritten after every stage.

    python -m bench.readback --shapes llama3.2-1b,llama3.1-8b --recipes fp8,nvfp4 --tokenizer TOKENIZER_DIR \\
        --work /tmp/readback --out bench/results/readback-h200/readback.json [--before OLD_EXPORTED_PY]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.calibration import SHAPES as CALIBRATION_SHAPES  # noqa: E402
from ptq import exported, fidelity  # noqa: E402
from ptq.exported import simulation  # noqa: E402

SHAPES = CALIBRATION_SHAPES
# The recipes' ModelOpt configs (conf/recipe/*.yaml), with the launcher's default exclusion of lm_head.
RECIPES = {"fp8": "FP8_DEFAULT_CFG", "nvfp4": "NVFP4_DEFAULT_CFG"}
EXCLUDE = ["*lm_head*"]


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class Stages:
    """Wall time of named stages, each closed by a device synchronisation."""

    def __init__(self, into: dict):
        self.times = into

    @contextlib.contextmanager
    def __call__(self, name: str):
        sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            sync()
            self.times[name] = round(time.perf_counter() - start, 3)


@contextlib.contextmanager
def timed_attr(owner, attr: str, into: dict, key: str):
    """Time every call of owner.attr (a function or classmethod) into into[key] while the block runs."""
    own = attr in vars(owner)
    original = vars(owner).get(attr)
    bound = getattr(owner, attr)

    def wrapper(*args, **kwargs):
        sync()
        start = time.perf_counter()
        try:
            return bound(*args, **kwargs)
        finally:
            sync()
            into[key] = round(into.get(key, 0.0) + time.perf_counter() - start, 3)

    setattr(owner, attr, wrapper)
    try:
        yield
    finally:
        if own:
            setattr(owner, attr, original)
        else:
            delattr(owner, attr)


def environment() -> dict:
    from importlib import metadata

    env = {"python": platform.python_version(), "cpus": os.cpu_count(), "date": time.strftime("%Y-%m-%d")}
    for name in ("torch", "transformers", "nvidia-modelopt", "safetensors", "accelerate"):
        try:
            env[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            env[name] = None
    env["cuda"] = torch.version.cuda
    if torch.cuda.is_available():
        env["device"] = torch.cuda.get_device_name()
        try:
            env["driver"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=30,
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            env["driver"] = None
    return env


def write_source(shape: str, tokenizer_dir: str, out: Path, layers=None) -> Path:
    """A random-weight BF16 checkpoint of `shape` (seed 0), built on the GPU, with the given tokenizer."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    done = out / ".complete"
    if done.exists():
        return out
    kwargs = dict(SHAPES[shape], max_position_embeddings=4096)
    if layers:
        kwargs["num_hidden_layers"] = layers
    config = LlamaConfig(**kwargs)
    config.architectures = ["LlamaForCausalLM"]
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = LlamaForCausalLM._from_config(config, dtype=torch.bfloat16).eval()
    shutil.rmtree(out, ignore_errors=True)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(out)
    done.write_text(f"random weights (seed 0), shape {shape}{f', {layers} layers' if layers else ''}\n")
    del model
    free()
    return out


def free():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def quant_config(recipe: str) -> dict:
    import modelopt.torch.quantization as mtq

    cfg = copy.deepcopy(getattr(mtq, RECIPES[recipe]))
    for pattern in EXCLUDE:
        cfg["quant_cfg"].append({"quantizer_name": pattern, "enable": False})
    return cfg


def load_before(path: str):
    spec = importlib.util.spec_from_file_location("exported_before", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["exported_before"] = module
    spec.loader.exec_module(module)
    return module


def read_back(module, export_dir: Path, device: str, tokens, fid_bs: int, ref, parts: dict) -> tuple:
    """(fidelity figures, Simulation summary) of the export read back through `module` (ptq.exported.simulation,
    or the copy of the earlier ptq/exported/); parts gets the time of simulate, of
    AutoModelForCausalLM.from_pretrained where it is called, and of the whole load and compare."""
    from transformers import AutoModelForCausalLM

    stage = Stages(parts)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    with (
        timed_attr(AutoModelForCausalLM, "from_pretrained", parts, "from_pretrained"),
        timed_attr(module, "simulate", parts, "simulate"),
        stage("load"),
    ):
        model, _, sim = module.load_exported(export_dir, device, torch.bfloat16)
    with stage("compare"):
        figures = fidelity.compare(model, tokens, fid_bs, ref, desc="read-back vs BF16")
    parts["total"] = round(parts["load"] + parts["compare"], 3)
    parts["other"] = round(parts["load"] - parts.get("from_pretrained", 0) - parts.get("simulate", 0), 3)
    if torch.cuda.is_available():
        parts["peak_gpu_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    del model
    free()
    return figures, sim.summary()


def run_point(shape: str, recipe: str, source: Path, work: Path, args, before, record: dict, save) -> None:
    import modelopt.torch.quantization as mtq
    from modelopt.torch.export import export_hf_checkpoint
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = "cuda" if torch.cuda.is_available() else "cpu"
    place = "cuda:0" if device == "cuda" else device
    point = record.setdefault("points", {}).setdefault(f"{shape}:{recipe}", {"shape": shape, "recipe": recipe})
    times = point.setdefault("modelopt_direct_s", {})
    stage = Stages(times)
    tokenizer = AutoTokenizer.from_pretrained(source)
    vocab = min(len(tokenizer), SHAPES[shape]["vocab_size"]) if shape in SHAPES else len(tokenizer)
    gen = torch.Generator().manual_seed(1234)
    calib = torch.randint(0, vocab, (args.calib_size, args.calib_len), generator=gen)
    tokens = torch.randint(0, vocab, (args.fid_samples, args.fid_len), generator=torch.Generator().manual_seed(4321))
    with stage("load"):
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.bfloat16, device_map={"": place}).eval()
    with stage("reference"):
        ref = fidelity.reference(model, tokens, args.fid_batch, desc="BF16 reference")

    def loop(m):
        for batch in calib.split(args.calib_batch):
            m(batch.to(device))

    with stage("calibrate"), torch.no_grad():
        mtq.quantize(model, quant_config(recipe), loop)
    with stage("fidelity"):
        point["in_memory"] = fidelity.compare(model, tokens, args.fid_batch, ref, desc="in memory vs BF16")
    export_dir = work / f"{shape}-{recipe}"
    shutil.rmtree(export_dir, ignore_errors=True)
    with stage("export"):
        export_hf_checkpoint(model, dtype=torch.bfloat16, export_dir=str(export_dir))
        tokenizer.save_pretrained(export_dir)
    point["export_gb"] = round(sum(f.stat().st_size for f in export_dir.glob("*.safetensors")) / 1e9, 3)
    del model
    free()
    save()
    parts = point.setdefault("read_back_s", {})
    point["read_back"], point["simulated"] = read_back(
        simulation, export_dir, device, tokens, args.fid_batch, ref, parts
    )
    times["read_back"] = parts["total"]
    run = sum(times[k] for k in ("load", "reference", "calibrate", "fidelity", "export", "read_back"))
    point["run_s"] = round(run, 3)
    point["read_back_share"] = round(parts["total"] / run, 4)
    save()
    with stage("stored_weight_check"):
        check = exported.check_stored_weights(export_dir, source, device)
    point["stored_weight_check"] = {k: v for k, v in check.items() if k != "worst_layers"}
    point["stored_weight_check"]["worst_layer"] = (check["worst_layers"] or [None])[0]
    without = run - parts["total"]  # the run with no check of the written checkpoint
    point["check_share"] = round(times["stored_weight_check"] / (without + times["stored_weight_check"]), 4)
    save()
    # A scale written 4x too large in one layer: the check must see it (a copy of the export, one tensor changed).
    if args.tamper:
        broken = work / f"{shape}-{recipe}-broken"
        shutil.rmtree(broken, ignore_errors=True)
        shutil.copytree(export_dir, broken)
        name = tamper(broken)
        tampered = exported.check_stored_weights(broken, source, device)
        point["tampered_check"] = {"changed": name, "problems": tampered["problems"]}
        shutil.rmtree(broken, ignore_errors=True)
        save()
    if before is not None and (args.before_points == "all" or f"{shape}:{recipe}" in args.before_points.split(",")):
        parts = point.setdefault("read_back_before_s", {})
        point["read_back_before"], _ = read_back(before, export_dir, device, tokens, args.fid_batch, ref, parts)
        point["read_back_before_share"] = round(parts["total"] / (without + parts["total"]), 4)
        point["same_figures_as_before"] = point["read_back_before"] == point["read_back"]
        save()
    del ref
    free()
    shutil.rmtree(export_dir, ignore_errors=True)


def tamper(export_dir: Path) -> str:
    """Multiply one layer's per-tensor weight scale by 4 in place (the file is rewritten); returns its name."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    for file in sorted(export_dir.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            names = list(f.keys())
            metadata = f.metadata()
        target = next((n for n in names if n.endswith("layers.1.mlp.down_proj.weight_scale_2")), None) or next(
            (n for n in names if n.endswith("layers.1.mlp.down_proj.weight_scale")), None
        )
        if target:
            tensors = {}
            with safe_open(str(file), framework="pt") as f:
                for n in names:
                    tensors[n] = f.get_tensor(n)
            tensors[target] = (tensors[target].float() * 4).to(tensors[target].dtype)
            save_file(tensors, str(file), metadata=metadata)
            return target
    raise SystemExit("no weight scale of layers.1.mlp.down_proj to change")


def warm_up(recipes, tokenizer_dir: str, work: Path, args) -> None:
    """One-layer model of the first shape through every recipe: ModelOpt's extension builds, first imports."""
    import modelopt.torch.quantization as mtq
    from modelopt.torch.export import export_hf_checkpoint
    from transformers import AutoModelForCausalLM

    device = "cuda" if torch.cuda.is_available() else "cpu"
    place = "cuda:0" if device == "cuda" else device
    shape = args.shapes.split(",")[0]
    source = write_source(shape, tokenizer_dir, work / "warm-up-source", layers=1)
    tokens = torch.randint(0, 1000, (4, 64))
    for recipe in recipes:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.bfloat16, device_map={"": place}).eval()
        with torch.no_grad():
            mtq.quantize(model, quant_config(recipe), lambda m: m(tokens.to(device)))
            model(tokens.to(device))
        out = work / f"warm-up-{recipe}"
        shutil.rmtree(out, ignore_errors=True)
        export_hf_checkpoint(model, dtype=torch.bfloat16, export_dir=str(out))
        del model
        back, _, _ = exported.load_exported(out, device, torch.bfloat16, tokenizer_from=str(source))
        with torch.no_grad():
            back(tokens.to(device))
        exported.check_stored_weights(out, source, device)
        del back
        shutil.rmtree(out, ignore_errors=True)
        free()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="llama3.2-1b,llama3.1-8b")
    parser.add_argument("--recipes", default="fp8,nvfp4")
    parser.add_argument("--tokenizer", required=True, help="a Hugging Face folder with a tokenizer")
    parser.add_argument("--work", required=True, help="folder for the random checkpoints and the exports")
    parser.add_argument("--out", required=True)
    parser.add_argument("--calib-size", type=int, default=512)
    parser.add_argument("--calib-len", type=int, default=512)
    parser.add_argument("--calib-batch", type=int, default=32)
    parser.add_argument("--fid-samples", type=int, default=32, help="hardware=h200's fidelity.samples")
    parser.add_argument("--fid-len", type=int, default=512)
    parser.add_argument("--fid-batch", type=int, default=8, help="the backend's fidelity batch (at most 8)")
    parser.add_argument("--before", help="a copy of the earlier ptq/exported/ to time on the same exports")
    parser.add_argument("--before-points", default="all", help="'all' or shape:recipe,... to run --before on")
    parser.add_argument("--tamper", action="store_true", help="also check a copy with one weight scale x4")
    args = parser.parse_args()
    os.environ.setdefault("TQDM_DISABLE", "1")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "environment": environment(),
        "argv": sys.argv[1:],
        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "work")},
    }

    def save():
        out.write_text(json.dumps(record, indent=1) + "\n")

    save()
    before = load_before(args.before) if args.before else None
    recipes = args.recipes.split(",")
    start = time.perf_counter()
    warm_up(recipes, args.tokenizer, work, args)
    record["warm_up_s"] = round(time.perf_counter() - start, 1)
    for shape in args.shapes.split(","):
        begin = time.perf_counter()
        source = write_source(shape, args.tokenizer, work / f"{shape}-source")
        record.setdefault("source_write_s", {})[shape] = round(time.perf_counter() - begin, 1)
        for recipe in recipes:
            print(f"readback bench: {shape} {recipe}", flush=True)
            run_point(shape, recipe, source, work, args, before, record, save)
            print(json.dumps(record["points"][f"{shape}:{recipe}"].get("read_back_s")), flush=True)
        shutil.rmtree(work / f"{shape}-source", ignore_errors=True)
    record["total_s"] = round(time.perf_counter() - start, 1)
    save()


if __name__ == "__main__":
    main()
