"""Plots of benchmark results, written as PNG files (no display needed)."""
from __future__ import annotations

import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: workers and CI have no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from tasks.contracts import BenchResult  # noqa: E402

_METRICS = {"ttft": "TTFT", "tpot": "TPOT", "e2el": "E2EL"}
_TARGET = re.compile(r"(ttft|tpot|itl|e2el)_ms_p(\d+(?:\.\d+)?)")


def _panels(slo_targets: dict[str, float]) -> dict[str, str]:
    """TTFT, TPOT and E2EL always; ITL only when an SLO bounds it."""
    panels = dict(_METRICS)
    if any(k.startswith("itl_") for k in slo_targets):
        panels["itl"] = "ITL"
    return panels


def plot_latency_vs_qps(bench: BenchResult, out_path: Path, slo_targets: dict[str, float]) -> Path:
    """p50/p99 of each latency metric against target QPS, one panel per metric, with the SLO bounds
    (dashed) and the max sustainable QPS (vertical line). Returns `out_path`."""
    levels = sorted(bench.levels, key=lambda lv: lv.target_qps)
    qps = np.array([lv.target_qps for lv in levels])
    panels = _panels(slo_targets)
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False)
    for ax, (metric, label) in zip(axes[0], panels.items()):
        for pct, style in (("p50", "o-"), ("p99", "s-")):
            ys = np.array([getattr(getattr(lv, f"{metric}_ms"), pct) for lv in levels])
            ax.plot(qps, ys, style, label=pct, markersize=4)
        for key, bound in slo_targets.items():
            m = _TARGET.fullmatch(key)
            if m and m.group(1) == metric:
                ax.axhline(bound, color="red", linestyle="--", linewidth=1, label=f"SLO p{m.group(2)}")
        if bench.max_sustainable_qps > 0:
            ax.axvline(bench.max_sustainable_qps, color="green", linewidth=1,
                       label=f"max QPS {bench.max_sustainable_qps:.3g}")
        ax.set_title(f"{label} (ms)")
        ax.set_xlabel("target QPS")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    kind = "SIMULATED engine" if bench.simulated else "measured"
    fig.suptitle(f"Latency vs QPS ({kind})")
    fig.tight_layout()
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, dpi=100)
    plt.close(fig)  # Hydra multiruns plot many times in one process
    return out_path
