"""Reading an exported checkpoint back (ptq/exported.py): the unpacking matches ModelOpt's packing, a broken
export is caught, and formats that cannot be simulated are refused with a clear message."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from conftest import compose_run, small_run_overrides
from ptq.exported import dequantize_weight, load_exported, unpack_int4
from ptq.errors import ConfigError
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
    mine = dequantize_weight("FP8_PB_WO", {"weight": packed._quantized_data, "weight_scale": scale}, None, torch.float32)
    theirs = packed.dequantize(torch.float32, scale=scale, block_sizes={-1: 128, -2: 128})
    assert torch.equal(mine, theirs)
    assert 0 < (mine - weight).norm() / weight.norm() < 0.05


def test_export_fidelity_check_flags_a_checkpoint_worse_than_the_model_in_memory():
    good = {"mean_kl": 0.05, "exported_checkpoint": {"mean_kl": 0.06}}
    bad = {"mean_kl": 0.05, "exported_checkpoint": {"mean_kl": 0.4}}
    assert export_fidelity_problems(good, 1.5) == []
    (problem,) = export_fidelity_problems(bad, 1.5)
    assert "0.4000" in problem and "do not reproduce" in problem
    assert export_fidelity_problems({"mean_kl": 0.05}, 1.5) == []  # not measured: nothing to judge


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
    tokens = tokenizer("The capital of France is Paris. The river that flows through it is the", return_tensors="pt").input_ids
    good = _logprobs(model, tokens)
    bad_model, _, _ = load_exported(broken, "cpu", torch.float32)
    bad = _logprobs(bad_model, tokens)
    kl = (good.exp() * (good - bad)).sum(-1).mean().item()
    assert kl > 0.05, kl


def test_formats_that_cannot_be_simulated_are_refused(fp8_checkpoint, tmp_path):
    other = tmp_path / "mx"
    shutil.copytree(fp8_checkpoint, other)
    quant = json.loads((other / "hf_quant_config.json").read_text())
    quant["quantization"]["quant_algo"] = "MXFP8"
    (other / "hf_quant_config.json").write_text(json.dumps(quant))
    with pytest.raises(ConfigError, match="MXFP8 cannot be simulated.*serving engine"):
        load_exported(other, "cpu", torch.float32)
