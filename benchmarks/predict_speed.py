"""Timing of the performance model (targets: 1,000 rows < 10 s; 10-minute Poisson at 20 QPS < 2 s).

    flock /tmp/dolphin-cpu.lock .venv/bin/python benchmarks/predict_speed.py

Rows are the calibration runs re-labelled over catalogue models, GPUs, precisions and both modes, so
every code path is timed. The first call (YAML loading) is timed separately from the steady state.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tasks.catalog import load_gpu, load_model  # noqa: E402
from tasks.perf_model import PerfModel  # noqa: E402
from tasks.perf_predict import predict_frame  # noqa: E402
from tasks.perf_sim import poisson_trace, simulate  # noqa: E402

CSV = ROOT.parent / "shared" / "calibration" / "measured_agg_h100.csv"
MODELS = ["Qwen/Qwen3-32B", "meta-llama/Llama-3.1-70B-Instruct", "Qwen/Qwen3-8B", "Qwen/Qwen3-30B-A3B",
          "deepseek-ai/DeepSeek-V3", "meta-llama/Llama-3.1-8B-Instruct-FP8"]
SYSTEMS = ["h100_sxm", "h200_sxm", "b200_sxm", "a100_sxm", "l40s"]


def rows(n: int, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    df = pd.read_csv(CSV).sample(n, replace=True, random_state=seed).reset_index(drop=True)
    df["model_path"] = rng.choice(MODELS, n)
    df["system"] = rng.choice(SYSTEMS, n)
    df["gemm_quant_mode"] = rng.choice(["fp8", "fp8_block", "", "int4_wo"], n)
    disagg = rng.random(n) < 0.3
    df.loc[disagg, "mode"] = "disagg"
    for col, values in {"prefill_num_workers": [1, 2, 4], "prefill_tp_size": [1, 2, 4], "decode_num_workers": [1, 2],
                        "decode_tp_size": [2, 4, 8], "prefill_batch_size": [1]}.items():
        df.loc[disagg, col] = rng.choice(values, disagg.sum())
    return df


def main() -> int:
    df = rows(1000)
    t = time.perf_counter()
    predict_frame(df.head(10))
    first = time.perf_counter() - t
    t = time.perf_counter()
    out = predict_frame(df)
    rows_s = time.perf_counter() - t
    print(f"predict: first call (catalogue load) {first:.2f} s; 1,000 rows {rows_s:.2f} s "
          f"({out['pred_ttft_ms'].notna().sum()} predicted) [target < 10 s]")
    pm = PerfModel(load_model("llama-3.1-8b"), load_gpu("h100"), "bf16", "bf16", tp=1)
    trace = poisson_trace(20, 600, 1000, 200)
    t = time.perf_counter()
    res = simulate(pm, *trace, max_num_batched_tokens=8192, max_num_seqs=256, kv_capacity_tokens=400_000)
    sim_s = time.perf_counter() - t
    s = res.summary()
    print(f"simulate: 10 min Poisson at 20 QPS, {s['requests']} requests, {s['steps']} steps in {sim_s:.2f} s "
          f"[target < 2 s]; mean TTFT {s['ttft_mean_ms']:.0f} ms, TPOT {s['tpot_mean_ms']:.1f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
