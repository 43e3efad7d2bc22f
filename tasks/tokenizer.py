"""Dolphin's deterministic word tokenizer, shared by the scenario dataset and the sim engine.

One token = one whitespace-separated word. Without a model's own tokenizer this is the only way to make a
prompt of exactly N tokens that the engine also counts as N. Words come from a fixed 512-word vocabulary
so prompts are plain ASCII and cheap to build.
"""
from __future__ import annotations

import numpy as np

VOCAB: tuple[str, ...] = tuple(
    f"{c}{v}{k}" for c in "bdfgklmnprstvz" for v in "aeiou" for k in ("", "n", "r", "s", "l", "m", "x", "t")
)[:512]


def count_tokens(text: str) -> int:
    return len(text.split())


def make_text(num_tokens: int, rng: np.random.Generator) -> str:
    """A string that `count_tokens` counts as exactly `num_tokens`."""
    if num_tokens <= 0:
        return ""
    idx = rng.integers(0, len(VOCAB), size=num_tokens)
    return " ".join(VOCAB[i] for i in idx)


def token_text(index: int) -> str:
    """The text of the `index`-th generated token, with its leading space (as streamed)."""
    return " " + VOCAB[index % len(VOCAB)]
