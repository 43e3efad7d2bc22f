"""Predict TTFT, TPOT and output throughput for rows of measured-run CSVs (`dolphin predict`).

Rows are resolved (`perf_rows`), grouped by everything that fixes a PerfModel (model, GPU, dtypes, TP,
backend), and each group is costed in one vectorised call of `perf_steady`. Rows that cannot be modelled
keep empty predictions and say why in `pred_reason`.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import replace

import numpy as np
import pandas as pd

from tasks.perf_model import PerfModel, PerfParams, load_perf_params
from tasks.perf_rows import ResolvedRow, reads_as_wide_ep, resolve_row
from tasks.perf_spec import SpecDecode
from tasks.perf_steady import agg_steady, disagg_steady

PRED_COLUMNS = ("pred_ttft_ms", "pred_tpot_ms", "pred_output_tok_per_s", "pred_reason")
# Measured rows come from closed-loop benchmarks of about 10 prompts per client (InferenceMAX's
# `--num-prompts $((CONC * 10))`), whose first wave all arrives at once.
BENCH_PROMPTS_PER_CLIENT = 10.0
# TensorRT-LLM's attention-DP recipes enable context balancing: InferenceMAX's DeepSeek-R1 launch scripts set
# `attention_dp_config: {enable_balance: true, batching_wait_iters: 0, timeout_iters: 60}`, its gpt-oss ones
# `enable_balance: true` (the defaults: 50 iterations). Where a row's attention DP is only inferred (wide EP),
# nothing says how it was configured, and none is charged.
ADP_BALANCE_TIMEOUT_ITERS = {"trtllm": 60.0}


def row_frontend(r: ResolvedRow, params: PerfParams) -> tuple[float, float]:
    """The serving frontend a measured row's requests passed: a PD row's router is the orchestrator's
    (Dynamo's frontend), not the engine's API server, so none of the engine's is charged; an aggregated
    row's is its engine build's, where the calibration measured that build (`PerfParams.frontend`)."""
    return (0.0, 0.0) if r.mode == "disagg" else params.frontend(r.backend, r.backend_version)


def resolve_frame(df: pd.DataFrame) -> tuple[list[ResolvedRow | None], list[str]]:
    rows, reasons = [], []
    for rec in df.to_dict("records"):
        try:
            rows.append(resolve_row(rec))
            reasons.append("")
        except (ValueError, KeyError, TypeError) as exc:  # unmodellable row: a reason, never a crash
            rows.append(None)
            reasons.append(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
    return rows, reasons


def instance_model(r: ResolvedRow, tp: int, params: PerfParams, attention_dp: int = 1, pp: int = 1,
                   ep: int = 1) -> PerfModel:
    """The step model of one engine instance of row `r` (its prefill or decode pool's layout for PD)."""
    return PerfModel(r.model, r.gpu, r.weights_dtype, r.kv_dtype, tp=tp,
                     step_overhead_s=params.overhead(r.backend), params=params, compute_dtype=r.compute_dtype,
                     attention_dp=attention_dp, expert_dtype=r.expert_dtype, backend=r.backend, pp=pp, ep=ep)


def widen_to_fit(r: ResolvedRow, params: PerfParams) -> tuple[ResolvedRow, str]:
    """`r` itself when its weights fit its GPUs; else `r` on the fewest doublings of each too-small pool's
    GPUs that hold them, and a note saying so. A run that was measured did fit: such a row misstates its
    layout (an export that dropped attention-DP/EP ranks), and this is the smallest layout that ran."""
    fields = [("tp", "attn_dp", "pp", "ep")] if r.mode == "agg" else [
        ("prefill_tp", "prefill_attn_dp", "prefill_pp", "prefill_ep"), ("decode_tp", "attn_dp", "pp", "ep")]
    changes, notes = {}, []
    for tp_f, dp_f, pp_f, ep_f in fields:
        tp = getattr(r, tp_f)
        for _ in range(7):
            pm = instance_model(r, tp, params, getattr(r, dp_f), getattr(r, pp_f), getattr(r, ep_f))
            if pm.resident_weight_bytes < 0.9 * r.gpu.memory_bytes:
                break
            tp *= 2
        if tp != getattr(r, tp_f):
            changes[tp_f] = tp
            notes.append(f"{tp_f.replace('_', ' ')} {getattr(r, tp_f)} -> {tp}")
            if reads_as_wide_ep(r.model, tp, getattr(r, dp_f)):
                changes[dp_f], changes[ep_f] = tp, tp
                changes["wide_ep"] = r.mode == "agg" or r.wide_ep
    if "decode_tp" in changes:
        changes["tp"] = changes["decode_tp"]
    if not changes:
        return r, ""
    return replace(r, **changes), ("weights exceed GPU memory as stated; costed on the fewest GPUs that hold "
                                   f"them ({', '.join(notes)})")


def predict_resolved(rows: list[ResolvedRow | None], reasons: list[str],
                     params: PerfParams | None = None) -> pd.DataFrame:
    """Predictions for resolved rows; `params` overrides every row's family parameters (calibration)."""
    n = len(rows)
    ttft, tpot, tok = np.full(n, np.nan), np.full(n, np.nan), np.full(n, np.nan)
    reasons = list(reasons)
    groups: dict[tuple, list[int]] = defaultdict(list)
    for i, r in enumerate(rows):
        if r is None:
            continue
        key = (r.model.name, r.gpu.name, r.backend, r.weights_dtype, r.compute_dtype, r.kv_dtype, r.mode, r.tp,
               r.prefill_tp, r.decode_tp, r.attn_dp, r.prefill_attn_dp, r.expert_dtype, r.pp, r.prefill_pp, r.ep,
               r.prefill_ep, r.backend_version, r.wide_ep, r.spec_method, r.spec_k, r.spec_acceptance)
        groups[key].append(i)
    for idx in groups.values():
        p = params or load_perf_params(rows[idx[0]].gpu.name)
        wide, note = widen_to_fit(rows[idx[0]], p)  # the layout is the whole group's
        layout = {f: getattr(wide, f) for f in ("tp", "prefill_tp", "decode_tp", "attn_dp", "prefill_attn_dp", "ep",
                                                "prefill_ep", "wide_ep")}
        sel = [replace(rows[i], **layout) for i in idx]
        r = sel[0]
        for i in idx:
            reasons[i] = "; ".join(n for n in (rows[i].layout_note, note) if n)
        isl, osl, conc = (np.array([getattr(x, a) for x in sel], float) for a in ("isl", "osl", "concurrency"))
        spec = SpecDecode(r.spec_k, r.spec_acceptance, r.spec_method or "ngram")
        try:
            if r.mode == "agg":
                out = agg_steady(instance_model(r, r.tp, p, r.attn_dp, r.pp, r.ep), r.backend, isl, osl, conc,
                                 request_overhead_s=p.request_overhead(r.backend), sync=p.sync(r.backend),
                                 sync_exps=p.sync_exps(r.backend),
                                 frontend_s=row_frontend(r, p),
                                 reserve_gib=p.memory_reserve_gib, prompts_per_client=BENCH_PROMPTS_PER_CLIENT,
                                 adp_balance_iters=0.0 if r.wide_ep else ADP_BALANCE_TIMEOUT_ITERS.get(r.backend, 0.0),
                                 spec=spec)
            else:
                pw = np.array([x.prefill_workers for x in sel], float)
                dw = np.array([x.decode_workers for x in sel], float)
                gpus = pw * r.prefill_tp * r.prefill_pp + dw * r.decode_tp * r.pp
                # KV moves over the scale-out NICs once the deployment outgrows one NVLink domain.
                link = np.where(gpus > r.gpu.nvlink_domain_gpus, r.gpu.scale_out_gbps, r.gpu.link_bandwidth_gbps)
                pm_p = instance_model(r, r.prefill_tp, p, r.prefill_attn_dp, r.prefill_pp, r.prefill_ep)
                pm_d = instance_model(r, r.decode_tp, p, r.attn_dp, r.pp, r.ep)
                out = disagg_steady(pm_p, pm_d, r.backend, isl, osl, conc, pw, dw,
                                    request_overhead_s=p.request_overhead(r.backend),
                                    reserve_gib=p.memory_reserve_gib, kv_link_gbps=link,
                                    frontend_s=row_frontend(r, p), prompts_per_client=BENCH_PROMPTS_PER_CLIENT,
                                    prefill_max_batch=np.array([x.prefill_batch or np.inf for x in sel], float),
                                    decode_max_batch=np.array([x.decode_max_batch or np.inf for x in sel], float),
                                    spec=spec)
        except (ValueError, ZeroDivisionError) as exc:
            for i in idx:
                reasons[i] = f"cannot cost: {exc}"
            continue
        ttft[idx], tpot[idx], tok[idx] = out["ttft_s"] * 1e3, out["tpot_s"] * 1e3, out["output_tok_s"]
        for j, i in enumerate(idx):
            if not np.isfinite(out["ttft_s"][j]):
                reasons[i] = "does not fit: the weights alone exceed GPU memory at this TP"
    return pd.DataFrame({"pred_ttft_ms": ttft, "pred_tpot_ms": tpot, "pred_output_tok_per_s": tok,
                         "pred_reason": reasons})


def predict_frame(df: pd.DataFrame, params: PerfParams | None = None) -> pd.DataFrame:
    """`df` with the prediction columns appended (replacing any already there)."""
    rows, reasons = resolve_frame(df)
    pred = predict_resolved(rows, reasons, params)
    base = df.drop(columns=[c for c in PRED_COLUMNS if c in df.columns]).reset_index(drop=True)
    return pd.concat([base, pred], axis=1)
