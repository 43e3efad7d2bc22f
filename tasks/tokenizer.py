"""Tokenizers that build prompts of an exact token count: Dolphin's word tokenizer and a model's own.

**Word tokenizer** (`WORD_TOKENIZER`, used by the sim engine): one token = one whitespace-separated word,
no special tokens. Words come from a fixed 512-word vocabulary so prompts are plain ASCII and cheap to build.
Without a model's tokenizer this is the only way to make a prompt of exactly N tokens that the engine also
counts as N.

**A model's tokenizer** (`HFTokenizer`, from a local `tokenizer.json` via the `tokenizers` library).
vLLM's random dataset decodes random token ids, re-encodes and trims until the count is right; that needs
retries and does not compose: two texts joined can merge into different tokens at the seam, so shared
blocks would not stay shared. Instead prompts are made only of *pieces*: vocabulary tokens that are one
space plus ASCII letters (`Ġword` / `▁word`) and encode alone to themselves. Pre-tokenizers split text
before each space-word, so any sequence of pieces renders to a text that encodes back to exactly those
pieces; prompts then have exact counts by construction and blocks concatenate without seams. Loading
checks this on random sequences, and the dataset re-encodes every prompt to verify it.

`prompt_tokens` counts what the server reports as `usage.prompt_tokens` on /v1/completions: the pieces plus
the special tokens `encode(text, add_special_tokens=True)` adds (e.g. Llama's BOS), as vLLM does. A chat
endpoint adds its chat template's tokens on top.
"""
from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path
from typing import Sequence

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


# ---------------------------------------------------------------- prompt tokenizers
class PromptTokenizer:
    """Renders sequences of piece indices (0..num_pieces-1) to text the tokenizer encodes to exactly
    `head + piece_ids[pieces] + tail`, where head/tail are the special tokens the server adds."""

    name: str
    needs_check: bool  # False when exactness holds by construction and re-encoding would only cost time

    def __init__(self, pieces: Sequence[str], piece_ids: Sequence[int], head: Sequence[int] = (),
                 tail: Sequence[int] = (), strip_first: bool = False) -> None:
        self.pieces = np.array(pieces, dtype=object)  # each starts with one space
        self.piece_ids = np.asarray(piece_ids, dtype=np.int64)
        self.head, self.tail = tuple(head), tuple(tail)
        self.strip_first = strip_first  # drop the text's first space (tokenizers that prepend one themselves)

    @property
    def num_pieces(self) -> int:
        return len(self.pieces)

    @property
    def special_tokens(self) -> int:
        """Tokens the server adds to every prompt and counts in prompt_tokens."""
        return len(self.head) + len(self.tail)

    def render(self, pieces: np.ndarray) -> str:
        text = "".join(self.pieces[pieces])
        return text[1:] if self.strip_first else text

    def token_ids(self, pieces: np.ndarray) -> np.ndarray:
        """The ids the server sees for `render(pieces)`, special tokens included."""
        return np.concatenate([np.asarray(self.head, dtype=np.int64), self.piece_ids[pieces],
                               np.asarray(self.tail, dtype=np.int64)])

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text as the server encodes it (special tokens included)."""
        raise NotImplementedError

    def count(self, text: str) -> int:
        return len(self.encode_batch([text])[0])


class WordTokenizer(PromptTokenizer):
    """The sim engine's tokenizer: every VOCAB word is a piece, id = its VOCAB index. Words outside
    VOCAB encode to the id len(VOCAB)."""

    name = "dolphin-words"
    needs_check = False

    def __init__(self) -> None:
        super().__init__([" " + w for w in VOCAB], range(len(VOCAB)), strip_first=True)
        self._index = {w: i for i, w in enumerate(VOCAB)}

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        unknown = len(VOCAB)
        return [[self._index.get(w, unknown) for w in t.split()] for t in texts]

    def count(self, text: str) -> int:
        return count_tokens(text)


WORD_TOKENIZER = WordTokenizer()

_PIECE = re.compile(r"[\u0120\u2581]([A-Za-z]+)")  # byte-level "Ġword" or sentencepiece "▁word"
MAX_PIECES = 8192  # plenty of variety; bounds the load-time check on 100k+ vocabularies
MIN_PIECES = 64


class TokenizerError(ValueError):
    """A tokenizer that cannot make exact prompts; the message says why."""


class HFTokenizer(PromptTokenizer):
    """A model's tokenizer from a local `tokenizer.json` (Hugging Face `tokenizers`, no `transformers`)."""

    needs_check = True

    def __init__(self, path: str | Path) -> None:
        from tokenizers import Tokenizer  # only needed with a model's tokenizer

        self.path = Path(path)
        self.name = str(self.path)
        self._tok = Tokenizer.from_file(str(self.path))
        special = {t.content for t in self._tok.get_added_tokens_decoder().values() if t.special}
        cand = sorted((i, " " + m.group(1)) for t, i in self._tok.get_vocab().items()
                      if t not in special and (m := _PIECE.fullmatch(t)))
        if not cand:
            raise TokenizerError(f"{self.path}: no space-word tokens (Ġword / ▁word) to build prompts from")
        ids = np.array([i for i, _ in cand], dtype=np.int64)
        texts = [t for _, t in cand]
        pick = np.sort(np.random.default_rng(0).permutation(len(cand))[:MAX_PIECES])  # fixed, spread subset
        ids, texts = ids[pick], [texts[k] for k in pick]
        # Tokenizers that prepend a space themselves (sentencepiece) want the text's first space dropped.
        strip = self._alone_ok(texts, ids, strip=True).sum() > self._alone_ok(texts, ids, strip=False).sum()
        ok = self._alone_ok(texts, ids, strip)
        if ok.sum() < MIN_PIECES:
            raise TokenizerError(f"{self.path}: only {int(ok.sum())} space-word tokens encode to themselves; "
                                 f"need {MIN_PIECES} to build prompts")
        probe = self._tok.encode(texts[int(np.argmax(ok))][int(strip):], add_special_tokens=True)
        mask = np.asarray(probe.special_tokens_mask, dtype=bool)
        first, last = int(np.argmin(mask)), len(mask) - int(np.argmin(mask[::-1]))
        super().__init__([t for t, k in zip(texts, ok) if k], ids[ok], head=probe.ids[:first],
                         tail=probe.ids[last:], strip_first=bool(strip))
        self._self_check()

    def _alone_ok(self, texts: list[str], ids: np.ndarray, strip: bool) -> np.ndarray:
        enc = self._tok.encode_batch([t[1:] if strip else t for t in texts], add_special_tokens=False)
        return np.array([e.ids == [i] for e, i in zip(enc, ids.tolist())], dtype=bool)

    def _self_check(self) -> None:
        """Pieces in sequence must encode to themselves (no merges across them); else fail now, not later."""
        rng = np.random.default_rng(0)
        seqs = [rng.integers(0, self.num_pieces, size=512) for _ in range(8)]
        for seq, got in zip(seqs, self.encode_batch([self.render(s) for s in seqs])):
            if not np.array_equal(got, self.token_ids(seq)):
                raise TokenizerError(f"{self.path}: a text of space-word tokens does not encode back to them; "
                                     f"this tokenizer cannot make exact prompts")

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        # encode_batch_fast skips character offsets: ~3x faster, same ids.
        encode = getattr(self._tok, "encode_batch_fast", self._tok.encode_batch)
        return [e.ids for e in encode(list(texts), add_special_tokens=True)]


@lru_cache(maxsize=8)
def _load_hf(path: Path) -> HFTokenizer:
    return HFTokenizer(path)


def load_tokenizer(path: str | Path | None) -> PromptTokenizer:
    """The word tokenizer for None; else the `tokenizer.json` at `path` (the file, or a model directory
    holding it). Loaded once per path."""
    if path is None:
        return WORD_TOKENIZER
    p = Path(path).expanduser()
    if p.is_dir():
        p = p / "tokenizer.json"
    if not p.is_file():
        raise FileNotFoundError(f"no tokenizer at {p}: give a tokenizer.json or a model directory holding one")
    return _load_hf(p.resolve())
