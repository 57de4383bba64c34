"""Hydra's basic sweeper (`-m key=a,b,c`, `hydra.sweeper.params`), checking the points of a batch with one
composition per distinct set of config-group choices (composing.py) instead of one per point, and not at all
when the launcher checks every point itself. Selected in conf/config.yaml (`override hydra/sweeper: ptq`)."""

# No `from __future__ import annotations`: see ptq_slurm_launcher.py.
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, List, Sequence

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper, BasicSweeperConf
from hydra.core.config_store import ConfigStore
from hydra.core.utils import filter_overrides
from omegaconf import OmegaConf

from hydra_plugins.ptq_slurm_launcher.composing import compose_all
from ptq.layout import MANIFEST_NAME
from ptq.sweep import LOCAL, Point, write_manifest


@dataclass
class PtqSweeperConf(BasicSweeperConf):
    _target_: str = "hydra_plugins.ptq_slurm_launcher.ptq_sweeper.PtqSweeper"


log = logging.getLogger(__name__)

ConfigStore.instance().store(group="hydra/sweeper", name="ptq", node=PtqSweeperConf, provider="ptq-launcher")


class PtqSweeper(BasicSweeper):
    def get_job_batch(self) -> Sequence[Sequence[str]]:
        """The next batch, without points that are an earlier point again: the same resolved config once the
        settings of a stage that does not run are set aside, as when `recover=none,qad recover.steps=10,20` gives
        recover=none once per step count. Points that share a folder but differ in anything else are launched and
        refused by planning, visibly; the Slurm launcher refuses such points with a record of their own."""
        batch = super().get_job_batch()
        if getattr(self.launcher, "checks_each_point", False):
            return batch
        seen = getattr(self, "_seen", {})
        self._seen = seen
        kept = []
        for overrides, cfg in zip(batch, compose_all(self.hydra_context.config_loader, self.config, batch)):
            key = _identity(cfg)
            if key in seen:
                log.info(
                    "Not launching %s: it is the point %s again (the same run; %s)",
                    " ".join(overrides),
                    " ".join(seen[key]),
                    cfg.output_dir,
                )
                continue
            seen[key] = list(overrides)
            kept.append(overrides)
        return kept

    def validate_batch_is_legal(self, batch: Sequence[Sequence[str]]) -> None:
        """Every point composes (raises Hydra's error for the first that does not). A launcher that composes and
        checks each point itself, refusing only the points that do not compose (the Slurm launcher), is left to."""
        if getattr(self.launcher, "checks_each_point", False):
            return
        configs = compose_all(self.hydra_context.config_loader, self.config, batch)
        if not self.config.dry_run:
            self._local_manifest(batch, configs)

    def _local_manifest(self, batch: Sequence[Sequence[str]], configs: List[Any]) -> None:
        """A sweep run by this process (Hydra's basic launcher) gets a manifest too, so `python -m ptq.status`
        follows it like a Slurm sweep: every point, its folder, and its state from its run record."""
        points: List[Point] = getattr(self, "_points", [])
        for overrides, cfg in zip(batch, configs):
            config = {key: OmegaConf.to_container(cfg[key], resolve=True) for key in ("model", "recipe", "calib")}
            config["output_dir"] = str(cfg.output_dir)
            points.append(Point(index=len(points), overrides=list(overrides), config=config, state=LOCAL))
        self._points = points
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        write_manifest(
            sweep_dir / MANIFEST_NAME,
            sweep_dir,
            points,
            [filter_overrides(p.overrides) for p in points],
            pack=False,
            finished=False,
        )

    def sweep(self, arguments: List[str]) -> Any:
        try:
            return super().sweep(arguments)
        finally:
            if not getattr(self.launcher, "checks_each_point", False):
                _remove_empty_folders(Path(str(self.config.hydra.sweep.dir)), bool(self.config.dry_run))


def _identity(cfg) -> str:
    """What makes a point the run it is: its resolved config, without the settings of a recovery that does not
    run (recover=none ignores recover.steps, recover.lr, ...)."""
    config = OmegaConf.to_container(cfg, resolve=True)
    recover = config.get("recover") or {}
    if recover.get("method") in (None, "none"):
        config["recover"] = {"method": "none"}
    return json.dumps(config, sort_keys=True, default=str)


def _remove_empty_folders(sweep_dir: Path, dry_run: bool) -> None:
    """Hydra makes <sweep dir>/<job number>/ for every point of a local sweep; this launcher writes nothing
    there (each point writes into its own output_dir), so the empty ones go. A dry run leaves no sweep folder
    (Hydra's multirun.yaml is all it would hold), nor a `sweeps` folder it made."""
    if not sweep_dir.is_dir():
        return
    for child in sweep_dir.iterdir():
        if child.is_dir() and not any(child.iterdir()):
            child.rmdir()
    if dry_run and [c.name for c in sweep_dir.iterdir()] == ["multirun.yaml"]:
        (sweep_dir / "multirun.yaml").unlink()
    for folder in (sweep_dir, sweep_dir.parent):
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
