"""Benchmark metrics: percentiles, SLO verdicts, goodput, clock scaling, arrivals, and the client's
timing against a real streaming server on 127.0.0.1."""
from __future__ import annotations

import asyncio
import dataclasses
import json
from dataclasses import asdict

import numpy as np
import pytest
from tests.bench_servers import bench_server, fetch
from tests.conftest import free_port

from tasks.bench.client import RequestRecord, request_chat, request_completions
from tasks.bench.load import gamma_arrivals, poisson_arrivals
from tasks.bench.metrics import (
    EarlyVerdict, allowed_failures, parse_target, percentiles, summarize_level, violations_needed,
)
from tasks.contracts import BenchRequest

TTFT, ITL, N_TOKENS = 0.05, 0.02, 8
REQ = BenchRequest(prompt="ba be bi bo", prompt_tokens=4, max_tokens=N_TOKENS)


def make_records(e2el_s: np.ndarray, span_s: float, ttft_s: float = 0.1, tokens: int = 11) -> list[RequestRecord]:
    sched = np.linspace(0, span_s, len(e2el_s))
    return [RequestRecord(level=0, request_id=i, scheduled_s=float(s), send_lag_s=0.0, prompt_tokens=4,
                          output_tokens=tokens, ttft_s=ttft_s, e2el_s=float(e), ok=True)
            for i, (s, e) in enumerate(zip(sched, e2el_s))]


# ---------------------------------------------------------------- pure metrics
def test_percentiles_interpolate_and_empty_is_zero():
    p = percentiles(np.arange(1, 101))
    assert (p.mean, p.p50, p.p90) == pytest.approx((50.5, 50.5, 90.1))
    assert p.p99 == pytest.approx(99.01)
    assert percentiles([]).model_dump() == dict.fromkeys(("mean", "p50", "p90", "p95", "p99"), 0.0)


@pytest.mark.parametrize("key,expected", [("e2el_ms_p99", ("e2el", 99.0)), ("tpot_ms_p99.9", ("tpot", 99.9)),
                                          ("ttft_ms_p90", ("ttft", 90.0))])
def test_parse_target(key, expected):
    assert parse_target(key) == expected


@pytest.mark.parametrize("key", ["latency_ms_p99", "e2el_p99", "e2el_ms_p0", "e2el_ms_p101", "itl_ms_p99x"])
def test_parse_target_rejects(key):
    with pytest.raises(ValueError):
        parse_target(key)


def test_summarize_violation_goodput_and_tpot():
    e2el = np.linspace(0.5, 2.5, 100)
    recs = make_records(e2el, span_s=9.0)
    level = summarize_level(3, 10.0, recs, 10.0, {"e2el_ms_p99": 2000, "tpot_ms_p50": 500})
    assert not level.slo_met and level.index == 3
    [v] = level.violations
    measured = float(v.split()[1])
    assert v.startswith("e2el_ms_p99 ") and v.endswith("> 2000") and 2400 < measured < 2500
    assert level.goodput_rps == pytest.approx(np.count_nonzero(e2el <= 2.0) / 10.0)
    assert level.achieved_qps == pytest.approx(10.0)
    assert level.tpot_ms.p50 == pytest.approx(np.median((e2el - 0.1) / 10) * 1e3)
    assert level.output_tok_per_s == pytest.approx(100 * 11 / 10.0)


def test_time_scale_doubles_latencies_and_halves_rates():
    recs = make_records(np.linspace(0.5, 1.5, 50), span_s=5.0)
    for r in recs:
        r.itl_s = [0.01] * 10
    one = summarize_level(0, 4.0, recs, 6.0, {"e2el_ms_p99": 10_000}, time_scale=1.0)
    two = summarize_level(0, 4.0, recs, 6.0, {"e2el_ms_p99": 10_000}, time_scale=2.0)
    for metric in ("ttft_ms", "tpot_ms", "itl_ms", "e2el_ms"):
        assert getattr(two, metric).p99 == pytest.approx(2 * getattr(one, metric).p99)
    assert two.duration_s == pytest.approx(12.0)
    assert two.achieved_qps == pytest.approx(one.achieved_qps / 2)
    assert two.output_tok_per_s == pytest.approx(one.output_tok_per_s / 2)


def test_single_token_requests_have_no_tpot_but_count_for_goodput():
    recs = make_records(np.full(20, 0.3), span_s=5.0, tokens=1) + make_records(np.full(10, 0.3), span_s=5.0)
    level = summarize_level(0, 4.0, recs, 6.0, {"tpot_ms_p99": 1.0})
    assert level.completed == 30
    assert level.tpot_ms.p50 == pytest.approx(20.0)  # only the 11-token requests: (0.3 - 0.1) / 10
    assert level.goodput_rps == pytest.approx(20 / 6.0)  # 1-token requests pass, the others break 1 ms
    assert level.violations[0].startswith("tpot_ms_p99 ")


def test_failures_over_one_percent_break_the_slo():
    recs = make_records(np.full(100, 0.3), span_s=9.0)
    recs[0].ok, recs[0].error = False, "timeout: no complete response"
    assert summarize_level(0, 10.0, recs, 10.0, {"e2el_ms_p99": 2000}).slo_met  # 1 of 100 is allowed
    recs[1].ok, recs[1].error = False, "http: status 503: busy"
    level = summarize_level(0, 10.0, recs, 10.0, {"e2el_ms_p99": 2000})
    assert (level.completed, level.failed) == (98, 2)
    assert level.violations == ["failed 2/100 > 1% (timeout 1, http 1)"]


@pytest.mark.parametrize("targets", [{"e2el_ms_p99": 2000}, {"ttft_ms_p99": 2000}])
def test_backlog_when_level_outlasts_its_arrivals(targets):
    recs = make_records(np.full(40, 0.3), span_s=9.0)
    assert summarize_level(0, 4.0, recs, 10.0, targets).slo_met
    level = summarize_level(0, 4.0, recs, 30.0, targets)
    assert not level.slo_met and level.violations[0].startswith("backlog: arrivals outpace completions")


def test_record_json_roundtrip_rederives_tpot():
    rec = RequestRecord(level=1, request_id=2, scheduled_s=0.5, send_lag_s=0.001, prompt_tokens=4,
                        output_tokens=5, ttft_s=0.1, e2el_s=0.5, itl_s=[0.1] * 4, ok=True)
    assert rec.tpot_s == pytest.approx(0.1)
    back = RequestRecord.from_dict(json.loads(json.dumps(asdict(rec))))
    assert back == rec


# ---------------------------------------------------------------- early verdict
# 58 and 70 as well: there (n - 1) * q / 100 and numpy's (n - 1) * (q / 100) round apart for n = 51, 91
QS = [0.5, 1.0, 10.0, 33.3, 50.0, 58.0, 70.0, 90.0, 95.0, 99.0, 99.9, 100.0]


def lowest_failing_count(n: int, q: float, bound: float = 1.0) -> int:
    """By bisection on numpy: the fewest samples over `bound` that push the percentile over it when the
    others are as low as they can be (0) and the exceeders one float step over (more never lower it).
    One step, as the interpolation weight may be 1 - 1e-14 where (n - 1) q / 100 rounds just under an integer."""
    hair = np.nextafter(bound, np.inf)

    def over(k: int) -> bool:
        return np.percentile(np.r_[np.zeros(n - k), np.full(k, hair)], q) > bound

    lo, hi = 0, n  # over(n) holds
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if over(mid) else (mid + 1, hi)
    return lo


@pytest.mark.parametrize("q", QS)
def test_violations_needed_is_the_least_count_numpy_agrees_with(q):
    ns = range(1, 201)
    assert [violations_needed(n, q) for n in ns] == [lowest_failing_count(n, q) for n in ns]
    assert violations_needed(1, q) == 1
    assert violations_needed(60, 100.0) == 1  # max: one exceeder is enough


def test_violations_needed_holds_on_random_data():
    rng = np.random.default_rng(5)
    for _ in range(3000):
        n, q = int(rng.integers(1, 400)), float(rng.choice([rng.uniform(0.01, 100), *QS]))
        v = rng.lognormal(0, 1, n)
        bound = float(rng.choice(v)) if rng.random() < 0.3 else float(rng.lognormal(0, 1))  # ties, too
        if np.count_nonzero(v > bound) >= violations_needed(n, q):
            assert np.percentile(v, q) > bound, (n, q)
    with pytest.raises(ValueError):
        violations_needed(0, 99.0)


def random_level(rng: np.random.Generator, n: int, q: float, bound_s: float) -> list[RequestRecord]:
    """n requests, a few failed, the share over `bound_s` around what the q-th percentile tolerates."""
    over = rng.random(n) < rng.uniform(0.5, 2.0) * (1 - q / 100 + 1 / n)
    e2el = np.where(over, bound_s * rng.uniform(1.001, 3, n), bound_s * rng.uniform(0.2, 0.999, n))
    fail = rng.random(n) < rng.uniform(0, 0.03)
    tokens = np.where(rng.random(n) < 0.1, 1, 11)
    return [RequestRecord(level=0, request_id=i, scheduled_s=0.1 * i, send_lag_s=0.0, prompt_tokens=4,
                          output_tokens=int(t), ttft_s=0.01, e2el_s=float(e), ok=not f,
                          error="timeout: x" if f else None)
            for i, (e, f, t) in enumerate(zip(e2el, fail, tokens))]


def test_early_verdict_is_never_wrong_and_does_decide():
    """Feed random levels in a random finishing order, telling the verdict at each step how many
    unfinished requests are (truly) past the E2EL bound; whenever it decides, summarize_level on the
    whole level must find the SLO violated."""
    rng = np.random.default_rng(11)
    decided = 0
    for trial in range(400):
        n, ts = int(rng.integers(10, 150)), [1.0, 10.0][trial % 2]
        q = float(rng.choice([50.0, 90.0, 99.0, 99.9, 100.0]))
        key = f"e2el_ms_p{q:g}"
        targets = {key: 2000.0, f"tpot_ms_p{q:g}": 500.0}  # TPOT over 500 ms: only E2EL over ~5 s
        recs = random_level(rng, n, q, bound_s=2.0 / ts)
        verdict = EarlyVerdict(n, targets, ts)
        order = rng.permutation(n)
        for step, i in enumerate(order):
            verdict.add(recs[i])
            rest = [recs[j] for j in order[step + 1:]]
            past = [r for r in rest if not r.ok or r.e2el_s * ts > 2.0]  # what an in-flight check could see
            seen = int(rng.integers(0, len(past) + 1))
            if why := verdict.decided() or verdict.decided({key: seen}):
                level = summarize_level(0, 1.0, recs, 0.0, targets, ts)
                assert not level.slo_met, (why, n, q, step)
                assert why.startswith(f"decided early after {step + 1}/{n} requests: ")
                decided += 1
                break
    assert decided > 100


def test_failures_decide_only_past_the_failure_rule_and_do_not_count_as_over_a_bound():
    n, targets = 200, {"e2el_ms_p99": 2000.0}
    need = violations_needed(n, 99.0)  # 3 of 200
    fast = RequestRecord(level=0, request_id=0, scheduled_s=0.0, send_lag_s=0.0, prompt_tokens=4,
                         output_tokens=5, ttft_s=0.1, e2el_s=0.5, ok=True)
    slow = dataclasses.replace(fast, e2el_s=2.5)
    failed = dataclasses.replace(fast, ok=False, error="timeout: x")
    # allowed failures plus need - 1 slow ones: the whole level can still pass, so nothing is decided...
    head = [failed] * allowed_failures(n) + [slow] * (need - 1)
    verdict = EarlyVerdict(n, targets)
    for r in head:
        verdict.add(r)
    assert verdict.decided() is None
    assert summarize_level(0, 1.0, head + [fast] * (n - len(head)), 1.0, targets).slo_met
    # ...nor when the in-flight ones past the bound could all fail within the rule's slack
    fresh = EarlyVerdict(n, targets)
    fresh.add(slow)
    assert fresh.decided({"e2el_ms_p99": allowed_failures(n) + need - 2}) is None
    why = fresh.decided({"e2el_ms_p99": allowed_failures(n) + need - 1})
    assert why == ("decided early after 1/200 requests: 3 over e2el bound 2000 ms "
                   "(2 of them in flight; e2el_ms_p99 of 198 needs <= 2)")
    # one failure more than allowed decides at once
    verdict.add(failed)
    assert verdict.decided().endswith(f"{allowed_failures(n) + 1} failed (at most {allowed_failures(n)} allowed)")


def test_early_verdict_compares_in_engine_time_and_tpot_only_from_completed():
    targets = {"tpot_ms_p50": 100.0, "e2el_ms_p50": 1000.0, "itl_ms_p50": 1.0}
    verdict = EarlyVerdict(10, targets, time_scale=10.0)
    assert verdict.e2el_bounds_wall_s() == {"e2el_ms_p50": pytest.approx(0.1)}  # ITL and TPOT: no in-flight
    # wall TPOT 0.02 s = 200 engine ms: over; wall E2EL 0.09 s = 900 engine ms: under
    rec = RequestRecord(level=0, request_id=0, scheduled_s=0.0, send_lag_s=0.0, prompt_tokens=4,
                        output_tokens=4, ttft_s=0.03, e2el_s=0.09, ok=True)
    for _ in range(violations_needed(10, 50.0) - 1):
        verdict.add(rec)
        assert verdict.decided() is None
    verdict.add(rec)
    assert "over tpot bound 100 ms" in verdict.decided()


# ---------------------------------------------------------------- arrivals
def test_poisson_arrivals_mean_gap_and_cv():
    offsets = poisson_arrivals(5.0, 20_000, np.random.default_rng(7))
    gaps = np.diff(offsets)
    assert offsets[0] == 0.0 and len(offsets) == 20_000 and np.all(gaps >= 0)
    assert gaps.mean() == pytest.approx(1 / 5.0, rel=0.03)
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, rel=0.05)
    assert np.array_equal(offsets, poisson_arrivals(5.0, 20_000, np.random.default_rng(7)))


def test_gamma_arrivals_are_burstier_at_same_rate():
    gaps = np.diff(gamma_arrivals(5.0, 20_000, np.random.default_rng(1), shape=0.25))
    assert gaps.mean() == pytest.approx(0.2, rel=0.05)
    assert gaps.std() / gaps.mean() == pytest.approx(2.0, rel=0.1)


# ---------------------------------------------------------------- client timing on real HTTP
@pytest.fixture(scope="module")
def server() -> str:
    with bench_server(ttft=TTFT, itl=ITL) as url:
        yield url


def _assert_timing(recs: list[RequestRecord]) -> None:
    for r in recs:
        assert r.ok, r.error
        assert r.output_tokens == N_TOKENS and len(r.itl_s) == N_TOKENS - 1
        # vLLM's definitions hold exactly; the server's sleeps are lower bounds, and the upper bounds are
        # loose because a 2-core host running tests in parallel can stall a request by a few hundred ms.
        assert r.tpot_s == pytest.approx((r.e2el_s - r.ttft_s) / (N_TOKENS - 1), rel=1e-9)
        assert np.mean(r.itl_s) == pytest.approx(r.tpot_s, rel=0.1)
        assert TTFT <= r.ttft_s < TTFT + 0.5
        assert ITL * 0.75 <= r.tpot_s < ITL * 5
        assert TTFT + (N_TOKENS - 1) * ITL <= r.e2el_s < TTFT + (N_TOKENS - 1) * ITL + 0.5


def test_completions_timing(server):
    recs = fetch(request_completions, server, "stream", [REQ] * 4)
    _assert_timing(recs)
    assert all(r.prompt_tokens == 4 for r in recs)
    scaled = summarize_level(0, 1.0, recs, 1.0, {"e2el_ms_p99": 10_000}, time_scale=2.0)
    assert 2e3 * TTFT <= scaled.ttft_ms.p50 < 2e3 * (TTFT + 0.04)
    assert 2e3 * ITL * 0.75 <= scaled.itl_ms.p50 < 2e3 * ITL * 1.75


def test_chat_role_chunk_is_not_the_first_token(server):
    _assert_timing(fetch(request_chat, server, "stream", [REQ] * 3))


def test_a_token_chunk_with_held_back_text_is_the_first_token_and_usage_does_not_end_the_request(server):
    # As `vllm bench serve` counts: TTFT at the first chunk with choices, E2EL at the last token chunk.
    recs = fetch(request_completions, server, "heldback", [REQ] * 2)
    _assert_timing(recs)


def test_a_stream_without_done_completes_when_its_last_token_names_a_finish_reason(server):
    _assert_timing(fetch(request_completions, server, "nodone", [REQ] * 2))
    _assert_timing(fetch(request_chat, server, "nodone", [REQ]))
    cut = fetch(request_completions, server, "truncate", [REQ])[0]  # no finish_reason: cut short
    assert not cut.ok and cut.error.startswith("truncated") and cut.output_tokens == 2


def test_output_tokens_fall_back_to_chunk_count_without_usage(server):
    long = BenchRequest(prompt="ba be", prompt_tokens=99, max_tokens=N_TOKENS)
    recs = fetch(request_completions, server, "nousage", [long])
    _assert_timing(recs)
    assert recs[0].prompt_tokens == 99  # no usage: the dataset's count


def test_preconnected_connections_carry_the_requests_and_a_dead_port_costs_nothing(server):
    from tasks.bench.http import LeanSession

    async def go() -> tuple[int, int, int, list]:
        async with LeanSession() as session:
            opened = await session.preconnect(server, 3)
            pooled = {id(w) for w in session.open}
            # Three at once: each takes one of the pre-opened connections, none is opened in the level.
            recs = await asyncio.gather(*(request_completions(session, server, "stream", REQ, 5.0) for _ in range(3)))
            new = len({id(w) for w in session.open} - pooled)
        async with LeanSession() as dead:
            refused = await dead.preconnect(f"http://127.0.0.1:{free_port()}", 2)
        return opened, new, refused, recs

    opened, new_after, refused, recs = asyncio.run(go())
    assert opened == 3 and new_after == 0 and refused == 0
    _assert_timing(recs)
