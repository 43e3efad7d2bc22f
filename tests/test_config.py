"""The config tree composes, validates, and rejects bad values with the field's name."""
from __future__ import annotations

from pathlib import Path

import pytest

from flows.cli import compose
from tasks.config import ConfigError, load_config
from tasks.kv import kv_task
from tasks.paths import CONF_DIR, REPO_ROOT
from tasks.profile import profile_task
from tasks.quantize import check_quant, quant_task

EXPERIMENTS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))
GPUS = sorted(p.stem for p in (CONF_DIR / "gpu").glob("*.yaml"))
MODELS = sorted(p.stem for p in (CONF_DIR / "model").glob("*.yaml"))


def plan(overrides: list[str]):
    _, cfg = compose(overrides)
    check_quant(cfg.quant, cfg.gpu)
    profile = profile_task.fn(cfg.workload, cfg.slo, None)
    return cfg, quant_task.fn(kv_task.fn(cfg.model, cfg.gpu, cfg.deploy, cfg.quant, profile, cfg.slo),
                              cfg.gpu, cfg.quant)


def test_default_paths_are_absolute_and_point_at_shipped_data():
    resolved, cfg = compose([])
    assert Path(cfg.workload.trace).is_absolute() and Path(cfg.workload.trace).is_file()
    assert Path(cfg.workload.trace).is_relative_to(REPO_ROOT)  # shipped with the repo, not ../shared
    assert cfg.tracking.uri.startswith("sqlite:////") and Path(cfg.run_dir).is_absolute()
    assert resolved["scenario"] == cfg.workload.name == cfg.tracking.experiment


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_preset_plans_feasibly(experiment):
    cfg, choice = plan([f"experiment={experiment}"])
    assert choice.plan.feasible, choice.plan.reason
    assert cfg.workload.name != "azure-code"  # the preset's own scenario, hence its own MLflow experiment


def test_llama70b_preset_is_the_seed_deployment():
    cfg, choice = plan(["experiment=llama70b_fp8_pd"])
    assert (cfg.deploy.prefill.instances, cfg.deploy.prefill.tp) == (4, 1)
    assert (cfg.deploy.decode.instances, cfg.deploy.decode.tp) == (1, 4)
    assert cfg.deploy.num_gpus == 8 and choice.weights_dtype == "fp8"


@pytest.mark.parametrize("gpu", GPUS)
@pytest.mark.parametrize("model", MODELS)
def test_every_catalogue_entry_validates(gpu, model):
    _, cfg = compose([f"gpu={gpu}", f"model={model}"])
    assert cfg.gpu.name == gpu and cfg.model.name == model


def test_bad_values_name_their_field():
    resolved, _ = compose([])
    bad = {**resolved, "slo": {"targets": {"e2e_p99": 2000}, "target_qps": None},
           "bench": {**resolved["bench"], "growth": 0.5}}
    with pytest.raises(ConfigError) as err:
        load_config(bad)
    assert "slo.targets" in str(err.value) and "bench.growth" in str(err.value)
    with pytest.raises(ConfigError, match="tracking.uri"):
        load_config({**resolved, "tracking": {**resolved["tracking"], "uri": "sqlite:///relative.db"}})


def test_fp8_on_a_gpu_without_fp8_fails_before_anything_runs():
    _, cfg = compose(["gpu=a10", "quant=fp8"])
    with pytest.raises(ConfigError, match="8.6"):
        check_quant(cfg.quant, cfg.gpu)
