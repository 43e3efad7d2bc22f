"""Hydra composition outside Hydra's job machinery (`dolphin plan`, deployments, tests), and the split of a
composed config into what is measured and how Dolphin runs it. No Prefect here: `dolphin plan` stays fast.
"""
from __future__ import annotations

import itertools
from typing import Any

# Keys of the composed config that steer how Dolphin runs, not what is measured: taken out before the
# config is validated, hashed and tracked.
RUN_CONTROL_KEYS = ("force", "schedule")


def split_run_control(composed: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the config to measure, the run-control keys) of a composed config."""
    resolved = {k: v for k, v in composed.items() if k not in RUN_CONTROL_KEYS}
    return resolved, {k: composed[k] for k in RUN_CONTROL_KEYS if k in composed}


def compose_config(overrides: list[str]) -> dict[str, Any]:
    """The composed config of one Hydra override list (no sweep), every interpolation resolved. A bad
    override raises ValueError with Hydra's own message on one line."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf import OmegaConf

    from tasks.paths import CONF_DIR, register_resolvers

    register_resolvers()
    running = GlobalHydra.instance().hydra  # inside a Hydra app (a sweep callback): set it aside
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            try:
                return OmegaConf.to_container(compose("config", overrides=overrides), resolve=True)
            except HydraException as exc:
                raise ValueError(" ".join(str(exc).split())) from None
    finally:
        GlobalHydra.instance().clear()
        if running is not None:
            GlobalHydra.instance().initialize(running)


def expand_sweep(overrides: list[str]) -> list[list[str]]:
    """`gpu=a10,h100 deploy=agg` -> [[gpu=a10, deploy=agg], [gpu=h100, deploy=agg]], as Hydra's basic
    sweeper expands a multirun."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    choices = [[f"{o.get_key_element()}={v}" for v in o.sweep_string_iterator()] if o.is_sweep_override()
               else [o.input_line] for o in OverridesParser.create().parse_overrides(overrides)]
    return [list(combo) for combo in itertools.product(*choices)]
