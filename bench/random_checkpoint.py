"""Write a random-weight Hugging Face checkpoint with a real model's shape (bench/calibration.py's SHAPES).

    python -m bench.random_checkpoint --shape llama3.2-1b --tokenizer TOKENIZER_DIR --out DIR

Timings and parallel layouts depend on shapes, not on weight values, so benchmarks of large shapes need
no download. The tokenizer (any Hugging Face folder, e.g. the converted SmolLM2) only turns the
calibration and fidelity text into ids below the shape's vocabulary size. The folder is written under a
temporary name and renamed when complete; an existing complete folder is kept.
"""

from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path

import torch

from bench.calibration import SHAPES, build_model

COMPLETE = ".complete"


def write(shape: str, tokenizer_dir: str, out: str, device: str) -> Path:
    from transformers import AutoTokenizer

    target = Path(out)
    if (target / COMPLETE).exists():
        return target
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    if len(tokenizer) > SHAPES[shape]["vocab_size"]:
        raise SystemExit(f"the tokenizer of {tokenizer_dir} has {len(tokenizer)} tokens, more than {shape}'s vocabulary")
    model = build_model(shape, torch.device(device), torch.bfloat16)
    tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / COMPLETE).write_text(f"random weights (seed 0), shape {shape}, tokenizer from {tokenizer_dir}\n")
    shutil.rmtree(target, ignore_errors=True)
    os.rename(tmp, target)
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", required=True, choices=sorted(SHAPES))
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    print(write(args.shape, args.tokenizer, args.out, args.device))


if __name__ == "__main__":
    main()
