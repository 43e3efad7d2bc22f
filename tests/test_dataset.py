"""The scenario dataset: exact token counts, joint lengths, reproducibility, shared prefix, clipping."""
from __future__ import annotations

import time

import pytest

from tasks.contracts import LengthStats, WorkloadProfile
from tasks.dataset import build_dataset
from tasks.profile import synthetic_profile
from tasks.tokenizer import count_tokens

PAIRS = [(300, 5), (40, 900), (1200, 17), (7, 1)]


def profile_with(pairs: list[tuple[int, int]], shared_prefix_len: int = 0) -> WorkloadProfile:
    stats = LengthStats(mean=1.0, p50=1.0, p90=1.0, p99=1.0, max=1.0)  # unused by the dataset
    return WorkloadProfile(source="test", requests=len(pairs), duration_s=1.0, mean_qps=1.0, peak_qps_1s=1.0,
                           peak_qps_60s=1.0, interarrival_cv=0.0, gamma_shape=None, input_tokens=stats,
                           output_tokens=stats, shared_prefix_len=shared_prefix_len, length_pairs=pairs)


def test_token_counts_are_exact_and_pairs_joint():
    reqs = build_dataset(profile_with(PAIRS), n=200, seed=3)
    assert len(reqs) == 200
    for r in reqs:
        assert count_tokens(r.prompt) == r.prompt_tokens
        assert (r.prompt_tokens, r.max_tokens) in PAIRS  # never an input of one pair with another's output
    assert len({(r.prompt_tokens, r.max_tokens) for r in reqs}) == len(PAIRS)  # with replacement, all seen


def test_same_seed_same_dataset():
    prof = profile_with(PAIRS, shared_prefix_len=20)
    assert build_dataset(prof, 50, seed=7) == build_dataset(prof, 50, seed=7)
    assert build_dataset(prof, 50, seed=7) != build_dataset(prof, 50, seed=8)


def test_shared_prefix_starts_every_prompt():
    prof = synthetic_profile(4900, 10, qps=1.0, n=10, shared_prefix_len=4500)
    reqs = build_dataset(prof, n=20, seed=0)
    prefixes = {" ".join(r.prompt.split()[:4500]) for r in reqs}
    assert len(prefixes) == 1
    assert len({" ".join(r.prompt.split()[4500:]) for r in reqs}) == 20  # the rest differs
    assert all(count_tokens(r.prompt) == 4900 and r.max_tokens == 10 for r in reqs)
    # An explicit prefix length overrides the profile's; a prompt shorter than it is the prefix's start.
    short = build_dataset(profile_with([(10, 3), (50, 3)]), n=30, seed=1, shared_prefix_len=30)
    full = next(r.prompt for r in short if r.prompt_tokens == 50).split()[:30]
    for r in short:
        assert r.prompt.split()[: min(30, r.prompt_tokens)] == full[: r.prompt_tokens]


def test_clipping_to_max_model_len():
    reqs = build_dataset(profile_with(PAIRS), n=200, seed=0, max_model_len=1000)
    for r in reqs:
        assert r.prompt_tokens + r.max_tokens <= 1000
        assert r.prompt_tokens >= 1 and r.max_tokens >= 1
        assert count_tokens(r.prompt) == r.prompt_tokens
    got = {(r.prompt_tokens, r.max_tokens) for r in reqs}
    assert (300, 5) in got  # fits: untouched
    assert (1200, 17) not in got and (983, 17) in got  # input shrinks first, output kept
    assert (40, 900) in got
    tight = build_dataset(profile_with([(5, 2000)]), n=3, seed=0, max_model_len=100)
    assert {(r.prompt_tokens, r.max_tokens) for r in tight} == {(1, 99)}  # then the output
    with pytest.raises(ValueError):
        build_dataset(profile_with(PAIRS), n=3, seed=0, max_model_len=1)


def test_ten_thousand_long_prompts_quickly():
    start = time.perf_counter()
    reqs = build_dataset(profile_with([(2048, 128)]), n=10_000, seed=0)
    assert time.perf_counter() - start < 15
    assert count_tokens(reqs[-1].prompt) == 2048
