"""Read a request trace (Azure CSV, Mooncake JSONL, generic CSV/JSONL/Parquet) into one normalised frame.

A trace is normalised to one DataFrame, sorted by arrival, with columns
`arrival_s` (seconds from the first arrival), `input_tokens`, `output_tokens` and, when the trace has them,
`hash_ids` (ids of the request's 512-token prompt blocks; equal ids are shareable KV blocks), as an Arrow
list column.

Bad rows (missing, non-numeric, negative or fractional lengths; missing or unparsable timestamps; JSONL lines
that are not JSON objects; CSV lines with too many fields; hash_ids that are not lists) are dropped and
counted with the file's own line numbers: CSV header = line 1, JSONL first line = line 1, Parquet rows
from 1. Blank lines are not rows. A trace with more than `max_bad_fraction` bad rows is rejected.
"""
from __future__ import annotations

import codecs
import io
import json
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from tasks.config import WorkloadConfig

MOONCAKE_BLOCK_TOKENS = 512
DEFAULT_MAX_BAD_FRACTION: float = WorkloadConfig.model_fields["max_bad_row_fraction"].default
MAX_BAD_EXAMPLES = 20  # bad rows kept with line number and reason

# Our column names -> the file's, per known format. A user's `columns` mapping overrides these.
FORMAT_COLUMNS: dict[str, dict[str, str]] = {
    "azure": {"arrival": "TIMESTAMP", "input": "ContextTokens", "output": "GeneratedTokens"},
    "mooncake": {"arrival": "timestamp", "input": "input_length", "output": "output_length",
                 "hash_ids": "hash_ids"},
    # Generic files: by default the names `read_trace` itself produces, so its output round-trips.
    "generic": {"arrival": "arrival_s", "input": "input_tokens", "output": "output_tokens",
                "hash_ids": "hash_ids"},
}
# Units per second of a numeric arrival column (Mooncake stores milliseconds). Dividing by these is exact
# for whole units (3000 ms is 3.0 s, not 3.0000000000000004), so arrivals fall in the right 1 s windows.
_ARRIVAL_UNITS_PER_S = {"s": 1, "ms": 1_000, "us": 1_000_000, "ns": 1_000_000_000}
_EXTENSIONS = {".csv": "csv", ".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet"}
_FORMAT_FIX = "set workload.format (dolphin profile --format) to one of azure, mooncake, csv, jsonl, parquet"


class TraceFormatError(ValueError):
    """A trace that does not have the columns or values its format needs; the message says the fix."""


@dataclass(frozen=True)
class BadRows:
    """Rows dropped from a trace: how many, of how many data rows, and the first (line, reason) pairs."""

    count: int = 0
    rows: int = 0
    examples: tuple[tuple[int, str], ...] = ()

    @property
    def fraction(self) -> float:
        return self.count / self.rows if self.rows else 0.0

    def describe(self, limit: int = MAX_BAD_EXAMPLES) -> str:
        shown = ", ".join(f"line {line} ({why})" for line, why in self.examples[:limit])
        more = self.count - min(limit, len(self.examples))
        return shown + (f" and {more:,} more" if more > 0 else "")


@dataclass
class _Loaded:
    frame: pd.DataFrame
    lines: np.ndarray  # the file line number of each frame row
    unreadable: list[tuple[int, str]]  # lines that gave no row at all (not JSON, too many CSV fields)


def _one_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0].rstrip(".")


def _names(columns) -> str:
    """Column names for a message: a few, each short, escaped (a garbage file has garbage names)."""
    names = [repr(str(c)[:40]) for c in list(columns)[:12]]
    more = len(columns) - len(names)
    return "[" + ", ".join(names) + (f", ... {more} more" if more > 0 else "") + "]"


# ---------------------------------------------------------------- reading
_SKIPPED_LINE = re.compile(r"Skipping line (\d+): expected")
_BLANK_LINE = re.compile(rb"\n[ \t\r]*\n")
_CHUNK_LINES = 10_000  # of a JSONL file Arrow rejects as a whole


def _load_csv(path: Path) -> _Loaded:
    # Blank lines are kept as all-missing rows so that row i stays line i + 2 (the header is line 1),
    # except for lines with too many fields: the C parser skips those and names them in a warning.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        frame = pd.read_csv(path, skip_blank_lines=False, on_bad_lines="warn")
    skipped = np.array(sorted(int(n) for w in caught for n in _SKIPPED_LINE.findall(str(w.message))),
                       dtype=np.int64)
    lines = np.arange(len(frame), dtype=np.int64) + 2
    if skipped.size:
        lines = np.setdiff1d(np.arange(2, 2 + len(frame) + skipped.size), skipped)[:len(frame)]
    blank = frame.isna().all(axis=1).to_numpy()
    if blank.any():
        frame, lines = frame[~blank].reset_index(drop=True), lines[~blank]
    return _Loaded(frame, lines, [(int(n), "too many fields") for n in skipped])


def _arrow_to_pandas(table: pa.Table) -> pd.DataFrame:
    # List columns stay Arrow lists: prefix reuse works on their flat values, not on a million Python lists.
    return table.to_pandas(types_mapper=lambda t: pd.ArrowDtype(t) if pa.types.is_list(t) else None)


def _read_json_lines(data: bytes) -> pa.Table:
    import pyarrow.json as pj

    return pj.read_json(io.BytesIO(data), read_options=pj.ReadOptions(block_size=4 << 20))


def _load_jsonl(path: Path) -> _Loaded:
    data = path.read_bytes()
    if not data.strip():
        return _Loaded(pd.DataFrame(), np.empty(0, np.int64), [])
    try:  # Arrow's parser is ~15x faster than pandas'; it rejects the whole file at the first bad line
        table = _read_json_lines(data)
    except pa.ArrowInvalid:
        parts = _load_jsonl_chunks(data.split(b"\n"))
        frame = pd.concat([part.frame for part in parts], ignore_index=True)  # differing types -> object
        return _Loaded(frame, np.concatenate([part.lines for part in parts]),
                       [bad for part in parts for bad in part.unreadable])
    lines = np.arange(1, table.num_rows + 1, dtype=np.int64)
    if _BLANK_LINE.search(b"\n" + data):  # Arrow skips blank lines: number the others
        lines = np.flatnonzero([bool(line.strip()) for line in data.split(b"\n")])[:table.num_rows] + 1
    return _Loaded(_arrow_to_pandas(table), lines, [])


def _load_jsonl_chunks(lines: list[bytes]) -> list[_Loaded]:
    """A file Arrow rejected, in chunks of _CHUNK_LINES lines: Arrow for each, so that the good bulk stays
    fast; in a chunk it rejects, each line is checked on its own and the good ones go back to Arrow."""
    parts = []
    for first in range(0, len(lines), _CHUNK_LINES):
        chunk = lines[first:first + _CHUNK_LINES]
        numbers = np.array([first + 1 + i for i, line in enumerate(chunk) if line.strip()], dtype=np.int64)
        if not numbers.size:
            continue
        try:
            parts.append(_Loaded(_arrow_to_pandas(_read_json_lines(b"\n".join(chunk))), numbers, []))
            continue
        except pa.ArrowInvalid:
            pass
        records, good, unreadable = [], [], []
        for number in numbers:
            try:
                obj = json.loads(lines[number - 1].decode())
            except ValueError:  # includes UnicodeDecodeError
                unreadable.append((int(number), "invalid JSON"))
                continue
            if isinstance(obj, dict):
                records.append(obj)
                good.append(number)
            else:
                kind = "array" if isinstance(obj, list) else "scalar"
                unreadable.append((int(number), f"a JSON {kind}, not an object (JSONL holds one object per line)"))
        try:  # the typed Arrow columns, unless the values themselves clash (a string among numbers)
            frame = _arrow_to_pandas(_read_json_lines(b"\n".join(lines[n - 1] for n in good)))
        except pa.ArrowInvalid:
            frame = pd.DataFrame.from_records(records)
        parts.append(_Loaded(frame, np.array(good, dtype=np.int64), unreadable))
    return parts


def _load_parquet(path: Path) -> _Loaded:
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    return _Loaded(_arrow_to_pandas(table), np.arange(1, table.num_rows + 1, dtype=np.int64), [])


def _check_text(path: Path, kind: str) -> None:
    """Binary data at the start of a CSV/JSONL file: say so, rather than parse it into garbage columns."""
    with path.open("rb") as f:
        head = f.read(1 << 16)
    try:
        codecs.getincrementaldecoder("utf-8")().decode(head, final=False)  # a cut-off last char is fine
        bad_at = head.find(b"\x00")
    except UnicodeDecodeError as exc:
        bad_at = exc.start
    if bad_at >= 0:
        raise TraceFormatError(f"trace {path} is not a {kind} text file (binary data at byte {bad_at}); "
                               f"{_FORMAT_FIX} if it is another format")


def _load(path: Path, kind: str) -> _Loaded:
    """The file's rows, or one clear TraceFormatError for a file that cannot be read as `kind` at all."""
    loader = {"csv": _load_csv, "jsonl": _load_jsonl, "parquet": _load_parquet}[kind]
    try:
        if kind != "parquet":
            _check_text(path, kind)
        return loader(path)
    except TraceFormatError:
        raise
    except pd.errors.EmptyDataError:
        return _Loaded(pd.DataFrame(), np.empty(0, np.int64), [])
    except PermissionError:
        raise TraceFormatError(f"cannot read trace {path}: permission denied") from None
    except UnicodeDecodeError as exc:  # past the head that _check_text looked at
        raise TraceFormatError(f"trace {path} is not a {kind} text file (not UTF-8 at byte {exc.start}); "
                               f"{_FORMAT_FIX} if it is another format") from None
    except (OSError, ValueError, pa.ArrowException) as exc:  # pandas' ParserError and ArrowInvalid included
        raise TraceFormatError(f"cannot read trace {path} as {kind}: {_one_line(exc)}; "
                               f"{_FORMAT_FIX} if it is another format") from None


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
            f"cannot tell the format of {path} from its extension {path.suffix!r}; {_FORMAT_FIX}"
        ) from None


def _detect(columns: pd.Index) -> str:
    """A known format whose required columns are all present, else the generic mapping."""
    for fmt in ("azure", "mooncake"):
        required = {v for k, v in FORMAT_COLUMNS[fmt].items() if k != "hash_ids"}
        if required <= set(columns):
            return fmt
    return "generic"


def _mostly_numbers(col: pd.Series) -> bool:
    sample = col.dropna().head(1000)
    return bool(pd.to_numeric(sample, errors="coerce").notna().mean() >= 0.5) if len(sample) else True


def _arrival_seconds(col: pd.Series, per_s: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Seconds since the earliest arrival (NaN where bad) and the bad-row masks. Numbers count units of
    1/`per_s` s; text that is mostly not numbers is parsed as timestamps (ISO 8601 fast path, else the
    format of the first value). Differences are taken before scaling: exact for integer clocks."""
    missing = col.isna().to_numpy()
    if pd.api.types.is_datetime64_any_dtype(col):  # Parquet timestamps; Arrow's JSON reader infers them too
        secs = (col - col.min()).dt.total_seconds().to_numpy(dtype=float, na_value=np.nan)
        return secs, {"missing timestamp": missing, "unparsable timestamp": np.zeros(len(col), bool)}
    if pd.api.types.is_numeric_dtype(col) or _mostly_numbers(col):
        num = pd.to_numeric(col, errors="coerce")
        values = num.to_numpy() if num.dtype.kind in "iu" else num.to_numpy(dtype=float, na_value=np.nan)
        finite = np.isfinite(values)
        secs = (values - values[finite].min()) / per_s if finite.any() else values.astype(float)
        return secs, {"missing timestamp": missing, "unparsable timestamp": ~finite & ~missing}
    ts = pd.to_datetime(col, format="ISO8601", errors="coerce", utc=True)
    if ts.isna().sum() > 0.5 * (~missing).sum():
        ts = pd.to_datetime(col, errors="coerce", utc=True)
    secs = (ts - ts.min()).dt.total_seconds().to_numpy(dtype=float, na_value=np.nan)
    return secs, {"missing timestamp": missing, "unparsable timestamp": np.isnan(secs) & ~missing}


def _token_counts(col: pd.Series, name: str) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Counts as floats (NaN where missing or non-numeric) and the bad-row masks."""
    missing = col.isna().to_numpy()
    values = pd.to_numeric(col, errors="coerce").to_numpy(dtype=float, na_value=np.nan)
    finite = np.isfinite(values)
    return values, {
        f"missing {name}": missing,
        f"non-numeric {name}": ~finite & ~missing,
        f"negative {name}": finite & (values < 0),
        f"non-integer {name}": finite & (values != np.floor(values)),
    }


def _hash_lists(col: pd.Series, path: Path) -> tuple[pd.Series, dict[str, np.ndarray]]:
    """hash_ids as an Arrow list column (null: no blocks) and the bad-row mask. JSONL and Parquet lists
    pass through; text such as "[1, 2, 3]" or "1 2 3" (a CSV cell) is split into its ids."""
    if isinstance(col.dtype, pd.ArrowDtype) and pa.types.is_list(col.dtype.pyarrow_dtype):
        return col, {}
    if col.dtype == object:  # from JSON read line by line: lists (or arrays), nulls, or anything else
        values = col.to_numpy()
        listlike = np.fromiter((isinstance(v, (list, tuple, np.ndarray)) for v in values), bool, len(values))
        ok = listlike | col.isna().to_numpy()
        lists = np.where(listlike, values, None)
    else:  # text or single numbers
        missing = col.isna().to_numpy()
        split = col.astype(str).str.replace(r"[\[\],]", " ", regex=True).str.split().to_numpy()
        ok, lists = np.ones(len(col), bool), np.where(missing, None, split)
    try:
        arr = pa.array(lists, from_pandas=True)
    except (pa.ArrowException, TypeError) as exc:
        raise TraceFormatError(f"hash_ids column {col.name!r} of {path} mixes id types ({_one_line(exc)}); "
                               f"give each request a list of integer (or string) block ids") from None
    if pa.types.is_null(arr.type):
        arr = pa.nulls(len(arr), pa.list_(pa.int64()))
    return pd.Series(pd.arrays.ArrowExtensionArray(arr), name=col.name), {"malformed hash_ids": ~ok}


def _bad_rows(masks: dict[str, np.ndarray], lines: np.ndarray,
              unreadable: list[tuple[int, str]]) -> tuple[np.ndarray, BadRows]:
    """The mask of bad frame rows and the record of all bad rows, the first `MAX_BAD_EXAMPLES` by line."""
    names = list(masks)
    stacked = np.column_stack([masks[k] for k in names]) if names else np.zeros((len(lines), 0), bool)
    bad = stacked.any(axis=1)
    idx = np.flatnonzero(bad)[:MAX_BAD_EXAMPLES]
    examples = [(int(lines[i]), ", ".join(n for n, hit in zip(names, stacked[i]) if hit)) for i in idx]
    examples = sorted(examples + unreadable[:MAX_BAD_EXAMPLES])[:MAX_BAD_EXAMPLES]
    count = int(bad.sum()) + len(unreadable)
    return bad, BadRows(count=count, rows=len(lines) + len(unreadable), examples=tuple(examples))


def read_trace_with_bad_rows(path: str | Path, fmt: str = "auto", columns: dict[str, str] | None = None,
                             max_bad_fraction: float = DEFAULT_MAX_BAD_FRACTION) -> tuple[pd.DataFrame, BadRows]:
    """Read a trace into the normalised frame described in the module docstring, without its bad rows,
    and the record of those. Raises TraceFormatError past `max_bad_fraction` bad rows (a share of all
    data rows), and for a file that is empty, a directory, unreadable or of an unknown format.

    `fmt`: "azure" (CSV with wall-clock TIMESTAMP), "mooncake" (JSONL, timestamp in ms), "csv" / "jsonl" /
    "parquet" (generic), or "auto" (azure/mooncake by their columns, else generic by extension).
    `columns` maps our names {arrival, input, output, hash_ids} to the file's columns and overrides the
    format's defaults; the extra key `arrival_unit` (s, ms, us, ns; default s, ms for mooncake) gives
    the unit of a numeric arrival column. A non-numeric arrival column is parsed as timestamps.
    """
    if fmt not in ("auto", "azure", "mooncake", "csv", "jsonl", "parquet"):
        raise TraceFormatError(f"unknown trace format {fmt!r}; use auto, azure, mooncake, csv, jsonl or parquet")
    if not 0 <= max_bad_fraction <= 1:
        raise ValueError(f"max_bad_fraction={max_bad_fraction} must be within [0, 1]")
    p = Path(path).expanduser()
    if p.is_dir():
        raise TraceFormatError(f"trace {p} is a directory; give a trace file (workload.trace)")
    if not p.exists():
        raise FileNotFoundError(f"trace file not found: {p} (set workload.trace to an existing file)")
    loaded = _load(p, _file_kind(p, fmt))
    raw = loaded.frame
    if raw.empty and loaded.unreadable:
        _, record = _bad_rows({}, loaded.lines, loaded.unreadable)
        raise TraceFormatError(f"trace {p} has no valid rows: {record.describe(5)}")
    if raw.empty:
        raise TraceFormatError(f"trace {p} has no requests (the file is empty or has only a header)")
    kind = _detect(raw.columns) if fmt == "auto" else fmt if fmt in ("azure", "mooncake") else "generic"
    user = dict(columns or {})
    unit = user.pop("arrival_unit", "ms" if kind == "mooncake" else "s")
    if unit not in _ARRIVAL_UNITS_PER_S:
        raise TraceFormatError(f"workload.columns.arrival_unit={unit!r}; "
                               f"use one of {sorted(_ARRIVAL_UNITS_PER_S)}")
    unknown = set(user) - set(FORMAT_COLUMNS["generic"])
    if unknown:
        raise TraceFormatError(f"unknown workload.columns keys {sorted(unknown)}; "
                               f"use {sorted(FORMAT_COLUMNS['generic'])} and arrival_unit")
    mapping = {**FORMAT_COLUMNS[kind], **user}

    for ours in ("arrival", "input", "output"):
        if mapping[ours] not in raw.columns:
            raise TraceFormatError(
                f"trace {p} ({kind} format) has no column {mapping[ours]!r} for {ours}; "
                f"columns found: {_names(raw.columns)}. Fix: set workload.columns.{ours}=<your column> "
                f"(dolphin profile --column {ours}=<your column>)"
            )
    # hash_ids are optional, unless the user named a column for them.
    has_hashes = mapping.get("hash_ids") in raw.columns
    if "hash_ids" in user and not has_hashes:
        raise TraceFormatError(
            f"trace {p} has no column {user['hash_ids']!r} for hash_ids; columns found: {_names(raw.columns)}. "
            f"Fix: set workload.columns.hash_ids=<your column>, or remove it"
        )

    arrival, masks = _arrival_seconds(raw[mapping["arrival"]], _ARRIVAL_UNITS_PER_S[unit])
    ins, in_masks = _token_counts(raw[mapping["input"]], "input")
    outs, out_masks = _token_counts(raw[mapping["output"]], "output")
    masks |= in_masks | out_masks
    hashes = None
    if has_hashes:
        hashes, hash_masks = _hash_lists(raw[mapping["hash_ids"]], p)
        masks |= hash_masks
    bad, record = _bad_rows(masks, loaded.lines, loaded.unreadable)
    if record.count == record.rows:
        raise TraceFormatError(f"trace {p} has no valid rows: {record.describe(5)}")
    if record.fraction > max_bad_fraction:
        raise TraceFormatError(
            f"trace {p} has {record.count:,} bad rows of {record.rows:,} ({record.fraction:.2%}, more than the "
            f"allowed {max_bad_fraction:.2%}): {record.describe(5)}; fix those rows, or allow more with "
            f"workload.max_bad_row_fraction (dolphin profile --max-bad-fraction)"
        )

    good = ~bad
    df = pd.DataFrame({
        "arrival_s": arrival[good],
        "input_tokens": ins[good].astype(np.int64),
        "output_tokens": outs[good].astype(np.int64),
    })
    if hashes is not None:
        df["hash_ids"] = hashes[good].reset_index(drop=True)
    # Stable sort keeps the file's order for equal timestamps; then make arrivals relative to the first.
    df = df.sort_values("arrival_s", kind="stable").reset_index(drop=True)
    df["arrival_s"] -= df["arrival_s"].iloc[0]
    return df, record


def read_trace(path: str | Path, fmt: str = "auto", columns: dict[str, str] | None = None,
               max_bad_fraction: float = DEFAULT_MAX_BAD_FRACTION) -> pd.DataFrame:
    """`read_trace_with_bad_rows` without the record of the bad rows it dropped."""
    return read_trace_with_bad_rows(path, fmt, columns, max_bad_fraction)[0]
