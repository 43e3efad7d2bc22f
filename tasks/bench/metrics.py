"""Per-level aggregation of request records into `LevelResult`: percentiles, goodput, SLO verdict.

Definitions follow vLLM's benchmark: TTFT = first token - scheduled send; TPOT = (E2EL - TTFT) /
(output tokens - 1) per request with more than one token; ITL = gaps between streamed chunks, pooled;
E2EL = last chunk - scheduled send. Goodput counts requests whose own TTFT/TPOT/E2EL are all within the
bounds (as `vllm bench serve --goodput`).

Time scale: the sim engine may run on a scaled clock (`time_scale` engine seconds per wall second). The
client measures wall seconds; `to_engine_s` / `to_wall_s` below are the only place where the two
clocks meet, so every reported latency and QPS is in engine time.

Early verdict: `EarlyVerdict` tells, from a level's partial outcome, when `summarize_level` on the whole
level is certain to say "violated", so the search can stop the level (see `tasks.bench.search`).
"""
from __future__ import annotations

import dataclasses
import math
import re
from collections import Counter
from typing import Iterable

import numpy as np

from tasks.bench.client import RequestRecord, error_class
from tasks.contracts import LevelResult, Percentiles

METRICS = ("ttft", "tpot", "itl", "e2el")
PER_REQUEST = ("ttft", "tpot", "e2el")  # one value per request (ITL pools every gap of every request)
_TARGET = re.compile(r"(ttft|tpot|itl|e2el)_ms_p(\d+(?:\.\d+)?)")
MAX_FAILED_FRACTION = 0.01
# Backlog: the level may take this many times its arrival span, plus one latency allowance.
BACKLOG_SPAN_FACTOR = 1.5
# Error class of a request stopped in flight because its level's verdict was already decided: it has no
# outcome, so it is not ok (counts in `failed`) but the failed-requests rule leaves it out.
CANCELLED = "cancelled"


# ---------------------------------------------------------------- clocks
def to_engine_s(wall_s, time_scale: float):
    """Wall seconds (scalar or array) -> engine seconds."""
    return wall_s * time_scale


def to_wall_s(engine_s, time_scale: float):
    """Engine seconds (scalar or array) -> wall seconds (for scheduling and timeouts)."""
    return engine_s / time_scale


def to_engine_record(rec: RequestRecord, time_scale: float) -> RequestRecord:
    """A wall-clock record as the engine saw it (TPOT is re-derived)."""
    if time_scale == 1.0:
        return rec

    def scale(x: float | None) -> float | None:
        return None if x is None else float(to_engine_s(x, time_scale))

    return dataclasses.replace(
        rec,
        scheduled_s=scale(rec.scheduled_s),
        send_lag_s=scale(rec.send_lag_s),
        queue_s=scale(rec.queue_s),
        ttft_s=scale(rec.ttft_s),
        e2el_s=scale(rec.e2el_s),
        itl_s=to_engine_s(np.asarray(rec.itl_s, dtype=float), time_scale).tolist(),
    )


# ---------------------------------------------------------------- targets and percentiles
def parse_target(key: str) -> tuple[str, float]:
    """'tpot_ms_p99.9' -> ('tpot', 99.9)."""
    m = _TARGET.fullmatch(key)
    if not m:
        raise ValueError(f"SLO target {key!r} is not <ttft|tpot|itl|e2el>_ms_p<percentile>")
    q = float(m.group(2))
    if not 0 < q <= 100:
        raise ValueError(f"SLO target {key!r}: percentile must be in (0, 100]")
    return m.group(1), q


def percentiles(values_ms: Iterable[float] | np.ndarray) -> Percentiles:
    """Mean and p50/p90/p95/p99 (numpy linear interpolation). No values -> all 0.0: read it together with
    the level's `completed` count; NaN would not survive JSON or MLflow."""
    v = np.asarray(values_ms, dtype=float)
    if v.size == 0:
        return Percentiles(mean=0.0, p50=0.0, p90=0.0, p95=0.0, p99=0.0)
    p50, p90, p95, p99 = np.percentile(v, [50, 90, 95, 99])
    return Percentiles(mean=float(v.mean()), p50=float(p50), p90=float(p90), p95=float(p95), p99=float(p99))


def samples_ms(ok: list[RequestRecord]) -> dict[str, np.ndarray]:
    """Per-metric samples in ms from successful records (ITL pooled over requests)."""
    itl = [r.itl_s for r in ok if r.itl_s]
    return {
        "ttft": np.array([r.ttft_s for r in ok], dtype=float) * 1e3,
        "tpot": np.array([r.tpot_s for r in ok if r.tpot_s is not None], dtype=float) * 1e3,
        "itl": (np.concatenate(itl) if itl else np.empty(0)) * 1e3,
        "e2el": np.array([r.e2el_s for r in ok], dtype=float) * 1e3,
    }


def goodput_mask(ok: list[RequestRecord], slo_targets: dict[str, float]) -> np.ndarray:
    """Requests whose own TTFT, TPOT and E2EL are within bounds. Several targets on one metric: the
    loosest bound is the per-request one. ITL targets are percentile-only (a request has many gaps)."""
    per_request = {
        "ttft": np.array([r.ttft_s for r in ok], dtype=float),
        "tpot": np.array([np.nan if r.tpot_s is None else r.tpot_s for r in ok], dtype=float),  # 1 token: no TPOT
        "e2el": np.array([r.e2el_s for r in ok], dtype=float),
    }
    bounds: dict[str, float] = {}
    for key, bound in slo_targets.items():
        metric, _ = parse_target(key)
        if metric in per_request:
            bounds[metric] = max(bound, bounds.get(metric, 0.0))
    mask = np.ones(len(ok), dtype=bool)
    for metric, bound in bounds.items():
        mask &= ~(per_request[metric] * 1e3 > bound)  # NaN compares False: passes
    return mask


def target_violations(samples: dict[str, np.ndarray], slo_targets: dict[str, float]) -> list[str]:
    """Each broken `<metric>_ms_p<q>` target as 'e2el_ms_p99 2430.1 > 2000'. A metric with no samples
    (no completed request) is left to the failed-requests rule."""
    out = []
    for key, bound in slo_targets.items():
        metric, q = parse_target(key)
        v = samples[metric]
        if v.size and (measured := float(np.percentile(v, q))) > bound:
            out.append(f"{key} {measured:.1f} > {bound:g}")
    return out


def backlog_violation(records: list[RequestRecord], duration_s: float, slo_targets: dict[str, float]) -> str | None:
    """Arrivals outpace completions when the level takes much longer than its arrival span plus one
    latency allowance: the E2EL bound if there is one, else twice the median E2EL of the first quarter
    of requests (which see a nearly empty server). All in the same clock as `duration_s`."""
    if not records:
        return None
    span = max(r.scheduled_s + r.queue_s + r.send_lag_s for r in records)
    e2el_bounds = [b / 1e3 for k, b in slo_targets.items() if parse_target(k)[0] == "e2el"]
    if e2el_bounds:
        allowance = max(e2el_bounds)
    else:
        first = sorted(records, key=lambda r: r.scheduled_s)[: max(1, len(records) // 4)]
        e2el = [r.e2el_s for r in first if r.ok]
        allowance = 2 * float(np.median(e2el)) if e2el else 0.0
    limit = BACKLOG_SPAN_FACTOR * span + allowance
    if duration_s > limit:
        return (f"backlog: arrivals outpace completions (level took {duration_s:.1f}s > "
                f"{BACKLOG_SPAN_FACTOR:g} x {span:.1f}s arrival span + {allowance:.1f}s)")
    return None


def allowed_failures(n: int) -> int:
    """Most failed requests out of n that the failed-requests rule allows."""
    return math.floor(MAX_FAILED_FRACTION * n)


def failure_violation(records: list[RequestRecord]) -> str | None:
    judged = [r for r in records if error_class(r) != CANCELLED]
    failed = [r for r in judged if not r.ok]
    if len(failed) <= allowed_failures(len(judged)):
        return None
    kinds = ", ".join(f"{k} {n}" for k, n in Counter(error_class(r) for r in failed).most_common())
    return f"failed {len(failed)}/{len(judged)} > {MAX_FAILED_FRACTION:.0%} ({kinds})"


# ---------------------------------------------------------------- early verdict
def violations_needed(n: int, q: float) -> int:
    """Fewest of n samples that must exceed a bound B for numpy's default (linear) q-th percentile of the n
    samples to be > B whatever the other samples are: n - floor((n - 1) q / 100).

    Sorted x_0 <= .. <= x_{n-1}, h = (n - 1) q / 100, i = floor(h): P = x_i + (h - i)(x_{i+1} - x_i) >= x_i.
    If k >= n - i samples exceed B, x_i is one of them, so P > B. With one fewer the rest may be 0 and the
    k exceed B by a hair: x_i = 0 and P = (h - i) x_{i+1} <= B. So the count is also the least that works.
    h is computed as numpy computes it ((n - 1) * (q / 100)), so float rounding agrees too.
    """
    if n < 1:
        raise ValueError(f"need n >= 1 samples, got {n}")
    return n - math.floor((n - 1) * (q / 100))


@dataclasses.dataclass
class _Tally:
    key: str
    metric: str
    q: float
    bound_ms: float
    over: int = 0  # finished ok with the metric over the bound
    no_sample: int = 0  # finished ok without the metric (TPOT of a one-token reply)


class EarlyVerdict:
    """Running counters over a level's finished requests (wall-clock records, O(targets) each) that say when
    `summarize_level` on all `n` planned requests is certain to find the SLO violated.

    Decided when the failed-requests rule is already broken, or when some per-request target (ttft, tpot,
    e2el) has `violations_needed(m, q)` requests over its bound, m being the most samples the finished
    level could hold. Failures leave the percentile samples, so they do not count as over a bound; instead,
    while the failure rule has slack, the worst case lets in-flight requests past a bound fail and drop out
    (a request over a bound and then failing only helps the level pass: k falls by 1, the need by 0 or 1).
    """

    def __init__(self, n: int, slo_targets: dict[str, float], time_scale: float = 1.0):
        self.n, self.time_scale = n, time_scale
        self.finished = self.failed = 0
        self.allowed = allowed_failures(n)
        self.tallies = [_Tally(key, metric, q, bound) for key, bound in slo_targets.items()
                        for metric, q in [parse_target(key)] if metric in PER_REQUEST]

    def e2el_bounds_wall_s(self) -> dict[str, float]:
        """E2EL bounds in wall seconds, by target: an unfinished request older than its bound (from its
        scheduled send) ends with an E2EL over it, or fails. Only E2EL: TPOT needs the whole reply, and
        whether an old request already has its first token (TTFT) is not visible from outside the client."""
        return {t.key: float(to_wall_s(t.bound_ms / 1e3, self.time_scale)) for t in self.tallies
                if t.metric == "e2el"}

    def add(self, rec: RequestRecord) -> None:
        """Count one finished request (wall clock, as measured)."""
        self.finished += 1
        if not rec.ok:
            self.failed += 1
            return
        for t in self.tallies:
            v = getattr(rec, f"{t.metric}_s")
            if v is None:
                t.no_sample += 1
            elif to_engine_s(v, self.time_scale) * 1e3 > t.bound_ms:  # as summarize_level compares
                t.over += 1

    def decided(self, in_flight_over: dict[str, int] | None = None) -> str | None:
        """Why the level is certainly violated, or None (also once every request has finished: nothing to
        save). `in_flight_over`: per e2el target key, unfinished requests already past its bound."""
        if self.finished >= self.n:
            return None
        head = f"decided early after {self.finished}/{self.n} requests: "
        if self.failed > self.allowed:
            return head + f"{self.failed} failed (at most {self.allowed} allowed)"
        slack = self.allowed - self.failed
        for t in self.tallies:
            e = (in_flight_over or {}).get(t.key, 0)
            gone = min(slack, e)  # worst case for the verdict: these fail and leave the samples
            m = self.n - self.failed - t.no_sample - gone
            k = t.over + e - gone
            if m >= 1 and k >= (need := violations_needed(m, t.q)):
                flying = f"{e - gone} of them in flight; " if e > gone else ""
                return head + (f"{k} over {t.metric} bound {t.bound_ms:g} ms "
                               f"({flying}{t.key} of {m} needs <= {need - 1})")
        return None


# ---------------------------------------------------------------- one level
def summarize_level(
    index: int,
    target_qps: float,
    records: list[RequestRecord],
    duration_s: float,
    slo_targets: dict[str, float],
    time_scale: float = 1.0,
    decided_early: str | None = None,
    min_goodput_pct: float | None = None,
) -> LevelResult:
    """Aggregate one level. `records` and `duration_s` are wall-clock as measured (the level start to
    its last response); `target_qps` is in engine time, as is everything in the result. `decided_early`:
    why the level was stopped before all its requests ran (its first violation; the rest describe only
    the requests that ran)."""
    recs = [to_engine_record(r, time_scale) for r in records]
    duration = float(to_engine_s(duration_s, time_scale))
    ok = [r for r in recs if r.ok]
    samples = samples_ms(ok)
    violations = [decided_early] if decided_early else []
    violations += target_violations(samples, slo_targets)
    # The backlog rule weighs a whole level's duration against its arrival span: not a level cut short.
    backlog = None if decided_early else backlog_violation(recs, duration, slo_targets)
    violations += [v for v in (failure_violation(recs), backlog) if v]
    good = int(goodput_mask(ok, slo_targets).sum())
    if min_goodput_pct is not None:
        judged = sum(error_class(r) != CANCELLED for r in recs)
        share = 100.0 * good / judged if judged else 0.0
        if share < min_goodput_pct:
            violations.append(f"goodput {share:.1f}% < {min_goodput_pct:g}% of requests within every bound")
    per_s = 1.0 / duration if duration > 0 else 0.0
    return LevelResult(
        index=index,
        target_qps=target_qps,
        achieved_qps=len(ok) * per_s,
        num_requests=len(recs),
        completed=len(ok),
        failed=len(recs) - len(ok),
        duration_s=duration,
        ttft_ms=percentiles(samples["ttft"]),
        tpot_ms=percentiles(samples["tpot"]),
        itl_ms=percentiles(samples["itl"]),
        e2el_ms=percentiles(samples["e2el"]),
        output_tok_per_s=sum(r.output_tokens for r in ok) * per_s,
        goodput_rps=good * per_s,
        slo_met=not violations,
        violations=violations,
    )


# ---------------------------------------------------------------- client validity and server honesty
def send_lag_p99_ms(records: list[RequestRecord]) -> float:
    """p99 of the client's send lag (actual send - scheduled send), ms; 0 without records."""
    lags = np.array([r.send_lag_s for r in records], dtype=float)
    return float(np.percentile(lags, 99)) * 1e3 if lags.size else 0.0


def lag_verdict(records: list[RequestRecord], max_lag_ms: float | None) -> str | None:
    """Why the run is invalid (the client could not send on schedule, so its latencies are partly the
    client's), or None when its p99 send lag is within `max_lag_ms` (None: not checked)."""
    if max_lag_ms is None or not records:
        return None
    p99 = send_lag_p99_ms(records)
    if p99 > max_lag_ms:
        return (f"client send lag p99 {p99:.2f} ms > {max_lag_ms:g} ms: the client could not keep the "
                f"schedule, so latencies include client delay; lower the rate or free the client's CPU")
    return None


def usage_mismatches(records: list[RequestRecord]) -> dict[str, int]:
    """Completed requests whose output tokens disagree with what was asked (meaningful with ignore_eos):
    `tokens` (usage completion_tokens != max_tokens), `no_usage` (the server sent no usage; the chunk
    count stood in), `chunks_over_tokens` (more streamed chunks than the usage's tokens)."""
    ok = [r for r in records if r.ok and r.requested_tokens]
    return {
        "tokens": sum(r.output_tokens != r.requested_tokens for r in ok if r.usage_reported),
        "no_usage": sum(not r.usage_reported for r in ok),
        "chunks_over_tokens": sum(len(r.itl_s) + 1 > r.output_tokens for r in ok if r.usage_reported),
    }


def error_counts(records: list[RequestRecord]) -> dict[str, int]:
    """Failed requests by error class (`tasks.bench.client.ERROR_CLASSES`)."""
    return dict(Counter(error_class(r) for r in records if not r.ok))


# ---------------------------------------------------------------- confidence intervals
BOOTSTRAP_RESAMPLES = 2000
_BOOTSTRAP_CELLS = 4_000_000  # resample in chunks of at most this many values (memory)


def bootstrap_ci(values: np.ndarray | list[float], q: float, confidence: float = 0.95,
                 resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0) -> tuple[float, float]:
    """Percentile-bootstrap confidence interval of the q-th percentile (numpy linear) of `values`.
    (nan, nan) without values."""
    v = np.asarray(values, dtype=float)
    if v.size == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    per_chunk = max(1, _BOOTSTRAP_CELLS // v.size)
    stats = np.concatenate([
        np.percentile(v[rng.integers(0, v.size, size=(min(per_chunk, resamples - done), v.size))], q, axis=1)
        for done in range(0, resamples, per_chunk)
    ])
    alpha = (1 - confidence) / 2
    lo, hi = np.quantile(stats, [alpha, 1 - alpha])
    return float(lo), float(hi)


def target_cis(records: list[RequestRecord], slo_targets: dict[str, float], time_scale: float = 1.0,
               confidence: float = 0.95, seed: int = 0) -> dict[str, dict]:
    """Per SLO target: the measured percentile, its bootstrap CI (engine ms) and what the CI says of the
    verdict: "holds" (CI below the bound), "violated" (above) or "uncertain" (the bound is inside)."""
    ok = [to_engine_record(r, time_scale) for r in records if r.ok]
    samples = samples_ms(ok)
    out = {}
    for key, bound in slo_targets.items():
        metric, q = parse_target(key)
        v = samples[metric]
        point = float(np.percentile(v, q)) if v.size else float("nan")
        lo, hi = bootstrap_ci(v, q, confidence, seed=seed)
        verdict = "holds" if hi <= bound else "violated" if lo > bound else "uncertain"
        out[key] = {"value_ms": point, "ci_low_ms": lo, "ci_high_ms": hi, "confidence": confidence,
                    "bound_ms": bound, "n": int(v.size), "ci_verdict": verdict if v.size else "no samples"}
    return out
