"""Stage 5 entry: build the scenario dataset, then search for the highest QPS that holds the SLO."""
from __future__ import annotations

import json
from pathlib import Path

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from tasks.bench.client import load_records
from tasks.bench.engine_metrics import scrape
from tasks.bench.metrics import target_cis
from tasks.bench.search import SearchOptions, run_slo_search
from tasks.catalog import GpuSpec, ModelArch
from tasks.config import BenchConfig, SLOConfig, WorkloadConfig
from tasks.contracts import BenchResult, LevelResult, QuantChoice, WorkloadProfile
from tasks.dataset import scenario_requests
from tasks.launch import EngineHandle
from tasks.perf_model import PerfModel
from tasks.tokenizer import load_tokenizer

# Distinct requests per run; levels cycle through them.
MAX_DISTINCT_REQUESTS = 2000


def start_qps_hint(quant: QuantChoice, profile: WorkloadProfile, model: ModelArch, gpu: GpuSpec) -> float:
    """Half the performance model's capacity estimate: the ramp then brackets the limit in a few levels."""
    plan = quant.plan
    perf = PerfModel(model, gpu, quant.weights_dtype, quant.kv_dtype, tp=plan.tp)
    capacity = perf.capacity_qps(profile.input_tokens.mean, profile.output_tokens.mean,
                                 plan.knobs.max_num_seqs, plan.kv_capacity_tokens)
    return max(0.05, 0.5 * capacity)


@task(name="slo-benchmark", cache_policy=NO_CACHE)
def bench_task(handle: EngineHandle, profile: WorkloadProfile, quant: QuantChoice, model: ModelArch,
               gpu: GpuSpec, bench: BenchConfig, slo: SLOConfig, workload: WorkloadConfig,
               run_dir: Path) -> BenchResult:
    # A real engine counts prompt tokens with the model's own tokenizer; the sim engine counts words.
    tokenizer = load_tokenizer(model.path) if model.path and not handle.endpoint.simulated else None
    requests = scenario_requests(profile, workload, n=min(MAX_DISTINCT_REQUESTS, 2 * bench.requests_per_level),
                                 seed=bench.seed, max_model_len=quant.plan.knobs.max_model_len,
                                 tokenizer=tokenizer)

    logger = get_run_logger()

    def after_level(level: LevelResult) -> None:
        verdict = "holds" if level.slo_met else "broken: " + "; ".join(level.violations)
        engine = level.engine
        seen = "".join(f", {label} {engine[key]:{fmt}}" for key, label, fmt in (
            ("engine_kv_usage_max", "engine KV max", ".0%"), ("engine_waiting_max", "waiting max", ".0f"),
            ("engine_preemptions", "preemptions", ".0f"), ("engine_spec_acceptance_rate", "spec accept", ".0%"))
            if key in engine)
        logger.info(
            "level %d at %.3g QPS: %d/%d ok, p99 TTFT %.0f ms, TPOT %.1f ms, E2EL %.0f ms%s; SLO %s",
            level.index, level.target_qps, level.completed, level.num_requests, level.ttft_ms.p99,
            level.tpot_ms.p99, level.e2el_ms.p99, seen, verdict,
        )
        with open(run_dir / "levels.jsonl", "a") as f:  # kept (and logged) even if a later level fails
            f.write(level.model_dump_json() + "\n")
        handle.check_alive()  # a dead engine fails the stage with its log tail, not a silent 0 QPS

    hint = start_qps_hint(quant, profile, model, gpu)
    options = SearchOptions(min_tail_samples=bench.min_tail_samples)
    result = run_slo_search(handle.endpoint, requests, bench, slo, run_dir, start_qps_hint=hint,
                            on_level=after_level, options=options)
    write_level_cis(result, run_dir / "level_cis.json")
    return result.model_copy(update={"engine_metrics": scrape(handle.endpoint.metrics_url)})


def write_level_cis(result: BenchResult, path: Path) -> Path:
    """Each level's SLO percentiles with bootstrap confidence intervals (LevelResult has no field for
    them): {level index: {target: {value_ms, ci_low_ms, ci_high_ms, ci_verdict, ...}}}."""
    records = load_records(result.records_path)  # already in engine time
    cis = {lv.index: target_cis([r for r in records if r.level == lv.index], result.slo_targets)
           for lv in result.levels}
    path.write_text(json.dumps(cis, indent=2))
    return path
