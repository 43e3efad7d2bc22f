"""The scenario dataset: benchmark requests whose lengths follow the workload profile.

Prompts are made of `tasks.tokenizer` words, so a prompt of N tokens is counted as N by the sim engine
and by `count_tokens`. Words are drawn uniformly from the vocabulary, as `tokenizer.make_text` does, but
from an index array joined in one call rather than word by word (10k prompts of 2k tokens in ~1 s).
"""
from __future__ import annotations

import numpy as np

from tasks.contracts import BenchRequest, WorkloadProfile
from tasks.tokenizer import VOCAB

_WORDS = np.array(VOCAB, dtype=object)


def _text(rng: np.random.Generator, num_tokens: int) -> str:
    if num_tokens <= 0:
        return ""
    return " ".join(_WORDS[rng.integers(0, len(_WORDS), size=num_tokens)])


def clip_lengths(inputs: np.ndarray, outputs: np.ndarray, max_model_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Fit input + output into `max_model_len`: shrink the input first (to >= 1 token), then the output."""
    if max_model_len < 2:
        raise ValueError(f"max_model_len={max_model_len} leaves no room for 1 input and 1 output token")
    inputs = np.minimum(inputs, np.maximum(max_model_len - outputs, 1))
    return inputs, np.minimum(outputs, max_model_len - inputs)


def build_dataset(profile: WorkloadProfile, n: int, seed: int, max_model_len: int | None = None,
                  shared_prefix_len: int | None = None) -> list[BenchRequest]:
    """`n` requests whose (input, output) lengths are drawn jointly, with replacement, from
    `profile.length_pairs`. The same seed gives the same list.

    - Lengths below 1 are raised to 1 (an engine rejects empty prompts and max_tokens=0).
    - Every prompt starts with the same `shared_prefix_len` tokens (default `profile.shared_prefix_len`),
      counted in its input length; a prompt shorter than the prefix is the prefix's first tokens.
      The rest is random, so no two prompts share more than the prefix.
    - With `max_model_len`, input + output is clipped to fit it: the input shrinks first (to no less
      than 1 token), then the output, so a request the engine would refuse becomes one it accepts.
    """
    if n < 1:
        raise ValueError(f"n={n}: a dataset needs at least one request")
    if not profile.length_pairs:
        raise ValueError(f"profile of {profile.source} has no length_pairs to sample from")
    prefix_len = profile.shared_prefix_len if shared_prefix_len is None else shared_prefix_len
    if prefix_len < 0:
        raise ValueError(f"shared_prefix_len={prefix_len} must be >= 0")

    rng = np.random.default_rng(seed)
    pairs = np.asarray(profile.length_pairs, dtype=np.int64)
    inputs, outputs = np.maximum(pairs[rng.integers(0, len(pairs), size=n)].T, 1)
    if max_model_len is not None:
        inputs, outputs = clip_lengths(inputs, outputs, max_model_len)

    prefix_words = _WORDS[rng.integers(0, len(_WORDS), size=prefix_len)]
    prefix = " ".join(prefix_words)
    requests = []
    for num_in, num_out in zip(inputs.tolist(), outputs.tolist()):
        if num_in <= prefix_len:
            prompt = prefix if num_in == prefix_len else " ".join(prefix_words[:num_in])
        else:
            prompt = " ".join(filter(None, (prefix, _text(rng, num_in - prefix_len))))
        requests.append(BenchRequest(prompt=prompt, prompt_tokens=num_in, max_tokens=num_out))
    return requests
