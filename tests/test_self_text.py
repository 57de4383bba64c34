"""Text the model writes itself (calib.dataset=self, fidelity.text=self): one sampling pass for both uses, rows
that do not depend on their batch, and a cached sample serving smaller requests and extended for larger ones."""

from __future__ import annotations

import logging

import pytest
import torch

from ptq import calib_data
from ptq.calib_data import self_sampled

pytestmark = pytest.mark.slow  # loads a (tiny) model


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(tiny_llama_dir), AutoTokenizer.from_pretrained(tiny_llama_dir)


def test_one_pass_samples_both_uses_and_the_cache_serves_smaller_requests(tiny, tmp_path, caplog, monkeypatch):
    model, tokenizer = tiny

    def sample(cache_dir, batch_size, requests):
        return self_sampled(
            model, tokenizer, model_id="tiny", cache_dir=str(cache_dir), batch_size=batch_size, requests=requests
        )

    passes = []
    real = calib_data.sample_rows
    monkeypatch.setattr(calib_data, "sample_rows", lambda *a, **k: passes.append(len(a[2])) or real(*a, **k))
    both = sample(tmp_path, 4, {"fidelity": (4321, 3, 12), "calibration": (1234, 5, 16)})
    assert passes == [8]  # one pass over the 3 + 5 rows
    assert both["fidelity"].shape == (3, 12) and both["calibration"].shape == (5, 16)
    assert not torch.equal(both["fidelity"][0], both["calibration"][0, :12])  # two streams, not one text twice

    with caplog.at_level(logging.INFO):
        smaller = sample(tmp_path, 4, {"calibration": (1234, 2, 10)})
    assert passes == [8] and "Using cached self-sampled text" in caplog.text
    assert torch.equal(smaller["calibration"], both["calibration"][:2, :10])

    # A larger request keeps the cached rows and samples only the rows after them; they are the rows a fresh
    # sampling of all seven gives, whatever the batch size (a row depends only on its seed and index).
    larger = sample(tmp_path, 3, {"calibration": (1234, 7, 16)})
    assert passes == [8, 2]
    assert torch.equal(larger["calibration"][:5], both["calibration"])
    fresh = sample(tmp_path / "fresh", 3, {"calibration": (1234, 7, 16)})
    assert passes == [8, 2, 7] and torch.equal(fresh["calibration"], larger["calibration"])
    # A longer request than the cache holds samples every row again, at the new length.
    longer = sample(tmp_path, 4, {"calibration": (1234, 7, 20)})
    assert passes == [8, 2, 7, 7] and longer["calibration"].shape == (7, 20)


def test_progress_is_logged_per_token_step(tiny, tmp_path, caplog):
    model, tokenizer = tiny
    with caplog.at_level(logging.INFO, logger="ptq.calib_data"):
        self_sampled(
            model, tokenizer, model_id="tiny", cache_dir=str(tmp_path), batch_size=2, requests={"text": (7, 2, 21)}
        )
    steps = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Sampling text:")]
    assert steps[0].startswith("Sampling text: 10% (2 of 20 token steps)") and steps[-1].startswith(
        "Sampling text: 100%"
    )
