"""Entry point: `python launch.py [group=option ...] [key=value ...]` (Hydra)."""

from __future__ import annotations

import logging

import hydra
from omegaconf import DictConfig, OmegaConf

from ptq.plan import ConfigError
from ptq.schema import register_schemas

register_schemas()
log = logging.getLogger("ptq")


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> None:
    from ptq.run import run

    try:
        run(OmegaConf.to_object(cfg), OmegaConf.to_container(cfg, resolve=True))
    except ConfigError as exc:
        log.error("%s", exc)
        raise SystemExit(f"error: {exc}") from None


if __name__ == "__main__":
    main()
