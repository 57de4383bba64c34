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

# Vision-language shapes: (model_type, text config, vision config, top-level settings). The published ones take
# their dimensions from the models' config.json files (Qwen2.5-VL-3B-Instruct, gemma-3-4b-it); the `-tiny` ones (LLaVA:
# a CLIP tower and a Llama language model)
# keep each family's modules (vision blocks, merger or projector, language model) at widths a CPU runs in seconds.
# The special tokens that mark images are added to the tokenizer, and their ids written into the config.
VLM_SHAPES = {
    "qwen2.5-vl-3b": (
        "qwen2_5_vl",
        dict(
            vocab_size=151936,
            hidden_size=2048,
            intermediate_size=11008,
            num_hidden_layers=36,
            num_attention_heads=16,
            num_key_value_heads=2,
            max_position_embeddings=128000,
            rope_theta=1000000.0,
            rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]},
        ),
        dict(
            depth=32,
            hidden_size=1280,
            intermediate_size=3420,
            num_heads=16,
            out_hidden_size=2048,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            window_size=112,
            fullatt_block_indexes=[7, 15, 23, 31],
        ),
        dict(tie_word_embeddings=True),
    ),
    "qwen2.5-vl-tiny": (
        "qwen2_5_vl",
        dict(
            vocab_size=49280,
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=4096,
            rope_scaling={"type": "mrope", "mrope_section": [4, 6, 6]},
        ),
        dict(
            depth=2,
            hidden_size=64,
            intermediate_size=128,
            num_heads=2,
            out_hidden_size=128,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            window_size=56,
            fullatt_block_indexes=[1],
        ),
        dict(tie_word_embeddings=False),
    ),
    "gemma3-4b": (
        "gemma3",
        dict(
            vocab_size=262208,
            hidden_size=2560,
            intermediate_size=10240,
            num_hidden_layers=34,
            num_attention_heads=8,
            num_key_value_heads=4,
            head_dim=256,
            sliding_window=1024,
            max_position_embeddings=131072,
        ),
        dict(
            hidden_size=1152,
            intermediate_size=4304,
            num_hidden_layers=27,
            num_attention_heads=16,
            image_size=896,
            patch_size=14,
        ),
        dict(mm_tokens_per_image=256, tie_word_embeddings=True),
    ),
    "gemma3-vl-tiny": (
        "gemma3",
        dict(
            vocab_size=49280,
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=32,
            sliding_window=64,
            max_position_embeddings=4096,
        ),
        dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=224,
            patch_size=14,
        ),
        dict(mm_tokens_per_image=16, tie_word_embeddings=True),
    ),
    "llava-tiny": (
        "llava",
        dict(
            model_type="llama",
            vocab_size=49280,
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=2048,
        ),
        dict(
            model_type="clip_vision_model",
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=56,
            patch_size=14,
            projection_dim=64,
        ),
        dict(vision_feature_layer=-1, tie_word_embeddings=False),
    ),
}
# The tokens each family marks images with, and a chat template that places an image where its user turn has one
# (written here for the random checkpoints: the real models ship their own).
VLM_TOKENS = {
    "qwen2_5_vl": ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"],
    "gemma3": ["<start_of_image>", "<end_of_image>", "<image_soft_token>"],
    "llava": ["<image>"],
}
VLM_TEMPLATES = {
    "llava": "{% for m in messages %}{{ m['role'] }}: {% for c in m['content'] %}{% if c['type'] == 'image' %}<image>"
    "{% else %}{{ c['text'] }}{% endif %}{% endfor %}\n{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}",
    "qwen2_5_vl": "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>{% else %}{{ c['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
    "gemma3": "{{ bos_token }}{% for m in messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n"
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}<start_of_image>{% else %}{{ c['text'] }}{% endif %}"
    "{% endfor %}<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}",
}

SHAPES = sorted(set(DENSE_SHAPES) | set(MOE_SHAPES) | set(VLM_SHAPES))


def vocab_size(shape: str) -> int:
    if shape in VLM_SHAPES:
        return VLM_SHAPES[shape][1]["vocab_size"]
    return MOE_SHAPES[shape][1]["vocab_size"] if shape in MOE_SHAPES else DENSE_SHAPES[shape]["vocab_size"]


def vlm_tokenizer(shape: str, tokenizer_dir: str):
    """The tokenizer of `tokenizer_dir` with the shape's image tokens added as special tokens (Gemma 3's under the
    names its processor reads: boi_token, eoi_token, image_token), and a chat template that places images."""
    from transformers import AutoTokenizer

    model_type = VLM_SHAPES[shape][0]
    tokens = VLM_TOKENS[model_type]
    if model_type in ("gemma3", "llava"):
        names = ("boi_token", "eoi_token", "image_token") if model_type == "gemma3" else ("image_token",)
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, extra_special_tokens=dict(zip(names, tokens)))
    else:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        tokenizer.add_special_tokens({"additional_special_tokens": tokens}, replace_extra_special_tokens=False)
    tokenizer.chat_template = VLM_TEMPLATES[model_type]
    return tokenizer


def vlm_config(shape: str, tokenizer):
    """The transformers config of a vision-language shape, its image token ids taken from `tokenizer`."""
    from transformers import AutoConfig

    model_type, text, vision, top = VLM_SHAPES[shape]
    ids = [tokenizer.convert_tokens_to_ids(t) for t in VLM_TOKENS[model_type]]
    if model_type == "qwen2_5_vl":
        marks = dict(
            vision_start_token_id=ids[0], vision_end_token_id=ids[1], image_token_id=ids[2], video_token_id=ids[3]
        )
    elif model_type == "llava":
        marks = dict(image_token_index=ids[0])
    else:
        marks = dict(boi_token_index=ids[0], eoi_token_index=ids[1], image_token_index=ids[2])
    return AutoConfig.for_model(model_type, text_config=dict(text), vision_config=dict(vision), **top, **marks)


def vlm_processor(shape: str, tokenizer):
    """The shape's processor (image processor, tokenizer, chat template); for Qwen2.5-VL without torchvision, which
    its video processor needs, (image processor, None): the caller saves the parts."""
    import transformers

    model_type, _, vision, top = VLM_SHAPES[shape]
    if model_type == "gemma3":
        images = transformers.Gemma3ImageProcessor(size={"height": vision["image_size"], "width": vision["image_size"]})
        return images, transformers.Gemma3Processor(
            image_processor=images,
            tokenizer=tokenizer,
            chat_template=tokenizer.chat_template,
            image_seq_length=top["mm_tokens_per_image"],
        )
    if model_type == "llava":
        edge = vision["image_size"]
        images = transformers.CLIPImageProcessor(
            size={"shortest_edge": edge}, crop_size={"height": edge, "width": edge}
        )
        return images, transformers.LlavaProcessor(
            image_processor=images,
            tokenizer=tokenizer,
            chat_template=tokenizer.chat_template,
            patch_size=vision["patch_size"],
            vision_feature_select_strategy="default",
            num_additional_image_tokens=1,  # CLIP's class token
        )
    # Small images (at most 448 x 448 pixels: 256 vision tokens) keep calibration and tests quick.
    images = transformers.Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=448 * 448)
    try:
        return images, transformers.Qwen2_5_VLProcessor(
            image_processor=images,
            tokenizer=tokenizer,
            video_processor=transformers.Qwen2VLVideoProcessor(),
            chat_template=tokenizer.chat_template,
        )
    except ImportError:
        return images, None


def moe_config(shape: str):
    """The transformers config of a Mixture-of-Experts or hybrid shape (no weights)."""
    from transformers import AutoConfig

    model_type, kwargs = MOE_SHAPES[shape]
    config = AutoConfig.for_model(model_type, **kwargs)
    if model_type == "nemotron_h":
        # The pure-PyTorch Mamba-2 path; the CUDA kernels (mamba-ssm) are optional and not installed.
        config.use_mamba_kernels = False
    return config


def build_model(shape: str, device, dtype=torch.bfloat16, tokenizer=None):
    """A randomly initialised model of `shape` (seed 0), built directly on `device` (a vision-language shape takes
    the ids of its image tokens from `tokenizer`, vlm_tokenizer's)."""
    if shape in VLM_SHAPES:
        from transformers import AutoModelForImageTextToText

        model = _seeded(
            lambda: AutoModelForImageTextToText.from_config(vlm_config(shape, tokenizer), dtype=dtype), device, dtype
        )
        return _fill_zero_matrices(model)
    if shape not in MOE_SHAPES:
        return build_dense_model(shape, device, dtype)
    from transformers import AutoModelForCausalLM

    config = moe_config(shape)
    return _seeded(lambda: AutoModelForCausalLM.from_config(config, dtype=dtype), device, dtype)


def _fill_zero_matrices(model):
    """transformers initialises some matrices of a vision-language model to zero, which a trained checkpoint
    never holds: Gemma 3's `multi_modal_projector.mm_input_projection_weight` is one, and left at zero it cuts the
    image off from the language model (every image gives the same logits, so image-text calibration and
    fidelity would measure nothing of the image path). Such matrices get random values like the rest (normal,
    the text model's initializer_range), drawn after the seeded build: the same shape gives the same weights."""
    std = getattr(model.config.get_text_config(), "initializer_range", 0.02)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() >= 2 and not parameter.any():
                parameter.normal_(0.0, std)
    return model


def _seeded(build, device, dtype):
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = build()
    finally:
        torch.set_default_dtype(previous)
    model.config.architectures = [type(model).__name__]
    return model.eval()


class _placeholder_ids:
    """Token ids for counting a vision-language shape's parameters without a tokenizer."""

    def convert_tokens_to_ids(self, token):
        return 1


def parameter_count(shape: str) -> int:
    """Parameters of `shape`, counted on the meta device (nothing allocated)."""
    if shape in VLM_SHAPES:
        from transformers import AutoModelForImageTextToText

        with torch.device("meta"):
            model = AutoModelForImageTextToText.from_config(vlm_config(shape, _placeholder_ids()))
        return sum(p.numel() for p in model.parameters())
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
    tokenizer = (
        vlm_tokenizer(shape, tokenizer_dir) if shape in VLM_SHAPES else AutoTokenizer.from_pretrained(tokenizer_dir)
    )
    if len(tokenizer) > vocab_size(shape):
        raise SystemExit(
            f"the tokenizer of {tokenizer_dir} has {len(tokenizer)} tokens, more than {shape}'s vocabulary"
        )
    model = build_model(shape, torch.device(device), torch.bfloat16, tokenizer=tokenizer)
    tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if shape in VLM_SHAPES:
        images, processor = vlm_processor(shape, tokenizer)
        if processor is not None:
            processor.save_pretrained(tmp)
        else:  # the parts; a machine with torchvision loads them as the processor
            images.save_pretrained(tmp)
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
