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
# Whether every config of the last sweep was answered, as read from MLflow at its end; the only verdict
# there is when a parallel launcher ran the jobs in other processes (OUTCOMES then stays empty).
SWEEP_ANSWERED: bool | None = None


def to_resolved(cfg: DictConfig) -> dict[str, Any]:
    """The job's config as plain data, every interpolation resolved, run-control keys (`force`) taken
    out; in a sweep, tracked under the parent."""
    from tasks.compose import split_run_control

    resolved, _ = split_run_control(OmegaConf.to_container(cfg, resolve=True))
    parent = os.environ.get(PARENT_RUN_ENV)
    if parent:
        # A child must live in its parent's experiment for the MLflow UI to nest it.
        resolved["tracking"]["parent_run_id"] = parent
        resolved["tracking"]["experiment"] = os.environ[PARENT_EXPERIMENT_ENV]
    return resolved


def validate(resolved: dict[str, Any]) -> None:
    """Checks that need no stage to run: schema, a dtype the GPU cannot execute, an engine this host cannot
    run."""
    from tasks.launch import check_host

    cfg = load_config(resolved)
    check_quant(cfg.quant, cfg.gpu, cfg.quality)
    check_host(cfg)


def run_job(cfg: DictConfig) -> str:
    """Hydra task function. Returns the pipeline status; failures are recorded, not raised, so that one
    bad config does not stop a sweep."""
    from flows.console import print_results
    from flows.pipeline import measure_or_reuse

    global IN_SWEEP
    IN_SWEEP = HydraConfig.get().mode == RunMode.MULTIRUN
    resolved = to_resolved(cfg)
    try:
        validate(resolved)
    except ConfigError as exc:
        OUTCOMES.append(exc)
        print(f"config error: {exc}")
        return "FAILED"
    # `force=true` re-measures configs already answered.
    outcome = measure_or_reuse(resolved, force=bool(cfg.get("force", False)))
    OUTCOMES.append(outcome)
    if not IN_SWEEP:
        print_results([outcome])
    return outcome.status


class MlflowParentRun(Callback):
    """Opens the sweep's parent MLflow run before the first job and closes it after the last."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        from tasks.track import start_parent_run

        tracking = sweep_tracking(config)
        overrides = " ".join(config.hydra.overrides.task)
        run_id = start_parent_run(tracking, run_name=f"sweep {overrides}"[:250], tags={"sweep": overrides})
        os.environ[PARENT_RUN_ENV] = run_id
        os.environ[PARENT_EXPERIMENT_ENV] = tracking.experiment
        os.environ["DOLPHIN_PARENT_TRACKING_URI"] = tracking.uri

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from flows.console import print_results
        from flows.pipeline import PipelineOutcome

        # Jobs of a parallel launcher (joblib, submitit) ran in other processes: their outcomes are not
        # in OUTCOMES, so the parent's status comes from the children in the store.
        global SWEEP_ANSWERED
        answered = SWEEP_ANSWERED = all_answered(OUTCOMES, sweep=True) if OUTCOMES else children_answered()
        report_sweep()
        finish_parent_run(failed=not answered)
        done = [o for o in OUTCOMES if isinstance(o, PipelineOutcome)]
        if done:
            print_results(done, title=f"Dolphin sweep: {len(OUTCOMES)} configs")


def _open_parent() -> tuple[str | None, str | None]:
    """(run id, tracking URI) of the sweep parent run this process opened, if one is open."""
    return os.environ.get(PARENT_RUN_ENV), os.environ.get("DOLPHIN_PARENT_TRACKING_URI")


def sweep_tracking(config: DictConfig) -> TrackingConfig:
    """Where the sweep's parent run goes. The config Hydra passes here has no sweep values, so a sweep over
    presets (experiment=a,b) would land in the default scenario's experiment: compose each job's config
    and use their experiment when they share one."""
    from tasks.compose import compose_config, expand_sweep

    tracking = TrackingConfig.model_validate(OmegaConf.to_container(config.tracking, resolve=True))
    task = [o for o in config.hydra.overrides.task if not o.lstrip("+~").startswith("hydra")]
    try:
        names = {compose_config(combo)["tracking"]["experiment"] for combo in expand_sweep(task)}
    except Exception:  # noqa: BLE001 - a bad job config is reported by that job; keep the default here
        return tracking
    return tracking.model_copy(update={"experiment": names.pop()}) if len(names) == 1 else tracking


def children_answered() -> bool:
    """Every child of the open sweep parent FINISHED or was infeasible (parallel launchers)."""
    from mlflow.tracking import MlflowClient

    from tasks.track import INFEASIBLE_TAG, REUSED_TAG_PREFIX

    run_id, uri = _open_parent()
    if not (run_id and uri):
        return False
    client = MlflowClient(uri)
    parent = client.get_run(run_id)
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{run_id}'", max_results=10000)
    reused = any(k.startswith(REUSED_TAG_PREFIX) for k in parent.data.tags)
    return (bool(children) or reused) and all(
        c.info.status == "FINISHED" or c.data.tags.get(INFEASIBLE_TAG) == "true" for c in children)


def report_sweep() -> None:
    """Rank the open sweep's configs, print the table and log it (table, HTML, plots) to the parent run.
    A report that cannot be made is a warning: the measurements are already safe in MLflow."""
    from flows.console import print_report
    from tasks.report import build_report, log_report_to_run

    run_id, uri = _open_parent()
    if not (run_id and uri):
        return
    try:
        report = build_report(uri, os.environ[PARENT_EXPERIMENT_ENV], parent_run_id=run_id)
        log_report_to_run(report, uri, run_id)
        print_report(report)
    except Exception as exc:  # noqa: BLE001 - never lose a sweep's end over its summary
        print(f"warning: no sweep report: {type(exc).__name__}: {exc}")


def all_answered(outcomes: list[Any], sweep: bool) -> bool:
    """True when every config produced an answer. One run must produce a measurement; in a sweep an
    infeasible memory plan is an answer too (it is in the table and in MLflow with its reason)."""
    from flows.pipeline import PipelineOutcome

    return bool(outcomes) and all(
        isinstance(o, PipelineOutcome)
        and ((o.status in ("FINISHED", "SKIPPED") and not o.infeasible) or (sweep and o.infeasible))
        for o in outcomes
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
