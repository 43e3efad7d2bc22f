"""Stage 1: profile the workload (its trace, or a synthetic spec) for the memory plan and the benchmark.

Reading is `tasks.trace`, the statistics and plots `tasks.profile_stats`; this module is the Prefect task
that composes them and writes `profile.json` and the plots to the run directory.
"""
from __future__ import annotations

import json
from pathlib import Path

from prefect import task

from tasks.config import SLOConfig, WorkloadConfig
from tasks.contracts import WorkloadProfile
from tasks.kv import slo_latency_s
from tasks.profile_stats import plot_profile, profile_trace, synthetic_profile
from tasks.trace import read_trace_with_bad_rows


@task(name="profile")
def profile_task(workload: WorkloadConfig, slo: SLOConfig, out_dir: Path | None) -> WorkloadProfile:
    """Profile the workload's trace (or its synthetic spec); write profile.json and plots to `out_dir`.

    With a trace, `workload.input_len` / `output_len` (when set) replace its lengths, keeping its
    arrivals; bad rows are dropped and counted, and past `workload.max_bad_row_fraction` the trace is
    rejected. Without one, arrivals are Poisson at `slo.target_qps` (1 QPS when unset, said in source).
    Concurrency is modelled with the SLO's E2EL bound as every request's latency (`slo_latency_s`).
    """
    latency_s = slo_latency_s(slo)
    if workload.trace is None:
        if workload.input_len is None or workload.output_len is None:
            raise ValueError("workload.trace is null: set workload.input_len and workload.output_len")
        qps = slo.target_qps or 1.0
        profile = synthetic_profile(workload.input_len, workload.output_len, qps,
                                    shared_prefix_len=workload.shared_prefix_len, seed=workload.seed,
                                    latency_s=latency_s)
        if slo.target_qps is None:
            profile = profile.model_copy(update={"source": profile.source + " (slo.target_qps unset: 1 QPS)"})
        df = None
    else:
        df, bad = read_trace_with_bad_rows(workload.trace, workload.format, workload.columns,
                                           workload.max_bad_row_fraction)
        if workload.input_len is not None:
            df["input_tokens"] = workload.input_len
        if workload.output_len is not None:
            df["output_tokens"] = workload.output_len
        profile = profile_trace(df, source=workload.trace, latency_s=latency_s, seed=workload.seed, bad_rows=bad)
        if workload.shared_prefix_len:
            profile = profile.model_copy(update={"shared_prefix_len": workload.shared_prefix_len})
    if out_dir is not None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "profile.json").write_text(json.dumps(profile.model_dump(), indent=1))
        if df is not None:
            plot_profile(df, out_dir)
    return profile
