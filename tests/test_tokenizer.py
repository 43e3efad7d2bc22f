"""Prompt tokenizers: the word tokenizer and a model's tokenizer.json, trained here with `tokenizers`."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from tasks.tokenizer import (VOCAB, WORD_TOKENIZER, HFTokenizer, TokenizerError, count_tokens, load_tokenizer,
                             make_text)

LETTERS = list("abcdefghijklmnopqrstuvwxyz")


def _corpus(seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    words = ["".join(rng.choice(LETTERS, size=rng.integers(2, 9))) for _ in range(3000)]
    return [" ".join(rng.choice(words, size=50)) + ", 123. Hello!" for _ in range(1500)]


def train_bpe(path: Path, style: str = "bytelevel", template: str = "<s> $A", vocab_size: int = 3000) -> Path:
    """A small BPE tokenizer.json: `bytelevel` (Llama-3/Qwen/GPT style) or `sentencepiece` (Llama-2's legacy
    form: a normalizer prepends "▁" and replaces spaces, no pre-tokenizer). `template` is the post-processor
    that adds special tokens, as the server's encode(add_special_tokens=True) does."""
    tok = Tokenizer(models.BPE())
    if style == "bytelevel":
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    else:
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
        alphabet = []
    tok.train_from_iterator(_corpus(), trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<s>", "</s>"],
                                                           initial_alphabet=alphabet, show_progress=False))
    if style == "sentencepiece":  # trained with Metaspace so merges stay within words; encode like Llama-2
        tok.pre_tokenizer = None
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    if template:
        tok.post_processor = processors.TemplateProcessing(single=template, special_tokens=[("<s>", 0), ("</s>", 1)])
    path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(path))
    return path


@pytest.fixture(scope="module")
def bpe_path(tmp_path_factory) -> Path:
    return train_bpe(tmp_path_factory.mktemp("tok") / "model" / "tokenizer.json")


def test_word_tokenizer_is_the_sim_engines():
    rng = np.random.default_rng(0)
    pieces = rng.integers(0, WORD_TOKENIZER.num_pieces, size=300)
    text = WORD_TOKENIZER.render(pieces)
    assert count_tokens(text) == 300 and WORD_TOKENIZER.count(text) == 300 and WORD_TOKENIZER.special_tokens == 0
    assert WORD_TOKENIZER.encode_batch([text])[0] == pieces.tolist()
    assert text == " ".join(VOCAB[i] for i in pieces)  # plain words, as make_text writes them
    assert count_tokens(make_text(17, rng)) == 17
    assert load_tokenizer(None) is WORD_TOKENIZER


def test_hf_pieces_round_trip_with_bos(bpe_path):
    tok = load_tokenizer(bpe_path.parent)  # a model directory holding tokenizer.json
    assert tok is load_tokenizer(bpe_path)  # loaded once per file
    raw = Tokenizer.from_file(str(bpe_path))
    assert tok.head == (0,) and tok.tail == () and tok.special_tokens == 1 and not tok.strip_first
    assert tok.num_pieces >= 200
    rng = np.random.default_rng(1)
    for n in (1, 2, 511, 2000):
        pieces = rng.integers(0, tok.num_pieces, size=n)
        text = tok.render(pieces)
        # The raw tokenizer, not our class, is the judge: n pieces, plus the BOS the server adds.
        assert len(raw.encode(text, add_special_tokens=False).ids) == n
        with_bos = raw.encode(text, add_special_tokens=True).ids
        assert with_bos == tok.token_ids(pieces).tolist() and with_bos[0] == 0
        assert tok.count(text) == n + 1


def test_sentencepiece_style_with_bos_and_eos(tmp_path):
    path = train_bpe(tmp_path / "tokenizer.json", style="sentencepiece", template="<s> $A </s>")
    tok = HFTokenizer(path)
    raw = Tokenizer.from_file(str(path))
    assert tok.strip_first  # the normalizer prepends "▁" itself; a leading space would become an extra token
    assert tok.head == (0,) and tok.tail == (1,) and tok.special_tokens == 2
    pieces = np.random.default_rng(2).integers(0, tok.num_pieces, size=700)
    text = tok.render(pieces)
    assert not text.startswith(" ")
    assert raw.encode(text, add_special_tokens=True).ids == tok.token_ids(pieces).tolist()
    assert len(raw.encode(text, add_special_tokens=False).ids) == 700


def test_unusable_tokenizers_fail_with_a_reason(tmp_path):
    # Digits only: no space-word tokens to build prompts from.
    tok = Tokenizer(models.WordLevel({str(i): i for i in range(10)} | {"[UNK]": 10}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(TokenizerError, match="space-word"):
        load_tokenizer(tmp_path)
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        load_tokenizer(tmp_path / "nowhere")
