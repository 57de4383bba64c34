"""Evaluation throughput: tokens/s of lm-eval multiple choice on BF16 and on a fake-quantized model,
against a plain BF16 forward pass over the same number of tokens.

    python bench/evaluation_throughput.py --model-path DIR --mc-file ARC.jsonl --items 200 --out OUT.json

`--model-path` is any Hugging Face folder; `--random-shape smollm2-135m --tokenizer DIR` builds random
weights of that shape instead (throughput depends on shapes, not values).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.calibration import SHAPES, build_model, recipe_config, sync, versions  # noqa: E402
from ptq.evaluation.readers import read_multiple_choice  # noqa: E402
from ptq.evaluation.runner import run_benchmarks  # noqa: E402
from ptq.schema import BenchmarkConfig, EvalConfig  # noqa: E402


def count_tokens(tokenizer, items) -> int:
    total = 0
    for item in items:
        context = len(tokenizer(item["query"])["input_ids"])
        total += sum(context + len(tokenizer(" " + c)["input_ids"]) for c in item["choices"])
    return total


def timed_eval(model, tokenizer, cfg, work):
    sync(next(model.parameters()).device)
    start = time.perf_counter()
    rows = run_benchmarks(model, tokenizer, cfg, work, "bench")
    sync(next(model.parameters()).device)
    return time.perf_counter() - start, rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model-path")
    parser.add_argument("--random-shape", choices=sorted(SHAPES))
    parser.add_argument("--tokenizer")
    parser.add_argument("--mc-file", required=True, help="ARC-style JSONL")
    parser.add_argument("--items", type=int, default=200)
    parser.add_argument("--recipe", default="fp8")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if args.model_path:
        tokenizer = AutoTokenizer.from_pretrained(args.model_path)
        model = AutoModelForCausalLM.from_pretrained(args.model_path, dtype=dtype).to(device).eval()
    else:
        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
        model = build_model(args.random_shape, device, dtype)
    items = read_multiple_choice(Path(args.mc_file), "arc_jsonl")[: args.items]
    tokens = count_tokens(tokenizer, items)
    cfg = EvalConfig(
        enabled=True,
        limit=args.items,
        bootstrap_iters=0,
        benchmarks=[BenchmarkConfig(name="mc", kind="multiple_choice", format="arc_jsonl", path=args.mc_file)],
    )
    work = Path(os.environ.get("TMPDIR", "/tmp")) / "ptq-bench-eval"

    # Plain forward over the same token count: rows of the mean request length, batch 32.
    per_request = max(2, tokens // sum(len(i["choices"]) for i in items))
    rows = max(1, tokens // per_request)
    ids = torch.randint(0, len(tokenizer), (rows, per_request))
    with torch.no_grad():
        model(ids[:2].to(device))
        sync(device)
        start = time.perf_counter()
        for batch in ids.split(32):
            model(batch.to(device))
        sync(device)
    forward_s = time.perf_counter() - start

    bf16_s, bf16_rows = timed_eval(model, tokenizer, cfg, work)
    import modelopt.torch.quantization as mtq

    quant_cfg, _ = recipe_config(
        args.recipe, "h100" if device.type == "cuda" else "cpu", args.random_shape or "smollm2-135m"
    )
    qmodel = copy.deepcopy(model)
    with torch.no_grad():
        mtq.quantize(qmodel, quant_cfg, lambda m: m(ids[:8].to(device)))
        qmodel(ids[:2].to(device))  # builds ModelOpt's extensions outside the timing
    quant_s, quant_rows = timed_eval(qmodel, tokenizer, cfg, work)
    result = {
        "device": torch.cuda.get_device_name(0) if device.type == "cuda" else f"CPU ({os.cpu_count()} cores)",
        "versions": versions(),
        "model": args.model_path or f"random {args.random_shape}",
        "items": len(items),
        "tokens": tokens,
        "plain_forward_s": forward_s,
        "plain_forward_tok_s": tokens / forward_s,
        "bf16_eval_s": bf16_s,
        "bf16_eval_tok_s": tokens / bf16_s,
        f"{args.recipe}_eval_s": quant_s,
        f"{args.recipe}_eval_tok_s": tokens / quant_s,
        "bf16_scores": bf16_rows,
        f"{args.recipe}_scores": quant_rows,
        "host": platform.node(),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if not k.endswith("_scores")}, indent=2))


if __name__ == "__main__":
    main()
