"""How long `dolphin profile` takes on 1M-request traces: an Azure-format CSV and a Mooncake JSONL.

    .venv/bin/python benchmarks/profile_speed.py [--rows 1000000] [--keep DIR]

Writes both traces to a temporary directory (or DIR), then times reading (`read_trace_with_bad_rows`),
profiling (`profile_trace`, with the default 2 s E2EL concurrency model) and plotting (`plot_profile`)
separately, and prints a table. The target is read + profile < 10 s per trace. One-off imports (scipy.stats,
matplotlib: ~2 s together on a small machine) are done before the clock starts.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from tasks.profile_stats import plot_profile, profile_trace
from tasks.trace import MOONCAKE_BLOCK_TOKENS, read_trace_with_bad_rows

TARGET_S = 10.0


def arrivals_s(n: int, rng: np.random.Generator, qps: float = 100.0, shape: float = 0.5) -> np.ndarray:
    """Bursty arrivals: gamma gaps with the given shape and mean 1/qps."""
    return np.concatenate([[0.0], np.cumsum(rng.gamma(shape, 1.0 / (shape * qps), n - 1))])


def write_azure_csv(path: Path, n: int, seed: int = 0) -> Path:
    """TIMESTAMP as the Azure trace writes it (wall clock, 7-digit fraction), ContextTokens, GeneratedTokens."""
    rng = np.random.default_rng(seed)
    start = np.datetime64("2023-11-16T18:17:03.979960", "us")
    stamps = start + (arrivals_s(n, rng) * 1e6).astype("timedelta64[us]")
    text = pd.Series(np.datetime_as_string(stamps, unit="us")).str.replace("T", " ") + "0"
    pd.DataFrame({"TIMESTAMP": text, "ContextTokens": rng.lognormal(7.3, 0.9, n).astype(np.int64) + 1,
                  "GeneratedTokens": rng.lognormal(3.3, 1.1, n).astype(np.int64) + 1}).to_csv(path, index=False)
    return path


def write_mooncake_jsonl(path: Path, n: int, seed: int = 0) -> Path:
    """1-10 blocks of 512 tokens per request; the first 0-3 blocks come from 2,000 shared prefixes
    (system prompts, Zipf popularity), the rest are unique to the request."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(1, 11, n)
    inputs = (blocks - 1) * MOONCAKE_BLOCK_TOKENS + rng.integers(1, MOONCAKE_BLOCK_TOKENS + 1, n)
    shared = np.minimum(rng.integers(0, 4, n), blocks)
    prefix = rng.zipf(1.5, n) % 2000  # which shared prefix; its block j has id prefix * 4 + j
    starts = np.cumsum(blocks) - blocks
    pos = np.arange(blocks.sum()) - np.repeat(starts, blocks)
    req = np.repeat(np.arange(n), blocks)
    ids = np.where(pos < shared[req], prefix[req] * 4 + pos, 10_000 + np.arange(pos.size))
    hash_ids = [a.tolist() for a in np.split(ids, starts[1:])]
    ms = (arrivals_s(n, rng) * 1000).astype(np.int64)
    pd.DataFrame({"timestamp": ms, "input_length": inputs, "output_length": rng.integers(1, 800, n),
                  "hash_ids": hash_ids}).to_json(path, orient="records", lines=True)
    return path


def time_trace(path: Path, plot_dir: Path) -> dict[str, float | str]:
    t0 = time.perf_counter()
    df, _ = read_trace_with_bad_rows(path)
    t1 = time.perf_counter()
    profile = profile_trace(df, source=str(path), latency_s=2.0)
    t2 = time.perf_counter()
    plot_profile(df, plot_dir)
    t3 = time.perf_counter()
    return {"trace": path.name, "rows": profile.requests, "MB": path.stat().st_size / 1e6, "read_s": t1 - t0,
            "profile_s": t2 - t1, "read+profile_s": t2 - t0, "plots_s": t3 - t2,
            "prefix_reuse": profile.prefix_reuse_ratio}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--keep", type=Path, help="write the traces here and keep them")
    args = parser.parse_args()
    import matplotlib.figure  # noqa: F401 - warm the lazy imports, so that they are not timed
    import scipy.stats  # noqa: F401
    with tempfile.TemporaryDirectory() as tmp:
        out = args.keep or Path(tmp)
        out.mkdir(parents=True, exist_ok=True)
        traces = [write_azure_csv(out / "azure_1m.csv", args.rows),
                  write_mooncake_jsonl(out / "mooncake_1m.jsonl", args.rows)]
        rows = [time_trace(path, out / f"plots_{path.stem}") for path in traces]
    table = pd.DataFrame(rows).set_index("trace")
    print(table.to_string(float_format=lambda x: f"{x:.2f}"))
    slow = table[table["read+profile_s"] > TARGET_S]
    print(f"target read+profile < {TARGET_S:g} s: " + ("met" if slow.empty else f"MISSED by {list(slow.index)}"))
    return 1 if len(slow) else 0


if __name__ == "__main__":
    raise SystemExit(main())
