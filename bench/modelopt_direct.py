"""One quantization point with ModelOpt called directly, as a user without the launcher writes it.

Load the BF16 checkpoint onto the GPU, cut a text file into `samples` x `seq_len` calibration tokens, find the
calibration batch with ModelOpt's own probe (as the launcher does), `mtq.quantize` with the recipe's ModelOpt
config (lm_head left in BF16, as the launcher's default exclusions do), `export_hf_checkpoint`. No fidelity, no
evaluation, no record: the floor the launcher's own costs are measured against (bench/speed_gpu.sh `direct`).

    python -m bench.modelopt_direct --model DIR --text FILE --recipe fp8 --out DIR [--samples 256 --seq-len 512]

Prints one JSON line of stage times (each closed by a CUDA synchronisation); the process's wall time, imports
included, is what the caller measures.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch

CONFIGS = {"fp8": "FP8_DEFAULT_CFG", "nvfp4": "NVFP4_DEFAULT_CFG"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--text", required=True)
    parser.add_argument("--recipe", choices=sorted(CONFIGS), default="fp8")
    parser.add_argument("--out", required=True)
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--seq-len", type=int, default=512)
    args = parser.parse_args()

    stages = {}
    mark = time.perf_counter()

    def stage(name):
        nonlocal mark
        torch.cuda.synchronize()
        now = time.perf_counter()
        stages[name] = round(now - mark, 2)
        mark = now

    import copy

    import modelopt.torch.quantization as mtq
    from modelopt.torch.export import export_hf_checkpoint
    from modelopt.torch.utils.dataset_utils import get_max_batch_size
    from transformers import AutoModelForCausalLM, AutoTokenizer

    stage("imports")

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16, device_map="cuda").eval()
    stage("load")

    ids = tokenizer(Path(args.text).read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"]
    calib = torch.tensor(ids[: args.samples * args.seq_len]).view(args.samples, args.seq_len)
    stage("tokenize")

    batch = max(1, min(get_max_batch_size(model, max_sample_length=args.seq_len), args.samples))
    stage("batch_probe")

    config = copy.deepcopy(getattr(mtq, CONFIGS[args.recipe]))
    config["quant_cfg"].append({"quantizer_name": "*lm_head*", "enable": False})

    def forward_loop(m):
        with torch.no_grad():
            for rows in calib.split(batch):
                m(rows.cuda())

    mtq.quantize(model, config, forward_loop)
    stage("calibrate")

    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    with torch.inference_mode():
        export_hf_checkpoint(model, export_dir=str(out))
    tokenizer.save_pretrained(out)
    stage("export")
    print(json.dumps({"recipe": args.recipe, "calib_batch_size": batch, "stages_s": stages}))


if __name__ == "__main__":
    main()
