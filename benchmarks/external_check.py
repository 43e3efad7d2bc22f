"""Predict published runs the model was never fitted to: GPUStack's performance lab (other models, GPUs, engines).

    .venv/bin/python benchmarks/external_check.py [--csv benchmarks/data/gpustack_perf_lab.csv] [--show]

The CSV transcribes every run printed in github.com/gpustack/gpustack docs/performance-lab (`vllm bench serve`
or guidellm against vLLM, SGLang and TensorRT-LLM on H100, H200 and A100; source file and commit per row).
Most send all prompts at once (request rate inf, no `--max-concurrency`): a burst that the engine works off
saturated. Each run is replayed on the scheduler simulation (tasks/perf_sim.py) with the calibrated step
model, the engine's default batch limits (or the run's `--max-num-batched-tokens` / `--max-num-seqs`) and
its KV capacity: a burst at t=0, a closed loop for `--max-concurrency`, Poisson arrivals for a request rate.
Duration is at least what the serving frontend's serial host work needs. Compared: total token throughput,
mean TTFT and mean TPOT. ShareGPT runs use the run's mean lengths for every request (an approximation).
Speculative-decoding runs are left out (their acceptance is not published). Nothing here is fitted:
`conf/perf/hopper.yaml` comes from ../shared/calibration only.
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tasks.perf_model import PerfParams, load_perf_params  # noqa: E402
from tasks.perf_predict import instance_model  # noqa: E402
from tasks.perf_rows import resolve_row  # noqa: E402
from tasks.perf_sim import simulate  # noqa: E402
from tasks.perf_steady import kv_capacity_tokens, scheduler  # noqa: E402

DEFAULT_CSV = Path(__file__).resolve().parent / "data" / "gpustack_perf_lab.csv"
SYSTEMS = {"h100": "h100_sxm", "h200": "h200_sxm", "a100": "a100_sxm"}
SPECULATIVE = re.compile(r"specul", re.I)


def _flag(flags: str, *names: str) -> int | None:
    for name in names:
        m = re.search(rf"{name}[ =]+(\d+)", flags)
        if m:
            return int(m.group(1))
    return None


def replay(run: dict, params: PerfParams | None = None) -> dict:
    """Predicted throughput, TTFT and TPOT of one published run, or a reason (`params`: instead of the
    GPU family's calibrated ones)."""
    flags = str(run.get("other_flags") or "")
    if SPECULATIVE.search(flags):
        return {"reason": "speculative decoding (acceptance not published)"}
    dp = int(run.get("dp") or 1)
    dp_attention = "dp-attention" in flags
    replicas = 1 if dp_attention else dp
    n_all = int(run["successful_requests"])
    isl = run["input_len"] if pd.notna(run["input_len"]) else run["total_input_tokens"] / n_all
    osl = run["output_len"] if pd.notna(run["output_len"]) else run["total_output_tokens"] / n_all
    isl, osl = max(1, int(round(isl))), max(1, int(round(osl)))
    try:
        r = resolve_row({"model_path": run["model"], "system": SYSTEMS.get(run["gpu"], run["gpu"]),
                         "backend": run["engine"], "precision": run["weights_quant"], "mode": "agg", "isl": isl,
                         "osl": osl, "batch_size": 1, "tp_size": int(run["tp"]),
                         "attention_dp_size": dp if dp_attention else 1, "moe_ep_size": int(run.get("ep") or 1)})
    except (ValueError, KeyError, TypeError) as exc:
        return {"reason": str(exc).splitlines()[0]}
    p = params or load_perf_params(r.gpu.name)
    pm = instance_model(r, r.tp, p, r.attn_dp, r.pp, r.ep)
    if pm.resident_weight_bytes >= pm.gpu.memory_bytes:
        return {"reason": "does not fit: the weights alone exceed GPU memory at this TP"}
    s = scheduler(r.backend, r.gpu)
    chunk = _flag(flags, "--max-num-batched-tokens", "--max_num_tokens", "--chunked-prefill-size") or s.chunk_tokens
    max_seqs = _flag(flags, "--max-num-seqs", "--max-running-requests") or s.max_seqs
    kv = max(kv_capacity_tokens(pm, r.backend, p.memory_reserve_gib), isl + osl)  # it ran, so one fits
    n = max(1, n_all // replicas)
    conc = run.get("max_concurrency")
    rate = run.get("request_rate")
    closed = int(conc) // replicas if pd.notna(conc) else 0
    if pd.notna(rate) and not closed:
        arrivals = np.sort(np.random.default_rng(0).uniform(0, n / (float(rate) / replicas), n))
    else:
        arrivals = np.zeros(n)
    res = simulate(pm, arrivals, np.full(n, isl), np.full(n, osl), max_num_batched_tokens=chunk,
                   max_num_seqs=max_seqs, kv_capacity_tokens=int(kv), closed_loop=closed)
    front_req, front_tok = p.frontend(r.backend)
    duration = max(res.end_s, n * (front_req + front_tok * osl))
    return {"pred_tok_s": replicas * n * (isl + osl) / duration,
            "pred_ttft": 1e3 * (float(np.nanmean(res.ttft_s)) + p.request_overhead(r.backend)),
            "pred_tpot": 1e3 * float(np.nanmean(res.tpot_s)), "isl": isl, "osl": osl, "reason": ""}


MOE_FAMILIES = r"^(DeepSeek-R1|DeepSeek-V3\.2|GLM-4\.5|GLM-4\.6|gpt-oss-120b|gpt-oss-20b|Qwen3-235B)"


def sweep_moe(runs: pd.DataFrame) -> None:
    """How `moe_half_width` (tasks/perf_calibration.MOE_HALF_WIDTH) was chosen: median |% error| of total
    token throughput over the MoE bursts with fixed lengths on A100 and H200 (GPUStack's H100 runs are
    left out: its dense H100 runs are 50-60 % slower than its A100 runs and our H100 calibration both
    imply), per value, then each family left out in turn (the value the others prefer, scored on it)."""
    from dataclasses import replace

    family = runs["model"].str.split("/").str[-1].str.extract(MOE_FAMILIES)[0]
    keep = (family.notna() & runs["dataset"].eq("random") & runs["max_concurrency"].isna() & runs["gpu"].ne("h100")
            & ~runs["other_flags"].fillna("").str.contains(SPECULATIVE))
    sel, family = runs[keep].to_dict("records"), family[keep].to_numpy()
    measured = runs.loc[keep, "total_tok_s"].to_numpy()
    base = load_perf_params("h100")
    errors = {}
    print(f"{len(sel)} MoE bursts; median |% error| of tok/s (and median signed % per family) by moe_half_width")
    for width in (0, 400, 800, 1000, 1400, 1800, 2400, 3200):
        params = replace(base, moe_half_width=float(width))
        pred = np.array([replay(run, params).get("pred_tok_s", np.nan) for run in sel])
        errors[width] = 100 * (pred / measured - 1)
        signed = pd.Series(errors[width]).groupby(family).median().round(0).astype(int).to_dict()
        print(f"{width:>6} {np.median(np.abs(errors[width])):6.1f}  {signed}")
    print("leave one family out: value the others prefer -> held-out median |% error| (with 0)")
    for fam in sorted(set(family)):
        out = family == fam
        best = min(errors, key=lambda w: np.median(np.abs(errors[w][~out])))
        print(f"  {fam:<14} {best:>6} -> {np.median(np.abs(errors[best][out])):5.1f}  "
              f"({np.median(np.abs(errors[0][out])):5.1f})")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--csv", type=Path, default=DEFAULT_CSV)
    ap.add_argument("--show", action="store_true", help="print every run")
    ap.add_argument("--sweep-moe", action="store_true", help="how the MoE GEMM width constant was chosen")
    args = ap.parse_args(argv)
    runs = pd.read_csv(args.csv)
    if args.sweep_moe:
        sweep_moe(runs)
        return 0
    pred = pd.DataFrame([replay(run) for run in runs.to_dict("records")])
    out = pd.DataFrame({
        "model": runs["model"].str.split("/").str[-1], "gpu": runs["gpu"], "engine": runs["engine"],
        "tp": runs["tp"], "dataset": runs["dataset"], "isl": pred.get("isl"), "osl": pred.get("osl"),
        "tok_s": runs["total_tok_s"], "pred_tok_s": pred.get("pred_tok_s"),
        "ttft": runs["mean_ttft_ms"], "pred_ttft": pred.get("pred_ttft"),
        "tpot": runs["mean_tpot_ms"], "pred_tpot": pred.get("pred_tpot"), "reason": pred["reason"]})
    for k in ("tok_s", "ttft", "tpot"):
        out[f"{k}_err"] = 100 * (out[f"pred_{k}"] / out[k] - 1)
    ok = out["reason"].eq("")
    if args.show:
        with pd.option_context("display.width", 250, "display.max_rows", 1000, "display.max_colwidth", 36):
            print(out.round(1).to_string(index=False))
    skipped = out.loc[~ok, "reason"].str.replace(r"'.*'", "'...'", regex=True).value_counts()
    print(f"{len(out)} published runs, {int(ok.sum())} replayed; not replayed: "
          + "; ".join(f"{v} x {k}" for k, v in skipped.items()))
    print(f"{'|% error| of':<26} {'n':>4} {'tok/s med':>9} {'p90':>6} {'TTFT med':>9} {'p90':>6} "
          f"{'TPOT med':>9} {'p90':>6}")
    groups = [("all", ok)] + [(f"  {k}", ok & (out["engine"] == k)) for k in sorted(out["engine"].unique())]
    groups += [(f"  {g}", ok & (out["gpu"] == g)) for g in sorted(out["gpu"].unique())]
    groups += [("  random lengths", ok & (out["dataset"] == "random")),
               ("  sharegpt (mean lengths)", ok & (out["dataset"] == "sharegpt"))]
    for label, m in groups:
        if m.any():
            cells = []
            for k in ("tok_s", "ttft", "tpot"):
                e = out.loc[m, f"{k}_err"].abs()
                cells.append(f"{e.median():>9.1f} {e.quantile(0.9):>6.1f}")
            print(f"{label:<26} {int(m.sum()):>4} " + " ".join(cells))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
