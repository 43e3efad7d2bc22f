"""The QPS search plan, the client's error classes, and a whole SLO search against a single-queue server
on 127.0.0.1 whose capacity is known."""
from __future__ import annotations

import json
import math
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from tests.bench_servers import bench_server, fetch, free_closed_port

from tasks.bench.client import error_class, load_records, request_chat, request_completions
from tasks.bench.metrics import violations_needed
from tasks.bench.search import LEVEL_SPAN_PER_BOUND, SearchOptions, level_size, run_slo_search, search_qps
from tasks.config import BenchConfig, SLOConfig
from tasks.contracts import BenchRequest, Endpoint

SERVICE_WALL_S = 0.01
TIME_SCALE = 10.0  # the queue serves one request per >= 0.1 engine seconds: capacity <= 10 engine QPS
REQS = [BenchRequest(prompt=" ".join(["ba"] * n), prompt_tokens=n, max_tokens=4) for n in (3, 5, 8)]


def drive(plan, holds) -> list[tuple[float, bool]]:
    """Run a search plan against a pure verdict function; return (qps, met) per level."""
    levels, verdict = [], None
    try:
        qps = next(plan)
        while True:
            verdict = holds(qps)
            levels.append((qps, verdict))
            qps = plan.send(verdict)
    except StopIteration:
        return levels


# ---------------------------------------------------------------- search plan
def test_plan_ramps_then_bisects_to_tolerance():
    levels = drive(search_qps(1.0, 2.0, 0.1, 20), lambda q: q <= 7.3)
    assert [q for q, _ in levels[:4]] == [1.0, 2.0, 4.0, 8.0]
    good = max(q for q, met in levels if met)
    bad = min(q for q, met in levels if not met)
    assert good <= 7.3 < bad and (bad - good) / good < 0.1


def test_plan_steps_down_when_first_level_fails():
    levels = drive(search_qps(10.0, 2.0, 0.1, 20), lambda q: q <= 2.0)
    assert [q for q, _ in levels[:4]] == [10.0, 5.0, 2.5, 1.25]
    assert max(q for q, met in levels if met) == pytest.approx(2.0, rel=0.1)


def test_plan_gives_up_below_start_over_growth_cubed_and_respects_max_levels():
    assert [q for q, _ in drive(search_qps(8.0, 2.0, 0.1, 20), lambda q: False)] == [8.0, 4.0, 2.0, 1.0]
    assert len(drive(search_qps(1.0, 2.0, 0.1, 3), lambda q: True)) == 3
    assert len(drive(search_qps(1.0, 2.0, 0.01, 5), lambda q: q < 3)) == 5


# ---------------------------------------------------------------- error classes on real HTTP
@pytest.fixture(scope="module")
def server() -> str:
    with bench_server(ttft=0.01, itl=0.005, service=SERVICE_WALL_S) as url:
        yield url


@pytest.mark.parametrize("fn", [request_completions, request_chat])
@pytest.mark.parametrize("model,cls", [("error500", "http"), ("truncate", "truncated"), ("abort", "truncated"),
                                       ("hang", "timeout")])
@pytest.mark.parametrize("http", ["lean", "aiohttp"])
def test_errors_become_failed_records(server, fn, model, cls, http, monkeypatch):
    monkeypatch.setenv("DOLPHIN_BENCH_HTTP", http)  # both HTTP clients classify alike
    [rec] = fetch(fn, server, model, REQS[:1], timeout_s=0.3)
    assert not rec.ok and error_class(rec) == cls, rec.error
    assert rec.tpot_s is None
    if cls == "http":
        assert "500" in rec.error
    if cls == "timeout":
        assert 0.3 <= rec.e2el_s < 1.0


def test_connection_refused_is_a_connection_error():
    [rec] = fetch(request_completions, f"http://127.0.0.1:{free_closed_port()}", "stream", REQS[:1])
    assert not rec.ok and error_class(rec) == "connection", rec.error


# ---------------------------------------------------------------- whole search
def test_search_finds_capacity_of_single_queue(server, tmp_path):
    endpoint = Endpoint(engine="test", deploy="agg", base_url=server, model_name="queue", commands=[],
                        log_paths=[], pids=[], simulated=True, time_scale=TIME_SCALE)
    bench = BenchConfig(requests_per_level=60, warmup_requests=2, start_qps=3.0, growth=2.0, max_levels=6,
                        bisect_tolerance=0.25, request_timeout_s=30.0, seed=3)
    # p90, not p99: a 60-request level's p99 is its worst Poisson cluster, too noisy to pin a capacity.
    slo = SLOConfig(targets={"e2el_ms_p90": 400})
    seen = []
    with ThreadPoolExecutor(1) as pool:  # as a flow runs it: from a worker thread with no event loop
        result = pool.submit(run_slo_search, endpoint, REQS, bench, slo, tmp_path, None, seen.append, True,
                             SearchOptions(min_tail_samples=0)).result()

    capacity = 1 / (SERVICE_WALL_S * TIME_SCALE)
    assert 3.0 <= result.max_sustainable_qps < capacity
    assert [lv.index for lv in result.levels] == list(range(len(result.levels))) and seen == result.levels
    best = result.levels[result.best_level]
    assert best.slo_met and best.target_qps == result.max_sustainable_qps
    failing = [lv for lv in result.levels if not lv.slo_met]
    assert failing and all(lv.violations for lv in failing)
    assert any(v.startswith(("e2el_ms_p90 ", "backlog", "decided early")) for lv in failing for v in lv.violations)
    assert all(lv.target_qps > result.max_sustainable_qps for lv in failing)
    assert result.time_scale == TIME_SCALE and result.simulated

    lines = [json.loads(line) for line in open(result.records_path)]
    assert len(lines) == sum(lv.num_requests for lv in result.levels)
    assert [sum(r["level"] == lv.index for r in lines) for lv in result.levels] == \
           [lv.num_requests for lv in result.levels]
    # Records are in engine time: no request completes faster than one engine service time.
    assert min(r["e2el_s"] for r in lines if r["ok"]) >= SERVICE_WALL_S * TIME_SCALE * 0.95


# ---------------------------------------------------------------- early end of a failing level
def one_level(server: str, model: str, targets: dict[str, float], n: int, qps: float, tmp_path):
    endpoint = Endpoint(engine="test", deploy="agg", base_url=server, model_name=model, commands=[],
                        log_paths=[], pids=[], simulated=True, time_scale=TIME_SCALE)
    bench = BenchConfig(requests_per_level=n, warmup_requests=0, start_qps=qps, max_levels=1,
                        request_timeout_s=300.0, seed=1)
    t0 = time.perf_counter()
    # The levels' size is the test's n, not the 10 / (1 - p) rule's (tested on its own below).
    result = run_slo_search(endpoint, REQS, bench, SLOConfig(targets=targets), tmp_path, quiet=True,
                            options=SearchOptions(min_tail_samples=0))
    wall = time.perf_counter() - t0
    [level] = result.levels
    records = load_records(result.records_path)
    return level, records, wall


# The server's E2EL is >= 0.025 wall s = 250 engine ms, far over the bound: "stream" finishes over it,
# "hang" never finishes (only the in-flight check can tell), "error500" fails at once.
@pytest.mark.parametrize("model,reason,classes", [
    ("stream", " over e2el bound 100 ms", {None, "cancelled"}),
    ("hang", " over e2el bound 100 ms", {"cancelled"}),
    ("error500", " failed (at most 0 allowed)", {"http", "cancelled"}),
])
def test_level_that_cannot_pass_ends_early(server, tmp_path, model, reason, classes):
    n, qps = 60, 1.0  # ~59 engine s = ~5.9 wall s of arrivals if it ran to the end
    level, records, wall = one_level(server, model, {"e2el_ms_p99": 100}, n, qps, tmp_path)
    assert not level.slo_met
    assert level.violations[0].startswith("decided early after ") and reason in level.violations[0]
    assert not any(v.startswith("backlog") for v in level.violations)  # a cut level has no arrival span
    assert level.num_requests <= violations_needed(n, 99) + 3  # sent: those that decided, and a few in flight
    assert level.duration_s < 0.1 * (n - 1) / qps and wall < 2.0
    # The records are the sent requests, truthfully: cancelled ones are failed, never ok.
    assert len(records) == level.num_requests and level.failed == sum(not r.ok for r in records)
    assert {error_class(r) for r in records} <= classes
    cancelled = [r for r in records if error_class(r) == "cancelled"]
    assert all(not r.ok and r.ttft_s is None and r.e2el_s >= 0 for r in cancelled)
    if model == "hang":
        assert cancelled and level.completed == 0


def test_passing_level_runs_every_request(server, tmp_path):
    targets = {"e2el_ms_p99": 1_000, "ttft_ms_p50": 800}
    level, records, _ = one_level(server, "stream", targets, 20, 20.0, tmp_path)
    n = level_size(20.0, BenchConfig(requests_per_level=20), SLOConfig(targets=targets), min_tail_samples=0)
    assert n == 100  # 5 x the 1 s bound at 20 QPS
    assert level.slo_met and level.violations == []
    assert level.num_requests == level.completed == len(records) == n


def test_levels_hold_ten_samples_beyond_each_percentile():
    bench = BenchConfig(requests_per_level=10)
    sizes = {q: level_size(0.01, bench, SLOConfig(targets={f"tpot_ms_p{q}": 50})) for q in ("50", "90", "99", "99.9")}
    assert sizes == {"50": 20, "90": 100, "99": 1000, "99.9": 10000}
    assert level_size(0.01, bench, SLOConfig(targets={"tpot_ms_p100": 50, "ttft_ms_p90": 9})) == 100
    assert level_size(0.01, bench, SLOConfig(targets={"tpot_ms_p99": 50}), min_tail_samples=0) == 10


def test_levels_span_several_latency_bounds():
    # A 60-request burst at 149 QPS spans 0.4 s: a growing queue would still finish inside a 10 s bound.
    bench = BenchConfig(requests_per_level=60)
    loose = SLOConfig(targets={"e2el_ms_p99": 10_000, "tpot_ms_p99": 50})
    assert level_size(149.0, bench, loose, min_tail_samples=0) == math.ceil(149.0 * LEVEL_SPAN_PER_BOUND * 10)
    assert level_size(0.5, bench, loose, min_tail_samples=0) == 60  # already spans 120 s
    # TPOT/ITL bounds are per token: they do not set the span.
    assert level_size(149.0, bench, SLOConfig(targets={"tpot_ms_p99": 50}), min_tail_samples=0) == 60
    longer = BenchConfig(requests_per_level=60, min_level_duration_s=100)
    assert level_size(2.0, longer, SLOConfig(targets={"ttft_ms_p90": 100}), min_tail_samples=0) == 200
