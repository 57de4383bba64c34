"""ptq/formats.py is plain data so that planning never imports ModelOpt; these tests tie it to the installed
ModelOpt, so an upgrade that renames or drops a format fails here rather than in a run."""

from __future__ import annotations

import inspect
import re

import modelopt.torch.export.model_config as model_config
import modelopt.torch.export.quant_utils as quant_utils
import modelopt.torch.quantization as mtq

from ptq.formats import (
    CANDIDATES,
    EXPORT_FORMATS,
    KV_CACHE_CONFIGS,
    KV_CACHE_EXPORTS,
    KV_CACHE_FORMATS,
    MIXED_PRECISION,
    export_algos,
)


def modelopt_quant_algos() -> set:
    """Every quant_algo the installed ModelOpt's export can write into hf_quant_config.json."""
    named = set(re.findall(r'"quant_algo":\s*"([A-Z0-9_]+)"', inspect.getsource(quant_utils)))
    constants = {v.upper() for k, v in vars(model_config).items() if k.startswith("QUANTIZATION_") and v}
    return named | constants


def test_every_export_format_is_one_modelopt_writes():
    written = modelopt_quant_algos()
    assert MIXED_PRECISION in inspect.getsource(quant_utils)
    assert set(EXPORT_FORMATS) <= written, sorted(set(EXPORT_FORMATS) - written)


def test_the_formats_the_plan_and_the_read_back_name_exist():
    assert {name for name in KV_CACHE_CONFIGS.values() if not isinstance(getattr(mtq, name, None), dict)} == set()
    # Every KV-cache choice has its format and the kv_cache_quant_algo the export names, one of ModelOpt's.
    assert set(KV_CACHE_CONFIGS) == set(KV_CACHE_FORMATS) == set(KV_CACHE_EXPORTS)
    kv_names = {getattr(model_config, n) for n in dir(model_config) if n.startswith("KV_CACHE_")}
    assert set(KV_CACHE_EXPORTS.values()) <= kv_names, set(KV_CACHE_EXPORTS.values()) - kv_names
    assert {name for name in CANDIDATES if not isinstance(getattr(mtq, name, None), dict)} == set()
    # Selections by field are what exported.py and plan.py use; each picks what the table says.
    assert set(export_algos(megatron_export=True)) == {"FP8", "FP8_PB_WO", "FP8_PB_REAL", "NVFP4", "W4A16_NVFP4"}
    assert "W8A8_SQ_PER_CHANNEL" in export_algos(activation="int8", readback=True)
    assert not set(export_algos(readback=False)) & set(export_algos(activation=None, readback=True))
