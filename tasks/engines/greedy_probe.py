"""A fixed set of greedy completions sent to a real deployment right after it starts.

It proves the whole path answers (router, prefill, KV transfer, decode) before the benchmark loads it, and
warms the one-time costs (NIXL's first handshake). Its outputs are a fingerprint of the model's numerics:
the same model and dtypes must give the same greedy tokens in every deployment mode, so a PD pair whose KV
transfer garbles the cache, or a speculative setup that changes outputs, shows up as a different
`greedy_outputs_sha256` across runs in MLflow.
"""
from __future__ import annotations

import hashlib
import json

import httpx

_TEXT = ("Prefill and decode disaggregation moves the key value cache of a prompt from the server that "
         "computed it to the server that generates the answer, so each pool can be sized for its own work. ")


def probe_prompts(max_model_len: int, n: int = 3, max_words: int = 200) -> list[str]:
    """`n` distinct prompts of several KV blocks each (a transfer moves whole blocks), sized so prompt +
    answer stay well inside max_model_len with any tokenizer (~1.3 tokens per word here)."""
    words = _TEXT.split()
    length = max(8, min(max_words, max_model_len // 4))
    return [" ".join([f"Case {i}:"] + [words[(i + j) % len(words)] for j in range(length)]) for i in range(n)]


def greedy_probe(base_url: str, model_name: str, max_model_len: int, max_tokens: int = 16,
                 timeout_s: float = 120.0) -> list[str]:
    """The completion text of each probe prompt at temperature 0, exactly `max_tokens` tokens each.
    Raises httpx.HTTPError (or KeyError on a malformed answer)."""
    outputs = []
    with httpx.Client(timeout=timeout_s) as client:
        for prompt in probe_prompts(max_model_len):
            resp = client.post(f"{base_url}/v1/completions", json={
                "model": model_name, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                "ignore_eos": True, "seed": 0})
            resp.raise_for_status()
            outputs.append(resp.json()["choices"][0]["text"])
    return outputs


def outputs_sha256(outputs: list[str]) -> str:
    return hashlib.sha256(json.dumps(outputs).encode()).hexdigest()
