"""Stage 1: read a request trace and profile it (lengths, arrivals, burstiness, prefix reuse).

A trace is normalised to one DataFrame, sorted by arrival, with columns
`arrival_s` (seconds from the first arrival), `input_tokens`, `output_tokens` and, when the trace has them,
`hash_ids` (ids of the request's 512-token prompt blocks; equal ids are shareable KV blocks).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
from prefect import task
from scipy import stats

from tasks.config import SLOConfig, WorkloadConfig
from tasks.contracts import LengthStats, WorkloadProfile
from tasks.kv import slo_latency_s

MOONCAKE_BLOCK_TOKENS = 512

# Our column names -> the file's, per known format. A user's `columns` mapping overrides these.
FORMAT_COLUMNS: dict[str, dict[str, str]] = {
    "azure": {"arrival": "TIMESTAMP", "input": "ContextTokens", "output": "GeneratedTokens"},
    "mooncake": {"arrival": "timestamp", "input": "input_length", "output": "output_length",
                 "hash_ids": "hash_ids"},
    # Generic files: by default the names `read_trace` itself produces, so its output round-trips.
    "generic": {"arrival": "arrival_s", "input": "input_tokens", "output": "output_tokens",
                "hash_ids": "hash_ids"},
}
# Seconds per unit of a numeric arrival column (Mooncake stores milliseconds).
_ARRIVAL_UNIT_S = {"s": 1.0, "ms": 1e-3, "us": 1e-6, "ns": 1e-9}
_EXTENSIONS = {".csv": "csv", ".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet"}


class TraceFormatError(ValueError):
    """A trace that does not have the columns or values its format needs; the message says the fix."""


# ---------------------------------------------------------------- reading
def _load(path: Path, kind: str) -> pd.DataFrame:
    if kind == "csv":
        return pd.read_csv(path)
    if kind == "jsonl":
        # No date guessing: Mooncake's `timestamp` is a number of ms, not an epoch.
        return pd.read_json(path, lines=True, convert_dates=False, keep_default_dates=False)
    return pd.read_parquet(path)


def _file_kind(path: Path, fmt: str) -> str:
    if fmt == "azure":
        return "csv"
    if fmt == "mooncake":
        return "jsonl"
    if fmt in ("csv", "jsonl", "parquet"):
        return fmt
    try:
        return _EXTENSIONS[path.suffix.lower()]
    except KeyError:
        raise TraceFormatError(
            f"cannot tell the format of {path} from its extension {path.suffix!r}; "
            f"set workload.format to one of azure, mooncake, csv, jsonl, parquet"
        ) from None


def _detect(columns: pd.Index) -> str:
    """A known format whose required columns are all present, else the generic mapping."""
    for fmt in ("azure", "mooncake"):
        required = {v for k, v in FORMAT_COLUMNS[fmt].items() if k != "hash_ids"}
        if required <= set(columns):
            return fmt
    return "generic"


def _arrival_seconds(col: pd.Series, unit_s: float) -> np.ndarray:
    """Numbers are in `unit_s` seconds; anything else is parsed as a timestamp (any ISO-like form)."""
    if pd.api.types.is_numeric_dtype(col):
        return col.to_numpy(dtype=float) * unit_s
    ts = pd.to_datetime(col, format="ISO8601", utc=True)
    return (ts - ts.min()).dt.total_seconds().to_numpy()


def _token_counts(col: pd.Series, name: str) -> np.ndarray:
    values = pd.to_numeric(col, errors="coerce")
    bad = int(values.isna().sum())
    if bad:
        raise TraceFormatError(f"column {col.name!r} ({name}) has {bad} missing or non-numeric values")
    return values.to_numpy().astype(np.int64)


def read_trace(path: str | Path, fmt: str = "auto", columns: dict[str, str] | None = None) -> pd.DataFrame:
    """Read a trace into the normalised frame described in the module docstring.

    `fmt`: "azure" (CSV with wall-clock TIMESTAMP), "mooncake" (JSONL, timestamp in ms), "csv" / "jsonl" /
    "parquet" (generic), or "auto" (azure/mooncake by their columns, else generic by extension).
    `columns` maps our names {arrival, input, output, hash_ids} to the file's columns and overrides the
    format's defaults; the extra key `arrival_unit` (s, ms, us, ns; default s, ms for mooncake) gives
    the unit of a numeric arrival column. A non-numeric arrival column is parsed as timestamps.
    """
    if fmt not in ("auto", "azure", "mooncake", "csv", "jsonl", "parquet"):
        raise TraceFormatError(f"unknown trace format {fmt!r}; use auto, azure, mooncake, csv, jsonl or parquet")
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"trace file not found: {p} (set workload.trace to an existing file)")
    raw = _load(p, _file_kind(p, fmt))
    if raw.empty:
        raise TraceFormatError(f"trace {p} has no requests")
    kind = _detect(raw.columns) if fmt == "auto" else fmt if fmt in ("azure", "mooncake") else "generic"
    user = dict(columns or {})
    unit = user.pop("arrival_unit", "ms" if kind == "mooncake" else "s")
    if unit not in _ARRIVAL_UNIT_S:
        raise TraceFormatError(f"workload.columns.arrival_unit={unit!r}; use one of {sorted(_ARRIVAL_UNIT_S)}")
    unknown = set(user) - set(FORMAT_COLUMNS["generic"])
    if unknown:
        raise TraceFormatError(f"unknown workload.columns keys {sorted(unknown)}; "
                               f"use {sorted(FORMAT_COLUMNS['generic'])} and arrival_unit")
    mapping = {**FORMAT_COLUMNS[kind], **user}

    for ours in ("arrival", "input", "output"):
        if mapping[ours] not in raw.columns:
            raise TraceFormatError(
                f"trace {p} ({kind} format) has no column {mapping[ours]!r} for {ours}; "
                f"columns found: {list(raw.columns)}. Fix: set workload.columns.{ours}=<your column>"
            )
    # hash_ids are optional, unless the user named a column for them.
    has_hashes = mapping.get("hash_ids") in raw.columns
    if "hash_ids" in user and not has_hashes:
        raise TraceFormatError(
            f"trace {p} has no column {user['hash_ids']!r} for hash_ids; columns found: {list(raw.columns)}. "
            f"Fix: set workload.columns.hash_ids=<your column>, or remove it"
        )

    df = pd.DataFrame({
        "arrival_s": _arrival_seconds(raw[mapping["arrival"]], _ARRIVAL_UNIT_S[unit]),
        "input_tokens": _token_counts(raw[mapping["input"]], "input"),
        "output_tokens": _token_counts(raw[mapping["output"]], "output"),
    })
    if has_hashes:
        df["hash_ids"] = raw[mapping["hash_ids"]].to_numpy()
    # Stable sort keeps the file's order for equal timestamps; then make arrivals relative to the first.
    df = df.sort_values("arrival_s", kind="stable").reset_index(drop=True)
    df["arrival_s"] -= df["arrival_s"].iloc[0]
    return df


# ---------------------------------------------------------------- profiling
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
    pos = gaps[gaps > 0]
    if pos.size < 2 or np.ptp(pos) == 0:
        return None
    shape, _, _ = stats.gamma.fit(pos, floc=0)
    return float(shape)


def prefix_reuse_ratio(hash_ids: pd.Series, input_tokens: np.ndarray, block: int = MOONCAKE_BLOCK_TOKENS) -> float:
    """Share of all input tokens that sit in a block whose hash id appeared in an earlier request.

    Requests are in arrival order. Block j of a request holds min(block, input - block*j) tokens, clipped
    at 0: every block is full except the last, which holds input - block*(blocks-1) (and a trace whose
    counts disagree cannot count more tokens than a request's input).
    A block id repeated inside one request is not reuse: only an earlier request's KV can be shared.
    """
    total = float(input_tokens.sum())
    if total <= 0 or hash_ids.dtype != object:  # e.g. a column that is all null
        return 0.0
    n_blocks = hash_ids.str.len().fillna(0).to_numpy(dtype=np.int64)  # null -> no blocks
    if n_blocks.sum() == 0:
        return 0.0
    ids = hash_ids[n_blocks > 0].explode()  # empty lists would explode to a NaN row
    req = np.repeat(np.arange(len(hash_ids)), n_blocks)
    pos = np.arange(req.size) - np.repeat(np.cumsum(n_blocks) - n_blocks, n_blocks)  # block index in request
    tokens = np.clip(input_tokens[req] - block * pos, 0, block)
    # explode keeps request order, so duplicated() marks all but each id's first occurrence, and
    # factorize numbers ids in order of first occurrence: first_req[code] = the request that introduced it.
    codes, _ = pd.factorize(ids.to_numpy())
    first_req = req[~pd.Series(codes).duplicated().to_numpy()]
    reused = req > first_req[codes]
    return float(tokens[reused].sum() / total)


def profile_trace(df: pd.DataFrame, source: str, latency_s: float | None = None,
                  sample_pairs: int = 10000, seed: int = 0) -> WorkloadProfile:
    """Profile a frame from `read_trace` (fully vectorised: a 1M-request trace takes seconds).

    Definitions: duration = last - first arrival; mean_qps = requests / duration (requests itself when
    all arrive at once); peak_qps_Ws = most arrivals in fixed W-second windows aligned at the first
    arrival, / W; interarrival_cv = std / mean of the gaps (ddof 0; 0 without gaps); gamma_shape = ML
    fit (loc 0) of the positive gaps; lengths: mean, numpy percentiles, max. length_pairs: up to
    `sample_pairs` (input, output) rows drawn without replacement with `seed`, so lengths stay joint.

    `latency_s` is accepted for the pipeline's sake but unused: the contract has no field for the
    concurrency it would give (see `tasks.kv` for the Little's-law concurrency the plan uses).
    """
    del latency_s
    n = len(df)
    if n == 0:
        raise TraceFormatError(f"trace {source} has no requests")
    arr = df["arrival_s"].to_numpy(dtype=float)
    ins = df["input_tokens"].to_numpy(dtype=np.int64)
    outs = df["output_tokens"].to_numpy(dtype=np.int64)
    duration = float(arr[-1] - arr[0])
    gaps = np.diff(arr)
    gap_mean = gaps.mean() if gaps.size else 0.0
    rng = np.random.default_rng(seed)
    idx = np.sort(rng.choice(n, size=min(n, sample_pairs), replace=False))
    reuse = None
    if "hash_ids" in df.columns:
        reuse = prefix_reuse_ratio(df["hash_ids"], ins)
    return WorkloadProfile(
        source=source,
        requests=n,
        duration_s=duration,
        mean_qps=n / duration if duration > 0 else float(n),
        peak_qps_1s=_peak_qps(arr, 1.0),
        peak_qps_60s=_peak_qps(arr, 60.0),
        interarrival_cv=float(gaps.std() / gap_mean) if gap_mean > 0 else 0.0,
        gamma_shape=_gamma_shape(gaps),
        input_tokens=_length_stats(ins),
        output_tokens=_length_stats(outs),
        prefix_reuse_ratio=reuse,
        length_pairs=[(int(i), int(o)) for i, o in zip(ins[idx], outs[idx])],
    )


def synthetic_profile(input_len: int, output_len: int, qps: float, n: int = 1000,
                      shared_prefix_len: int = 0, seed: int = 0) -> WorkloadProfile:
    """The trace-less case: constant lengths and Poisson arrivals at `qps` (gaps rescaled so the mean
    QPS is exactly `qps`). Every request shares its first `shared_prefix_len` tokens, so the prefix
    reuse is that share of the input for all requests after the first."""
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
    prof = profile_trace(df, source=source, seed=seed)
    return prof.model_copy(update={
        "mean_qps": float(qps) if n > 1 else prof.mean_qps,
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


# ---------------------------------------------------------------- pipeline entry
@task(name="profile")
def profile_task(workload: WorkloadConfig, slo: SLOConfig, out_dir: Path | None) -> WorkloadProfile:
    """Profile the workload's trace (or its synthetic spec); write profile.json and plots to `out_dir`.

    With a trace, `workload.input_len` / `output_len` (when set) replace its lengths, keeping its
    arrivals. Without one, arrivals are Poisson at `slo.target_qps` (1 QPS when unset, said in source).
    """
    if workload.trace is None:
        if workload.input_len is None or workload.output_len is None:
            raise ValueError("workload.trace is null: set workload.input_len and workload.output_len")
        qps = slo.target_qps or 1.0
        profile = synthetic_profile(workload.input_len, workload.output_len, qps,
                                    shared_prefix_len=workload.shared_prefix_len, seed=workload.seed)
        if slo.target_qps is None:
            profile = profile.model_copy(update={"source": profile.source + " (slo.target_qps unset: 1 QPS)"})
        df = None
    else:
        df = read_trace(workload.trace, workload.format, workload.columns)
        if workload.input_len is not None:
            df["input_tokens"] = workload.input_len
        if workload.output_len is not None:
            df["output_tokens"] = workload.output_len
        profile = profile_trace(df, source=workload.trace, latency_s=slo_latency_s(slo), seed=workload.seed)
        if workload.shared_prefix_len:
            profile = profile.model_copy(update={"shared_prefix_len": workload.shared_prefix_len})
    if out_dir is not None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "profile.json").write_text(json.dumps(profile.model_dump(), indent=1))
        if df is not None:
            plot_profile(df, out_dir)
    return profile
