"""Entry point: `python launch.py [group=option ...] [key=value ...]`, or `-m` for a sweep (Hydra)."""

from __future__ import annotations

import logging
import os
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from ptq.errors import ConfigError
from ptq.run import record_failure, run
from ptq.schema import register_schemas
from ptq.state import ProcessState

register_schemas()
log = logging.getLogger("ptq")
# What the points this process runs keep for each other (a sweep with Hydra's basic launcher, a packed Slurm job).
PROCESS_STATE = ProcessState()


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig):
    sweeping = HydraConfig.get().mode == RunMode.MULTIRUN
    # Only the points of a sweep (Hydra's basic launcher, a packed Slurm job) share this process's BF16 model.
    PROCESS_STATE.keep_models = sweeping
    try:
        record = run(
            OmegaConf.to_object(cfg),
            OmegaConf.to_container(cfg, resolve=True),
            overrides=list(HydraConfig.get().overrides.task),
            state=PROCESS_STATE,
        )
        return record["status"]
    except ConfigError as exc:
        if not sweeping:  # said once, as the exit message
            raise SystemExit(f"error: {exc}") from None
        log.error("%s", exc)
        if not cfg.dry_run:
            # The point's folder says why it did not run, so the results table can show it.
            record_failure(OmegaConf.to_container(cfg, resolve=True), f"refused: {exc}")
        return "refused"
    except Exception:
        # In a sweep one failing point must not stop the others; its run record says why it failed.
        if not sweeping:
            raise
        log.exception("This point failed; the sweep goes on")
        return "failed"


def recipe_file_shortcut(argv):
    """`recipe=<file.yaml>` (a ModelOpt recipe file, e.g. the modelopt_recipe.yaml written beside a checkpoint, or a
    recipe of ModelOpt's library by its path there) means `recipe=modelopt recipe.modelopt_recipe=<file>`; a file
    that exists here is passed by its absolute path, anything else as given; other arguments are left as they are."""
    out = []
    for arg in argv:
        key, _, value = arg.partition("=")
        if key == "recipe" and value.endswith((".yaml", ".yml")) and "," not in value:
            local = os.path.expanduser(value)
            named = os.path.abspath(local) if os.path.isfile(local) else value
            out += ["recipe=modelopt", f"recipe.modelopt_recipe={named}"]
        else:
            out.append(arg)
    return out


if __name__ == "__main__":
    sys.argv[1:] = recipe_file_shortcut(sys.argv[1:])
    main()
