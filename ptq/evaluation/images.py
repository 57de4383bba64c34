"""Multiple choice over images (benchmark kind `image_choice`) for vision-language models, scored in process.

lm-eval's multimodal model (`hf-multimodal`, lm-eval 0.4.13) answers generation requests only: its `loglikelihood`
raises NotImplementedError, so a multiple-choice question about an image cannot go through lm-eval's scoring the way
a text one does. This module scores it the same way lm-eval scores a text multiple-choice task instead: the prompt
is one user turn of the model's chat template holding the image and the question (`template` over the item's
fields), followed by the assistant's turn; each choice is the continuation, and its log-likelihood given prompt and
image decides. `acc`: the choice of highest log-likelihood is the gold one; `acc_norm`: the same with each
log-likelihood divided by the choice's length in bytes (lm-eval's acc_norm). Per-item scores are kept, so the
report pairs a quantized model with BF16 on the same items.

Data: JSONL, one item per line: {"image": "<path>", "question": "...", "choices": ["...", ...], "answer": <index>},
the image path absolute or relative to the file's folder (read and checked by readers.read_image_choice).
"""

from __future__ import annotations

import math
from typing import Dict, List

from ptq.errors import ConfigError
from ptq.vlm import image_prompt


def _continuation_logprob(model, processor, prompt: str, choice: str, image) -> float:
    """log P(choice | prompt with the image), summed over the choice's tokens. (torch is imported here, not with the
    module: the evaluation package is read when planning, which imports no torch.)"""
    import torch

    device = next(model.parameters()).device
    context = processor(text=[prompt], images=[image], return_tensors="pt")
    full = processor(text=[prompt + choice], images=[image], return_tensors="pt")
    start = context["input_ids"].shape[1]
    ids = full["input_ids"][0]
    if ids.shape[0] <= start or not torch.equal(ids[:start], context["input_ids"][0]):
        raise ConfigError(
            f"the choice {choice!r} does not tokenize as a continuation of its prompt; an image_choice item's choices "
            "must follow the prompt as plain text."
        )
    with torch.no_grad():
        logits = model(**{k: v.to(device) for k, v in full.items()}).logits[0, start - 1 : -1].float()
    target = ids[start:].to(logits.device)
    return float(torch.log_softmax(logits, dim=-1).gather(-1, target.unsqueeze(-1)).sum())


def score(model, processor, items: List[dict], indices: List[int]) -> Dict[str, List[float]]:
    """Per-item acc and acc_norm (0 or 1) of `items[i]` for i in `indices`."""
    from PIL import Image

    acc, acc_norm = [], []
    for i in indices:
        item = items[i]
        prompt = image_prompt(processor, item["prompt"], answer_follows=True, source=item["image"])
        with Image.open(item["image"]) as image:
            picture = image.convert("RGB")
        logps = [_continuation_logprob(model, processor, prompt, choice, picture) for choice in item["choices"]]
        normed = [lp / max(1, len(c.encode("utf-8"))) for lp, c in zip(logps, item["choices"])]
        acc.append(float(max(range(len(logps)), key=logps.__getitem__) == item["gold"]))
        acc_norm.append(float(max(range(len(normed)), key=normed.__getitem__) == item["gold"]))
    return {"acc": acc, "acc_norm": acc_norm}


def rows(name: str, per_item: Dict[str, List[float]], indices: List[int], extra: dict) -> List[dict]:
    """Result rows as the lm-eval path gives them: value, standard error of the mean, per-item scores."""
    out = []
    for metric, scores in per_item.items():
        n = len(scores)
        mean = sum(scores) / n
        stderr = math.sqrt(sum((s - mean) ** 2 for s in scores) / (n - 1) / n) if n > 1 else None
        out.append(
            {
                "benchmark": name,
                "metric": metric,
                "value": mean,
                "stderr": stderr,
                "higher_is_better": True,
                **extra,
                "items": {"doc_ids": list(indices), "scores": [round(s, 6) for s in scores]},
            }
        )
    return out
