"""Fidelity figures and their uncertainty (ptq/fidelity.py), on a small language model built here: a BF16-like
reference against itself and against a perturbed copy."""

from __future__ import annotations

import math
from types import SimpleNamespace

import torch

from ptq.fidelity import compare, reference


class TinyLM(torch.nn.Module):
    """Embedding -> linear over the vocabulary: enough to have next-token distributions."""

    def __init__(self, vocab=50, width=16, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = torch.nn.Embedding(vocab, width)
        self.head = torch.nn.Linear(width, vocab)

    def forward(self, ids):
        return SimpleNamespace(logits=self.head(self.embed(ids)))


def tokens(sequences=16, length=24):
    return torch.randint(0, 50, (sequences, length), generator=torch.Generator().manual_seed(1))


def test_a_model_against_itself_has_no_difference_and_no_spread():
    model, ids = TinyLM(), tokens()
    out = compare(model, ids, 4, reference(model, ids, 4))
    assert out["sequences"] == 16 and out["tokens"] == 16 * 23
    assert abs(out["mean_kl"]) < 1e-3 and out["mean_kl_stderr"] < 1e-3 and out["top1_agreement"] == 1.0
    low, high = out["perplexity_ratio_ci95"]
    assert 0.999 < low <= out["perplexity_ratio"] <= high < 1.001


def test_a_perturbed_model_gets_standard_errors_from_its_sequences():
    model, ids = TinyLM(), tokens()
    ref = reference(model, ids, 4)
    with torch.no_grad():
        model.head.weight.add_(0.3 * torch.randn_like(model.head.weight, generator=None))
    out = compare(model, ids, 4, ref)
    per = out["per_sequence"]
    assert len(per["kl"]) == len(per["top1_agreement"]) == len(per["log_perplexity_ratio"]) == 16
    # The overall figures are the means of the per-sequence ones (equal lengths) ...
    assert math.isclose(out["mean_kl"], sum(per["kl"]) / 16, rel_tol=1e-4)
    assert math.isclose(out["top1_agreement"], sum(per["top1_agreement"]) / 16, rel_tol=1e-4)
    # ... and their standard errors are sd / sqrt(16) of those.
    mean = sum(per["kl"]) / 16
    sd = math.sqrt(sum((v - mean) ** 2 for v in per["kl"]) / 15)
    assert out["mean_kl"] > 0.01 and math.isclose(out["mean_kl_stderr"], sd / 4, rel_tol=1e-3)
    low, high = out["perplexity_ratio_ci95"]
    assert low < high and low <= out["perplexity_ratio"] * 1.01 and out["perplexity_ratio"] <= high * 1.01
    assert math.isclose(math.log(high / low), 2 * 1.96 * out["log_perplexity_ratio_stderr"], rel_tol=1e-6)
