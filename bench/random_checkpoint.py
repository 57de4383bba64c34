"""Write a random-weight Hugging Face checkpoint with a real model's shape.

    python -m bench.random_checkpoint --shape llama3.2-1b --tokenizer TOKENIZER_DIR --out DIR
    python -m bench.random_checkpoint --shape nemotron3-nano-30b-a3b --tokenizer TOKENIZER_DIR --out DIR
    python -m bench.random_checkpoint --list          # every shape with its parameter count

Timings, memory and code paths depend on shapes, not on weight values, so benchmarks of large shapes need
no download. Random weights say nothing about accuracy. The tokenizer (any Hugging Face folder, e.g. the
converted SmolLM2) only turns the calibration and fidelity text into ids below the shape's vocabulary size.
The folder is written under a temporary name and renamed when complete; an existing complete folder is kept.

Dense Llama shapes come from bench/calibration.py's SHAPES. The Mixture-of-Experts and hybrid shapes below
take their dimensions from the published configurations (Nemotron 3 Nano 30B-A3B: Megatron-Bridge's
`Nemotron3NanoProvider`; Qwen3-30B-A3B: its config.json); the `-tiny` shapes keep each family's layer kinds
(Mamba-2, attention, routed + shared experts, router) at widths a 2-core CPU quantizes in seconds.
"""

from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path

import torch

from bench.calibration import SHAPES as DENSE_SHAPES
from bench.calibration import build_model as build_dense_model

COMPLETE = ".complete"

# Nemotron 3 Nano's layer pattern: M = Mamba-2, E = MoE, * = attention (23 M + 23 E + 6 *).
NANO_PATTERN = "MEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEMEM*EMEMEMEME"

MOE_SHAPES = {
    "nemotron3-nano-30b-a3b": (
        "nemotron_h",
        dict(
            hybrid_override_pattern=NANO_PATTERN,
            hidden_size=2688,
            vocab_size=131072,
            tie_word_embeddings=False,
            num_attention_heads=32,
            num_key_value_heads=2,
            head_dim=128,
            mamba_num_heads=64,
            mamba_head_dim=64,
            ssm_state_size=128,
            n_groups=8,
            conv_kernel=4,
            chunk_size=128,
            n_routed_experts=128,
            n_shared_experts=1,
            num_experts_per_tok=6,
            moe_intermediate_size=1856,
            moe_shared_expert_intermediate_size=3712,
            intermediate_size=1856,
            routed_scaling_factor=2.5,
            n_group=1,
            topk_group=1,
            norm_topk_prob=True,
            max_position_embeddings=8192,
        ),
    ),
    # Nano's widths and experts, its first 13 layers (6 Mamba-2, 5 MoE, 2 attention; 7.3 B parameters): the same
    # per-layer work on a GPU of 80 GB, for timings per layer and every recipe's code path at full width.
    "nemotron3-nano-13layers": ("nemotron_h", None),
    # Same layer kinds in the same order of appearance, 16 routed experts (2 active), small widths.
    "nemotron3-nano-tiny": (
        "nemotron_h",
        dict(
            hybrid_override_pattern="MEM*EME",
            hidden_size=256,
            vocab_size=49152,
            tie_word_embeddings=False,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=64,
            mamba_num_heads=8,
            mamba_head_dim=32,
            ssm_state_size=16,
            n_groups=2,
            conv_kernel=4,
            chunk_size=64,
            n_routed_experts=16,
            n_shared_experts=1,
            num_experts_per_tok=2,
            moe_intermediate_size=128,
            moe_shared_expert_intermediate_size=256,
            intermediate_size=256,
            routed_scaling_factor=2.5,
            n_group=1,
            topk_group=1,
            norm_topk_prob=True,
            max_position_embeddings=4096,
        ),
    ),
    "qwen3-30b-a3b": (
        "qwen3_moe",
        dict(
            hidden_size=2048,
            intermediate_size=6144,
            moe_intermediate_size=768,
            num_hidden_layers=48,
            num_attention_heads=32,
            num_key_value_heads=4,
            head_dim=128,
            num_experts=128,
            num_experts_per_tok=8,
            norm_topk_prob=True,
            vocab_size=151936,
            tie_word_embeddings=False,
            rope_theta=1000000.0,
            max_position_embeddings=40960,
        ),
    ),
    "qwen3-moe-tiny": (
        "qwen3_moe",
        dict(
            hidden_size=256,
            intermediate_size=512,
            moe_intermediate_size=128,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=64,
            num_experts=16,
            num_experts_per_tok=4,
            norm_topk_prob=True,
            vocab_size=49152,
            tie_word_embeddings=False,
            max_position_embeddings=4096,
        ),
    ),
}

MOE_SHAPES["nemotron3-nano-13layers"] = (
    "nemotron_h",
    dict(MOE_SHAPES["nemotron3-nano-30b-a3b"][1], hybrid_override_pattern=NANO_PATTERN[:13]),
)

SHAPES = sorted(set(DENSE_SHAPES) | set(MOE_SHAPES))


def vocab_size(shape: str) -> int:
    return MOE_SHAPES[shape][1]["vocab_size"] if shape in MOE_SHAPES else DENSE_SHAPES[shape]["vocab_size"]


def moe_config(shape: str):
    """The transformers config of a Mixture-of-Experts or hybrid shape (no weights)."""
    from transformers import AutoConfig

    model_type, kwargs = MOE_SHAPES[shape]
    config = AutoConfig.for_model(model_type, **kwargs)
    if model_type == "nemotron_h":
        # The pure-PyTorch Mamba-2 path; the CUDA kernels (mamba-ssm) are optional and not installed.
        config.use_mamba_kernels = False
    return config


def build_model(shape: str, device, dtype=torch.bfloat16):
    """A randomly initialised model of `shape` (seed 0), built directly on `device`."""
    if shape not in MOE_SHAPES:
        return build_dense_model(shape, device, dtype)
    from transformers import AutoModelForCausalLM

    config = moe_config(shape)
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    finally:
        torch.set_default_dtype(previous)
    model.config.architectures = [type(model).__name__]
    return model.eval()


def parameter_count(shape: str) -> int:
    """Parameters of `shape`, counted on the meta device (nothing allocated)."""
    with torch.device("meta"):
        model = build_model(shape, "meta") if shape in MOE_SHAPES else None
    if model is None:
        from transformers import LlamaConfig, LlamaForCausalLM

        with torch.device("meta"):
            model = LlamaForCausalLM(LlamaConfig(**DENSE_SHAPES[shape]))
    return sum(p.numel() for p in model.parameters())


def write(shape: str, tokenizer_dir: str, out: str, device: str) -> Path:
    from transformers import AutoTokenizer

    target = Path(out)
    if (target / COMPLETE).exists():
        return target
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    if len(tokenizer) > vocab_size(shape):
        raise SystemExit(
            f"the tokenizer of {tokenizer_dir} has {len(tokenizer)} tokens, more than {shape}'s vocabulary"
        )
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
    parser.add_argument("--shape", choices=SHAPES)
    parser.add_argument("--tokenizer")
    parser.add_argument("--out")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--list", action="store_true", help="print every shape and its parameter count")
    args = parser.parse_args()
    if args.list:
        for shape in SHAPES:
            print(f"{shape:28s} {parameter_count(shape) / 1e9:8.3f} B parameters")
        return
    if not (args.shape and args.tokenizer and args.out):
        parser.error("--shape, --tokenizer and --out are needed (or --list)")
    print(write(args.shape, args.tokenizer, args.out, args.device))


if __name__ == "__main__":
    main()
