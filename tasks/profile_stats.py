"""Statistics of a workload from a `tasks.trace.read_trace` frame: counts, rates, burstiness, lengths,
concurrency and prefix reuse (vectorised with numpy/scipy/pyarrow), and its plots. No Prefect, so
`dolphin profile` starts quickly; the pipeline's stage entry is `tasks.profile.profile_task`.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from tasks.contracts import LengthStats, WorkloadProfile
from tasks.trace import MOONCAKE_BLOCK_TOKENS, BadRows, TraceFormatError

def _length_stats(x: np.ndarray) -> LengthStats:
    p50, p90, p99 = np.percentile(x, [50, 90, 99])
    return LengthStats(mean=float(x.mean()), p50=float(p50), p90=float(p90), p99=float(p99), max=float(x.max()))


def _peak_qps(arrival_s: np.ndarray, window_s: float) -> float:
    """Most arrivals in one fixed window (windows aligned at the first arrival), per second."""
    bins = np.floor((arrival_s - arrival_s[0]) / window_s).astype(np.int64)
    return float(np.bincount(bins).max() / window_s)


def _gamma_shape(gaps: np.ndarray) -> float | None:
    """ML shape of a gamma fit (loc 0) to the positive gaps; None when there is no finite estimate
    (fewer than 2 gaps, or all gaps equal: the MLE diverges)."""
    from scipy import stats  # ~1.5 s to import: only when a profile is fitted, not for every CLI error

    pos = gaps[gaps > 0]
    if pos.size < 2 or np.ptp(pos) == 0:
        return None
    shape, _, _ = stats.gamma.fit(pos, floc=0)
    return float(shape)


def _list_array(hash_ids: pd.Series) -> pa.Array:
    """The column as one Arrow list array: zero-copy for `read_trace`'s Arrow lists, converted otherwise."""
    arr = pa.array(hash_ids.array if isinstance(hash_ids.dtype, pd.ArrowDtype)
                   else hash_ids.to_numpy(dtype=object), from_pandas=True)
    return arr.combine_chunks() if isinstance(arr, pa.ChunkedArray) else arr


def prefix_reuse_ratio(hash_ids: pd.Series, input_tokens: np.ndarray, block: int = MOONCAKE_BLOCK_TOKENS) -> float:
    """Share of all input tokens that sit in a block whose hash id appeared in an earlier request.

    Requests are in arrival order. Block j of a request holds min(block, input - block*j) tokens, clipped
    at 0: every block is full except the last, which holds input - block*(blocks-1) (and a trace whose
    counts disagree cannot count more tokens than a request's input).
    A block id repeated inside one request is not reuse: only an earlier request's KV can be shared.
    `hash_ids` holds lists (null: no blocks), as an Arrow list column or Python lists.
    """
    input_tokens = np.asarray(input_tokens, dtype=np.int64)
    total = float(input_tokens.sum())
    arr = _list_array(hash_ids)
    if total <= 0 or not pa.types.is_list(arr.type):  # e.g. a column that is all null
        return 0.0
    n_blocks = pc.list_value_length(arr).fill_null(0).to_numpy().astype(np.int64)
    if n_blocks.sum() == 0:
        return 0.0
    ids = arr.flatten().to_numpy(zero_copy_only=False)  # the valid lists' ids, in request order
    req = np.repeat(np.arange(len(arr)), n_blocks)
    pos = np.arange(req.size) - np.repeat(np.cumsum(n_blocks) - n_blocks, n_blocks)  # block index in request
    tokens = np.clip(input_tokens[req] - block * pos, 0, block)
    # factorize numbers ids in order of first occurrence, so the first occurrences, in order, are codes
    # 0, 1, 2, ...: first_req[code] = the request that introduced the id.
    codes, _ = pd.factorize(ids, use_na_sentinel=False)
    first_req = req[~pd.Series(codes).duplicated().to_numpy()]
    reused = req > first_req[codes]
    return float(tokens[reused].sum() / total)


def request_latency_s(output_tokens: np.ndarray, latency_s: float | None = None, ttft_s: float | None = None,
                      tpot_s: float | None = None) -> tuple[np.ndarray, str] | None:
    """Each request's modelled E2EL and a description of the model; None when no model is given.

    With `tpot_s` (and `ttft_s`, default 0): ttft_s + tpot_s * (output_tokens - 1), vLLM's TPOT definition
    read backwards. Otherwise the fixed `latency_s` for every request.
    """
    if tpot_s is not None:
        ttft_s = ttft_s or 0.0
        if ttft_s < 0 or tpot_s < 0:
            raise ValueError(f"ttft_s={ttft_s} and tpot_s={tpot_s} must be >= 0")
        lat = ttft_s + tpot_s * np.maximum(np.asarray(output_tokens, dtype=float) - 1, 0)
        return lat, f"TTFT {ttft_s * 1e3:g} ms + TPOT {tpot_s * 1e3:g} ms x (output tokens - 1)"
    if latency_s is None:
        return None
    if latency_s < 0:
        raise ValueError(f"latency_s={latency_s} must be >= 0")
    return np.full(len(output_tokens), float(latency_s)), f"fixed E2EL {latency_s:g} s"


def peak_concurrency(arrival_s: np.ndarray, latency_s: np.ndarray | float) -> int:
    """Most requests in flight at once, request i being in flight over [arrival_i, arrival_i + latency_i).

    The count only rises at arrivals, so it is evaluated just after each: requests arrived by then (ties
    included) minus requests finished by then, both by binary search on sorted times.
    """
    arrival_s = np.asarray(arrival_s, dtype=float)
    order = np.argsort(arrival_s, kind="stable")
    starts = arrival_s[order]
    ends = np.sort(starts + np.broadcast_to(latency_s, arrival_s.shape)[order])
    in_flight = np.searchsorted(starts, starts, side="right") - np.searchsorted(ends, starts, side="right")
    return int(in_flight.max()) if in_flight.size else 0


def profile_trace(df: pd.DataFrame, source: str, latency_s: float | None = None,
                  sample_pairs: int = 10000, seed: int = 0, *, ttft_s: float | None = None,
                  tpot_s: float | None = None, bad_rows: BadRows | None = None) -> WorkloadProfile:
    """Profile a frame from `read_trace` (fully vectorised: a 1M-request trace takes seconds).

    Definitions: duration = last - first arrival; mean_qps = requests / duration (requests itself when
    all arrive at once); peak_qps_Ws = most arrivals in fixed W-second windows aligned at the first
    arrival, / W; interarrival_cv = std / mean of the gaps (ddof 0; 0 without gaps); gamma_shape = ML
    fit (loc 0) of the positive gaps; lengths: mean, numpy percentiles, max. length_pairs: up to
    `sample_pairs` (input, output) rows drawn without replacement with `seed`, so lengths stay joint.

    Concurrency, given a latency model (see `request_latency_s`): each request is in flight from its
    arrival for its modelled latency L_i, either the fixed E2EL `latency_s` or `ttft_s + tpot_s *
    (output - 1)` when `tpot_s` is given. peak_concurrency = the most requests in flight at once over the
    trace (`peak_concurrency`); littles_law_concurrency = mean_qps x mean(L_i). Both None without a model.
    `bad_rows` (from `read_trace_with_bad_rows`) is copied into the profile.
    """
    n = len(df)
    if n == 0:
        raise TraceFormatError(f"trace {source} has no requests")
    arr = df["arrival_s"].to_numpy(dtype=float)
    ins = df["input_tokens"].to_numpy(dtype=np.int64)
    outs = df["output_tokens"].to_numpy(dtype=np.int64)
    duration = float(arr[-1] - arr[0])
    mean_qps = n / duration if duration > 0 else float(n)
    gaps = np.diff(arr)
    gap_mean = gaps.mean() if gaps.size else 0.0
    rng = np.random.default_rng(seed)
    idx = np.sort(rng.choice(n, size=min(n, sample_pairs), replace=False))
    reuse = None
    if "hash_ids" in df.columns:
        reuse = prefix_reuse_ratio(df["hash_ids"], ins)
    concurrency = {}
    model = request_latency_s(outs, latency_s, ttft_s, tpot_s)
    if model is not None:
        lat, description = model
        concurrency = {"peak_concurrency": peak_concurrency(arr, lat),
                       "littles_law_concurrency": mean_qps * float(lat.mean()), "latency_model": description}
    bad_rows = bad_rows or BadRows()
    return WorkloadProfile(
        source=source,
        requests=n,
        duration_s=duration,
        mean_qps=mean_qps,
        peak_qps_1s=_peak_qps(arr, 1.0),
        peak_qps_60s=_peak_qps(arr, 60.0),
        interarrival_cv=float(gaps.std() / gap_mean) if gap_mean > 0 else 0.0,
        gamma_shape=_gamma_shape(gaps),
        input_tokens=_length_stats(ins),
        output_tokens=_length_stats(outs),
        prefix_reuse_ratio=reuse,
        bad_rows=bad_rows.count,
        bad_row_lines=[line for line, _ in bad_rows.examples],
        bad_row_reasons=[why for _, why in bad_rows.examples],
        **concurrency,
        length_pairs=[(int(i), int(o)) for i, o in zip(ins[idx], outs[idx])],
    )


def synthetic_profile(input_len: int, output_len: int, qps: float, n: int = 1000,
                      shared_prefix_len: int = 0, seed: int = 0,
                      latency_s: float | None = None) -> WorkloadProfile:
    """The trace-less case: constant lengths and Poisson arrivals at `qps` (gaps rescaled so the mean
    QPS is exactly `qps`). Every request shares its first `shared_prefix_len` tokens, so the prefix
    reuse is that share of the input for all requests after the first. `latency_s`: as in `profile_trace`."""
    if input_len < 1 or output_len < 1 or n < 1 or qps <= 0:
        raise ValueError("synthetic profile needs input_len, output_len, n >= 1 and qps > 0")
    if not 0 <= shared_prefix_len <= input_len:
        raise ValueError(f"shared_prefix_len={shared_prefix_len} must be within [0, input_len={input_len}]")
    gaps = np.random.default_rng(seed).exponential(1.0 / qps, size=n - 1)
    if gaps.size:
        gaps *= (n / qps) / gaps.sum()  # duration n/qps, so requests/duration == qps
    df = pd.DataFrame({
        "arrival_s": np.concatenate([[0.0], np.cumsum(gaps)]),
        "input_tokens": np.full(n, input_len),
        "output_tokens": np.full(n, output_len),
    })
    source = (f"synthetic: {input_len} input / {output_len} output tokens, "
              f"shared prefix {shared_prefix_len}, Poisson arrivals at {qps:g} QPS, {n} requests")
    prof = profile_trace(df, source=source, latency_s=latency_s, seed=seed)
    mean_qps = float(qps) if n > 1 else prof.mean_qps
    return prof.model_copy(update={
        "mean_qps": mean_qps,
        "littles_law_concurrency": None if latency_s is None else mean_qps * latency_s,
        "shared_prefix_len": shared_prefix_len,
        "prefix_reuse_ratio": (n - 1) / n * shared_prefix_len / input_len,
    })


# ---------------------------------------------------------------- plots
def plot_profile(df: pd.DataFrame, out_dir: Path) -> list[Path]:
    """Input/output length histograms and QPS over time (1 s bins), as PNGs in `out_dir`."""
    from matplotlib.figure import Figure  # OO API: no pyplot state, renders with Agg, no display

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for col, label in (("input_tokens", "input tokens"), ("output_tokens", "output tokens")):
        fig = Figure(figsize=(5, 3.2))
        ax = fig.subplots()
        ax.hist(df[col].to_numpy(), bins=60, color="tab:blue")
        ax.set(xlabel=label, ylabel="requests", title=f"{label} per request")
        fig.tight_layout()
        paths.append(out_dir / f"{col}_hist.png")
        fig.savefig(paths[-1], dpi=90)
    arr = df["arrival_s"].to_numpy(dtype=float)
    counts = np.bincount(np.floor(arr - arr[0]).astype(np.int64))
    fig = Figure(figsize=(7, 3.2))
    ax = fig.subplots()
    ax.plot(np.arange(counts.size), counts, lw=0.7)
    ax.set(xlabel="time since first arrival (s)", ylabel="requests / s", title="arrival rate (1 s bins)")
    fig.tight_layout()
    paths.append(out_dir / "qps_over_time.png")
    fig.savefig(paths[-1], dpi=90)
    return paths
