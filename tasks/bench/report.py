"""What a benchmark run writes: the result JSON with `vllm bench serve --save-result`'s keys (vLLM's
`vllm/benchmarks/serve.py`: `calculate_metrics` and the result dict of `benchmark` / `main_async`), our
extras under "dolphin", per-request records (JSONL or Parquet) and PNG plots.

vLLM's definitions, kept exactly: failed requests count 0 output tokens; TPOT is averaged over requests
with more than one token, and a one-token request has TPOT 0 for goodput; a request is good when each
of its TTFT/TPOT/E2EL is <= the --goodput bound; throughputs divide by the run's duration; mean/median/
std/percentiles of no values are those of [0]. One difference, on purpose: latencies count from the
scheduled send, not the actual one (no coordinated omission); the gap is the reported send lag.
"""
from __future__ import annotations

import math
from dataclasses import asdict
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from tasks.bench.client import RequestRecord
from tasks.bench.metrics import error_counts, lag_verdict, samples_ms, send_lag_p99_ms, usage_mismatches

BACKENDS = {"completions": "openai", "chat": "openai-chat"}  # vLLM's --backend names
GOODPUT_METRICS = ("ttft", "tpot", "e2el")
PERCENTILE_METRICS = ("ttft", "tpot", "itl", "e2el")
EXTRA_PERCENTILES = (50.0, 90.0, 95.0, 99.0, 99.9)
# vLLM drops these unless --save-detailed.
DETAILED_KEYS = ("input_lens", "output_lens", "start_times", "ttfts", "itls", "generated_texts", "errors")


def parse_goodput(pairs: list[str] | None) -> dict[str, float]:
    """vLLM's --goodput KEY:VALUE (ms) pairs, KEY in ttft, tpot, e2el."""
    out: dict[str, float] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition(":")
        try:
            bound = float(value)
        except ValueError:
            bound = None
        if not sep or bound is None:
            raise ValueError(f"--goodput {pair!r}: use KEY:VALUE in ms, e.g. ttft:500 tpot:50")
        if key not in GOODPUT_METRICS:
            raise ValueError(f"--goodput {pair!r}: the metric must be one of {', '.join(GOODPUT_METRICS)}")
        if bound < 0:
            raise ValueError(f"--goodput {pair!r}: the bound must be >= 0")
        out[key] = bound
    return out


def p_word(p: float) -> str:
    """vLLM's key spelling of a percentile: 99 -> '99', 99.9 -> '99.9'."""
    return str(int(p)) if int(p) == p else str(p)


def _stats(values_ms: np.ndarray, percentiles: list[float] | tuple[float, ...]) -> dict[str, float]:
    v = values_ms if values_ms.size else np.zeros(1)  # vLLM: np.mean(x or 0)
    out = {"mean": float(np.mean(v)), "median": float(np.median(v)), "std": float(np.std(v))}
    out.update({f"p{p_word(p)}": float(x) for p, x in zip(percentiles, np.percentile(v, list(percentiles)))})
    return out


def _peaks(ok: list[RequestRecord]) -> tuple[float, int]:
    """vLLM's max_output_tokens_per_s and max_concurrent_requests: tokens and active requests per 1 s
    bucket from the first start, at their peak."""
    if not ok:
        return 0.0, 0
    starts = np.array([r.scheduled_s + r.queue_s for r in ok])
    ends = starts + np.array([r.e2el_s for r in ok])
    t0 = starts.min()
    buckets = int(np.ceil(ends.max() - t0)) + 1
    token_times = np.concatenate([s + r.ttft_s + np.concatenate(([0.0], np.cumsum(r.itl_s)))
                                  for s, r in zip(starts, ok)])
    tokens = np.bincount(np.clip((token_times - t0).astype(int), 0, buckets - 1), minlength=buckets)
    # +1 at each request's first bucket, -1 after its last: the running sum is the active count.
    delta = np.zeros(buckets + 1)
    np.add.at(delta, (starts - t0).astype(int), 1)
    np.add.at(delta, (ends - t0).astype(int) + 1, -1)
    return float(tokens.max()), int(np.cumsum(delta)[:-1].max())


def vllm_result(
    records: list[RequestRecord], duration_s: float, *, endpoint: str, model_id: str, tokenizer_id: str,
    num_prompts: int, request_rate: float, burstiness: float, max_concurrency: int | None,
    goodput: dict[str, float] | None = None, percentile_metrics: list[str] | None = None,
    metric_percentiles: list[float] | None = None, label: str | None = None, detailed: bool = False,
    max_lag_ms: float | None = None, ignore_eos: bool = True, extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The result dict `vllm bench serve --save-result [--save-detailed]` writes, from our records, plus
    "dolphin": validity, send lag, error classes, usage mismatches, p50..p99.9 of every metric."""
    recs = sorted(records, key=lambda r: r.request_id)
    ok = [r for r in recs if r.ok]
    goodput = goodput or {}
    selected = percentile_metrics or ["ttft", "tpot", "itl"]
    pcts = metric_percentiles or [99.0]
    out_lens = [r.output_tokens if r.ok else 0 for r in recs]
    total_in = sum(r.prompt_tokens for r in ok)
    total_out = sum(out_lens)
    dur = duration_s if duration_s > 0 else float("nan")
    samples = samples_ms(ok)
    good = None
    if goodput:
        per_req = {"ttft": samples["ttft"], "e2el": samples["e2el"],
                   "tpot": np.array([(r.tpot_s or 0.0) * 1e3 for r in ok])}  # 1 token: TPOT 0, as vLLM
        mask = np.ones(len(ok), dtype=bool)
        for metric, bound in goodput.items():
            mask &= per_req[metric] <= bound
        good = int(mask.sum())
    max_tok_s, max_conc = _peaks(ok)
    backend = BACKENDS[endpoint]
    result: dict[str, Any] = {
        "date": datetime.now().strftime("%Y%m%d-%H%M%S"),
        "endpoint_type": backend,
        "backend": backend,
        "label": label,
        "model_id": model_id,
        "tokenizer_id": tokenizer_id,
        "num_prompts": num_prompts,
        "request_rate": request_rate if not math.isinf(request_rate) else "inf",
        "burstiness": burstiness,
        "max_concurrency": max_concurrency,
        "duration": duration_s,
        "completed": len(ok),
        "failed": len(recs) - len(ok),
        "total_input_tokens": total_in,
        "total_output_tokens": total_out,
        "request_throughput": len(ok) / dur,
        "request_goodput": good / dur if good is not None else None,
        "output_throughput": total_out / dur,
        "total_token_throughput": (total_in + total_out) / dur,
        "input_lens": [r.prompt_tokens for r in recs],
        "output_lens": out_lens,
        "ttfts": [r.ttft_s if r.ok else 0.0 for r in recs],
        "itls": [r.itl_s if r.ok else [] for r in recs],
        "latencies": [r.e2el_s if r.ok else 0.0 for r in recs],
        "start_times": [r.scheduled_s + r.queue_s for r in recs],
        "queue_times": [r.queue_s for r in recs],
        "generated_texts": ["" for _ in recs],  # the client does not keep texts (it would slow the parser)
        "errors": [r.error or "" for r in recs],
        "max_output_tokens_per_s": max_tok_s,
        "max_concurrent_requests": max_conc,
        "rtfx": 0.0,
    }
    for metric in PERCENTILE_METRICS:  # vLLM's order: ttft, tpot, itl, e2el
        if metric in selected:
            for stat, value in _stats(samples[metric], pcts).items():
                result[f"{stat}_{metric}_ms"] = value
    if not detailed:
        for key in DETAILED_KEYS:
            del result[key]
    invalid = lag_verdict(recs, max_lag_ms)
    lags_ms = np.array([r.send_lag_s for r in recs]) * 1e3
    result["dolphin"] = {
        "valid": invalid is None,
        "invalid_reason": invalid,
        "max_lag_ms": max_lag_ms,
        "send_lag_ms": {"p50": float(np.median(lags_ms)) if lags_ms.size else 0.0,
                        "p99": send_lag_p99_ms(recs), "max": float(lags_ms.max()) if lags_ms.size else 0.0},
        "latency_from": "scheduled send",
        "ignore_eos": ignore_eos,
        "error_classes": error_counts(recs),
        "usage_mismatches": usage_mismatches(recs) if ignore_eos else None,
        "goodput_share": good / len(recs) if good is not None and recs else None,
        "percentiles_ms": {m: _stats(samples[m], EXTRA_PERCENTILES) for m in PERCENTILE_METRICS},
        **(extra or {}),
    }
    return result


def result_filename(endpoint: str, request_rate: float, max_concurrency: int | None, model_id: str,
                    label: str | None, date: str) -> str:
    """vLLM's default name: {label}-{rate}qps[-concurrency{n}]-{model}-{date}.json."""
    conc = f"-concurrency{max_concurrency}" if max_concurrency is not None else ""
    return f"{label or BACKENDS[endpoint]}-{request_rate}qps{conc}-{model_id.split('/')[-1]}-{date}.json"


# ---------------------------------------------------------------- records
def write_records(records: list[RequestRecord], path: str | Path) -> Path:
    """Per-request records as JSONL or Parquet (by the suffix), one row per request."""
    import pandas as pd  # only when records are written

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    df = pd.DataFrame([asdict(r) for r in records])
    if path.suffix == ".parquet":
        df.to_parquet(path, index=False)
    elif path.suffix == ".jsonl":
        df.to_json(path, orient="records", lines=True)
    else:
        raise ValueError(f"--records {path}: use a .jsonl or .parquet file")
    return path


def read_records(path: str | Path) -> list[RequestRecord]:
    """Records written by `write_records` (either format)."""
    import pandas as pd

    path = Path(path)
    df = pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_json(path, lines=True)
    rows = df.astype(object).where(df.notna(), None).to_dict("records")
    return [RequestRecord.from_dict({**row, "itl_s": list(row["itl_s"])}) for row in rows]


# ---------------------------------------------------------------- plots
def _plt():
    """matplotlib, headless, imported only when a plot is asked for (it costs seconds to import)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt

def _save(plt, fig, out_path: Path) -> Path:
    """Write a finished figure as PNG (creating its folder) and free it."""
    fig.tight_layout()
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, dpi=100)
    plt.close(fig)
    return out_path



def plot_ttft_cdf(series: dict[str, np.ndarray], out_path: Path, bound_ms: float | None = None) -> Path:
    """Empirical CDF of TTFT (ms), one curve per label (e.g. per QPS level)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for label, v in series.items():
        if len(v):
            x = np.sort(v)
            ax.step(x, np.arange(1, x.size + 1) / x.size, where="post", label=label)
    if bound_ms is not None:
        ax.axvline(bound_ms, color="red", linestyle="--", linewidth=1, label="SLO bound")
    ax.set_xlabel("TTFT (ms)")
    ax.set_ylabel("share of requests")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    return _save(plt, fig, out_path)


def plot_latency_hist(records: list[RequestRecord], out_path: Path) -> Path:
    """Histograms of TTFT, TPOT and E2EL (ms) of one run."""
    plt = _plt()
    samples = samples_ms([r for r in records if r.ok])
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    for ax, metric in zip(axes, ("ttft", "tpot", "e2el")):
        if samples[metric].size:
            ax.hist(samples[metric], bins=40)
        ax.set_title(f"{metric.upper()} (ms)")
        ax.grid(True, alpha=0.3)
    return _save(plt, fig, out_path)
