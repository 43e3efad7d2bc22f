"""The `pipeline` Prefect flow: config -> measured, costed deployment.

It only composes the stages in `tasks/`; each stage is a Prefect task. What a stage measured is written
under the run directory as soon as it exists, and whatever happens later the run lands in MLflow (FAILED,
with the reason, when a stage fails) and every engine process is stopped.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from prefect import flow
from prefect.runtime import flow_run

from tasks.bench.stage import bench_task
from tasks.compose import compose_config, expand_sweep, split_run_control
from tasks.config import DolphinConfig, load_config
from tasks.contracts import BenchResult, Endpoint, QuantChoice, TrackResult, WorkloadProfile
from tasks.cost import cost_per_mtok_usd
from tasks.engines.greedy_probe import outputs_sha256
from tasks.kv import kv_task
from tasks.launch import launch_task
from tasks.prefect_server import use_local_api_unless_configured
from tasks.profile import profile_task
from tasks.quantize import quant_task
from tasks.track import INFEASIBLE_TAG, config_hash, find_answered_run, record_reused_run, track_task

class InfeasiblePlan(RuntimeError):
    """The memory plan cannot work; raised before anything is launched."""


class PipelineFailed(RuntimeError):
    """A stage failed; carries everything the stages before it produced (already tracked)."""

    def __init__(self, outcome: "PipelineOutcome"):
        super().__init__(outcome.error)
        self.outcome = outcome


@dataclass
class PipelineOutcome:
    """What one config produced, for the console table and the multirun summary."""

    cfg: DolphinConfig
    status: str
    error: str | None = None
    infeasible: bool = False  # stopped by the memory plan: a verdict about the config, not a breakage
    profile: WorkloadProfile | None = None
    quant: QuantChoice | None = None
    endpoint: Endpoint | None = None
    bench: BenchResult | None = None
    cost_per_mtok: float | None = None
    kv_transfer: dict[str, float] | None = None  # pd on vLLM: kv_transfer_* from the decode servers
    track: TrackResult | None = None
    reused_run_id: str | None = None  # status SKIPPED: this earlier run already answered the config


def run_name(cfg: DolphinConfig) -> str:
    return f"{cfg.model.name}-{cfg.gpu.name}-{cfg.deploy.mode}-{cfg.quant.name}-{cfg.engine.kind}"


def run_tags(cfg: DolphinConfig, resolved: dict) -> dict[str, str]:
    return {
        "gpu": cfg.gpu.name,
        "deploy": cfg.deploy.mode,
        "quant": cfg.quant.name,
        "engine": cfg.engine.kind,
        "model": cfg.model.name,
        "scenario": cfg.scenario,
        "config_hash": config_hash(resolved),
        "simulated": str(cfg.engine.kind == "sim").lower(),
    }


def measure_or_reuse(resolved: dict[str, Any], force: bool = False) -> PipelineOutcome:
    """Run `pipeline` unless the experiment already holds an answer for this config (same config_hash,
    FINISHED or infeasible): then say so and return a SKIPPED outcome. `force` always measures.
    A sweep's parent run (tracking.parent_run_id) records which earlier run answered a skipped config."""
    cfg = load_config(resolved)
    if not force:
        found = find_answered_run(cfg.tracking, config_hash(resolved))
        if found:
            earlier, infeasible = found
            print(f"skipped: already measured in run {earlier} ({run_name(cfg)}"
                  f"{', infeasible' if infeasible else ''}; force=true re-measures)", flush=True)
            if cfg.tracking.parent_run_id:
                record_reused_run(cfg.tracking.uri, cfg.tracking.parent_run_id, config_hash(resolved), earlier)
            return PipelineOutcome(cfg=cfg, status="SKIPPED", infeasible=infeasible, reused_run_id=earlier,
                                   error="infeasible memory plan (see the earlier run)" if infeasible else None)
    use_local_api_unless_configured()  # not Prefect's ephemeral server: it dies with our Ctrl-C
    try:
        return pipeline(resolved)
    except PipelineFailed as exc:
        return exc.outcome


def best_level_cost(cfg: DolphinConfig, bench: BenchResult) -> float | None:
    if bench.best_level is None:
        return None
    level = next(lv for lv in bench.levels if lv.index == bench.best_level)
    return cost_per_mtok_usd(cfg.gpu.usd_per_hour, cfg.deploy.num_gpus, level.output_tok_per_s)


@flow(name="pipeline", flow_run_name="{resolved[scenario]}-{resolved[gpu][name]}-{resolved[deploy][mode]}")
def pipeline(resolved: dict[str, Any]) -> PipelineOutcome:
    """profile -> kv lower bound -> quantization -> launch -> SLO benchmark -> track."""
    cfg = load_config(resolved)
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False))

    out = PipelineOutcome(cfg=cfg, status="RUNNING")
    try:
        out.profile = profile_task(cfg.workload, cfg.slo, run_dir / "profile")
        plans = kv_task(cfg.model, cfg.gpu, cfg.deploy, cfg.quant, cfg.quality, out.profile, cfg.slo, cfg.memory)
        out.quant = quant_task(plans, cfg.gpu, cfg.quant, cfg.model, cfg.quality)
        (run_dir / "plan.json").write_text(out.quant.model_dump_json(indent=2))
        if not out.quant.plan.feasible:
            raise InfeasiblePlan(out.quant.plan.reason)

        handle = launch_task(cfg, out.quant, run_dir)
        try:
            out.endpoint = handle.endpoint
            out.bench = bench_task(
                handle, out.profile, out.quant, cfg.model, cfg.gpu, cfg.bench, cfg.slo, cfg.workload, run_dir
            )
            handle.check_alive()  # an engine that died mid-run invalidates what was measured after
            out.kv_transfer = handle.transfer_metrics()  # pd: the decode side's proof that KV arrived
        finally:
            handle.stop()
        out.cost_per_mtok = best_level_cost(cfg, out.bench)
        out.status = "FINISHED"
    except BaseException as exc:  # Ctrl-C too: record what was measured, then stop
        out.status, out.error = "FAILED", f"{type(exc).__name__}: {exc}"
        out.infeasible = isinstance(exc, InfeasiblePlan)
        try:
            out.track = _track(out, resolved, run_dir)
        except Exception as track_exc:  # keep the original failure as the one reported
            out.error += f" (and tracking failed: {track_exc})"
        if isinstance(exc, Exception):
            raise PipelineFailed(out) from exc
        raise
    out.track = _track(out, resolved, run_dir)
    return out


def _report_inputs(out: PipelineOutcome) -> dict[str, float]:
    """What `dolphin report` needs to cost a config at the target QPS, as metrics of the run."""
    cfg = out.cfg
    extra = {"gpus_per_replica": float(cfg.deploy.num_gpus), "usd_per_gpu_hour": cfg.gpu.usd_per_hour}
    if out.profile is not None:  # the load the memory plan was sized for (as the kv stage picks it)
        extra["target_qps"] = cfg.slo.target_qps or out.profile.mean_qps
    if out.bench and out.bench.best_level is not None:
        best = next(lv for lv in out.bench.levels if lv.index == out.bench.best_level)
        if best.achieved_qps > 0:
            extra["output_tokens_per_request"] = best.output_tok_per_s / best.achieved_qps
    return extra


def _track(out: PipelineOutcome, resolved: dict, run_dir: Path) -> TrackResult:
    extra = {"cost_per_mtok_usd": out.cost_per_mtok} if out.cost_per_mtok is not None else {}
    extra |= _report_inputs(out)
    if out.endpoint and out.endpoint.engine_kv_tokens is not None:  # what the engine logged at startup
        extra["engine_kv_capacity_tokens"] = out.endpoint.engine_kv_tokens
    extra |= out.kv_transfer or {}
    if out.bench:  # engine-side counters, e.g. engine_vllm_num_preemptions_total
        em = out.bench.engine_metrics
        extra |= {"engine_" + k.replace(":", "_"): v for k, v in em.items()}
        drafted = em.get("vllm:spec_decode_num_draft_tokens_total", 0.0)
        if drafted > 0:  # share of proposed draft tokens the target model accepted
            extra["spec_acceptance_rate"] = em.get("vllm:spec_decode_num_accepted_tokens_total", 0.0) / drafted
    (run_dir / "summary.json").write_text(json.dumps({"status": out.status, "error": out.error, **extra}))
    tags = run_tags(out.cfg, resolved)
    if out.quant is not None:
        tags |= {"weights_dtype": out.quant.weights_dtype, "kv_dtype": out.quant.kv_dtype}
    if out.infeasible:
        tags[INFEASIBLE_TAG] = "true"
    if flow_run.id:  # links the MLflow run to the Prefect flow run that measured it
        tags["prefect_flow_run_id"] = flow_run.id
    if out.endpoint and out.endpoint.greedy_outputs:  # equal across deploy modes unless outputs changed
        tags["greedy_outputs_sha256"] = outputs_sha256(out.endpoint.greedy_outputs)
    return track_task(
        resolved=resolved,
        tags=tags,
        run_name=run_name(out.cfg),
        tracking=out.cfg.tracking,
        run_dir=run_dir,
        profile=out.profile,
        quant=out.quant,
        endpoint=out.endpoint,
        bench=out.bench,
        extra_metrics=extra,
        status=out.status,
        error=out.error,
    )


# ---------------------------------------------------------------- scheduled runs (Prefect deployments)
@flow(name="dolphin-scheduled")
def scheduled_pipeline(overrides: list[str], force: bool = True) -> list[str]:
    """What a Prefect deployment runs: `dolphin run -m <overrides>`, composed here from the overrides. A
    schedule exists to re-measure, so `force` defaults to true. More than one config is a sweep: one MLflow
    parent run, a child per config, and the report on the parent. Returns each config's status."""
    from tasks.report import build_report, log_report_to_run
    from tasks.track import end_parent_run, start_parent_run

    configs = [split_run_control(compose_config(o))[0] for o in expand_sweep(overrides)]
    parent = None
    if len(configs) > 1:
        tracking = load_config(configs[0]).tracking
        parent = start_parent_run(tracking, f"scheduled sweep {' '.join(overrides)}"[:250],
                                  {"sweep": " ".join(overrides), "dolphin.scheduled": "true"})
    statuses: list[str] = []
    try:
        for resolved in configs:
            if parent:
                resolved["tracking"] |= {"parent_run_id": parent, "experiment": tracking.experiment}
            out = measure_or_reuse(resolved, force=force)
            statuses.append("INFEASIBLE" if out.infeasible else out.status)
    finally:
        if parent:
            broken = len(statuses) < len(configs) or "FAILED" in statuses
            try:
                log_report_to_run(build_report(tracking.uri, tracking.experiment, parent_run_id=parent),
                                  tracking.uri, parent)
            finally:
                end_parent_run(tracking.uri, parent, "FAILED" if broken else "FINISHED")
    if "FAILED" in statuses or (len(configs) == 1 and statuses == ["INFEASIBLE"]):
        raise RuntimeError(f"not every config of {overrides} produced an answer: {statuses}")
    return statuses
