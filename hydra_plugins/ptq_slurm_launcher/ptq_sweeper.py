"""Hydra's basic sweeper (`-m key=a,b,c`, `hydra.sweeper.params`), checking the points of a batch with one
composition per distinct set of config-group choices (composing.py) instead of one per point, and not at all
when the launcher checks every point itself. Selected in conf/config.yaml (`override hydra/sweeper: ptq`)."""

# No `from __future__ import annotations`: see ptq_slurm_launcher.py.
from dataclasses import dataclass
from typing import Sequence

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper, BasicSweeperConf
from hydra.core.config_store import ConfigStore

from hydra_plugins.ptq_slurm_launcher.composing import compose_all


@dataclass
class PtqSweeperConf(BasicSweeperConf):
    _target_: str = "hydra_plugins.ptq_slurm_launcher.ptq_sweeper.PtqSweeper"


ConfigStore.instance().store(group="hydra/sweeper", name="ptq", node=PtqSweeperConf, provider="ptq-launcher")


class PtqSweeper(BasicSweeper):
    def validate_batch_is_legal(self, batch: Sequence[Sequence[str]]) -> None:
        """Every point composes (raises Hydra's error for the first that does not). A launcher that composes and
        checks each point itself, refusing only the points that do not compose (the Slurm launcher), is left to."""
        if getattr(self.launcher, "checks_each_point", False):
            return
        compose_all(self.hydra_context.config_loader, self.config, batch)
