"""The sweep's fast composition (hydra_plugins/ptq_slurm_launcher/composing.py) gives, point by point, the
config Hydra's own `load_sweep_config` composes, and the same refusals."""

from pathlib import Path

import pytest
from hydra import initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import HydraException
from hydra.types import RunMode
from omegaconf import OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from hydra_plugins.ptq_slurm_launcher.composing import PointComposer, composer_for
from ptq.schema import register_schemas

REPO = Path(__file__).resolve().parents[1]

# Every point of a sweep carries the sweep's own (non-swept) overrides, as Hydra's sweeper hands them over.
SWEEP = ["cluster=slurm"]
# What sweeps vary: group choices, values inside chosen groups, both, hydra settings, additions.
POINTS = [
    [],
    ["calib.size=7"],
    ["recipe=int8_sq", "calib.size=7", "calib.seq_len=32"],
    ["recipe=nvfp4", "hardware=h100", "recipe.kv_cache=fp8"],
    ["model=llama3.2-1b", "hardware=h100", "parallelism=tp2", "output_root=/tmp/elsewhere"],
    ["fidelity=none", "eval=local_quick", "eval.limit=5"],
    ["calib.size=9", "recipe=int4_awq"],  # a value before a group choice
    ["hydra.launcher.timeout_min=5", "recipe=fp8", "overwrite=true"],
    ["hydra.launcher.no_such_setting=5"],
    ["recipe=auto_quantize", "recipe.effective_bits=5.5"],
    ["+recipe.extra_key=1"],
    ["recipe=int8_sq", "+recipe.algorithm_args.alpha=0.5", "recipe.algorithm=smoothquant"],
]
BAD = [
    ["recipe=no_such_recipe"],
    ["calib.size=many"],
    ["no_such_key=1"],
    ["recipe.kv_cache=fp3"],
]


@pytest.fixture(scope="module")
def sweep():
    register_schemas()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        loader = GlobalHydra.instance().config_loader()
        master = loader.load_configuration("config", overrides=SWEEP, run_mode=RunMode.MULTIRUN)
        yield loader, master
    GlobalHydra.instance().clear()


def hydra_composes(loader, master, overrides):
    full = loader.load_sweep_config(master, SWEEP + list(overrides))
    with open_dict(full):
        del full["hydra"]
    return full


def as_plain(cfg):
    return OmegaConf.to_container(cfg, resolve=True)


@pytest.mark.parametrize("overrides", POINTS, ids=lambda o: " ".join(o) or "defaults")
def test_each_point_matches_what_hydra_composes(sweep, overrides):
    loader, master = sweep
    composer = PointComposer(loader, master)
    try:
        expected = as_plain(hydra_composes(loader, master, overrides))
    except (HydraException, OmegaConfBaseException) as exc:
        with pytest.raises(type(exc)):
            as_plain(composer.compose(SWEEP + overrides))
        return
    assert as_plain(composer.compose(SWEEP + overrides)) == expected
    # Composed again from the cache of its group choices: still the same, and the cached base untouched.
    assert as_plain(composer.compose(SWEEP + overrides)) == expected
    assert as_plain(composer.compose(SWEEP + [])) == as_plain(hydra_composes(loader, master, []))


@pytest.mark.parametrize("overrides", BAD, ids=" ".join)
def test_a_point_hydra_refuses_is_refused(sweep, overrides):
    loader, master = sweep
    with pytest.raises((HydraException, OmegaConfBaseException)):
        hydra_composes(loader, master, overrides)
    with pytest.raises((HydraException, OmegaConfBaseException)):
        as_plain(PointComposer(loader, master).compose(SWEEP + overrides))


def test_group_choices_are_composed_once_per_distinct_set(sweep):
    loader, master = sweep
    composer = composer_for(loader, master)
    composer._bases.clear()
    for recipe in ("fp8", "int8_sq"):
        for size in range(1, 6):
            composer.compose([f"recipe={recipe}", f"calib.size={size}"])
    assert sorted(composer._bases) == [("recipe=fp8",), ("recipe=int8_sq",)]
    assert composer_for(loader, master) is composer
