"""Stage 1: trace reading and the profile's definitions, on the shipped Azure trace and tiny known traces."""
from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import time
from collections import Counter
from datetime import datetime, timedelta

import numpy as np
import pandas as pd
import pytest
from scipy import optimize, special, stats

from flows.cli import main as dolphin
from tasks.config import SLOConfig, WorkloadConfig
from tasks.paths import REPO_ROOT
from tasks.profile import profile_task
from tasks.profile_stats import peak_concurrency, plot_profile, profile_trace, synthetic_profile
from tasks.trace import MAX_BAD_EXAMPLES, TraceFormatError, read_trace, read_trace_with_bad_rows
from tests.conftest import DOLPHIN, base_env

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


def test_timestamp_columns_in_jsonl_and_parquet(tmp_path):
    # Arrow's JSON reader turns ISO strings into timestamps (not when some have a fraction); Parquet has its own.
    mapping = {"arrival": "t", "input": "i", "output": "o"}
    for stamps in (["2024-01-01 00:00:03", "2024-01-01 00:00:01"],
                   ["2024-01-01 00:00:03", "2024-01-01 00:00:00.5"]):
        rows = [{"t": t, "i": 5, "o": 1} for t in stamps]
        df = read_trace(write_jsonl(tmp_path / "t.jsonl", rows), "auto", mapping)
        want = (pd.Timestamp(stamps[0]) - pd.Timestamp(stamps[1])).total_seconds()
        assert df["arrival_s"].tolist() == [0.0, want]
    when = pd.to_datetime(pd.Series(["2024-01-01 00:00:00", "2024-01-01 00:00:02.5"]), format="ISO8601")
    pd.DataFrame({"t": when, "i": [1, 2], "o": [1, 1]}).to_parquet(tmp_path / "t.parquet")
    assert read_trace(tmp_path / "t.parquet", "auto", mapping)["arrival_s"].tolist() == [0.0, 2.5]


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
    # Concurrency from the SLO's E2EL bound (2000 ms) as every request's latency.
    assert p.latency_model == "fixed E2EL 2 s" and p.littles_law_concurrency == pytest.approx(p.mean_qps * 2)
    assert p.peak_concurrency >= p.peak_qps_1s  # >= the most arrivals in one 1 s window

    syn = WorkloadConfig(name="syn", input_len=4900, output_len=10, shared_prefix_len=4500)
    p = profile_task.fn(syn, SLOConfig(targets={"ttft_ms_p90": 500}, target_qps=3.0), None)
    assert p.mean_qps == pytest.approx(3.0) and p.shared_prefix_len == 4500
    assert p.littles_law_concurrency == pytest.approx(3.0 * 2.0)  # no E2EL target: the 2 s default


# ---------------------------------------------------------------- the CLI's --json against a by-hand profile
BLOCK = 512


def by_hand(arrivals, ins, outs, latencies, hash_ids=None, windows=(1, 60)):
    """The --json statistics computed independently: pure Python and the statistics module, the gamma MLE
    from its score equation, peak concurrency by brute force. `arrivals` are exact relative seconds in
    the file's order; `windows[w]` gives the window index of each arrival (exact integer arithmetic)."""
    order = sorted(range(len(arrivals)), key=lambda i: arrivals[i])  # stable: file order for ties
    t = [arrivals[i] for i in order]
    n, duration = len(t), t[-1] - t[0]
    gaps = [b - a for a, b in zip(t, t[1:])]
    pos = [g for g in gaps if g > 0]
    # Gamma MLE with loc 0: ln k - digamma(k) = ln(mean) - mean(ln x), scale = mean / k.
    target = math.log(statistics.fmean(pos)) - statistics.fmean(math.log(g) for g in pos)
    shape = optimize.brentq(lambda k: math.log(k) - special.digamma(k) - target, 1e-4, 1e4)

    def lengths(xs):
        q = statistics.quantiles(xs, n=100, method="inclusive")  # numpy's default (linear) percentiles
        return {"mean": statistics.fmean(xs), "p50": q[49], "p90": q[89], "p99": q[98], "max": max(xs)}

    in_flight = [sum(1 for a, lat in zip(arrivals, latencies) if a <= now < a + lat) for now in arrivals]
    out = {
        "requests": n, "duration_s": duration, "mean_qps": n / duration,
        "peak_qps_1s": max(Counter(windows[1]).values()) / 1,
        "peak_qps_60s": max(Counter(windows[60]).values()) / 60,
        "interarrival_cv": statistics.pstdev(gaps) / statistics.fmean(gaps), "gamma_shape": shape,
        "input_tokens": lengths(ins), "output_tokens": lengths(outs),
        "peak_concurrency": max(in_flight), "littles_law_concurrency": n / duration * statistics.fmean(latencies),
        "prefix_reuse_ratio": None, "bad_rows": 0, "bad_row_lines": [], "bad_row_reasons": [],
    }
    if hash_ids is not None:
        seen, reused = set(), 0
        for i in order:
            reused += sum(max(0, min(BLOCK, ins[i] - BLOCK * j)) for j, h in enumerate(hash_ids[i]) if h in seen)
            seen.update(hash_ids[i])
        out["prefix_reuse_ratio"] = reused / sum(ins)
    return out


def assert_matches(got: dict, want: dict):
    for key, value in want.items():
        if isinstance(value, dict):
            assert got[key] == pytest.approx(value, rel=1e-9), key
        elif isinstance(value, float):
            assert got[key] == pytest.approx(value, rel=1e-6 if key == "gamma_shape" else 1e-9), key
        else:
            assert got[key] == value, key


def cli_json(capsys, *args) -> dict:
    assert dolphin(["profile", *map(str, args), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def bursty_ticks(rng, n, mean_ticks) -> list[int]:
    """Distinct, bursty arrival times on an integer clock, file order shuffled a little."""
    ticks = np.cumsum(1 + rng.gamma(0.3, mean_ticks / 0.3, n).astype(np.int64)).tolist()
    ticks[3], ticks[7] = ticks[7], ticks[3]
    return ticks


def test_cli_json_azure_csv(tmp_path, capsys):
    rng = np.random.default_rng(11)
    us = bursty_ticks(rng, 400, 500_000)  # microseconds since an epoch
    start = datetime(2023, 11, 16, 18, 17, 3, 979960)
    # The Azure trace's own form: wall clock with a 7-digit fraction.
    stamps = [(start + timedelta(microseconds=u)).strftime("%Y-%m-%d %H:%M:%S.%f") + "0" for u in us]
    ins, outs = rng.integers(1, 8000, 400).tolist(), rng.integers(1, 600, 400).tolist()
    path = tmp_path / "azure.csv"
    path.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n"
                    + "".join(f"{s},{i},{o}\n" for s, i, o in zip(stamps, ins, outs)))
    # Independently: parse the text back with datetime (dropping the 7th digit, always 0 here).
    parsed = [datetime.strptime(s[:26], "%Y-%m-%d %H:%M:%S.%f") for s in stamps]
    rel_us = [round((p - min(parsed)).total_seconds() * 1e6) for p in parsed]
    e2el = 1.2345675  # off the microsecond grid: no request ends exactly at an arrival
    want = by_hand([u / 1e6 for u in rel_us], ins, outs, [e2el] * 400,
                   windows={w: [u // (w * 1_000_000) for u in rel_us] for w in (1, 60)})
    got = cli_json(capsys, path, "--e2el-s", e2el)
    assert_matches(got, want)
    assert got["latency_model"] == f"fixed E2EL {e2el:g} s"


def test_cli_json_mooncake_jsonl(tmp_path, capsys):
    rng = np.random.default_rng(12)
    n = 400
    ms = bursty_ticks(rng, n, 400)
    outs = rng.integers(1, 600, n).tolist()
    rows, ins, hashes = [], [], []
    for i in range(n):
        blocks = int(rng.integers(1, 8))
        shared = [int(rng.integers(0, 6)) * 100 + j for j in range(min(blocks, int(rng.integers(0, 4))))]
        ids = shared + [10_000 + 10 * i + j for j in range(blocks - len(shared))]
        if i % 50 == 0:
            ids.append(ids[0])  # an id repeated inside one request is not reuse
        ins.append((blocks - 1) * BLOCK + int(rng.integers(1, BLOCK + 1)))
        hashes.append(ids)
        rows.append({"timestamp": ms[i], "input_length": ins[-1], "output_length": outs[i], "hash_ids": ids})
    path = write_jsonl(tmp_path / "mooncake.jsonl", rows)
    e2el = 1.5005  # off the millisecond grid
    want = by_hand([(m - min(ms)) / 1000 for m in ms], ins, outs, [e2el] * n, hash_ids=hashes,
                   windows={w: [(m - min(ms)) // (w * 1000) for m in ms] for w in (1, 60)})
    got = cli_json(capsys, path, "--e2el-s", e2el)
    assert_matches(got, want)
    assert 0.05 < got["prefix_reuse_ratio"] < 0.6  # the trace does share blocks, and not all


def test_cli_json_generic_parquet_with_columns_and_per_token_latency(tmp_path, capsys):
    rng = np.random.default_rng(13)
    n = 300
    when = (np.cumsum(rng.gamma(0.5, 1.2, n)) + 1e5).tolist()  # seconds, as floats
    when[0], when[1] = when[1], when[0]
    prompt, gen = rng.integers(1, 3000, n).tolist(), rng.integers(1, 300, n).tolist()
    blocks = [[int(x) for x in rng.integers(0, 40, math.ceil(p / BLOCK))] for p in prompt]
    pd.DataFrame({"when": when, "prompt": prompt, "gen": gen, "blocks": blocks}).to_parquet(tmp_path / "g.parquet")
    t0 = min(when)
    rel = [w - t0 for w in when]
    latencies = [0.15 + 0.02 * (g - 1) for g in gen]  # TTFT + TPOT x (output - 1)
    want = by_hand(rel, prompt, gen, latencies, hash_ids=blocks,
                   windows={w: [math.floor(r / w) for r in rel] for w in (1, 60)})
    got = cli_json(capsys, tmp_path / "g.parquet", "--column", "arrival=when", "--column", "input=prompt",
                   "--column", "output=gen", "--column", "hash_ids=blocks", "--ttft-ms", 150, "--tpot-ms", 20,
                   "--plots", tmp_path / "plots")
    assert_matches(got, want)
    assert "TPOT 20 ms" in got["latency_model"]
    assert len(list((tmp_path / "plots").glob("*.png"))) == 3


def test_peak_concurrency_counts_half_open_intervals():
    # In flight over [arrival, arrival + latency): the request of t=0 has left when the one of t=1 arrives.
    assert peak_concurrency(np.array([0.0, 0.5, 1.0, 3.0]), 1.0) == 2
    assert peak_concurrency(np.array([2.0, 0.0, 0.0, 0.0]), 1.0) == 3  # ties all count; order is free
    assert peak_concurrency(np.array([0.0, 0.1, 0.2]), np.array([5.0, 0.05, 5.0])) == 2
    df = pd.DataFrame({"arrival_s": np.arange(100) * 0.5, "input_tokens": 10, "output_tokens": 11})
    p = profile_trace(df, "steady", ttft_s=0.5, tpot_s=0.1)  # latency 0.5 + 0.1 x 10 = 1.5 s
    assert p.peak_concurrency == 3 and p.littles_law_concurrency == pytest.approx(100 / 49.5 * 1.5)
    assert profile_trace(df, "no model").peak_concurrency is None


# ---------------------------------------------------------------- bad rows
def test_bad_csv_rows_are_counted_with_their_line_numbers(tmp_path, capsys):
    good = "2023-11-16 18:17:{:02d}.5,{},{}\n"
    lines = ["TIMESTAMP,ContextTokens,GeneratedTokens"]  # line 1
    lines += [good.format(s, 100 + s, 10).strip() for s in range(20)]  # lines 2-21
    lines += [
        ",5,5",  # 22
        "yesterday,5,5",  # 23
        "2023-11-16 18:18:00,,5",  # 24
        "2023-11-16 18:18:01,abc,5",  # 25
        "2023-11-16 18:18:02,-4,5",  # 26
        "",  # 27: blank, not a row
        "2023-11-16 18:18:03,5,2.5",  # 28
        "2023-11-16 18:18:04,5",  # 29
        "2023-11-16 18:18:05,5,5,5",  # 30
        "2023-11-16 18:18:06,7,7",  # 31
    ]
    path = tmp_path / "bad.csv"
    path.write_text("\n".join(lines) + "\n")
    df, bad = read_trace_with_bad_rows(path, max_bad_fraction=0.5)
    assert list(bad.examples) == [
        (22, "missing timestamp"), (23, "unparsable timestamp"), (24, "missing input"), (25, "non-numeric input"),
        (26, "negative input"), (28, "non-integer output"), (29, "missing output"), (30, "too many fields"),
    ]
    assert (bad.count, bad.rows) == (8, 29) and len(df) == 21 and df["input_tokens"].iloc[-1] == 7
    got = cli_json(capsys, path, "--max-bad-fraction", 0.5)
    assert got["requests"] == 21 and got["bad_rows"] == 8
    assert got["bad_row_lines"] == [22, 23, 24, 25, 26, 28, 29, 30]
    assert got["bad_row_reasons"][4] == "negative input"


def test_bad_jsonl_rows_slow_and_fast_paths(tmp_path):
    ok = {"timestamp": 0, "input_length": 600, "output_length": 3, "hash_ids": [1, 2]}
    text = "\n".join([
        json.dumps(ok),  # 1
        '{"timestamp": 5, "input_length": ',  # 2: not JSON
        "",  # 3: blank
        "[1, 2]",  # 4: not an object
        json.dumps({**ok, "timestamp": 9, "hash_ids": "abc"}),  # 5
        json.dumps({**ok, "timestamp": None, "output_length": -1}),  # 6
        json.dumps({**ok, "timestamp": 12, "input_length": "many"}),  # 7
        json.dumps({"timestamp": 15, "input_length": 700, "hash_ids": [1]}),  # 8: no output_length
        json.dumps({**ok, "timestamp": 20}),  # 9
    ]) + "\n"
    path = tmp_path / "bad.jsonl"
    path.write_text(text)
    df, bad = read_trace_with_bad_rows(path, max_bad_fraction=1.0)
    assert [n for n, _ in bad.examples] == [2, 4, 5, 6, 7, 8] and bad.rows == 8
    reasons = dict(bad.examples)
    assert reasons[2] == "invalid JSON" and "array" in reasons[4] and reasons[5] == "malformed hash_ids"
    assert reasons[6] == "missing timestamp, negative output" and reasons[7] == "non-numeric input"
    assert reasons[8] == "missing output"
    assert df["arrival_s"].tolist() == [0.0, 0.02]
    assert profile_trace(df, "x").prefix_reuse_ratio == pytest.approx(600 / 1200)  # 2nd request reuses all

    # All lines are JSON, so Arrow reads the file in one go and skips blank lines; numbers stay the file's.
    fast = tmp_path / "fast.jsonl"
    fast.write_text(json.dumps(ok) + "\n\n  \n" + json.dumps({**ok, "input_length": -5}) + "\n"
                    + json.dumps({**ok, "timestamp": 3}) + "\n")
    df, bad = read_trace_with_bad_rows(fast, max_bad_fraction=1.0)
    assert list(bad.examples) == [(4, "negative input")] and len(df) == 2


def test_bad_parquet_rows_are_numbered_from_one(tmp_path):
    frame = pd.DataFrame({"arrival_s": [0.0, 1.0, np.nan, 3.0, 4.0], "input_tokens": [5, 5, 5, -5, 5],
                          "output_tokens": [1, 1, 1, 1, 1]})
    frame.to_parquet(tmp_path / "t.parquet")
    _, bad = read_trace_with_bad_rows(tmp_path / "t.parquet", max_bad_fraction=0.5)
    assert list(bad.examples) == [(3, "missing timestamp"), (4, "negative input")]


def test_bad_row_fraction_rejects_and_says_the_fix(tmp_path):
    rows = [{"timestamp": i, "input_length": 10, "output_length": 2} for i in range(100)]
    rows[40]["input_length"] = -1
    path = write_jsonl(tmp_path / "one.jsonl", rows)
    df, bad = read_trace_with_bad_rows(path)  # 1 of 100 = the default 1%: still accepted
    assert len(df) == 99 and bad.count == 1 and bad.examples == ((41, "negative input"),)
    rows[70]["output_length"] = None
    write_jsonl(path, rows)
    with pytest.raises(TraceFormatError) as err:
        read_trace(path)
    msg = str(err.value)
    for part in ("2 bad rows of 100", "2.00%", "1.00%", "line 41 (negative input)", "line 71 (missing output)",
                 "workload.max_bad_row_fraction", "--max-bad-fraction"):
        assert part in msg
    assert len(read_trace(path, max_bad_fraction=0.05)) == 98
    # The config field reaches the pipeline's stage.
    wl = WorkloadConfig(name="t", trace=str(path), max_bad_row_fraction=0.05)
    p = profile_task.fn(wl, SLO, None)
    assert p.requests == 98 and p.bad_rows == 2 and p.bad_row_lines == [41, 71]
    with pytest.raises(TraceFormatError):
        profile_task.fn(WorkloadConfig(name="t", trace=str(path)), SLO, None)


def test_only_the_first_bad_rows_are_kept(tmp_path):
    rows = [{"timestamp": i, "input_length": -1 if i % 2 else 1, "output_length": 1} for i in range(100)]
    _, bad = read_trace_with_bad_rows(write_jsonl(tmp_path / "t.jsonl", rows), max_bad_fraction=0.6)
    assert bad.count == 50 and [n for n, _ in bad.examples] == list(range(2, 2 + 2 * MAX_BAD_EXAMPLES, 2))
    assert bad.describe(3).endswith("and 47 more")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_unreadable_file(tmp_path):
    path = tmp_path / "secret.csv"
    path.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n")
    path.chmod(0)
    with pytest.raises(TraceFormatError, match="permission denied"):
        read_trace(path)


def test_cli_errors_are_one_sentence(tmp_path, capsys):
    """Broken inputs through real `dolphin profile` processes, all at once: exit 2, one line, no traceback.
    (The last few in this process: each process costs ~2 s of CPU on a 2-core machine.)"""
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "header.csv").write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n")
    (tmp_path / "trace.txt").write_text("1,2,3\n")
    (tmp_path / "dir.csv").mkdir()
    (tmp_path / "garbage.csv").write_bytes(bytes(range(256)) * 8)
    (tmp_path / "garbage.parquet").write_bytes(bytes(range(256)) * 8)
    (tmp_path / "broken.jsonl").write_text('{"timestamp": 0, "input_length": 5, "output_length": 1}\n'
                                           '{"timestamp": 1, "input_le\nnot json at all\n')
    (tmp_path / "array.json").write_text('[{"timestamp": 0, "input_length": 5, "output_length": 1}]')
    cases = {  # file -> words its sentence must have
        "empty.jsonl": ["no requests"], "trace.txt": ["extension", "--format"], "dir.csv": ["directory"],
        "garbage.csv": ["not a csv text file", "binary"],
        "broken.jsonl": ["2 bad rows of 3", "line 2 (invalid JSON)", "line 3", "--max-bad-fraction"],
        "header.csv": ["no requests"], "garbage.parquet": ["parquet", "--format"],
        "array.json": ["line 1", "JSON array"], "missing.csv": ["not found"],
    }
    in_process = ["header.csv", "garbage.parquet", "array.json", "missing.csv"]
    home = tmp_path / "home"
    home.mkdir()
    procs = {name: subprocess.Popen([DOLPHIN, "profile", str(tmp_path / name)], env=base_env(home), cwd=tmp_path,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name in cases if name not in in_process}
    results = {}
    try:
        for name, proc in procs.items():
            _, err = proc.communicate(timeout=120)
            results[name] = (proc.returncode, err)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    for name in in_process:
        results[name] = (dolphin(["profile", str(tmp_path / name)]), capsys.readouterr().err)
    for name, (code, err) in results.items():
        assert code == 2, (name, err)
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1, (name, err)
        assert err.startswith("dolphin profile: ") and all(w in err for w in cases[name]), (name, err)
