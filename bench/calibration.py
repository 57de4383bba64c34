"""Calibration cost per recipe against one plain BF16 forward pass over the same tokens.

Measures, on whatever device it runs (CUDA if present, else CPU):
  - BF16 forward time over the calibration tokens (the floor calibration cannot beat),
  - calibration wall time per recipe (ModelOpt's mtq.quantize with the launcher's recipe configs),
    after a warm-up quantization of a one-layer model that pays ModelOpt's one-time CUDA extension builds,
  - the fake-quantized forward over the same tokens, peak GPU memory, export time and size,
  - calibration/forward ratio against batch size, and a profile of where calibration time goes.

Weights are random with the real model's shapes: timings depend on shapes, not values.

    python bench/calibration.py --shape smollm2-135m --out bench/results/calibration-<device>.json
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ptq.plan import choose_awq_block_size  # noqa: E402
from ptq.recipes import build_quant_config  # noqa: E402
from ptq.schema import register_schemas  # noqa: E402

SHAPES = {
    # hidden, intermediate, layers, heads, kv heads, vocab (published model configs)
    "smollm2-135m": dict(
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        vocab_size=49152,
        tie_word_embeddings=True,
    ),
    "llama3.2-1b": dict(
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        tie_word_embeddings=True,
    ),
    "llama3.1-8b": dict(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        tie_word_embeddings=False,
        rope_theta=500000.0,
    ),
}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def build_model(shape: str, device, dtype, layers=None):
    from transformers import LlamaConfig, LlamaForCausalLM

    kwargs = dict(SHAPES[shape], max_position_embeddings=4096)
    if layers:
        kwargs["num_hidden_layers"] = layers
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**kwargs)).to(device=device, dtype=dtype).eval()
    model.config.architectures = ["LlamaForCausalLM"]
    return model


@torch.no_grad()
def forward_all(model, tokens, batch_size, device):
    for batch in tokens.split(batch_size):
        model(batch.to(device))


def timed(fn, device):
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def recipe_config(recipe: str, hardware: str, shape: str):
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    register_schemas()
    conf = Path(__file__).resolve().parents[1] / "conf"
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        cfg = OmegaConf.to_object(compose(config_name="config", overrides=[f"recipe={recipe}", f"hardware={hardware}"]))
    widths = sorted({SHAPES[shape]["hidden_size"], SHAPES[shape]["intermediate_size"]})
    block = choose_awq_block_size(cfg.recipe.awq_block_size, widths, shape) if cfg.recipe.awq else None
    return build_quant_config(cfg.recipe, list(cfg.model.exclude_modules), block), block


def calibrate(model, quant_cfg, tokens, batch_size, device):
    import modelopt.torch.quantization as mtq

    def loop(m):
        forward_all(m, tokens, batch_size, device)

    with torch.no_grad():
        return timed(lambda: mtq.quantize(model, quant_cfg, loop), device)


def versions():
    from importlib import metadata

    out = {"python": platform.python_version()}
    for name in ("torch", "transformers", "nvidia-modelopt"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def profile_calibration(base, quant_cfg, tokens, batch_size, device):
    """Where calibration time goes: host-side op counts and CPU vs device time."""
    import modelopt.torch.quantization as mtq
    from torch.profiler import ProfilerActivity, profile

    model = copy.deepcopy(base)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof, torch.no_grad():
        mtq.quantize(model, quant_cfg, lambda m: forward_all(m, tokens, batch_size, device))
    events = prof.key_averages()
    by_cpu = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:12]
    count = {e.key: e.count for e in events}
    device_total = sum(getattr(e, "self_device_time_total", 0) for e in events) / 1e6
    return {
        "batches": -(-tokens.shape[0] // batch_size),
        "aten_item_calls": count.get("aten::item", 0),
        "aten_local_scalar_dense_calls": count.get("aten::_local_scalar_dense", 0),
        "cuda_launches": count.get("cudaLaunchKernel", 0) + count.get("cuLaunchKernel", 0),
        "self_cpu_s": round(sum(e.self_cpu_time_total for e in events) / 1e6, 3),
        "self_device_s": round(device_total, 3),
        "top_self_cpu_ops": [
            {"op": e.key, "calls": e.count, "self_cpu_ms": round(e.self_cpu_time_total / 1e3, 1)} for e in by_cpu
        ],
    }


def markdown(result) -> str:
    env = result["environment"]
    lines = [
        f"# Calibration cost vs one BF16 forward pass — {env['device']}",
        "",
        f"Shape {result['shape']} (random weights), {result['samples']} x {result['seq_len']} calibration tokens, "
        f"batch {result['batch_size']}; torch {env['versions']['torch']}, transformers {env['versions']['transformers']}, "
        f"nvidia-modelopt {env['versions']['nvidia-modelopt']}.",
        "",
        f"BF16 forward over all calibration tokens: {result['bf16_forward_s']:.3f} s.",
        "",
        "| recipe | calibrate s | vs BF16 forward | fake-quant forward vs BF16 | first-use warm-up s | peak GPU GiB | export s | export MB | error |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in result["recipes"]:
        if "error" in row:
            lines.append(f"| {row['recipe']} | – | – | – | – | – | – | – | {row['error'][:80]} |")
            continue
        lines.append(
            f"| {row['recipe']} | {row['calibrate_s']:.2f} | {row['calibrate_vs_forward']:.1f}x | {row['fake_quant_forward_vs_bf16']:.1f}x "
            f"| {row['warmup_s']:.1f} | {row['peak_gpu_gib']:.2f} | {row['export_s']:.2f} | {row['export_mb']:.0f} | {row.get('export_error', '')[:60]} |"
        )
    if result.get("batch_sweep"):
        lines += [
            "",
            "## Calibration / forward ratio against batch size",
            "",
            "| recipe | batch | BF16 forward s | calibrate s | ratio |",
            "|---|---|---|---|---|",
        ]
        for row in result["batch_sweep"]:
            lines.append(
                f"| {row['recipe']} | {row['batch_size']} | {row['bf16_forward_s']:.3f} | {row['calibrate_s']:.3f} | {row['ratio']:.1f}x |"
            )
    if result.get("profile"):
        p = result["profile"]
        lines += [
            "",
            f"## Where {p['recipe']} calibration time goes (batch {p['batch_size']})",
            "",
            f"{p['batches']} batches; {p['aten_item_calls']} `aten::item` device-to-host reads, "
            f"{p['cuda_launches']} kernel launches; self CPU time {p['self_cpu_s']} s vs device time {p['self_device_s']} s.",
            "",
            "| op | calls | self CPU ms |",
            "|---|---|---|",
        ]
        lines += [f"| {o['op']} | {o['calls']} | {o['self_cpu_ms']} |" for o in p["top_self_cpu_ops"]]
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", default="smollm2-135m", choices=sorted(SHAPES))
    parser.add_argument("--recipes", default="fp8,int8_sq,int4_awq,w4a8_awq,nvfp4,nvfp4_awq")
    parser.add_argument("--samples", type=int, default=512)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--sweep-recipes", default="fp8,nvfp4")
    parser.add_argument("--sweep-batches", default="8,32,128,512")
    parser.add_argument("--profile-recipe", default="fp8")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    hardware = "h100" if device.type == "cuda" else "cpu"
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "shape": args.shape,
        "samples": args.samples,
        "seq_len": args.seq_len,
        "batch_size": args.batch_size,
        "environment": {
            "device": torch.cuda.get_device_name(0) if device.type == "cuda" else f"CPU ({os.cpu_count()} cores)",
            "versions": versions(),
            "host_cpus": os.cpu_count(),
        },
        "recipes": [],
        "batch_sweep": [],
    }

    def save():
        out.write_text(json.dumps(result, indent=2) + "\n")
        out.with_suffix(".md").write_text(markdown(result))

    base = build_model(args.shape, device, dtype)
    tiny = build_model(args.shape, device, dtype, layers=1)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, SHAPES[args.shape]["vocab_size"], (args.samples, args.seq_len), generator=gen)
    forward_all(base, tokens[: args.batch_size], args.batch_size, device)  # warm up kernels
    fwd = [timed(lambda: forward_all(base, tokens, args.batch_size, device), device) for _ in range(3)]
    result["bf16_forward_s"] = statistics.median(fwd)
    save()

    from modelopt.torch.export import export_hf_checkpoint

    for recipe in [r for r in args.recipes.split(",") if r]:
        row = {"recipe": recipe}
        try:
            quant_cfg, block = recipe_config(recipe, hardware, args.shape)
            row["awq_block_size"] = block
            # ModelOpt builds its CUDA extensions on the first fake-quantized forward of a format,
            # not during max calibration: pay both on a one-layer model before timing.
            warm = copy.deepcopy(tiny)
            row["warmup_s"] = calibrate(warm, quant_cfg, tokens[:2, :64], 2, device) + timed(
                lambda: forward_all(warm, tokens[:2, :64], 2, device), device
            )
            warm = None
            model = copy.deepcopy(base)
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            row["calibrate_s"] = calibrate(model, quant_cfg, tokens, args.batch_size, device)
            row["peak_gpu_gib"] = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else 0.0
            row["calibrate_vs_forward"] = row["calibrate_s"] / result["bf16_forward_s"]
            fq = timed(lambda: forward_all(model, tokens, args.batch_size, device), device)
            row["fake_quant_forward_vs_bf16"] = fq / result["bf16_forward_s"]
            with tempfile.TemporaryDirectory() as tmp:
                try:
                    row["export_s"] = timed(
                        lambda: export_hf_checkpoint(model, dtype=torch.bfloat16, export_dir=tmp), device
                    )
                    row["export_mb"] = sum(p.stat().st_size for p in Path(tmp).glob("*.safetensors")) / 2**20
                except Exception as exc:  # recorded, not fatal: the table shows which exports fail
                    row["export_s"], row["export_mb"] = 0.0, 0.0
                    row["export_error"] = f"{type(exc).__name__}: {exc}"
            model = None
        except Exception as exc:
            row["error"] = f"{type(exc).__name__}: {exc}"
        result["recipes"].append(row)
        print(json.dumps(row), flush=True)
        save()

    for recipe in [r for r in args.sweep_recipes.split(",") if r]:
        quant_cfg, _ = recipe_config(recipe, hardware, args.shape)
        for bs in [int(b) for b in args.sweep_batches.split(",")]:
            try:
                f = timed(lambda: forward_all(base, tokens, bs, device), device)
                c = calibrate(copy.deepcopy(base), quant_cfg, tokens, bs, device)
                row = {"recipe": recipe, "batch_size": bs, "bf16_forward_s": f, "calibrate_s": c, "ratio": c / f}
            except torch.cuda.OutOfMemoryError:
                row = {
                    "recipe": recipe,
                    "batch_size": bs,
                    "bf16_forward_s": float("nan"),
                    "calibrate_s": float("nan"),
                    "ratio": float("nan"),
                }
                torch.cuda.empty_cache()
            result["batch_sweep"].append(row)
            print(json.dumps(row), flush=True)
            save()

    if args.profile_recipe:
        quant_cfg, _ = recipe_config(args.profile_recipe, hardware, args.shape)
        result["profile"] = {
            "recipe": args.profile_recipe,
            "batch_size": args.batch_size,
            **profile_calibration(base, quant_cfg, tokens, args.batch_size, device),
        }
        save()
    print(markdown(result))


if __name__ == "__main__":
    main()
