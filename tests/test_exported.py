"""Reading an exported checkpoint back (ptq/exported/): the unpacking matches ModelOpt's packing, the model
read back holds exactly the stored numbers, a broken export is caught (by the full read-back and by the cheaper
stored-weight check), and formats that cannot be simulated are refused with a clear message."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import compose_run, small_run_overrides
from safetensors.torch import load_file, save_file

from ptq.errors import ConfigError
from ptq.exported.dequantize import dequantize_weight, nvfp4_fake_quant, unpack_int4
from ptq.exported.reading import read_tensors, unreadable_formats
from ptq.exported.simulation import load_exported
from ptq.exported.stored_weights import check_stored_weights
from ptq.run import run
from ptq.validate import export_fidelity_problems


def test_int4_unpacking_inverts_modelopts_export_packing():
    from modelopt.torch.export.quant_utils import pack_int4_in_uint8

    torch.manual_seed(0)
    weight = torch.randn(6, 8)
    scale = weight.reshape(6, 2, 4).abs().amax(-1) / 7  # block 4
    packed = pack_int4_in_uint8(weight, scale, 4)
    assert packed.shape == (3, 8) and packed.dtype == torch.uint8
    codes = (weight / scale.repeat_interleave(4, 1)).round().clamp(-8, 7)
    assert torch.equal(unpack_int4(packed).float(), codes)
    restored = dequantize_weight("W4A16_AWQ", {"weight": packed, "weight_scale": scale}, 4, torch.float32)
    assert torch.allclose(restored, codes * scale.repeat_interleave(4, 1))


def test_fp8_block_scales_match_modelopts_blockwise_quantization():
    from modelopt.torch.quantization.qtensor import FP8QTensor

    torch.manual_seed(0)
    weight = torch.randn(200, 300)  # neither side a multiple of 128: the edge tiles are partial
    packed, scale = FP8QTensor.quantize(weight, block_sizes={-1: 128, -2: 128})
    assert tuple(scale.shape) == (2, 3)
    mine = dequantize_weight(
        "FP8_PB_WO", {"weight": packed._quantized_data, "weight_scale": scale}, None, torch.float32
    )
    theirs = packed.dequantize(torch.float32, scale=scale, block_sizes={-1: 128, -2: 128})
    assert torch.equal(mine, theirs)
    assert 0 < (mine - weight).norm() / weight.norm() < 0.05


def _as_bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}[t.dtype])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_nvfp4_weights_dequantize_to_the_bits_of_modelopts_nvfp4_tensor(dtype):
    from modelopt.torch.quantization.qtensor import NVFP4QTensor

    torch.manual_seed(0)
    weight = torch.randn(48, 256) * torch.logspace(-2, 2, 256)  # blocks of very different ranges
    weight[3, :16] = 0  # an all-zero block
    packed, scale, scale_2 = NVFP4QTensor.quantize(weight, 16)
    assert packed._quantized_data.shape == (48, 128) and scale.dtype == torch.float8_e4m3fn
    stored = {"weight": packed._quantized_data, "weight_scale": scale, "weight_scale_2": scale_2}
    mine = dequantize_weight("NVFP4", stored, 16, dtype)
    theirs = packed.dequantize(dtype=dtype, scale=scale, double_scale=scale_2, block_sizes={-1: 16})
    assert torch.equal(_as_bits(mine), _as_bits(theirs))
    assert 0 < (mine.float() - weight).norm() / weight.norm() < 0.15


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_nvfp4_activation_quantization_gives_the_bits_of_modelopts(dtype):
    from modelopt.torch.quantization.qtensor import NVFP4QTensor

    torch.manual_seed(1)
    x = torch.randn(3, 5, 64) * torch.logspace(-3, 3, 64)
    x[0, 0, :16] = 0  # all-zero block: its scale is 1
    x[1, 1, :16] = torch.tensor([6, 0.75, 1.75, 3.5, -0.75, -1.75, -3.5, 0.25, 1.25, 2.5, 5, -5, 0.1, -0.1, 4.9, 5.1])
    x = x.to(dtype)
    global_scale = torch.tensor(1.0 / 448)  # the 6-wide tie block gets an exact scale of 1 (ties stay ties)
    mine = nvfp4_fake_quant(x, global_scale, 16)
    q, scale, scale_2 = NVFP4QTensor.quantize(x.float(), 16, weights_scaling_factor_2=global_scale)
    theirs = q.dequantize(dtype=dtype, scale=scale, double_scale=scale_2, block_sizes={-1: 16})
    assert mine.dtype == dtype and torch.equal(_as_bits(mine), _as_bits(theirs))
    ties = mine[1, 1].float().tolist()
    assert ties[1:7] == [1.0, 2.0, 4.0, -1.0, -2.0, -4.0]  # 0.75, 1.75, 3.5 round to the even code, upwards


def _export(model_dir: Path, modelopt_cfg: str, out: Path) -> Path:
    """`model_dir` quantized by ModelOpt with `modelopt_cfg` (CPU, float32, lm_head excluded) and exported."""
    import copy

    import modelopt.torch.quantization as mtq
    from modelopt.torch.export import export_hf_checkpoint
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    cfg = copy.deepcopy(getattr(mtq, modelopt_cfg))
    cfg["quant_cfg"].append({"quantizer_name": "*lm_head*", "enable": False})
    tokens = torch.randint(0, model.config.vocab_size, (4, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        mtq.quantize(model, cfg, lambda m: m(tokens))
    export_hf_checkpoint(model, dtype=torch.bfloat16, export_dir=str(out))
    return out


@pytest.fixture(scope="module")
def tiny_exports(tiny_llama_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tiny-exports")
    return {
        cfg: _export(tiny_llama_dir, cfg, tmp / cfg)
        for cfg in ("FP8_DEFAULT_CFG", "NVFP4_DEFAULT_CFG", "INT4_AWQ_CFG", "FP8_PER_CHANNEL_PER_TOKEN_CFG")
    }


def test_the_model_read_back_holds_exactly_the_stored_numbers(tiny_exports, tiny_llama_dir):
    from modelopt.torch.quantization.qtensor import NVFP4QTensor

    export = tiny_exports["NVFP4_DEFAULT_CFG"]
    model, _, sim = load_exported(export, "cpu", torch.bfloat16, tokenizer_from=str(tiny_llama_dir))
    assert sim.summary()["formats"] == {"NVFP4": 14}
    stored = read_tensors(export)
    params = dict(model.named_parameters())
    for name in sim.layers:  # quantized: ModelOpt's own dequantization of the stored codes and scales
        codes, scale, scale_2 = (stored[f"{name}.{leaf}"] for leaf in ("weight", "weight_scale", "weight_scale_2"))
        expected = NVFP4QTensor(torch.Size([codes.shape[0], codes.shape[1] * 2]), torch.float32, codes).dequantize(
            dtype=torch.bfloat16, scale=scale, double_scale=scale_2, block_sizes={-1: 16}
        )
        assert torch.equal(params[f"{name}.weight"], expected), name
    plain = [n for n in stored if n.rpartition(".")[0] not in sim.layers]
    assert "model.embed_tokens.weight" in plain and "lm_head.weight" in plain
    for name in plain:  # everything else: the stored tensor itself, nothing left as initialised
        assert torch.equal(params[name], stored[name]), name
    tokens = torch.randint(0, 100, (1, 12))
    with torch.no_grad():
        assert torch.isfinite(model(tokens).logits).all()


@pytest.mark.parametrize("cfg, changed", [("FP8_DEFAULT_CFG", "weight_scale"), ("NVFP4_DEFAULT_CFG", "weight_scale_2")])
def test_the_stored_weight_check_passes_an_export_and_names_a_layer_with_a_wrong_scale(
    tiny_exports, tiny_llama_dir, tmp_path, cfg, changed
):
    good = check_stored_weights(tiny_exports[cfg], tiny_llama_dir)
    algo = "FP8" if cfg.startswith("FP8") else "NVFP4"
    assert good["applicable"] and good["problems"] == []
    assert good["layers"] == 14 and good["formats"] == {algo: 14} and good["input_scales"] == 14
    assert 0 < good["max_relative_error"][algo] < (0.05 if algo == "FP8" else 0.15)
    assert 0.95 < good["gain"][0] <= good["gain"][1] < 1.05
    assert good["plain_tensors"] == 7  # embeddings, lm_head, five norms

    broken = tmp_path / "broken"
    shutil.copytree(tiny_exports[cfg], broken)
    tensors = load_file(str(broken / "model.safetensors"))
    name = f"model.layers.1.mlp.down_proj.{changed}"
    tensors[name] = (tensors[name].float() * 4).to(tensors[name].dtype)  # a scale 4x too large
    tensors["model.norm.weight"] = tensors["model.norm.weight"] * 1.1  # and a plain tensor that is not the source's
    save_file(tensors, str(broken / "model.safetensors"), metadata={"format": "pt"})
    bad = check_stored_weights(broken, tiny_llama_dir)
    assert len(bad["problems"]) == 2
    found = re.match(
        rf"model.layers.1.mlp.down_proj \({algo}\): the stored weight is ([0-9.]+) x the source", bad["problems"][0]
    )
    assert found and 3.9 < float(found.group(1)) < 4.1, bad["problems"][0]
    assert bad["problems"][1].startswith("model.norm.weight is stored unquantized but differs from the source")


def test_the_stored_weight_check_leaves_smoothed_exports_to_the_full_read_back(tiny_exports, tiny_llama_dir):
    result = check_stored_weights(tiny_exports["INT4_AWQ_CFG"], tiny_llama_dir)
    assert not result["applicable"] and "W4A16_AWQ" in result["reason"] and result["problems"] == []


def test_export_fidelity_check_flags_a_checkpoint_worse_than_the_model_in_memory():
    good = {"mean_kl": 0.05, "exported_checkpoint": {"mean_kl": 0.06}}
    bad = {"mean_kl": 0.05, "exported_checkpoint": {"mean_kl": 0.4}}
    assert export_fidelity_problems(good, 1.5) == []
    (problem,) = export_fidelity_problems(bad, 1.5)
    assert "0.4000" in problem and "do not reproduce" in problem
    assert export_fidelity_problems({"mean_kl": 0.05}, 1.5) == []  # not measured: nothing to judge
    checked = {"mean_kl": 0.05, "exported_checkpoint": {"check": "stored weights", "problems": ["layer x: 4.0 x"]}}
    assert export_fidelity_problems(checked, 1.5) == ["stored-weight check: layer x: 4.0 x"]


@pytest.fixture(scope="module")
def fp8_checkpoint(smollm2_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("exported")
    cfg, config = compose_run(small_run_overrides(tmp, "recipe=fp8"))
    record = run(cfg, config)
    assert record["status"] == "finished", record.get("error")
    return Path(record["checkpoint"])


def _logprobs(model, tokens):
    with torch.no_grad():
        return F.log_softmax(model(tokens).logits.float(), -1)


@pytest.mark.slow
def test_corrupted_scales_are_visible_in_the_read_back_model(fp8_checkpoint, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(fp8_checkpoint, broken)
    tensors = load_file(str(broken / "model.safetensors"))
    # One layer's scale wrong by 4x: what a wrong amax or a mixed-up tensor name would write.
    tensors["model.layers.3.mlp.down_proj.weight_scale"] *= 4
    save_file(tensors, str(broken / "model.safetensors"), metadata={"format": "pt"})

    model, tokenizer, sim = load_exported(fp8_checkpoint, "cpu", torch.float32)
    assert sim.summary()["formats"] == {"FP8": 210}
    tokens = tokenizer(
        "The capital of France is Paris. The river that flows through it is the", return_tensors="pt"
    ).input_ids
    good = _logprobs(model, tokens)
    bad_model, _, _ = load_exported(broken, "cpu", torch.float32)
    bad = _logprobs(bad_model, tokens)
    kl = (good.exp() * (good - bad)).sum(-1).mean().item()
    assert kl > 0.05, kl


def test_per_token_activations_store_no_input_scale_and_pass_the_stored_weight_check(tiny_exports, tiny_llama_dir):
    """FP8_PER_CHANNEL_PER_TOKEN scales activations per token at run time: no input_scale is stored or asked for
    (an H200 run of recipe=fp8_pc_pt failed validation on exactly this before)."""
    result = check_stored_weights(tiny_exports["FP8_PER_CHANNEL_PER_TOKEN_CFG"], tiny_llama_dir)
    assert result["applicable"] and result["problems"] == [], result
    assert result["formats"] == {"FP8_PER_CHANNEL_PER_TOKEN": 14} and result["input_scales"] == 0
    assert 0 < result["max_relative_error"]["FP8_PER_CHANNEL_PER_TOKEN"] < 0.08


def mxfp8_named(checkpoint: Path, tmp_path: Path) -> Path:
    """A copy of `checkpoint` whose hf_quant_config.json names MXFP8, a format the read-back cannot compute with."""
    other = tmp_path / "mx"
    shutil.copytree(checkpoint, other)
    quant = json.loads((other / "hf_quant_config.json").read_text())
    quant["quantization"]["quant_algo"] = "MXFP8"
    (other / "hf_quant_config.json").write_text(json.dumps(quant))
    return other


def test_formats_that_cannot_be_read_back_are_named_and_left_unchecked(fp8_checkpoint, tmp_path):
    other = mxfp8_named(fp8_checkpoint, tmp_path)
    assert unreadable_formats(other) == ["MXFP8"] and unreadable_formats(fp8_checkpoint) == []
    unchecked = {"mean_kl": 0.1, "exported_checkpoint": {"check": "none", "reason": "MXFP8 cannot be read back"}}
    assert export_fidelity_problems(unchecked, 1.5) == []


def test_formats_that_cannot_be_simulated_are_refused(fp8_checkpoint, tmp_path):
    other = mxfp8_named(fp8_checkpoint, tmp_path)
    with pytest.raises(ConfigError, match="MXFP8 cannot be simulated.*serving engine"):
        load_exported(other, "cpu", torch.float32)
