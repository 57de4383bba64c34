"""Calibration coverage of routed experts: how many calibration tokens each expert of each MoE layer received.

A routed expert only sees the tokens its router sends it. During calibration an expert that gets no tokens
has no activation statistics of its own, and algorithms that need them (AWQ's per-channel scales, GPTQ's
Hessian, SmoothQuant) leave it untreated. With ModelOpt 0.47's fused experts (transformers 5) the input
quantizer of each projection is shared by all experts of a layer, so its activation scale comes from every
token routed in that layer; each expert's weight scale is its own, and for an expert that was never called
ModelOpt's export derives it from the expert's weights (a warning, `moe_utils.py`). This module counts the
tokens per expert during the first calibration pass and names the experts that got none or too few, with the
calibration size that would give every expert enough tokens if each kept the share of tokens it got here.
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional

import torch

SCALES_NOTE = (
    "each projection's input (activation) scale is shared by all experts of its layer and was calibrated "
    "on every token routed in that layer; an expert that received no tokens gets its weight scale from "
    "its own weights when the checkpoint is exported (ModelOpt's fallback), and no per-expert algorithm "
    "statistics (AWQ, GPTQ, SmoothQuant)"
)


def moe_blocks(model) -> Dict[str, torch.nn.Module]:
    """name -> MoE block (a module with routed `experts` and a router `gate` that knows its top_k)."""
    blocks = {}
    for name, module in model.named_modules():
        experts, gate = getattr(module, "experts", None), getattr(module, "gate", None)
        if experts is None or gate is None or not hasattr(gate, "top_k"):
            continue
        if _expert_count(module):
            blocks[name] = module
    return blocks


# ModelOpt's calibration setting that also sends calibration tokens to more experts than the router picks
# (QuantizeAlgorithmConfig.moe_calib_experts_ratio). ModelOpt 0.47 applies it through its sparse-MoE wrapper,
# which takes only blocks whose experts are separate modules; transformers 5 keeps them fused (one 3-D weight per
# projection), and there the setting is accepted and changes nothing (measured on NemotronH: the same tokens per
# expert with and without it).
EXPERTS_RATIO = "moe_calib_experts_ratio"


def experts_ratio_problem(model) -> Optional[str]:
    """Why ModelOpt's moe_calib_experts_ratio would not reach `model`'s experts, or None. ModelOpt wraps (and so
    applies the ratio to) blocks whose `experts` can be iterated, one module per expert; fused experts cannot."""
    holders = [
        (name, m.experts)
        for name, m in model.named_modules()
        if isinstance(getattr(m, "experts", None), torch.nn.Module)
    ]
    if not holders:
        return "has no Mixture-of-Experts layers"
    if any(hasattr(experts, "__iter__") for _, experts in holders):
        return None
    return (
        f"keeps its experts fused (one 3-D weight per projection, as transformers 5 stores them: "
        f"{holders[0][0]}.experts), which ModelOpt's sparse-MoE calibration does not wrap: the setting would be "
        "accepted and change nothing"
    )


def _expert_count(block) -> int:
    for owner in (block.experts, block.gate, block):
        for attr in ("num_experts", "n_routed_experts", "num_local_experts"):
            value = getattr(owner, attr, None)
            if isinstance(value, int) and value > 1:
                return value
    return 0


class ExpertCounter:
    """Counts, per MoE layer, the routing slots each expert receives while active (a forward pre-hook on each
    layer's experts module, which transformers 5 calls as experts(hidden_states, top_k_index, top_k_weights)).
    Only the first `with` block counts: calibration algorithms that run the forward loop again (AWQ, GPTQ) would
    count the same tokens twice; `passes` says how many blocks ran."""

    def __init__(self, model) -> None:
        self.blocks = moe_blocks(model)
        self.counts: Dict[str, torch.Tensor] = {
            name: torch.zeros(_expert_count(b), dtype=torch.long) for name, b in self.blocks.items()
        }
        self.top_k = {name: int(b.gate.top_k) for name, b in self.blocks.items()}
        self._handles: list = []
        self.passes = 0

    def __bool__(self) -> bool:
        return bool(self.blocks)

    def _hook(self, name: str):
        def count(module, args, kwargs):
            index = args[1] if len(args) > 1 else kwargs.get("top_k_index")
            if isinstance(index, torch.Tensor):
                found = torch.bincount(index.reshape(-1).to(torch.long), minlength=len(self.counts[name]))
                self.counts[name] += found[: len(self.counts[name])].cpu()

        return count

    def __enter__(self) -> "ExpertCounter":
        if not self.passes:
            for name, block in self.blocks.items():
                self._handles.append(block.experts.register_forward_pre_hook(self._hook(name), with_kwargs=True))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.passes += 1


def coverage(counts: Dict[str, List[int]], top_k: Dict[str, int], tokens: int, samples: int, min_tokens: int) -> dict:
    """What the record keeps about expert coverage. `counts`: layer -> tokens per expert; `tokens`: calibration
    tokens that passed each layer (samples x seq_len); experts below `min_tokens` are named, and
    `suggested_calib_size` is the calib.size at which each would reach `min_tokens` if it kept the share of
    tokens it got here (an expert that got none is counted as half a token)."""
    uncovered, few = [], []
    need_tokens = 0.0
    for layer, per_expert in counts.items():
        for expert, got in enumerate(per_expert):
            if got >= min_tokens:
                continue
            (uncovered if got == 0 else few).append(f"{layer}.experts.{expert}")
            share = max(got, 0.5) / max(tokens, 1)
            need_tokens = max(need_tokens, min_tokens / share)
    all_counts = sorted(c for per_expert in counts.values() for c in per_expert)
    suggested: Optional[int] = None
    if need_tokens and tokens:
        suggested = max(samples + 1, math.ceil(samples * need_tokens / tokens))
    return {
        "moe_layers": len(counts),
        "experts_per_layer": sorted({len(v) for v in counts.values()}),
        "top_k": sorted(set(top_k.values())),
        "calibration_tokens": tokens,
        "min_tokens": min_tokens,
        "tokens_per_expert": {"min": all_counts[0], "median": all_counts[len(all_counts) // 2], "max": all_counts[-1]}
        if all_counts
        else {},
        "experts": len(all_counts),
        "uncovered": uncovered,
        "few_tokens": few,
        "suggested_calib_size": suggested,
        "scales": SCALES_NOTE,
        "counts": counts,
    }


def warning(summary: dict, calib_size: int) -> Optional[str]:
    """One line for the log before export when some experts got fewer than min_tokens calibration tokens."""
    short = summary["uncovered"] + summary["few_tokens"]
    if not short:
        return None
    named = ", ".join(short[:6]) + (f" and {len(short) - 6} more" if len(short) > 6 else "")
    return (
        f"{len(summary['uncovered'])} routed experts received no calibration tokens and "
        f"{len(summary['few_tokens'])} fewer than {summary['min_tokens']} ({named}) out of {summary['experts']}; "
        f"{summary['scales']}. About calib.size={summary['suggested_calib_size']} (now {calib_size}) would give "
        "each of them enough tokens."
    )
