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
from typing import Dict, List, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

log = logging.getLogger(__name__)


@dataclass
class Reference:
    # Per batch: the scored positions' log-probs [positions, vocab] fp16 on the CPU (every next-token position of
    # a text batch; the text positions of an image-text sample).
    logprobs: List[torch.Tensor]
    nll: float
    tokens: int


@dataclass
class Sample:
    """One image-text input of a vision-language model: its model inputs (input_ids, pixel_values, ...) and which
    next-token positions are scored: those whose next token is text, not one of the image's placeholder tokens."""

    inputs: Dict[str, torch.Tensor]
    scored: torch.Tensor  # [1, t-1] bool


Held = Union[torch.Tensor, List[Sample]]  # [sequences, seq_len] token ids, or image-text samples


def image_samples(inputs: List[Dict[str, torch.Tensor]], image_token_ids: Sequence[int]) -> List[Sample]:
    """Samples of processor outputs (one image-text pair each), scoring the positions whose next token is not an
    image placeholder (`image_token_ids`: the model config's image and video token ids)."""
    out = []
    for item in inputs:
        target = item["input_ids"][:, 1:]
        scored = ~torch.isin(target, torch.tensor(list(image_token_ids), dtype=target.dtype))
        out.append(Sample(dict(item), scored))
    return out


def _batches(tokens: Held, batch_size: int):
    """(model inputs, target ids [b, t-1], scored mask [b, t-1] or None: every position)."""
    if isinstance(tokens, list):
        for sample in tokens:
            yield sample.inputs, sample.inputs["input_ids"][:, 1:], sample.scored
        return
    for start in range(0, tokens.shape[0], batch_size):
        batch = tokens[start : start + batch_size]
        yield batch, batch[:, 1:], None


def sequence_count(tokens: Held) -> int:
    return len(tokens) if isinstance(tokens, list) else int(tokens.shape[0])


def digest(tokens: Held) -> str:
    """A fingerprint of the held-out inputs (the reference cache's key)."""
    h = hashlib.sha1()
    for part in [s.inputs[k] for s in tokens for k in sorted(s.inputs)] if isinstance(tokens, list) else [tokens]:
        h.update(part.cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@torch.no_grad()
def _next_token_logprobs(model, batch) -> torch.Tensor:
    device = next(model.parameters()).device
    if isinstance(batch, dict):
        logits = model(**{k: v.to(device) for k, v in batch.items()}).logits[:, :-1].float()
    else:
        logits = model(batch.to(device)).logits[:, :-1].float()
    return F.log_softmax(logits, dim=-1)


def _scored(model, inputs, target: torch.Tensor, scored: Optional[torch.Tensor]):
    """(log-probs [positions, vocab], target ids [positions], positions per sequence) of the scored positions."""
    logp = _next_token_logprobs(model, inputs)
    target = target.to(logp.device)
    if scored is None:
        return logp.reshape(-1, logp.shape[-1]), target.reshape(-1), [target.shape[1]] * target.shape[0]
    scored = scored.to(logp.device)
    return logp[scored], target[scored], scored.sum(-1).tolist()


def reference(model, tokens: Held, batch_size: int, desc: str = "fidelity: BF16 reference") -> Reference:
    stored, nll, count = [], 0.0, 0
    for inputs, target, scored in tqdm(list(_batches(tokens, batch_size)), desc=desc, unit="batch"):
        logp, target, _ = _scored(model, inputs, target, scored)
        nll += -logp.gather(-1, target.unsqueeze(-1)).sum().item()
        count += target.numel()
        stored.append(logp.to(torch.float16).cpu())
    return Reference(stored, nll, count)


def cached_reference(model, tokens: Held, batch_size: int, *, model_key, cache: Optional[dict] = None) -> Reference:
    """`reference`, reused while the same BF16 model (`model_key`), inputs and batch size come back: `cache` is a
    ProcessState's `references` (the points of a sweep in one process compare against the same reference; one
    entry, as it holds full-vocabulary log-probs). None: computed afresh."""
    if cache is None:
        return reference(model, tokens, batch_size)
    key = (model_key, batch_size, sequence_count(tokens), digest(tokens))
    if key in cache:
        log.info("Using the BF16 fidelity reference computed earlier in this process")
        return cache[key]
    cache.clear()  # the one kept before, of another model: its memory first
    ref = reference(model, tokens, batch_size)
    cache[key] = ref
    return ref


def _mean_and_stderr(values: List[float]) -> tuple:
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, math.nan
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


def compare(model, tokens: Held, batch_size: int, ref: Reference, desc: str = "fidelity: quantized vs BF16") -> dict:
    """Perplexity ratio, mean KL(BF16 || quantized) and top-1 agreement over `tokens`, with their uncertainty.

    Tokens of one sequence are not independent, so the uncertainty is taken across sequences: each sequence
    gives its mean KL, its top-1 agreement and its log perplexity ratio against BF16 on the same tokens (a
    paired difference), and the standard error of their means is sd / sqrt(sequences). The per-sequence values
    are kept so that two variants measured on the same text can be compared pairwise too. Image-text samples are
    scored on their text positions only."""
    nll, kl_sum, agree, count = 0.0, 0.0, 0, 0
    per_kl, per_top1, per_log_ratio = [], [], []
    batches = list(_batches(tokens, batch_size))
    for (inputs, target, scored), ref_logp in tqdm(list(zip(batches, ref.logprobs)), desc=desc, unit="batch"):
        logp, target, lengths = _scored(model, inputs, target, scored)
        ref_lp = ref_logp.to(logp.device).float()
        target = target.unsqueeze(-1)
        pos_nll = -logp.gather(-1, target).squeeze(-1)
        pos_ref_nll = -ref_lp.gather(-1, target).squeeze(-1)
        pos_kl = (ref_lp.exp() * (ref_lp - logp)).sum(-1)
        pos_agree = (ref_lp.argmax(-1) == logp.argmax(-1)).float()
        nll += pos_nll.sum().item()
        kl_sum += pos_kl.sum().item()
        agree += int(pos_agree.sum().item())
        count += int(target.shape[0])
        for seq_nll, seq_ref_nll, seq_kl, seq_agree in zip(
            *(t.split(lengths) for t in (pos_nll, pos_ref_nll, pos_kl, pos_agree))
        ):
            length = max(1, seq_kl.numel())
            per_kl.append(seq_kl.sum().item() / length)
            per_top1.append(seq_agree.sum().item() / length)
            per_log_ratio.append((seq_nll.sum() - seq_ref_nll.sum()).item() / length)
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
