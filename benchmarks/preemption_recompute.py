"""How much prefill vLLM-style preemption redoes when a closed loop asks for more KV than the cache holds.

    .venv/bin/python benchmarks/preemption_recompute.py

Runs the scheduler simulation (tasks/perf_sim.py: vLLM V1 admission, newest-first preemption with
recompute) in a closed loop of C clients against a KV cache sized for R_kv = capacity / (I + O/2) requests,
and prints recomputed tokens per output token (`RECOMPUTE_PER_OUTPUT_TOKEN` in tasks/perf_steady.py is
this table's typical value). An engine that grows KV on demand admits prompts into every free block, so
the growth of the running decodes is paid for by evicting the newest requests and prefilling them again.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tasks.catalog import load_gpu, load_model  # noqa: E402
from tasks.perf_model import PerfModel  # noqa: E402
from tasks.perf_sim import simulate  # noqa: E402


def main() -> int:
    pm = PerfModel(load_model("qwen3-32b"), load_gpu("h100"), "bf16", "bf16", tp=2, backend="vllm")
    print(f"{'isl':>5} {'osl':>5} {'R_kv':>5} {'C/R_kv':>6} {'preempt/req':>11} {'recompute/out tok':>17}")
    ratios = []
    for isl in (1024, 4096):
        for osl in (128, 512, 1024):
            for r_kv in (16, 64):
                for over in (1.1, 1.5, 2.0, 4.0):
                    conc = int(round(over * r_kv))
                    n = 12 * conc
                    kv = int(r_kv * (isl + osl / 2))
                    res = simulate(pm, None, np.full(n, isl), np.full(n, osl), max_num_batched_tokens=8192,
                                   max_num_seqs=1024, kv_capacity_tokens=kv, closed_loop=conc)
                    per_out = res.recomputed_tokens / float(res.output_tokens.sum())
                    ratios.append(per_out)
                    print(f"{isl:>5} {osl:>5} {r_kv:>5} {over:>6.1f} {res.preemptions / n:>11.2f} {per_out:>17.2f}")
    print(f"median recomputed tokens per output token: {np.median(ratios):.2f} "
          f"(p10 {np.percentile(ratios, 10):.2f}, p90 {np.percentile(ratios, 90):.2f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
