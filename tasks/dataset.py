"""The scenario dataset: benchmark requests whose lengths, shared prefix and prefix-sharing structure follow
the workload.

Token counts are exact for the tokenizer given (`tasks.tokenizer`): the word tokenizer the sim engine
counts with, by default, or a model's own tokenizer. `prompt_tokens` is what the server reports for the
prompt on /v1/completions, special tokens (BOS) included; input lengths and prefix lengths are counted the
same way, in the server's tokens.

Prefix structure, two kinds:
- a fixed shared prefix (`shared_prefix_len`): every prompt starts with the same tokens;
- a trace's Mooncake-style `hash_ids` (`build_dataset_from_trace`): the server's token stream is cut into
  512-token blocks and the block at position j of a request holds the tokens of its j-th hash id, the
  k-th token of block id h being a fixed function of (seed, h, k). Two requests sharing their first ids
  share exactly those blocks' tokens, so an engine's prefix cache sees the trace's reuse. Tokens beyond
  the request's ids are random and its own.
"""
from __future__ import annotations

import hashlib
from typing import Literal, Sequence

import numpy as np
import pandas as pd

from tasks.config import WorkloadConfig
from tasks.contracts import BenchRequest, WorkloadProfile
from tasks.trace import read_trace
from tasks.tokenizer import WORD_TOKENIZER, PromptTokenizer

BLOCK_TOKENS = 512  # Mooncake's hash block (tasks.trace.MOONCAKE_BLOCK_TOKENS)

_M1, _M2, _GOLD = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB), np.uint64(0x9E3779B97F4A7C15)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser (array uint64 arithmetic wraps): a cheap, well-spread hash."""
    x = x + _GOLD
    x = (x ^ (x >> np.uint64(30))) * _M1
    x = (x ^ (x >> np.uint64(27))) * _M2
    return x ^ (x >> np.uint64(31))


def _block_pieces(seed: int, ids: np.ndarray, offsets: np.ndarray, num_pieces: int) -> np.ndarray:
    """Piece of token `offsets` of block `ids`: the same (seed, id, offset) always gives the same piece."""
    key = _mix(ids.astype(np.int64).view(np.uint64) ^ _mix(np.array([seed], dtype=np.int64).view(np.uint64)))
    return (_mix(key + offsets.astype(np.uint64)) % np.uint64(num_pieces)).astype(np.int64)


def clip_lengths(inputs: np.ndarray, outputs: np.ndarray, max_model_len: int,
                 min_input: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Fit input + output into `max_model_len`: shrink the input first (to >= `min_input` tokens), then
    the output."""
    if max_model_len < min_input + 1:
        raise ValueError(f"max_model_len={max_model_len} leaves no room for {min_input} input and 1 output token")
    inputs = np.minimum(inputs, np.maximum(max_model_len - outputs, min_input))
    return inputs, np.minimum(outputs, max_model_len - inputs)


def _hash_array(ids: object) -> np.ndarray:
    """One request's hash ids as int64 (an empty array for a missing value); ids that are not integers
    (e.g. hex strings) are hashed, so equal ids stay equal."""
    if not isinstance(ids, (list, tuple, np.ndarray)):
        if ids is None or pd.isna(ids):  # None, NaN, pd.NA (an Arrow list column's null)
            return np.zeros(0, dtype=np.int64)
        ids = [ids]
    arr = np.asarray(ids).reshape(-1)
    if arr.dtype.kind in "iu" or arr.size == 0:
        return arr.astype(np.int64)
    return np.array([int.from_bytes(hashlib.blake2b(str(x).encode(), digest_size=8).digest(), "little", signed=True)
                     for x in arr.tolist()], dtype=np.int64)


def build_requests(inputs: Sequence[int], outputs: Sequence[int], seed: int, *,
                   hash_ids: Sequence[object] | None = None, shared_prefix_len: int = 0,
                   tokenizer: PromptTokenizer | None = None, max_model_len: int | None = None,
                   block_tokens: int = BLOCK_TOKENS) -> list[BenchRequest]:
    """One request per (input, output) length, in order; lengths in the server's tokens.

    - Inputs are raised to special tokens + 1 (an engine rejects empty prompts), outputs to 1.
    - With `max_model_len`, input + output is clipped to fit it: the input shrinks first, then the output.
    - `shared_prefix_len`: every prompt starts with the same that many tokens (a shorter prompt is the
      prefix's start); the rest is random, so no two prompts share more.
    - `hash_ids`: per request, its block ids (see the module docstring); cannot be combined with a
      shared prefix, which would overwrite the first blocks.
    """
    tok = tokenizer or WORD_TOKENIZER
    inputs = np.maximum(np.asarray(inputs, dtype=np.int64), tok.special_tokens + 1)
    outputs = np.maximum(np.asarray(outputs, dtype=np.int64), 1)
    if inputs.shape != outputs.shape:
        raise ValueError(f"{inputs.size} input lengths but {outputs.size} output lengths")
    if shared_prefix_len < 0:
        raise ValueError(f"shared_prefix_len={shared_prefix_len} must be >= 0")
    if hash_ids is not None:
        if len(hash_ids) != inputs.size:
            raise ValueError(f"{len(hash_ids)} hash id lists for {inputs.size} requests")
        if shared_prefix_len:
            raise ValueError("a shared prefix and a trace's hash_ids both fix the prompt's start; use one")
    if max_model_len is not None:
        inputs, outputs = clip_lengths(inputs, outputs, max_model_len, min_input=tok.special_tokens + 1)

    rng = np.random.default_rng(seed)
    head = len(tok.head)  # special tokens before the text: they count in the prefix and shift the blocks
    prefix = rng.integers(0, tok.num_pieces, size=max(shared_prefix_len - head, 0))
    pieces_per_request = []
    for i, num_in in enumerate(inputs.tolist()):
        n = num_in - tok.special_tokens  # pieces (content tokens) of this prompt
        ids = _hash_array(hash_ids[i]) if hash_ids is not None else None
        if ids is not None and ids.size:
            pos = head + np.arange(n)  # position in the server's token stream
            block = pos // block_tokens
            in_ids = block < ids.size
            pieces = np.empty(n, dtype=np.int64)
            pieces[in_ids] = _block_pieces(seed, ids[block[in_ids]], pos[in_ids] % block_tokens, tok.num_pieces)
            pieces[~in_ids] = rng.integers(0, tok.num_pieces, size=int((~in_ids).sum()))
        else:
            own = rng.integers(0, tok.num_pieces, size=max(n - prefix.size, 0))
            pieces = np.concatenate([prefix[:n], own])
        pieces_per_request.append(pieces)

    prompts = [tok.render(p) for p in pieces_per_request]
    if tok.needs_check:
        _check_counts(tok, prompts, pieces_per_request)
    return [BenchRequest(prompt=p, prompt_tokens=int(i), max_tokens=int(o))
            for p, i, o in zip(prompts, inputs.tolist(), outputs.tolist())]


def _check_counts(tok: PromptTokenizer, prompts: list[str], pieces: list[np.ndarray]) -> None:
    """Re-encode every prompt: the server must see exactly the tokens we counted (one batch call)."""
    for k, got in enumerate(tok.encode_batch(prompts)):
        if not np.array_equal(got, tok.token_ids(pieces[k])):
            raise RuntimeError(f"prompt {k} encodes to {len(got)} tokens with {tok.name}, "
                               f"expected {len(pieces[k]) + tok.special_tokens}")


def build_dataset(profile: WorkloadProfile, n: int, seed: int, max_model_len: int | None = None,
                  shared_prefix_len: int | None = None, *,
                  tokenizer: PromptTokenizer | None = None) -> list[BenchRequest]:
    """`n` requests whose (input, output) lengths are drawn jointly, with replacement, from
    `profile.length_pairs`. The same seed gives the same list.

    Every prompt starts with the same `shared_prefix_len` tokens (default `profile.shared_prefix_len`);
    see `build_requests` for lengths, clipping and special tokens. The profile carries no hash ids: for a
    trace's prefix-sharing structure use `build_dataset_from_trace`.
    """
    if n < 1:
        raise ValueError(f"n={n}: a dataset needs at least one request")
    if not profile.length_pairs:
        raise ValueError(f"profile of {profile.source} has no length_pairs to sample from")
    prefix_len = profile.shared_prefix_len if shared_prefix_len is None else shared_prefix_len
    pairs = np.asarray(profile.length_pairs, dtype=np.int64)
    rows = np.random.default_rng(seed).integers(0, len(pairs), size=n)
    return build_requests(pairs[rows, 0], pairs[rows, 1], seed, shared_prefix_len=prefix_len,
                          tokenizer=tokenizer, max_model_len=max_model_len)


def build_dataset_from_trace(df: pd.DataFrame, n: int, seed: int, *,
                             mode: Literal["window", "sample"] = "window", max_model_len: int | None = None,
                             shared_prefix_len: int = 0,
                             tokenizer: PromptTokenizer | None = None) -> list[BenchRequest]:
    """Requests from rows of a `tasks.trace.read_trace` frame, in arrival order, keeping each row's
    (input, output) and, when the frame has them, its `hash_ids` block structure.

    `mode="window"`: `n` consecutive rows from a seeded start, so neighbours' prefix sharing is kept as in
    the trace; `"sample"`: `n` rows drawn without replacement. A trace of fewer than `n` rows gives all
    its rows. Token counts, clipping and special tokens as in `build_requests`.
    """
    if n < 1:
        raise ValueError(f"n={n}: a dataset needs at least one request")
    if mode not in ("window", "sample"):
        raise ValueError(f"mode={mode!r}: use window or sample")
    rng = np.random.default_rng(seed)
    total = len(df)
    k = min(n, total)
    if mode == "window":
        rows = np.arange(k) + rng.integers(0, total - k + 1)
    else:
        rows = np.sort(rng.choice(total, size=k, replace=False))
    sub = df.iloc[rows]
    hashes = sub["hash_ids"].tolist() if "hash_ids" in sub.columns else None  # Arrow lists -> lists
    return build_requests(sub["input_tokens"].to_numpy(), sub["output_tokens"].to_numpy(), seed,
                          hash_ids=hashes, shared_prefix_len=shared_prefix_len, tokenizer=tokenizer,
                          max_model_len=max_model_len)


def token_prefix_reuse(token_ids: Sequence[Sequence[int]], block: int = BLOCK_TOKENS) -> float:
    """Share of all tokens a prefix cache of `block`-token blocks could reuse from earlier requests
    (in order): a block is reused when an earlier request had the same tokens up to and including it.
    On a dataset from a trace with prefix-chained hash ids (Mooncake) this equals
    `tasks.profile_stats.prefix_reuse_ratio` of the trace's rows, with the server's token ids as input."""
    seen: set[bytes] = set()
    reused = total = 0
    for ids in token_ids:
        arr = np.asarray(ids, dtype=np.int64)
        total += arr.size
        key, keys = b"", []
        for start in range(0, arr.size, block):
            chunk = arr[start:start + block]
            key = hashlib.blake2b(key + chunk.tobytes(), digest_size=16).digest()  # chained: the whole prefix
            reused += chunk.size if key in seen else 0
            keys.append(key)
        seen.update(keys)
    return reused / total if total else 0.0


def scenario_requests(profile: WorkloadProfile, workload: WorkloadConfig, n: int, seed: int,
                      max_model_len: int | None, tokenizer: PromptTokenizer | None = None) -> list[BenchRequest]:
    """The benchmark's requests for a workload: a trace with `hash_ids` keeps its rows and their prefix
    sharing (`build_dataset_from_trace`, with the workload's length overrides); otherwise lengths are
    drawn jointly from the profile, with the workload's fixed shared prefix."""
    if workload.trace is not None:
        df = read_trace(workload.trace, workload.format, workload.columns, workload.max_bad_row_fraction)
        if "hash_ids" in df.columns:
            for col, override in (("input_tokens", workload.input_len), ("output_tokens", workload.output_len)):
                if override is not None:
                    df[col] = override
            return build_dataset_from_trace(df, n, seed, max_model_len=max_model_len, tokenizer=tokenizer)
    return build_dataset(profile, n, seed, max_model_len, workload.shared_prefix_len or None, tokenizer=tokenizer)
