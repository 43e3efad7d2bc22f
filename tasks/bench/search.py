"""Max-sustainable-QPS search: run Poisson load levels against an endpoint until the SLO breaks, then
bisect between the last good and the first bad rate.

Open loop, no coordinated omission: every request is scheduled up front and its latencies count from
its scheduled time, however late the client sends it (the lag is recorded). Rates, latencies and
timeouts are in engine time (see `tasks.bench.metrics` for the clock conversion).

A level stops as soon as its verdict is certain to be "violated" (`EarlyVerdict`): no further sends, and
requests in flight are cancelled and recorded as failed with error class "cancelled"; requests never sent
have no record. A level that holds its SLO always runs every request.
"""
from __future__ import annotations

import asyncio
import gc
import json
import math
import os
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Coroutine, Generator, Iterator, TypeVar

import numpy as np
from rich.progress import Progress

from tasks.bench.client import REQUEST_FUNCS, RequestFn, RequestRecord, new_session, preconnect
from tasks.bench.engine_metrics import LevelProbe
from tasks.bench.progress import LiveStats, make_progress
from tasks.bench.load import ArrivalFn, poisson_arrivals
from tasks.bench.metrics import (
    CANCELLED, EarlyVerdict, parse_target, summarize_level, to_engine_record, to_wall_s,
)
from tasks.config import BenchConfig, SLOConfig
from tasks.contracts import BenchRequest, BenchResult, Endpoint, LevelResult

T = TypeVar("T")
STEP_DOWN_LEVELS = 3
# A level's arrivals span at least this many times the largest TTFT/E2EL bound: over a shorter span a
# queue that grows without limit still finishes inside the bound (a 60-request burst at 10x capacity
# "holds" a 10 s SLO). With 5 bounds, any overload above 1.25x capacity pushes latency past the bound.
LEVEL_SPAN_PER_BOUND = 5.0  # when the first level fails, try start / growth**k for k = 1..3
CHECK_INTERVAL_WALL_S = 0.05  # how often in-flight requests are checked against the E2EL bounds
# A record's E2EL ends at its last data chunk, and [DONE] may trail it: an in-flight request counts as
# over an E2EL bound only this much (wall) after it, so one finishing just under the bound never does.
DONE_GUARD_WALL_S = 0.05
# The last stretch before a send is waited by yielding to the loop, not by a timer (which wakes up to
# 1 ms late); $DOLPHIN_BENCH_SPIN_MS overrides it, 0 turns it off.
SPIN_S = float(os.environ.get("DOLPHIN_BENCH_SPIN_MS", "1.0")) / 1e3
DISPATCH_LEAD_S = 0.02  # a request's task exists this long before its send
# Connections opened before a level starts: opening one inside the level costs the loop ~1 ms, and a
# burst of arrivals would otherwise open one each at the worst moment.
PRECONNECT = 32
# A percentile estimate needs this many samples at or beyond it (the 10 / (1 - p) rule).
MIN_TAIL_SAMPLES = 10


def search_qps(start: float, growth: float, tolerance: float, max_levels: int) -> Generator[float, bool, None]:
    """The QPS levels to run, as a generator that is sent each level's verdict (True = SLO met).

    Ramp up by `growth` until a level fails; if the very first fails, step down by `growth` (at most
    STEP_DOWN_LEVELS times) until one holds; then bisect between the highest good and lowest bad rate
    until (bad - good) / good < tolerance. Never more than `max_levels` levels.
    """
    run = 0
    good = bad = None
    qps = start
    while run < max_levels:
        met = yield qps
        run += 1
        if not met:
            bad = qps
            break
        good, qps = qps, qps * growth
    if good is None and bad is not None:
        floor = start / growth**STEP_DOWN_LEVELS
        qps = bad / growth
        while run < max_levels and qps >= floor * (1 - 1e-9):
            met = yield qps
            run += 1
            if met:
                good = qps
                break
            bad, qps = qps, qps / growth
    while good is not None and bad is not None and run < max_levels and (bad - good) / good >= tolerance:
        mid = (good + bad) / 2
        met = yield mid
        run += 1
        good, bad = (mid, bad) if met else (good, mid)


def min_requests_for_percentile(q: float, tail: int = MIN_TAIL_SAMPLES) -> int:
    """Fewest requests whose q-th percentile rests on >= `tail` samples at or above it:
    ceil(tail / (1 - q/100)) (tail 10: p90 100, p99 1000, p99.9 10000). The max (q = 100): 1."""
    if q >= 100 or tail <= 0:
        return 1
    return math.ceil(round(tail / (1 - q / 100), 6))  # 10 / 0.001 is 10000.000000000009


def level_size(qps: float, bench: BenchConfig, slo: SLOConfig, min_tail_samples: int = MIN_TAIL_SAMPLES) -> int:
    """Requests in a level at `qps`: bench.requests_per_level, or more so that arrivals span
    bench.min_level_duration_s and LEVEL_SPAN_PER_BOUND x the largest TTFT/E2EL bound (engine seconds),
    and so that every target's percentile has `min_requests_for_percentile` requests behind it."""
    targets = [parse_target(k) + (b,) for k, b in slo.targets.items()]
    bounds_s = [b / 1e3 for metric, _, b in targets if metric in ("ttft", "e2el")]
    span_s = max([bench.min_level_duration_s, *(LEVEL_SPAN_PER_BOUND * b for b in bounds_s)])
    tail = max(min_requests_for_percentile(q, min_tail_samples) for _, q, _ in targets)
    return max(bench.requests_per_level, math.ceil(span_s * qps), tail)


def level_requests(requests: list[BenchRequest], n: int, rng: np.random.Generator) -> list[BenchRequest]:
    """n requests cycling through a seeded permutation of the dataset."""
    return [requests[i] for i in np.resize(rng.permutation(len(requests)), n)]


@dataclass
class LevelRun:
    records: list[RequestRecord]  # the sent requests, in request order (wall clock)
    duration_wall: float  # the level start to its last response (or to the cancellations)
    decided: str | None  # why the level stopped early; None when every request ran


def _cancelled_record(req: BenchRequest, index: int, i: int, offset: float, lag: float, age: float) -> RequestRecord:
    return RequestRecord(level=index, request_id=i, scheduled_s=offset, send_lag_s=lag,
                         prompt_tokens=req.prompt_tokens, e2el_s=age, ok=False,
                         error=f"{CANCELLED}: in flight when the level's SLO verdict was decided")


class _Slots:
    """A semaphore that tells each waiter when its slot was freed: in a closed loop that instant, not the
    waiter's wake-up, is the request's scheduled send, so a slow event loop shows up as send lag."""

    def __init__(self, n: int):
        self.free = n
        self.waiters: deque[asyncio.Future] = deque()

    async def acquire(self) -> float | None:
        """None when a slot was free at once; else the perf_counter time it was freed for us."""
        if self.free > 0 and not self.waiters:
            self.free -= 1
            return None
        fut = asyncio.get_running_loop().create_future()
        self.waiters.append(fut)
        try:
            return await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self.release()  # handed a slot while being cancelled: pass it on
            else:
                self.waiters.remove(fut)
            raise

    def release(self) -> None:
        while self.waiters:
            fut = self.waiters.popleft()
            if not fut.done():
                fut.set_result(time.perf_counter())
                return
        self.free += 1


async def sleep_until(t: float) -> None:
    """Wake at perf_counter time t, to tens of microseconds: the event loop's own timers wake up to 1 ms
    late (epoll waits in whole ms), so sleep to SPIN_S before t, then yield to the loop until t."""
    delay = t - time.perf_counter()
    if delay > SPIN_S:
        await asyncio.sleep(delay - SPIN_S)
    while time.perf_counter() < t:
        await asyncio.sleep(0)  # other callbacks (responses) still run


@contextmanager
def _quiet_gc() -> Iterator[None]:
    """No automatic garbage collection while a level runs (vLLM's bench freezes its heap the same way): a
    collection scans every container allocated since the last one, and a level's records and finished
    tasks make that ~14 ms of stalled sends per 50,000 objects. Their references are acyclic, so memory
    does not grow without it; the few cycles (cancelled tasks) are collected when the level ends."""
    gc.collect()
    gc.freeze()
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()
        gc.unfreeze()


async def run_level(
    fn: RequestFn, endpoint: Endpoint, reqs: list[BenchRequest], offsets_wall: np.ndarray, timeout_wall: float,
    index: int, on_done: Callable[[RequestRecord], None] = lambda r: None, verdict: EarlyVerdict | None = None,
    max_concurrency: int | None = None, ignore_eos: bool = True,
) -> LevelRun:
    """Send reqs[i] at offsets_wall[i] after the level start. With a `verdict`, stop as soon as it is
    decided: the counters are checked as each request finishes, the in-flight ones every
    CHECK_INTERVAL_WALL_S against the E2EL bounds. With `max_concurrency`, a request also waits for one
    of that many slots (closed loop); its latencies then count from the later of its arrival and the
    moment its slot was freed (`queue_s` after `scheduled_s`)."""
    offsets = np.asarray(offsets_wall, dtype=float)
    slots = _Slots(max_concurrency) if max_concurrency else None
    with _quiet_gc():
        return await _run_level(fn, endpoint, reqs, offsets, timeout_wall, index, on_done, verdict, slots,
                                ignore_eos)


async def _run_level(fn: RequestFn, endpoint: Endpoint, reqs: list[BenchRequest], offsets: np.ndarray,
                     timeout_wall: float, index: int, on_done: Callable[[RequestRecord], None],
                     verdict: EarlyVerdict | None, slots: _Slots | None, ignore_eos: bool) -> LevelRun:
    records: list[RequestRecord | None] = [None] * len(reqs)
    finished = np.zeros(len(reqs), dtype=bool)
    why: list[str] = []
    tasks: list[asyncio.Task] = []

    def stop(reason: str) -> None:
        if not why:
            why.append(reason)
            me = asyncio.current_task()
            for t in tasks:
                if t is not me:
                    t.cancel()

    async with new_session() as session:
        await preconnect(session, endpoint.base_url, min(len(reqs), PRECONNECT))
        t0 = time.perf_counter()

        async def one(i: int, req: BenchRequest, offset: float) -> None:
            start = t0 + offset
            await sleep_until(start)  # cancelled here: never sent, no record
            if slots is not None:
                freed = await slots.acquire()  # cancelled here: never sent, no record
                if freed is not None and freed > start:
                    start = freed
            sent = time.perf_counter()
            try:
                rec = await fn(session, endpoint.base_url, endpoint.model_name, req, timeout_wall,
                               level=index, request_id=i, scheduled_s=offset, start=start, ignore_eos=ignore_eos)
            except asyncio.CancelledError:
                records[i] = _cancelled_record(req, index, i, offset, sent - start, time.perf_counter() - start)
                records[i].queue_s = start - t0 - offset
                raise
            finally:
                if slots is not None:
                    slots.release()
            rec.queue_s = start - t0 - offset
            records[i], finished[i] = rec, True
            on_done(rec)
            if verdict is not None:
                verdict.add(rec)
                if reason := verdict.decided():
                    stop(reason)

        async def watch(bounds_wall: dict[str, float]) -> None:
            while not why:
                await asyncio.sleep(CHECK_INTERVAL_WALL_S)
                age = time.perf_counter() - t0 - offsets  # from the scheduled send, sent or not
                over = {k: int(np.count_nonzero((age > b + DONE_GUARD_WALL_S) & ~finished))
                        for k, b in bounds_wall.items()}
                if reason := verdict.decided(over):
                    stop(reason)

        async def dispatch() -> None:
            # Each request's task is created DISPATCH_LEAD_S before its send (not all up front, which
            # would take the loop for a while at t0 and hold thousands of timers); it then waits to the
            # instant itself.
            for i, (req, offset) in enumerate(zip(reqs, offsets.tolist())):
                delay = t0 + offset - DISPATCH_LEAD_S - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                if why:
                    return
                tasks.append(asyncio.create_task(one(i, req, offset)))

        tasks.append(asyncio.create_task(dispatch()))  # first, so that stop() cancels it too
        bounds = verdict.e2el_bounds_wall_s() if verdict is not None else {}
        watcher = asyncio.create_task(watch(bounds)) if bounds else None
        try:
            await asyncio.gather(tasks[0], return_exceptions=True)
            # Wait for the unfinished ones only: a gather over every task of the level would register
            # thousands of callbacks in one go and stall the last sends by ~10 ms.
            if pending := [t for t in tasks[1:] if not t.done()]:
                await asyncio.wait(pending)
        finally:  # also when we are cancelled ourselves: leave no task behind
            for t in tasks:
                t.cancel()
            if watcher:
                watcher.cancel()
                await asyncio.gather(watcher, return_exceptions=True)
        duration = time.perf_counter() - t0
    for t in tasks[1:]:
        if not t.cancelled() and (exc := t.exception()) is not None:
            raise exc
    return LevelRun([r for r in records if r is not None], duration, why[0] if why else None)


async def warmup(fn: RequestFn, endpoint: Endpoint, reqs: list[BenchRequest], timeout_wall: float,
                 ignore_eos: bool = True) -> None:
    """Sequential requests before the first level (connections, engine caches); not recorded."""
    async with new_session() as session:
        for i, req in enumerate(reqs):
            await fn(session, endpoint.base_url, endpoint.model_name, req, timeout_wall, level=-1, request_id=i,
                     ignore_eos=ignore_eos)


def _append_records(path: Path, records: list[RequestRecord], time_scale: float) -> None:
    with open(path, "a") as f:
        f.writelines(json.dumps(asdict(to_engine_record(r, time_scale))) + "\n" for r in records)
        f.flush()


@dataclass
class SearchOptions:
    """What `dolphin bench --search` sets beyond BenchConfig (the pipeline uses the defaults)."""

    arrivals: ArrivalFn = poisson_arrivals  # e.g. functools.partial(gamma_arrivals, shape=burstiness)
    time_budget_s: float | None = None  # wall seconds; no level starts that would end past it
    ignore_eos: bool = True
    min_tail_samples: int = MIN_TAIL_SAMPLES  # 0: no percentile-driven level size
    min_goodput_pct: float | None = None  # also an SLO: share of requests meeting every bound
    notes: list[str] = field(default_factory=list)  # why the search stopped early, when it did


async def _search(
    endpoint: Endpoint, requests: list[BenchRequest], bench: BenchConfig, slo: SLOConfig, records_path: Path,
    start_qps: float, on_level: Callable[[LevelResult], None] | None, progress: Progress | None,
    opts: SearchOptions,
) -> list[LevelResult]:
    fn = REQUEST_FUNCS[bench.endpoint]
    ts = endpoint.time_scale
    timeout_wall = float(to_wall_s(bench.request_timeout_s, ts))
    t_start = time.perf_counter()
    if bench.warmup_requests:
        await warmup(fn, endpoint, [requests[i % len(requests)] for i in range(bench.warmup_requests)],
                     timeout_wall, opts.ignore_eos)
    levels: list[LevelResult] = []
    plan = search_qps(start_qps, bench.growth, bench.bisect_tolerance, bench.max_levels)
    verdict = None
    while True:
        try:
            qps = plan.send(verdict) if levels else next(plan)
        except StopIteration:
            return levels
        index = len(levels)
        rng = np.random.default_rng(bench.seed + index)
        n = level_size(qps, bench, slo, opts.min_tail_samples)
        offsets_wall = to_wall_s(opts.arrivals(qps, n, rng), ts)
        if opts.time_budget_s is not None and levels:
            left = opts.time_budget_s - (time.perf_counter() - t_start)
            if float(offsets_wall[-1]) > left:  # a held level runs to its end: it would not fit
                opts.notes.append(f"time budget: level {index} at {qps:.3g} QPS needs "
                                  f"{float(offsets_wall[-1]):.0f} s, {max(left, 0):.0f} s of "
                                  f"{opts.time_budget_s:g} s left")
                return levels
        reqs = level_requests(requests, n, rng)
        bar = LiveStats(progress, f"level {index} @ {qps:.3g} qps", n, ts)
        early = EarlyVerdict(n, dict(slo.targets), ts)
        # The engine's own view of the level (KV usage, queueing, preemptions, spec acceptance), sampled
        # off the event loop so that polling /metrics never delays a send.
        probe = LevelProbe(endpoint.metrics_url, interval_s=min(1.0, max(0.1, float(offsets_wall[-1]) / 30)))
        await asyncio.to_thread(probe.start)
        try:
            run = await run_level(fn, endpoint, reqs, offsets_wall, timeout_wall, index, bar.done, early,
                                  ignore_eos=opts.ignore_eos)
        finally:
            engine = await asyncio.to_thread(probe.stop)
        bar.refresh()
        _append_records(records_path, run.records, ts)
        level = summarize_level(index, qps, run.records, run.duration_wall, dict(slo.targets), ts, run.decided,
                                min_goodput_pct=opts.min_goodput_pct)
        level = level.model_copy(update={"engine": engine})
        levels.append(level)
        verdict = level.slo_met
        if on_level is not None:
            on_level(level)


def _run_sync(coro: Coroutine[None, None, T]) -> T:
    """asyncio.run, also from a thread whose loop is already running (then on a helper thread)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


def run_slo_search(
    endpoint: Endpoint,
    requests: list[BenchRequest],
    bench: BenchConfig,
    slo: SLOConfig,
    out_dir: Path,
    start_qps_hint: float | None = None,
    on_level: Callable[[LevelResult], None] | None = None,
    quiet: bool = False,
    options: SearchOptions | None = None,
) -> BenchResult:
    """Find the highest Poisson QPS (engine time) at which every SLO target holds. Request records go to
    out_dir/requests.jsonl (engine time, one line per request, appended as each level ends). `options`:
    arrival shape, time budget, goodput SLO (see SearchOptions; `options.notes` says why it stopped)."""
    opts = options or SearchOptions()
    if not requests:
        raise ValueError("run_slo_search needs at least one request")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    records_path = out_dir / "requests.jsonl"
    records_path.write_text("")  # one search, one file
    start = bench.start_qps or start_qps_hint or 1.0
    progress = make_progress(quiet)
    with progress:
        levels = _run_sync(_search(endpoint, requests, bench, slo, records_path, start, on_level,
                                   None if progress.disable else progress, opts))
    good = [lv for lv in levels if lv.slo_met]
    best = max(good, key=lambda lv: lv.target_qps) if good else None
    return BenchResult(
        slo_targets=dict(slo.targets),
        levels=levels,
        max_sustainable_qps=best.target_qps if best else 0.0,
        best_level=best.index if best else None,
        records_path=str(records_path),
        time_scale=endpoint.time_scale,
        simulated=endpoint.simulated,
    )
