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
    check_quant(cfg.quant, cfg.gpu, cfg.quality)
    profile = profile_task.fn(cfg.workload, cfg.slo, None)
    plans = kv_task.fn(cfg.model, cfg.gpu, cfg.deploy, cfg.quant, cfg.quality, profile, cfg.slo, cfg.memory)
    return cfg, quant_task.fn(plans, cfg.gpu, cfg.quant, cfg.model, cfg.quality)


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


@pytest.mark.parametrize("model", [m for m in MODELS if "params_b:" in (CONF_DIR / "model" / f"{m}.yaml").read_text()])
def test_parameter_count_from_the_architecture_matches_the_published_one(model):
    _, cfg = compose([f"model={model}"])
    # Embeddings, attention (GQA or MLA), dense MLPs and experts, norms: within 1% of the model card.
    assert cfg.model.num_params / 1e9 == pytest.approx(cfg.model.params_b, rel=0.01)


def test_memory_knobs_are_validated_and_reach_the_plan():
    cfg, choice = plan(["memory.block_size=32", "memory.gpu_memory_utilization=0.8"])
    assert choice.plan.knobs.block_size == 32 and choice.plan.gpu_memory_utilization == 0.8
    resolved, _ = compose([])
    with pytest.raises(ConfigError, match="memory.gpu_memory_utilization"):
        load_config({**resolved, "memory": {**resolved["memory"], "gpu_memory_utilization": 1.5}})


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
        check_quant(cfg.quant, cfg.gpu, cfg.quality)


def test_tiny_llama_entry_matches_the_model_make_engines_builds():
    from tasks.catalog import ModelArch, load_model

    # tests/data holds the config.json engines/build_tiny_llama.py writes (checked in, so no build needed).
    built = ModelArch.from_hf_config(REPO_ROOT / "tests" / "data" / "vllm_kv_logs" / "tiny-llama.config.json")
    entry = load_model("tiny-llama")
    skip = {"name", "path", "hf_id"}
    assert entry.model_dump(exclude=skip) == built.model_dump(exclude=skip)
    assert entry.path.endswith(".engines/models/tiny-llama")
