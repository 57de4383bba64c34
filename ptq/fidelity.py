"""The `fidelity` group: label-free comparison of the quantized model with BF16.

Perplexity on held-out text, mean KL(BF16 || quantized) over next-token
distributions, and how often both pick the same top-1 token, each with its standard error across sequences.  The BF16 side runs
before quantization and keeps its log-probabilities (fp16, on the CPU) so the
model need not be held twice.
"""

from __future__ import annotations

import hashlib
import logging
import math
from dataclasses import dataclass
from typing import List

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

log = logging.getLogger(__name__)


@dataclass
class Reference:
    logprobs: List[torch.Tensor]  # per batch: [b, t-1, vocab] fp16, CPU
    nll: float
    tokens: int


def _batches(tokens: torch.Tensor, batch_size: int):
    for start in range(0, tokens.shape[0], batch_size):
        yield tokens[start : start + batch_size]


@torch.no_grad()
def _next_token_logprobs(model, batch: torch.Tensor) -> torch.Tensor:
    device = next(model.parameters()).device
    logits = model(batch.to(device)).logits[:, :-1].float()
    return F.log_softmax(logits, dim=-1)


def reference(model, tokens: torch.Tensor, batch_size: int, desc: str = "fidelity: BF16 reference") -> Reference:
    stored, nll, count = [], 0.0, 0
    for batch in tqdm(list(_batches(tokens, batch_size)), desc=desc, unit="batch"):
        logp = _next_token_logprobs(model, batch)
        target = batch[:, 1:].to(logp.device)
        nll += -logp.gather(-1, target.unsqueeze(-1)).sum().item()
        count += target.numel()
        stored.append(logp.to(torch.float16).cpu())
    return Reference(stored, nll, count)


# The latest reference of this process: the points of a sweep run in one process compare against the
# same BF16 model on the same tokens, so it is computed once (one entry: it holds full-vocabulary log-probs).
_reference_cache: dict = {}


def cached_reference(model, tokens: torch.Tensor, batch_size: int, *, model_key, enabled: bool = True) -> Reference:
    """`reference`, reused while the same BF16 model (`model_key`), tokens and batch size come back."""
    if not enabled:
        _reference_cache.clear()
        return reference(model, tokens, batch_size)
    digest = hashlib.sha1(tokens.cpu().contiguous().numpy().tobytes()).hexdigest()
    key = (model_key, batch_size, tuple(tokens.shape), digest)
    if key in _reference_cache:
        log.info("Using the BF16 fidelity reference computed earlier in this process")
        return _reference_cache[key]
    ref = reference(model, tokens, batch_size)
    _reference_cache.clear()
    _reference_cache[key] = ref
    return ref


def _mean_and_stderr(values: List[float]) -> tuple:
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, math.nan
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


def compare(
    model, tokens: torch.Tensor, batch_size: int, ref: Reference, desc: str = "fidelity: quantized vs BF16"
) -> dict:
    """Perplexity ratio, mean KL(BF16 || quantized) and top-1 agreement over `tokens`, with their uncertainty.

    Tokens of one sequence are not independent, so the uncertainty is taken across sequences: each sequence
    gives its mean KL, its top-1 agreement and its log perplexity ratio against BF16 on the same tokens (a
    paired difference), and the standard error of their means is sd / sqrt(sequences). The per-sequence values
    are kept so that two variants measured on the same text can be compared pairwise too."""
    nll, kl_sum, agree, count = 0.0, 0.0, 0, 0
    per_kl, per_top1, per_log_ratio = [], [], []
    batches = list(_batches(tokens, batch_size))
    for batch, ref_logp in tqdm(list(zip(batches, ref.logprobs)), desc=desc, unit="batch"):
        logp = _next_token_logprobs(model, batch)
        ref_lp = ref_logp.to(logp.device).float()
        target = batch[:, 1:].to(logp.device).unsqueeze(-1)
        seq_nll = -logp.gather(-1, target).squeeze(-1).sum(-1)
        seq_ref_nll = -ref_lp.gather(-1, target).squeeze(-1).sum(-1)
        seq_kl = (ref_lp.exp() * (ref_lp - logp)).sum(-1).sum(-1)
        seq_agree = (ref_lp.argmax(-1) == logp.argmax(-1)).sum(-1)
        length = target.shape[1]
        nll += seq_nll.sum().item()
        kl_sum += seq_kl.sum().item()
        agree += seq_agree.sum().item()
        count += target.shape[0] * length
        per_kl += (seq_kl / length).tolist()
        per_top1 += (seq_agree.float() / length).tolist()
        per_log_ratio += ((seq_nll - seq_ref_nll) / length).tolist()
    bf16_ppl = math.exp(ref.nll / ref.tokens)
    quant_ppl = math.exp(nll / count)
    log_ratio, log_ratio_se = _mean_and_stderr(per_log_ratio)
    return {
        "tokens": count,
        "sequences": len(per_kl),
        "bf16_perplexity": bf16_ppl,
        "quantized_perplexity": quant_ppl,
        "perplexity_ratio": quant_ppl / bf16_ppl,
        "perplexity_ratio_ci95": [math.exp(log_ratio - 1.96 * log_ratio_se), math.exp(log_ratio + 1.96 * log_ratio_se)],
        "log_perplexity_ratio_stderr": log_ratio_se,
        "mean_kl": kl_sum / count,
        "mean_kl_stderr": _mean_and_stderr(per_kl)[1],
        "top1_agreement": agree / count,
        "top1_agreement_stderr": _mean_and_stderr(per_top1)[1],
        "per_sequence": {
            "kl": [round(v, 6) for v in per_kl],
            "top1_agreement": [round(v, 6) for v in per_top1],
            "log_perplexity_ratio": [round(v, 6) for v in per_log_ratio],
        },
    }


def reference_only(ref: Reference) -> dict:
    """The figures for a BF16 run: it is its own reference."""
    ppl = math.exp(ref.nll / ref.tokens)
    return {
        "tokens": ref.tokens,
        "bf16_perplexity": ppl,
        "quantized_perplexity": ppl,
        "perplexity_ratio": 1.0,
        "perplexity_ratio_ci95": [1.0, 1.0],
        "mean_kl": 0.0,
        "mean_kl_stderr": 0.0,
        "top1_agreement": 1.0,
        "top1_agreement_stderr": 0.0,
    }
