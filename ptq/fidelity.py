"""The `fidelity` group: label-free comparison of the quantized model with BF16.

Perplexity on held-out text, mean KL(BF16 || quantized) over next-token
distributions, and how often both pick the same top-1 token.  The BF16 side runs
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
        yield tokens[start:start + batch_size]


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


def compare(model, tokens: torch.Tensor, batch_size: int, ref: Reference, desc: str = "fidelity: quantized vs BF16") -> dict:
    nll, kl_sum, agree, count = 0.0, 0.0, 0, 0
    batches = list(_batches(tokens, batch_size))
    for batch, ref_logp in tqdm(list(zip(batches, ref.logprobs)), desc=desc, unit="batch"):
        logp = _next_token_logprobs(model, batch)
        ref_lp = ref_logp.to(logp.device).float()
        target = batch[:, 1:].to(logp.device)
        nll += -logp.gather(-1, target.unsqueeze(-1)).sum().item()
        kl_sum += (ref_lp.exp() * (ref_lp - logp)).sum().item()
        agree += (ref_lp.argmax(-1) == logp.argmax(-1)).sum().item()
        count += target.numel()
    bf16_ppl = math.exp(ref.nll / ref.tokens)
    quant_ppl = math.exp(nll / count)
    return {
        "tokens": count,
        "bf16_perplexity": bf16_ppl,
        "quantized_perplexity": quant_ppl,
        "perplexity_ratio": quant_ppl / bf16_ppl,
        "mean_kl": kl_sum / count,
        "top1_agreement": agree / count,
    }


def reference_only(ref: Reference) -> dict:
    """The figures for a BF16 run: it is its own reference."""
    ppl = math.exp(ref.nll / ref.tokens)
    return {"tokens": ref.tokens, "bf16_perplexity": ppl, "quantized_perplexity": ppl,
            "perplexity_ratio": 1.0, "mean_kl": 0.0, "top1_agreement": 1.0}
