"""`dolphin kv` against vLLM's own KV-capacity numbers.

Ground truth: startup logs of real vLLM 0.32 (CPU build) serving the tiny Llama of
engines/build_tiny_llama.py, recorded in tests/data/vllm_kv_logs/ (serving parameters in `# key: value`
headers, the model's config.json beside them). Every real vLLM run of the pipeline repeats this check live:
the launch fails unless the capacity vLLM logs equals the plan's (tests/test_real_engine.py).
"""
from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import DOLPHIN

pytestmark = pytest.mark.integration

LOG_DIR = Path(__file__).parent / "data" / "vllm_kv_logs"
RECORDED_CONFIG = LOG_DIR / "tiny-llama.config.json"  # the model the logs were recorded with
# "CPU KV cache size: ..." on the CPU build, "GPU KV cache size: ..." on CUDA.
KV_LINE = re.compile(
    r"KV cache size: ([\d,]+) tokens, Maximum concurrency for ([\d,]+) tokens per request: ([\d.]+)x"
)


@dataclass(frozen=True)
class VllmKv:
    kv_gib: int
    block_size: int
    max_model_len: int
    kv_dtype: str
    tokens: int
    concurrency: str  # as logged, "%.2f"


def parse_kv_line(text: str) -> tuple[int, int, str]:
    """(tokens, max_model_len, concurrency as logged) from a vLLM startup log."""
    found = KV_LINE.findall(text)
    assert len(found) == 1, f"expected one KV capacity line, found {len(found)}"
    tokens, max_len, conc = found[0]
    return int(tokens.replace(",", "")), int(max_len.replace(",", "")), conc


def load_recorded(path: Path) -> VllmKv:
    text = path.read_text()
    head = dict(re.findall(r"^# (kv_gib|block_size|max_model_len|kv_dtype): (\S+)", text, re.M))
    tokens, max_len, conc = parse_kv_line(text)
    assert max_len == int(head["max_model_len"]), "header disagrees with the logged max_model_len"
    return VllmKv(int(head["kv_gib"]), int(head["block_size"]), max_len, head["kv_dtype"], tokens, conc)


def dolphin_kv(model_dir: Path, kv: VllmKv) -> dict:
    cmd = [DOLPHIN, "kv", "--model", str(model_dir), "--kv-gib", str(kv.kv_gib), "--block-size",
           str(kv.block_size), "--max-model-len", str(kv.max_model_len), "--kv-dtype", kv.kv_dtype, "--json"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, f"{' '.join(cmd)}\n{out.stdout}\n{out.stderr}"
    return json.loads(out.stdout)


def assert_matches_vllm(got: dict, kv: VllmKv) -> None:
    assert got["kv_capacity_tokens"] == kv.tokens
    assert f"{got['max_concurrency']:.2f}" == kv.concurrency  # vLLM logs "%.2fx"
    # One full-attention group: vLLM logs int(num_blocks / cdiv(L, block) * L), so the blocks must agree too.
    blocks_per_request = math.ceil(kv.max_model_len / kv.block_size)
    assert int(got["num_blocks"] / blocks_per_request * kv.max_model_len) == kv.tokens
    assert got["kv_bytes_per_token"] > 0


RECORDED = sorted(LOG_DIR.glob("*.log"))


def test_recorded_logs_present():
    # Guards against the parametrized test silently collecting nothing.
    assert len(RECORDED) >= 3


@pytest.mark.parametrize("log", RECORDED, ids=[p.stem for p in RECORDED])
def test_kv_matches_recorded_vllm_log(log: Path, tmp_path: Path):
    model_dir = tmp_path / "tiny-llama"
    model_dir.mkdir()
    shutil.copy(RECORDED_CONFIG, model_dir / "config.json")
    kv = load_recorded(log)
    assert_matches_vllm(dolphin_kv(model_dir, kv), kv)
