"""Hydra entry point: one call of the Prefect `pipeline` flow per config; a multirun is an MLflow parent
run with one child run per config."""
from __future__ import annotations

import os
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from tasks.config import ConfigError, TrackingConfig, load_config
from tasks.paths import CONF_DIR, register_resolvers
from tasks.quantize import check_quant

register_resolvers()

PARENT_RUN_ENV = "DOLPHIN_PARENT_RUN_ID"
PARENT_EXPERIMENT_ENV = "DOLPHIN_PARENT_EXPERIMENT"

# Outcomes of the jobs run in this process, for the summary table and the exit code.
OUTCOMES: list[Any] = []
IN_SWEEP = False  # set from Hydra's own run mode when a job runs


def to_resolved(cfg: DictConfig) -> dict[str, Any]:
    """The job's config as plain data, every interpolation resolved; in a sweep, tracked under the parent."""
    resolved = OmegaConf.to_container(cfg, resolve=True)
    parent = os.environ.get(PARENT_RUN_ENV)
    if parent:
        # A child must live in its parent's experiment for the MLflow UI to nest it.
        resolved["tracking"]["parent_run_id"] = parent
        resolved["tracking"]["experiment"] = os.environ[PARENT_EXPERIMENT_ENV]
    return resolved


def validate(resolved: dict[str, Any]) -> None:
    """Checks that need no stage to run: schema, and a dtype the GPU cannot execute."""
    cfg = load_config(resolved)
    check_quant(cfg.quant, cfg.gpu, cfg.quality)


def run_job(cfg: DictConfig) -> str:
    """Hydra task function. Returns the pipeline status; failures are recorded, not raised, so that one
    bad config does not stop a sweep."""
    from flows.console import print_results
    from flows.pipeline import PipelineFailed, pipeline

    global IN_SWEEP
    IN_SWEEP = HydraConfig.get().mode == RunMode.MULTIRUN
    resolved = to_resolved(cfg)
    try:
        validate(resolved)
    except ConfigError as exc:
        OUTCOMES.append(exc)
        print(f"config error: {exc}")
        return "FAILED"
    try:
        outcome = pipeline(resolved)
    except PipelineFailed as exc:
        outcome = exc.outcome
    OUTCOMES.append(outcome)
    if not IN_SWEEP:
        print_results([outcome])
    return outcome.status


class MlflowParentRun(Callback):
    """Opens the sweep's parent MLflow run before the first job and closes it after the last."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        from tasks.track import start_parent_run

        tracking = TrackingConfig.model_validate(OmegaConf.to_container(config.tracking, resolve=True))
        overrides = " ".join(config.hydra.overrides.task)
        run_id = start_parent_run(tracking, run_name=f"sweep {overrides}"[:250], tags={"sweep": overrides})
        os.environ[PARENT_RUN_ENV] = run_id
        os.environ[PARENT_EXPERIMENT_ENV] = tracking.experiment
        os.environ["DOLPHIN_PARENT_TRACKING_URI"] = tracking.uri

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from flows.console import print_results
        from flows.pipeline import PipelineOutcome

        finish_parent_run(failed=not all_answered(OUTCOMES, sweep=True))
        done = [o for o in OUTCOMES if isinstance(o, PipelineOutcome)]
        if done:
            print_results(done, title=f"Dolphin sweep: {len(OUTCOMES)} configs")


def all_answered(outcomes: list[Any], sweep: bool) -> bool:
    """True when every config produced an answer. One run must produce a measurement; in a sweep an
    infeasible memory plan is an answer too (it is in the table and in MLflow with its reason)."""
    from flows.pipeline import PipelineOutcome

    return bool(outcomes) and all(
        isinstance(o, PipelineOutcome) and (o.status == "FINISHED" or (sweep and o.infeasible)) for o in outcomes
    )


def finish_parent_run(failed: bool) -> None:
    """End the sweep's parent run if one is open (also called when a sweep aborts)."""
    from tasks.track import end_parent_run

    run_id = os.environ.pop(PARENT_RUN_ENV, None)
    uri = os.environ.pop("DOLPHIN_PARENT_TRACKING_URI", None)
    os.environ.pop(PARENT_EXPERIMENT_ENV, None)
    if run_id and uri:
        end_parent_run(uri, run_id, status="FAILED" if failed else "FINISHED")


main = hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")(run_job)
