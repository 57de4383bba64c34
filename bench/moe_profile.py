"""Where the forward and calibration time of a MoE or hybrid Mamba-MoE model goes, per layer kind.

    python -m bench.moe_profile --model DIR --text FILE --recipe mamba_moe_fp8_conservative --out FILE.json

Times each decoder layer's mixer (NemotronH: Mamba-2, MoE, attention; Qwen3-MoE: attention and MoE blocks) with
a device synchronisation before and after it, over the same tokens, twice: a plain BF16 forward pass, then
ModelOpt's calibration of `--recipe` (mtq.quantize with the launcher's config for it). The synchronisations add
a little time of their own; the shares, not the totals, are the result. Random weights are fine: time depends
on shapes, and routing only through how evenly tokens spread over experts.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ptq.models import mamba_path  # noqa: E402
from ptq.moe import ExpertCounter  # noqa: E402
from ptq.recipes import build_quant_config  # noqa: E402
from ptq.schema import register_schemas  # noqa: E402


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def mixers(model):
    """(kind, module) per timed part of each decoder layer."""
    config = model.config
    layers = model.model.layers
    types = getattr(config, "layers_block_type", None)
    if types:  # NemotronH: one mixer per layer, of the kind the pattern says
        names = {
            "linear_attention": "mamba",
            "mamba": "mamba",
            "moe": "moe",
            "full_attention": "attention",
            "attention": "attention",
            "mlp": "mlp",
        }
        return [(names.get(kind, kind), layer.mixer) for kind, layer in zip(types, layers)]
    parts = []
    for layer in layers:
        parts.append(("attention", layer.self_attn))
        parts.append(("moe" if hasattr(layer.mlp, "experts") else "mlp", layer.mlp))
    return parts


class KindTimer:
    def __init__(self, model, device) -> None:
        self.device, self.seconds, self._start, self._handles = device, defaultdict(float), {}, []
        for kind, module in mixers(model):
            self._handles.append(module.register_forward_pre_hook(self._pre(module)))
            self._handles.append(module.register_forward_hook(self._post(kind, module)))

    def _pre(self, module):
        def hook(*_):
            sync(self.device)
            self._start[id(module)] = time.perf_counter()

        return hook

    def _post(self, kind, module):
        def hook(*_):
            sync(self.device)
            self.seconds[kind] += time.perf_counter() - self._start.pop(id(module))

        return hook

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()

    def shares(self, total: float) -> dict:
        out = {kind: {"seconds": round(s, 3), "share": round(s / total, 4)} for kind, s in sorted(self.seconds.items())}
        out["other"] = {
            "seconds": round(total - sum(self.seconds.values()), 3),
            "share": round(1 - sum(self.seconds.values()) / total, 4),
        }
        return out


def coverage_curve(model, tokens, batch: int, device, min_tokens: int = 8) -> list:
    """Experts short of tokens after each batch of a BF16 pass: one row per sample count (what a calibration of
    that many samples, of this text, would have given each routed expert)."""
    rows = []
    with ExpertCounter(model) as counter:
        if not counter:
            return rows
        done = 0
        for chunk in tokens.split(batch):
            model(chunk.to(device))
            done += len(chunk)
            every = torch.cat([c for c in counter.counts.values()])
            rows.append(
                {
                    "samples": done,
                    "tokens": done * tokens.shape[1],
                    "experts": len(every),
                    "no_tokens": int((every == 0).sum()),
                    "below_min": int((every < min_tokens).sum()),
                    "min_tokens": min_tokens,
                    "min": int(every.min()),
                    "median": int(every.median()),
                    "max": int(every.max()),
                }
            )
    return rows


def quant_config(recipe: str, model_group: str):
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    register_schemas()
    conf = Path(__file__).resolve().parents[1] / "conf"
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        cfg = OmegaConf.to_object(compose(config_name="config", overrides=[f"recipe={recipe}", f"model={model_group}"]))
    return build_quant_config(cfg.recipe, list(cfg.model.exclude_modules), None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--text", required=True)
    parser.add_argument("--recipe", default="mamba_moe_fp8_conservative")
    parser.add_argument("--model-group", default="nemotron-3-nano-30b-a3b", help="the conf/model entry (exclusions)")
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument(
        "--coverage-samples",
        type=int,
        default=0,
        help="also count the tokens each routed expert receives in a BF16 pass over up to this many "
        "samples, snapshot after every batch (how coverage grows with calib.size)",
    )
    parser.add_argument(
        "--mamba-kernels",
        action="store_true",
        help="load with use_mamba_kernels=True: Mamba layers on mamba-ssm's and causal-conv1d's CUDA kernels",
    )
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    import modelopt.torch.quantization as mtq
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    ids = tokenizer(Path(args.text).read_text(encoding="utf-8"), return_tensors="pt").input_ids[0]
    tokens = ids[: args.samples * args.seq_len].view(args.samples, args.seq_len)
    available = len(ids) // args.seq_len
    coverage_tokens = ids[: min(args.coverage_samples, available) * args.seq_len].view(-1, args.seq_len)
    extra = {"use_mamba_kernels": True} if args.mamba_kernels else {}
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16, device_map=device.type, **extra)
    model.eval()

    def forward(m):
        for batch in tokens.split(args.batch):
            m(batch.to(device))

    result = {
        "model": args.model,
        "recipe": args.recipe,
        "samples": args.samples,
        "seq_len": args.seq_len,
        "batch": args.batch,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "versions": {"torch": torch.__version__},
        "mamba": mamba_path(model),
    }
    with torch.no_grad():
        forward(model)  # warm-up: kernels, allocator
        if len(coverage_tokens):
            result["coverage_by_samples"] = coverage_curve(model, coverage_tokens, args.batch, device)
            print("coverage", json.dumps(result["coverage_by_samples"]), flush=True)
        for label, run in (
            ("bf16_forward", lambda: forward(model)),
            ("calibrate", lambda: mtq.quantize(model, quant_config(args.recipe, args.model_group), forward)),
        ):
            timer = KindTimer(model, device)
            sync(device)
            start = time.perf_counter()
            run()
            sync(device)
            total = time.perf_counter() - start
            timer.remove()
            result[label] = {"seconds": round(total, 3), "by_kind": timer.shares(total)}
            print(label, json.dumps(result[label]), flush=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
