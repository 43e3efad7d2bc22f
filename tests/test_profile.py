"""Stage 1: trace reading and the profile's definitions, on the shipped Azure trace and tiny known traces."""
from __future__ import annotations

import json
import time

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from tasks.config import SLOConfig, WorkloadConfig
from tasks.paths import REPO_ROOT
from tasks.profile import (TraceFormatError, plot_profile, profile_task, profile_trace, read_trace,
                           synthetic_profile)

AZURE = REPO_ROOT / "data" / "traces" / "azure_llm_2023_code.csv"
SLO = SLOConfig(targets={"e2el_ms_p99": 2000})


def write_jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_azure_trace():
    df = read_trace(AZURE)
    raw = pd.read_csv(AZURE)
    stamps = pd.to_datetime(raw["TIMESTAMP"])
    duration = (stamps.max() - stamps.min()).total_seconds()
    assert len(df) == 8819 == len(raw)
    assert df["arrival_s"].is_monotonic_increasing and df["arrival_s"].iloc[0] == 0
    assert df["arrival_s"].iloc[-1] == pytest.approx(duration, abs=1e-6)
    assert sorted(df["input_tokens"]) == sorted(raw["ContextTokens"])

    p = profile_trace(df, source=str(AZURE))
    assert p.requests == 8819
    assert p.duration_s == pytest.approx(duration, abs=1e-6)
    assert p.mean_qps == pytest.approx(8819 / duration)
    assert p.peak_qps_1s >= p.peak_qps_60s >= p.mean_qps
    assert p.interarrival_cv > 1  # a bursty production trace, not Poisson
    assert p.gamma_shape is not None and 0 < p.gamma_shape < 1
    for s, col in ((p.input_tokens, "ContextTokens"), (p.output_tokens, "GeneratedTokens")):
        assert s.p50 <= s.p90 <= s.p99 <= s.max == raw[col].max()
        assert s.mean == pytest.approx(raw[col].mean())
    assert p.prefix_reuse_ratio is None  # Azure has no block hashes
    trace_pairs = set(zip(raw["ContextTokens"], raw["GeneratedTokens"]))
    assert len(p.length_pairs) == 8819 and set(p.length_pairs) <= trace_pairs


def test_definitions_on_a_known_trace(tmp_path):
    # Arrivals deliberately out of order in the file; the profile is of the sorted trace.
    arrivals = [1.1, 0.0, 0.2, 0.5, 1.2, 1.3, 1.9, 2.5, 70.0]
    ins = [10, 20, 30, 40, 50, 60, 70, 80, 90]
    outs = [1, 2, 3, 4, 5, 6, 7, 8, 9]
    path = tmp_path / "t.csv"
    pd.DataFrame({"t": arrivals, "in": ins, "out": outs}).to_csv(path, index=False)
    df = read_trace(path, "csv", {"arrival": "t", "input": "in", "output": "out"})
    assert df["arrival_s"].tolist() == sorted(arrivals)
    assert df.loc[df["arrival_s"] == 1.1, "input_tokens"].item() == 10  # rows stay joint through the sort

    p = profile_trace(df, source="known")
    gaps = np.diff(sorted(arrivals))
    assert p.duration_s == 70.0
    assert p.mean_qps == pytest.approx(9 / 70)
    assert p.peak_qps_1s == 4.0  # [1, 2) holds 1.1, 1.2, 1.3, 1.9
    assert p.peak_qps_60s == pytest.approx(8 / 60)
    assert p.interarrival_cv == pytest.approx(gaps.std() / gaps.mean())
    assert p.input_tokens.p50 == 50 and p.input_tokens.max == 90
    assert p.input_tokens.p90 == pytest.approx(np.percentile(ins, 90))
    assert sorted(p.length_pairs) == sorted(zip(ins, outs))


@pytest.mark.parametrize("shape", [1.0, 4.0])
def test_gamma_shape_recovers_the_arrival_process(shape):
    gaps = stats.gamma(shape).rvs(size=20000, random_state=np.random.default_rng(1))
    df = pd.DataFrame({"arrival_s": np.concatenate([[0], np.cumsum(gaps)]),
                       "input_tokens": 1, "output_tokens": 1})
    p = profile_trace(df, source="gamma")
    assert p.gamma_shape == pytest.approx(shape, rel=0.05)
    assert p.interarrival_cv == pytest.approx(1 / np.sqrt(shape), rel=0.05)


def test_gamma_shape_none_without_two_distinct_gaps():
    one_gap = pd.DataFrame({"arrival_s": [0.0, 1.0], "input_tokens": 5, "output_tokens": 5})
    regular = pd.DataFrame({"arrival_s": np.arange(10.0), "input_tokens": 5, "output_tokens": 5})
    assert profile_trace(one_gap, "a").gamma_shape is None
    p = profile_trace(regular, "b")
    assert p.gamma_shape is None and p.interarrival_cv == 0


def test_mooncake_prefix_reuse(tmp_path):
    rows = [
        {"timestamp": 0, "input_length": 1200, "output_length": 5, "hash_ids": [1, 2, 3]},  # 512+512+176
        {"timestamp": 1000, "input_length": 1100, "output_length": 6, "hash_ids": [1, 2, 4]},
        {"timestamp": 500, "input_length": 600, "output_length": 7, "hash_ids": [1, 5]},
        {"timestamp": 2000, "input_length": 1024, "output_length": 8, "hash_ids": [7, 7]},
    ]
    df = read_trace(write_jsonl(tmp_path / "mc.jsonl", rows))  # auto-detected, ms timestamps
    assert df["arrival_s"].tolist() == [0.0, 0.5, 1.0, 2.0]
    p = profile_trace(df, source="mooncake")
    assert p.duration_s == 2.0
    # 0.5 s: block 1 (512) seen before; 1.0 s: blocks 1 and 2 (1024); 2.0 s: 7 repeats only within
    # its own request, which is not reuse.
    assert p.prefix_reuse_ratio == pytest.approx((512 + 1024) / (1200 + 600 + 1100 + 1024))


def test_missing_column_names_it_and_the_fix(tmp_path):
    path = tmp_path / "azure_like.csv"
    path.write_text("TIMESTAMP,ContextTokens\n2023-11-16 18:17:03.9799600,10\n")
    with pytest.raises(TraceFormatError) as err:
        read_trace(path, "azure")
    msg = str(err.value)
    assert "GeneratedTokens" in msg and "ContextTokens" in msg and "workload.columns.output=" in msg
    # The suggested fix works.
    df = read_trace(path, "azure", {"output": "ContextTokens"})
    assert df["output_tokens"].tolist() == [10]


def test_missing_file_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.csv"):
        read_trace(tmp_path / "nope.csv")


def test_generic_formats_with_a_column_mapping(tmp_path):
    frame = pd.DataFrame({"when": ["2024-01-01 00:00:00", "2024-01-01 00:00:02.5"],
                          "prompt": [100, 200], "gen": [10, 20]})
    mapping = {"arrival": "when", "input": "prompt", "output": "gen"}
    frame.to_csv(tmp_path / "g.csv", index=False)
    frame.to_parquet(tmp_path / "g.parquet")
    for name in ("g.csv", "g.parquet"):
        df = read_trace(tmp_path / name, "auto", mapping)  # format from the extension
        assert df["arrival_s"].tolist() == [0.0, 2.5]
        assert df["input_tokens"].tolist() == [100, 200] and df["output_tokens"].tolist() == [10, 20]
    rows = [{"ms": 3000, "i": 7, "o": 3}, {"ms": 1000, "i": 5, "o": 2}]
    df = read_trace(write_jsonl(tmp_path / "g.jsonl", rows), "jsonl",
                    {"arrival": "ms", "arrival_unit": "ms", "input": "i", "output": "o"})
    assert df["arrival_s"].tolist() == [0.0, 2.0] and df["input_tokens"].tolist() == [5, 7]


def test_synthetic_profile():
    p = synthetic_profile(1000, 50, qps=4.0, n=400, shared_prefix_len=250)
    assert p.mean_qps == pytest.approx(4.0)
    assert p.duration_s == pytest.approx(400 / 4.0)
    assert p.input_tokens.p99 == p.input_tokens.max == 1000 and p.output_tokens.mean == 50
    assert p.interarrival_cv == pytest.approx(1.0, abs=0.15)  # Poisson
    assert p.shared_prefix_len == 250
    assert p.prefix_reuse_ratio == pytest.approx(399 / 400 * 0.25)
    assert "synthetic" in p.source and "Poisson" in p.source
    with pytest.raises(ValueError):
        synthetic_profile(100, 10, qps=1.0, shared_prefix_len=101)


def test_profile_is_vectorised():
    n = 300_000
    rng = np.random.default_rng(0)
    ins = rng.integers(1, 4096, n)
    blocks = [list(range(k)) for k in range(9)]  # every request shares the same leading block ids
    df = pd.DataFrame({"arrival_s": np.sort(rng.uniform(0, 3600, n)), "input_tokens": ins,
                       "output_tokens": rng.integers(1, 500, n),
                       "hash_ids": [blocks[k] for k in (ins + 511) // 512]})
    start = time.perf_counter()
    p = profile_trace(df, source="big")
    assert time.perf_counter() - start < 10
    assert 0.9 < p.prefix_reuse_ratio < 1.0  # all but the first occurrence of each block is reuse


def test_plot_profile(tmp_path):
    df = read_trace(AZURE)
    paths = plot_profile(df, tmp_path / "plots")
    assert len(paths) == 3
    for path in paths:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_profile_task_trace_and_synthetic(tmp_path):
    wl = WorkloadConfig(name="azure", trace=str(AZURE), format="azure", output_len=64)
    p = profile_task.fn(wl, SLO, tmp_path / "a")
    assert p.requests == 8819 and p.output_tokens.max == 64  # lengths overridden, arrivals kept
    saved = json.loads((tmp_path / "a" / "profile.json").read_text())
    assert saved["requests"] == 8819 and len(list((tmp_path / "a").glob("*.png"))) == 3

    syn = WorkloadConfig(name="syn", input_len=4900, output_len=10, shared_prefix_len=4500)
    p = profile_task.fn(syn, SLOConfig(targets={"ttft_ms_p90": 500}, target_qps=3.0), None)
    assert p.mean_qps == pytest.approx(3.0) and p.shared_prefix_len == 4500
