"""`recipe=auto_quantize*`: per-layer mixed precision chosen by ModelOpt's AutoQuantize.

`mtq.auto_quantize` calibrates every candidate format on the whole model, scores how much each
layer group (q/k/v share one choice, so do gate/up) hurts the model in each format, and picks per
group a candidate or BF16 so that the weights of the searchable layers average at most
`recipe.effective_bits` bits. Calibrating and scoring do not depend on the budget, so the search state is
kept under `cache_dir/auto_quantize/` and a sweep over budgets pays for them once. The table below is what the plan needs to know about a candidate
without importing ModelOpt; `tests/test_auto_quantize.py` checks its bits against ModelOpt's.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import os
import shutil
import warnings
from pathlib import Path
from typing import Dict, List, Tuple

from ptq.errors import ConfigError
from ptq.formats import BF16, CANDIDATES
from ptq.plan import Plan
from ptq.recipes import (
    classify_layers,
    disabled_patterns,
    is_excluded,
    module_pattern_to_quantizer_pattern,
    set_block_size,
)

log = logging.getLogger(__name__)


class AutoQuantizeSearch:
    """One search: prepared on the loaded model (cheap checks first), then run on the calibration tokens."""

    def __init__(self, model, plan: Plan):
        import modelopt.torch.quantization as mtq
        import torch

        recipe = plan.cfg.recipe
        self.plan = plan
        self.method = recipe.score_method
        # (name, what ModelOpt gets): the constant's name when unchanged, so ModelOpt reports it by name;
        # a copy with the AWQ block size otherwise (ModelOpt then calls it CUSTOM_<index>).
        self.candidates: List[Tuple[str, object]] = []
        patterns = [module_pattern_to_quantizer_pattern(p) for p in plan.exclude_patterns]
        for name in recipe.candidates:
            base = getattr(mtq, name, None)
            if not isinstance(base, dict):
                raise ConfigError(
                    f"recipe.candidates names {name}, which the installed ModelOpt does not define; "
                    f"choose from {', '.join(CANDIDATES)}."
                )
            # The layers each candidate leaves alone on purpose (lm_head, routers, ...) stay BF16 here too:
            # AutoQuantize ignores such name patterns in its formats and would otherwise search them.
            patterns += [p for p in disabled_patterns(base) if p not in patterns]
            if CANDIDATES[name].int4_blocks and plan.awq_block_size:
                cfg = copy.deepcopy(base)
                for entry in cfg["quant_cfg"]:
                    if entry.get("quantizer_name") == "*weight_quantizer" and "cfg" in entry:
                        set_block_size(entry["cfg"], plan.awq_block_size)
                self.candidates.append((name, cfg))
            else:
                self.candidates.append((name, name))
        self.excluded_patterns = patterns
        # Exact module names (no wildcards): they are both kept out of the search and out of the
        # budget's denominator; ModelOpt would otherwise count them as 16-bit weights.
        self.excluded = [
            n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and is_excluded(n, patterns)
        ]

    # The per-layer choice as one ModelOpt config (chosen_config), once run() has searched.
    applied_config = None

    def _steps(self, samples: int, batch_size: int) -> Tuple[int, int, int]:
        """(calibration steps, score steps, score samples). ModelOpt counts both in batches of the same
        loader, so the scores see whole batches: at least recipe.score_size samples where there are that many."""
        score_steps = math.ceil(min(self.plan.cfg.recipe.score_size, samples) / batch_size)
        return math.ceil(samples / batch_size), score_steps, min(score_steps * batch_size, samples)

    def _state_path(self, model, calib, batch_size: int, steps: Tuple[int, int]) -> Path:
        """Where the search state (calibration of every candidate, sensitivity scores) is kept. The key
        holds everything they depend on, and nothing about the budget."""
        import modelopt
        import torch

        cfg = self.plan.cfg
        source = Path(os.path.expanduser(self.plan.source.converted_dir or self.plan.source.location))
        files = (
            sorted(
                (f.name, f.stat().st_size, f.stat().st_mtime_ns)
                for f in source.glob("*")
                if f.suffix in (".safetensors", ".bin", ".json")
            )
            if source.is_dir()
            else []
        )
        key = {
            "model": str(source),
            "files": files,
            "revision": getattr(model.config, "_commit_hash", None),
            "device": cfg.hardware.device,
            "dtype": cfg.hardware.dtype,
            "modelopt": modelopt.__version__,
            "torch": torch.__version__,
            "candidates": [repr(c) for _, c in self.candidates],
            "excluded": self.excluded,
            "method": self.method,
            "batch_size": batch_size,
            "steps": list(steps),
            "calib": hashlib.sha1(calib.cpu().contiguous().numpy().tobytes()).hexdigest(),
        }
        digest = hashlib.sha1(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:20]
        return Path(os.path.expanduser(cfg.cache_dir)) / "auto_quantize" / f"{cfg.model.name}-{digest}.pth"

    def _scoring(self, device):
        """(forward_step, loss_func) for ModelOpt's sensitivity scores."""
        if self.method == "gradient":
            # Causal-LM loss of the batch itself (labels = input ids): its gradient weighs each layer's
            # output error by how much the loss cares about it.
            def forward_step(m, batch):
                batch = batch.to(device)
                return m(input_ids=batch, labels=batch)

            def loss_func(output, batch):
                return output.loss

            return forward_step, loss_func

        def logits_step(m, batch):  # kl_div compares logits with the unquantized model's
            return m(input_ids=batch.to(device)).logits

        return logits_step, None

    def _search(self, model, calib, batch_size: int, calib_steps: int, score_steps: int):
        """(model, ModelOpt's search state, state file, whether it was reused): mtq.auto_quantize, with the
        calibration and scores restored from an earlier search of the same model and data when there is one."""
        import modelopt.torch.quantization as mtq

        recipe = self.plan.cfg.recipe
        forward_step, loss_func = self._scoring(next(model.parameters()).device)
        constraints = {"effective_bits": float(recipe.effective_bits)}
        if self.excluded:
            constraints["cost"] = {"excluded_module_name_patterns": list(self.excluded)}
        # ModelOpt restores a saved search state from `checkpoint` and skips calibrating and scoring.
        # It writes the file in place, so it gets a private copy, published by an atomic rename: jobs of
        # one sweep never read a half-written state.
        state_path = self._state_path(model, calib, batch_size, (calib_steps, score_steps))
        work = state_path.with_name(f"{state_path.stem}.{os.getpid()}.partial.pth")
        reused = state_path.exists()
        state_path.parent.mkdir(parents=True, exist_ok=True)
        if reused:
            shutil.copyfile(state_path, work)
            log.info("AutoQuantize: reusing the calibration and scores saved in %s", state_path)
        try:
            with warnings.catch_warnings():
                # A candidate with our AWQ block size is a "custom" format to ModelOpt; we know.
                warnings.filterwarnings("ignore", message="Received custom quantization formats")
                warnings.filterwarnings("ignore", message="Checkpoint .* does not exist")
                warnings.filterwarnings("ignore", message="Per-rank checkpoint")
                model, state = mtq.auto_quantize(
                    model,
                    constraints=constraints,
                    quantization_formats=[cfg for _, cfg in self.candidates],
                    data_loader=list(calib.split(batch_size)),
                    forward_step=forward_step,
                    loss_func=loss_func,
                    disabled_layers=list(self.excluded) or None,
                    num_calib_steps=calib_steps,
                    num_score_steps=score_steps,
                    method=self.method,
                    verbose=False,
                    checkpoint=str(work),
                )
        except BaseException:
            work.unlink(missing_ok=True)
            raise
        if work.exists():
            os.replace(work, state_path)
        return model, state, state_path, reused

    def _assignment(self, state) -> Dict[str, str]:
        """Module name -> chosen format label (or bf16), for every searched layer."""
        from modelopt.torch.quantization.algorithms import QuantRecipe

        labels = {QuantRecipe(quant_cfg=None): BF16}
        for index, (name, cfg) in enumerate(self.candidates):
            labels[QuantRecipe(quant_cfg=cfg, name=f"CUSTOM_{index}")] = CANDIDATES[name].label
        excluded = set(self.excluded)
        assignment: Dict[str, str] = {}
        for group, chosen in state["best"]["recipe"].items():
            label = labels.get(chosen, str(chosen))
            for module_name in state["candidate_stats"][group]["module_names"]:
                if module_name not in excluded:
                    assignment[module_name] = label
        return assignment

    def run(self, model, calib, batch_size: int):
        """Search, leave `model` quantized with the chosen formats, and return
        (quantized, excluded, unexpected_bf16, record)."""
        recipe = self.plan.cfg.recipe
        calib_steps, score_steps, score_samples = self._steps(calib.shape[0], batch_size)
        log.info(
            "AutoQuantize: %s under %.2f effective bits, %s scores on %d samples, %d calibration steps, "
            "%d layers kept in BF16 by pattern",
            ", ".join(n for n, _ in self.candidates),
            recipe.effective_bits,
            self.method,
            score_samples,
            calib_steps,
            len(self.excluded),
        )
        model, state, state_path, reused = self._search(model, calib, batch_size, calib_steps, score_steps)
        assignment = self._assignment(state)
        self.applied_config = chosen_config(state)
        achieved = float(state["best"]["constraints"]["effective_bits"])
        satisfied = bool(state["best"].get("is_satisfied", True))
        counts: Dict[str, int] = {}
        for label in assignment.values():
            counts[label] = counts.get(label, 0) + 1
        if not satisfied or achieved > recipe.effective_bits + 1e-6:
            log.warning(
                "AutoQuantize could not meet the budget: %.3f effective bits for %.3f asked",
                achieved,
                recipe.effective_bits,
            )
        log.info(
            "AutoQuantize chose %s (%.3f effective bits for a budget of %.3f)",
            ", ".join(f"{v} {k}" for k, v in sorted(counts.items())),
            achieved,
            recipe.effective_bits,
        )

        # A layer the search left in BF16 is unquantized on purpose, like one an exclude pattern names.
        kept_bf16 = [f"{n}.weight_quantizer" for n, label in assignment.items() if label == BF16]
        quantized, excluded_layers, unexpected = classify_layers(model, self.excluded_patterns + kept_bf16)
        record = {
            "budget_bits": float(recipe.effective_bits),
            "effective_bits": round(achieved, 4),
            "satisfied": satisfied,
            "method": self.method,
            "candidates": {name: CANDIDATES[name].label for name, _ in self.candidates},
            "score_samples": score_samples,
            "score_steps": score_steps,
            "calib_steps": calib_steps,
            # Calibration and scores came from an earlier search of the same model and data (another budget).
            "search_state": str(state_path),
            "search_state_reused": reused,
            "format_counts": counts,
            "assignment": assignment,
            "excluded": list(self.excluded),
        }
        return quantized, excluded_layers, unexpected, record


# What the written recipe file of an AutoQuantize run says about itself (ptq/backends/hf_modelopt.py).
CHOSEN_NOTE = (
    "the per-layer formats AutoQuantize chose, as one config (modelopt get_auto_quantize_config): running it "
    "quantizes each layer in its chosen format with max calibration, without the search; the search's own "
    "per-candidate calibration (AWQ) is not part of it"
)


def chosen_config(state) -> dict:
    """The search's choice as a config mtq.quantize and ModelOpt's recipe loader take: one entry per quantized
    module in its chosen format, after the search's fixed and disabled layers (ModelOpt's own conversion). Its
    note that the result calibrates with `max` is what CHOSEN_NOTE says in the written file."""
    import modelopt.torch.quantization as mtq

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="get_auto_quantize_config")
        return mtq.get_auto_quantize_config(state)
