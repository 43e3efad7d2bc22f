"""One benchmark run (what `vllm bench serve` does): a fixed request list sent on an arrival schedule,
open loop or capped by a concurrency limit, after unrecorded warm-up requests.

The schedule is fixed before the first send; latencies count from each request's scheduled time (see
`tasks.bench.search.run_level`, which both this and the SLO search use).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from tasks.bench.client import REQUEST_FUNCS, RequestRecord
from tasks.bench.load import constant_arrivals, gamma_arrivals
from tasks.bench.progress import LiveStats, make_progress
from tasks.bench.search import _run_sync, run_level, warmup
from tasks.contracts import BenchRequest, Endpoint

if TYPE_CHECKING:
    import pandas as pd


def arrival_offsets(n: int, request_rate: float, burstiness: float = 1.0, seed: int = 0,
                    shape: str = "gamma") -> np.ndarray:
    """Wall offsets (s) of n arrivals: all at 0 for an infinite rate (as vLLM), else gamma gaps with
    shape `burstiness` (1 = Poisson, as vLLM's --burstiness) or evenly spaced (`shape="constant"`)."""
    if n < 1:
        raise ValueError(f"need at least one request, got {n}")
    if math.isinf(request_rate):
        return np.zeros(n)
    rng = np.random.default_rng(seed)
    if shape == "constant":
        return constant_arrivals(request_rate, n, rng)
    return gamma_arrivals(request_rate, n, rng, shape=burstiness)


def trace_offsets(df: "pd.DataFrame", n: int, time_scale: float) -> np.ndarray:
    """The first n arrivals of a `tasks.trace.read_trace` frame, replayed `time_scale` times faster
    (2 = twice as fast; offsets are trace seconds / time_scale)."""
    if time_scale <= 0:
        raise ValueError(f"--time-scale {time_scale} must be > 0")
    return df["arrival_s"].to_numpy(dtype=float)[:n] / time_scale


@dataclass
class RunResult:
    records: list[RequestRecord]  # request order, wall clock
    duration_s: float  # first scheduled send to the last response


def run_once(base_url: str, model: str, requests: list[BenchRequest], offsets_s: np.ndarray, *,
             endpoint: str = "completions", max_concurrency: int | None = None, warmup_requests: int = 0,
             timeout_s: float = 300.0, ignore_eos: bool = True, quiet: bool = False) -> RunResult:
    """Send requests[i] at offsets_s[i] (wall seconds from the start), at most `max_concurrency` at a
    time; `warmup_requests` sequential requests first, not recorded."""
    if len(requests) != len(offsets_s):
        raise ValueError(f"{len(requests)} requests but {len(offsets_s)} arrival times")
    if max_concurrency is not None and max_concurrency < 1:
        raise ValueError(f"--max-concurrency {max_concurrency} must be >= 1")
    fn = REQUEST_FUNCS[endpoint]
    ep = Endpoint(engine="external", deploy="external", base_url=base_url, model_name=model, commands=[],
                  log_paths=[], pids=[], simulated=False)

    async def go(progress) -> RunResult:
        if warmup_requests:
            await warmup(fn, ep, [requests[i % len(requests)] for i in range(warmup_requests)], timeout_s,
                         ignore_eos)
        live = LiveStats(progress, "bench", len(requests))
        run = await run_level(fn, ep, requests, offsets_s, timeout_s, 0, live.done,
                              max_concurrency=max_concurrency, ignore_eos=ignore_eos)
        live.refresh()
        return RunResult(run.records, run.duration_wall)

    progress = make_progress(quiet)
    with progress:
        return _run_sync(go(None if progress.disable else progress))

