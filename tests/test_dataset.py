"""The scenario dataset: exact token counts (word and model tokenizers), joint lengths, reproducibility,
shared prefix, a trace's hash-id prefix structure, clipping."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import pytest
from tokenizers import Tokenizer

from tasks.contracts import LengthStats, WorkloadProfile
from tasks.dataset import BLOCK_TOKENS, build_dataset, build_dataset_from_trace, token_prefix_reuse
from tasks.profile_stats import prefix_reuse_ratio
from tasks.trace import MOONCAKE_BLOCK_TOKENS, read_trace
from tasks.tokenizer import WORD_TOKENIZER, PromptTokenizer, count_tokens, load_tokenizer
from tests.test_tokenizer import train_bpe

PAIRS = [(300, 5), (40, 900), (1200, 17), (7, 1)]
Encode = Callable[[list[str]], list[list[int]]]


def profile_with(pairs: list[tuple[int, int]], shared_prefix_len: int = 0) -> WorkloadProfile:
    stats = LengthStats(mean=1.0, p50=1.0, p90=1.0, p99=1.0, max=1.0)  # unused by the dataset
    return WorkloadProfile(source="test", requests=len(pairs), duration_s=1.0, mean_qps=1.0, peak_qps_1s=1.0,
                           peak_qps_60s=1.0, interarrival_cv=0.0, gamma_shape=None, input_tokens=stats,
                           output_tokens=stats, shared_prefix_len=shared_prefix_len, length_pairs=pairs)


@pytest.fixture(scope="module")
def bpe_path(tmp_path_factory) -> Path:
    return train_bpe(tmp_path_factory.mktemp("tok") / "tokenizer.json")  # byte-level BPE, "<s> $A"


@pytest.fixture(scope="module", params=["words", "bpe"])
def tok(request, bpe_path) -> tuple[PromptTokenizer, Encode]:
    """A prompt tokenizer, and the server's encoding (special tokens included) to judge it by: for the model
    tokenizer that is the raw `tokenizers` object, not our class."""
    if request.param == "words":
        return WORD_TOKENIZER, WORD_TOKENIZER.encode_batch
    raw = Tokenizer.from_file(str(bpe_path))
    return load_tokenizer(bpe_path), lambda texts: [e.ids for e in raw.encode_batch(texts, add_special_tokens=True)]


# ---------------------------------------------------------------- lengths
def test_token_counts_are_exact_and_pairs_joint(tok):
    tokenizer, encode = tok
    # Perfectly correlated lengths: any mix of one pair's input with another's output would show.
    pairs = [(100 * k + 3, k) for k in range(1, 21)]
    reqs = build_dataset(profile_with(pairs), n=200, seed=3, tokenizer=tokenizer)
    assert len(reqs) == 200
    assert all(r.prompt_tokens == 100 * r.max_tokens + 3 for r in reqs)
    assert len({r.max_tokens for r in reqs}) > 15  # drawn with replacement across the pairs
    assert [len(ids) for ids in encode([r.prompt for r in reqs])] == [r.prompt_tokens for r in reqs]


def test_bos_is_counted_in_prompt_tokens(bpe_path):
    raw = Tokenizer.from_file(str(bpe_path))
    reqs = build_dataset(profile_with(PAIRS), n=40, seed=0, tokenizer=load_tokenizer(bpe_path))
    for r in reqs:
        assert len(raw.encode(r.prompt, add_special_tokens=False).ids) == r.prompt_tokens - 1
        assert raw.encode(r.prompt).ids[0] == raw.token_to_id("<s>")
    # A 1-token input cannot be BOS alone: it becomes BOS + 1 token.
    assert {r.prompt_tokens for r in build_dataset(profile_with([(1, 4)]), 3, 0, tokenizer=load_tokenizer(bpe_path))} == {2}


def test_same_seed_same_dataset(tok):
    tokenizer, _ = tok
    prof = profile_with(PAIRS, shared_prefix_len=20)
    first = build_dataset(prof, 50, seed=7, tokenizer=tokenizer)
    assert first == build_dataset(prof, 50, seed=7, tokenizer=tokenizer)
    assert first != build_dataset(prof, 50, seed=8, tokenizer=tokenizer)


def test_shared_prefix_is_identical_in_tokens(tok):
    tokenizer, encode = tok
    prof = profile_with([(4900, 10)], shared_prefix_len=4500)  # the long-context RAG case
    reqs = build_dataset(prof, n=12, seed=0, tokenizer=tokenizer)
    ids = np.array(encode([r.prompt for r in reqs]))  # all 4900 long, or this raises
    assert ids.shape == (12, 4900) and all(r.prompt_tokens == 4900 and r.max_tokens == 10 for r in reqs)
    assert (ids[:, :4500] == ids[0, :4500]).all()
    assert len({row[4500:].tobytes() for row in ids}) == 12  # the rest is each prompt's own


def test_shared_prefix_longer_than_a_prompt():
    # An explicit prefix length overrides the profile's; a prompt shorter than it is the prefix's start.
    short = build_dataset(profile_with([(10, 3), (50, 3)]), n=30, seed=1, shared_prefix_len=30)
    full = next(r.prompt for r in short if r.prompt_tokens == 50).split()[:30]
    for r in short:
        assert r.prompt.split()[: min(30, r.prompt_tokens)] == full[: r.prompt_tokens]


def test_clipping_to_max_model_len(tok):
    tokenizer, encode = tok
    reqs = build_dataset(profile_with(PAIRS), n=200, seed=0, max_model_len=1000, tokenizer=tokenizer)
    for r, ids in zip(reqs, encode([r.prompt for r in reqs])):
        assert r.prompt_tokens + r.max_tokens <= 1000
        assert r.prompt_tokens > tokenizer.special_tokens and r.max_tokens >= 1
        assert len(ids) == r.prompt_tokens
    got = {(r.prompt_tokens, r.max_tokens) for r in reqs}
    assert (300, 5) in got  # fits: untouched
    assert (1200, 17) not in got and (983, 17) in got  # input shrinks first, output kept
    assert (40, 900) in got
    tight = build_dataset(profile_with([(5, 2000)]), n=3, seed=0, max_model_len=100, tokenizer=tokenizer)
    floor = tokenizer.special_tokens + 1
    assert {(r.prompt_tokens, r.max_tokens) for r in tight} == {(floor, 100 - floor)}  # then the output
    with pytest.raises(ValueError):
        build_dataset(profile_with(PAIRS), n=3, seed=0, max_model_len=floor, tokenizer=tokenizer)


# ---------------------------------------------------------------- trace prefix structure
def small_trace() -> pd.DataFrame:
    """A read_trace frame: A, B share blocks 0-1; C shares block 0; D, E share nothing (E has no ids)."""
    return pd.DataFrame({
        "arrival_s": [0.0, 1.0, 2.0, 3.0, 4.0],
        "input_tokens": [1300, 1400, 700, 100, 600],
        "output_tokens": [5, 6, 7, 8, 9],
        "hash_ids": [[0, 1, 2], [0, 1, 3], [0, 4], [5], None],
    })


def test_shared_hash_ids_share_exactly_their_blocks(tok):
    tokenizer, encode = tok
    reqs = build_dataset_from_trace(small_trace(), n=5, seed=4, tokenizer=tokenizer)
    assert [(r.prompt_tokens, r.max_tokens) for r in reqs] == [(1300, 5), (1400, 6), (700, 7), (100, 8), (600, 9)]
    a, b, c, d, e = (np.array(ids) for ids in encode([r.prompt for r in reqs]))
    assert [len(x) for x in (a, b, c, d, e)] == [1300, 1400, 700, 100, 600]

    def common(x: np.ndarray, y: np.ndarray) -> int:
        """Length of the common prefix, ignoring single chance matches (a random token repeats 1 in ~1k)."""
        n = min(len(x), len(y))
        return int(np.argmax(np.r_[x[:n] != y[:n], True]))

    s = tokenizer.special_tokens
    assert common(a, b) == 2 * BLOCK_TOKENS and (a[1024:1100] != b[1024:1100]).mean() > 0.9
    assert common(a, c) == common(b, c) == BLOCK_TOKENS and (a[512:600] != c[512:600]).mean() > 0.9
    for x, y in ((a, d), (a, e), (d, e)):
        assert (x[s:100] != y[s:100]).mean() > 0.9  # beyond the BOS they all share, nothing in common
    assert BLOCK_TOKENS == MOONCAKE_BLOCK_TOKENS


def mooncake_trace(path: Path, n: int = 80, seed: int = 0) -> Path:
    """A Mooncake-style JSONL trace with prefix-chained hash ids: each request extends a random cut of an
    earlier chain of full 512-token blocks with fresh blocks and a fresh partial last block; some repeat
    an earlier request outright."""
    rng = np.random.default_rng(seed)
    chains: list[list[int]] = [[]]
    rows: list[dict] = []
    fresh = iter(range(10**6))
    for i in range(n):
        if rows and rng.random() < 0.15:
            row = dict(rows[rng.integers(len(rows))])
        else:
            base = chains[rng.integers(len(chains))]
            full = base[: rng.integers(len(base) + 1)] + [next(fresh) for _ in range(rng.integers(0, 3))]
            chains.append(full)
            tail = int(rng.integers(2, BLOCK_TOKENS)) if rng.random() < 0.8 or not full else 0
            row = {"input_length": BLOCK_TOKENS * len(full) + tail, "output_length": int(rng.integers(1, 50)),
                   "hash_ids": full + ([next(fresh)] if tail else [])}
        rows.append({**row, "timestamp": 250 * i})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_prefix_reuse_of_the_tokens_matches_the_trace(tok, tmp_path):
    tokenizer, encode = tok
    df = read_trace(mooncake_trace(tmp_path / "trace.jsonl"), "mooncake")
    expected = prefix_reuse_ratio(df["hash_ids"], df["input_tokens"].to_numpy())
    assert expected > 0.3  # the trace has real sharing to reproduce
    reqs = build_dataset_from_trace(df, n=len(df), seed=0, tokenizer=tokenizer)
    assert [r.prompt_tokens for r in reqs] == df["input_tokens"].tolist()
    assert token_prefix_reuse(encode([r.prompt for r in reqs])) == pytest.approx(expected, abs=1e-9)
    # A random sample keeps less of the neighbours' sharing but stays a valid, exact dataset.
    sample = build_dataset_from_trace(df, n=30, seed=0, mode="sample", tokenizer=tokenizer)
    assert [len(ids) for ids in encode([r.prompt for r in sample])] == [r.prompt_tokens for r in sample]


def test_trace_clipping_keeps_the_block_prefix(tok):
    tokenizer, encode = tok
    df = small_trace()
    full = encode([r.prompt for r in build_dataset_from_trace(df, 5, seed=1, tokenizer=tokenizer)])
    clipped = build_dataset_from_trace(df, 5, seed=1, tokenizer=tokenizer, max_model_len=800)
    assert [(r.prompt_tokens, r.max_tokens) for r in clipped] == [(795, 5), (794, 6), (700, 7), (100, 8), (600, 9)]
    for ids, whole in list(zip(encode([r.prompt for r in clipped]), full))[:4]:  # rows with ids cover their input
        assert ids == whole[: len(ids)]


def test_trace_windows_samples_and_seeds():
    df = pd.DataFrame({"arrival_s": np.arange(100.0), "input_tokens": 10 * np.arange(1, 101),
                       "output_tokens": np.full(100, 3)})
    starts = set()
    for seed in range(5):
        window = [r.prompt_tokens for r in build_dataset_from_trace(df, 8, seed=seed)]
        assert np.all(np.diff(window) == 10)  # consecutive rows, in arrival order
        starts.add(window[0])
        sample = [r.prompt_tokens for r in build_dataset_from_trace(df, 8, seed=seed, mode="sample")]
        assert np.all(np.diff(sample) > 0) and len(sample) == 8
    assert len(starts) > 1
    assert len(build_dataset_from_trace(df, 500, seed=0)) == 100  # a short trace gives all its rows
    with_ids = small_trace()
    assert build_dataset_from_trace(with_ids, 5, seed=2) == build_dataset_from_trace(with_ids, 5, seed=2)
    assert build_dataset_from_trace(with_ids, 5, seed=2) != build_dataset_from_trace(with_ids, 5, seed=3)
    with pytest.raises(ValueError, match="shared prefix"):
        build_dataset_from_trace(with_ids, 5, seed=0, shared_prefix_len=100)


# ---------------------------------------------------------------- speed
def test_ten_thousand_long_word_prompts_quickly():
    start = time.perf_counter()
    reqs = build_dataset(profile_with([(2048, 128)]), n=10_000, seed=0)
    assert time.perf_counter() - start < 15
    assert count_tokens(reqs[-1].prompt) == 2048


def test_long_model_tokenizer_prompts_quickly(bpe_path):
    tokenizer = load_tokenizer(bpe_path)
    start = time.perf_counter()
    reqs = build_dataset(profile_with([(2000, 128)]), n=500, seed=0, tokenizer=tokenizer)  # re-encodes all
    assert time.perf_counter() - start < 10  # ~1 s alone on 2 cores; room for a busy machine
    assert reqs[-1].prompt_tokens == 2000 == tokenizer.count(reqs[-1].prompt)


def test_scenario_requests_keep_a_traces_prefix_structure(tmp_path):
    from tasks.config import WorkloadConfig
    from tasks.dataset import scenario_requests
    from tasks.profile_stats import profile_trace

    path = mooncake_trace(tmp_path / "trace.jsonl")
    workload = WorkloadConfig(name="mc", trace=str(path), format="mooncake", output_len=7)
    profile = profile_trace(read_trace(path), str(path))
    requests = scenario_requests(profile, workload, n=40, seed=1, max_model_len=None)
    assert all(r.max_tokens == 7 for r in requests)  # the workload's override applies to trace rows
    ids = [WORD_TOKENIZER.encode_batch([r.prompt])[0] for r in requests]
    assert token_prefix_reuse(ids) > 0  # blocks the trace shares are shared in the prompts
    # Without hash ids (a synthetic workload), lengths come from the profile's pairs.
    synthetic = WorkloadConfig(name="s", trace=None, input_len=30, output_len=5, shared_prefix_len=10)
    plain = scenario_requests(profile_with([(30, 5)], shared_prefix_len=10), synthetic, n=5, seed=1,
                              max_model_len=None)
    assert {(r.prompt_tokens, r.max_tokens) for r in plain} == {(30, 5)}
    assert len({r.prompt.split()[:10].__str__() for r in plain}) == 1
