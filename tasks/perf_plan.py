"""Predicted TTFT / TPOT / throughput of a planned deployment at a target request rate (`dolphin plan`).

Aggregated: the discrete-event scheduler (`perf_sim`) plays a Poisson workload at the target rate per
replica; the closed-form step model splits its TTFT and TPOT into compute, memory, communication,
overhead and queueing (queueing = simulated TTFT minus one request's own prefill service, plus the wait
for the serving frontend, an M/D/1 server of its calibrated host work per request).
Disaggregated: the closed-form prefill-pool / decode-pool model at the concurrency that carries the rate.
Speculative decoding: `spec_decode_step` scales the decode step by the tokens each step accepts.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from tasks.perf_model import PerfModel
from tasks.perf_spec import NO_SPEC, SpecDecode, decode_step
from tasks.perf_sim import poisson_trace, simulate
from tasks.perf_steady import PARTS, agg_steady, disagg_steady

SIM_SECONDS = 120.0  # simulated workload length: enough arrivals for stable means, well under a second


@dataclass
class Prediction:
    ttft_ms: float
    tpot_ms: float
    output_tok_s: float  # whole deployment
    ttft_parts_ms: dict[str, float] = field(default_factory=dict)
    tpot_parts_ms: dict[str, float] = field(default_factory=dict)
    note: str = ""


def spec_decode_step(pm: PerfModel, batch: float, context: float, spec: SpecDecode) -> tuple[float, float]:
    """(seconds per output token, seconds per verify cycle) of speculative decoding at `batch` sequences
    (`perf_spec.decode_step`: the drafts, then a verify pass of k + 1 tokens per sequence)."""
    cycle = float(decode_step(pm, batch, batch * context, spec).seconds)
    return cycle / spec.tokens_per_step, cycle


def _ms(parts: dict) -> dict[str, float]:
    return {k: float(np.asarray(v).ravel()[0]) * 1e3 for k, v in parts.items()}


def frontend_queue_s(pm: PerfModel, backend: str, rate: float, mean_output: float) -> tuple[float, float]:
    """(mean wait, utilisation) of one instance's serving frontend at `rate` requests/s: its serial host
    work (calibrated per request and per streamed token) is an M/D/1 server in front of the engine; at
    utilisation >= 1 the wait is unbounded."""
    per_request, per_token = pm.params.frontend(backend)
    service = per_request + per_token * mean_output
    busy = rate * service
    return (service * busy / (2 * (1 - busy)) if busy < 1 else float("inf")), busy


def predict_agg(pm: PerfModel, backend: str, qps: float, mean_input: float, mean_output: float, *,
                max_num_batched_tokens: int, max_num_seqs: int, kv_capacity_tokens: int, replicas: int = 1,
                spec: SpecDecode = NO_SPEC, seed: int = 0) -> Prediction:
    per = qps / replicas
    trace = poisson_trace(per, SIM_SECONDS, int(round(mean_input)), int(round(mean_output)), seed=seed)
    if len(trace[0]) == 0:
        raise ValueError(f"target rate {qps} QPS gives no arrivals in {SIM_SECONDS:.0f} s")
    res = simulate(pm, *trace, max_num_batched_tokens=max_num_batched_tokens, max_num_seqs=max_num_seqs,
                   kv_capacity_tokens=kv_capacity_tokens)
    request_s = pm.params.request_overhead(backend)  # HTTP, tokenisation: outside the engine's steps
    front_s, front_busy = frontend_queue_s(pm, backend, per, mean_output)
    ttft, tpot = float(np.nanmean(res.ttft_s)) + request_s + front_s, float(np.nanmean(res.tpot_s))
    # The same engine at the concurrency the simulation saw (Little's law), prompts arriving one by one.
    conc = max(1.0, per * float(np.nanmean(res.e2e_s)))
    cf = agg_steady(pm, backend, mean_input, mean_output, conc, request_overhead_s=0.0, sync=0.0,
                    max_batched_tokens=max_num_batched_tokens, max_num_seqs=max_num_seqs,
                    kv_tokens=kv_capacity_tokens)
    ttft_parts = {k: v for k, v in _ms({k: cf[f"ttft_{k}_s"] for k in PARTS}).items() if k != "queue"}
    ttft_parts["overhead"] += request_s * 1e3
    ttft_parts["queue"] = max(0.0, ttft * 1e3 - sum(ttft_parts.values()))
    tpot_cf = _ms({k: cf[f"tpot_{k}_s"] for k in PARTS})
    total = sum(tpot_cf.values()) or 1.0
    tpot_parts = {k: v * tpot * 1e3 / total for k, v in tpot_cf.items()}
    note = "target rate above the serving frontend's capacity" if front_busy >= 1 else ""
    if spec.k:
        per_token, _ = spec_decode_step(pm, conc, mean_input + mean_output / 2, spec)
        scale = per_token / max(float(np.asarray(cf["tpot_s"]).ravel()[0]), 1e-9)
        tpot *= scale
        tpot_parts = {k: v * scale for k, v in tpot_parts.items()}
        note = "; ".join(filter(None, (note, f"speculative ({spec.method}): {spec.tokens_per_step:.2f} tokens "
                                              "per verify step")))
    done = np.isfinite(res.e2e_s)
    tok_s = replicas * float(res.output_tokens[done].sum() / res.end_s)
    return Prediction(ttft * 1e3, tpot * 1e3, tok_s, ttft_parts, tpot_parts, note)


def predict_disagg(pm_p: PerfModel, pm_d: PerfModel, backend: str, qps: float, mean_input: float,
                   mean_output: float, prefill_workers: int, decode_workers: int) -> Prediction:
    """Closed-form pools at the closed-loop concurrency whose throughput is `qps` (bisection)."""
    def at(conc: float) -> dict:
        return disagg_steady(pm_p, pm_d, backend, mean_input, mean_output, conc, prefill_workers, decode_workers,
                             request_overhead_s=pm_p.params.request_overhead(backend),
                             reserve_gib=pm_p.params.memory_reserve_gib, frontend_s=pm_p.params.frontend(backend))

    lo, hi = 1e-3, 1e5
    for _ in range(60):
        mid = np.sqrt(lo * hi)
        rate = float(at(mid)["output_tok_s"]) / mean_output
        lo, hi = (mid, hi) if rate < qps else (lo, mid)
    out = at(lo)
    note = "" if float(out["output_tok_s"]) / mean_output >= 0.99 * qps else "target rate above the pools' capacity"
    return Prediction(float(out["ttft_s"]) * 1e3, float(out["tpot_s"]) * 1e3, float(out["output_tok_s"]),
                      _ms({k: out[f"ttft_{k}_s"] for k in PARTS}), _ms({k: out[f"tpot_{k}_s"] for k in PARTS}), note)
