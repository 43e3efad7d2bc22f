"""The whole pipeline as a user runs it: the `dolphin` CLI in a subprocess, a real sim engine process, a real
Prefect server, a real MLflow store. Then the store is read back."""
from __future__ import annotations

import json
import re
import signal
import subprocess
import time
from pathlib import Path

import httpx
import psutil
import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import DOLPHIN, FAST, base_env, ctrl_c_reaches_it, engine_processes, free_port, run_dolphin
from tasks.paths import REPO_ROOT

pytestmark = pytest.mark.integration

STAGES = {"profile", "kv-lower-bound", "quantization", "launch", "slo-benchmark", "track"}


def mlflow_client(home: Path) -> MlflowClient:
    return MlflowClient(tracking_uri=f"sqlite:///{home}/artifacts/mlflow.db")


def all_runs(home: Path) -> list:
    client = mlflow_client(home)
    exps = client.search_experiments()
    return client.search_runs([e.experiment_id for e in exps]) if exps else []


def artifact_files(client: MlflowClient, run_id: str, path: str = "") -> set[str]:
    files = set()
    for info in client.list_artifacts(run_id, path or None):
        files |= artifact_files(client, run_id, info.path) if info.is_dir else {info.path}
    return files


def test_default_run_lands_in_mlflow_and_prefect(tmp_path, prefect_api):
    res = run_dolphin(["run", *FAST], tmp_path, api_url=prefect_api)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    assert "SIMULATED" in res.stdout and "max QPS" in res.stdout

    runs = all_runs(tmp_path)
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.tags["simulated"] == "true"
    assert {run.data.tags[k] for k in ("gpu", "deploy", "quant", "engine")} == {"h100", "agg", "fp16", "sim"}
    m = run.data.metrics
    assert m["max_sustainable_qps"] > 0
    for name in ("ttft_ms_p99", "tpot_ms_p99", "itl_ms_p99", "e2el_ms_p99", "goodput_rps",
                 "output_tok_per_s", "kv_capacity_tokens", "kv_lower_bound_gib", "weights_gib",
                 "cost_per_mtok_usd"):
        assert name in m, name
    assert m["e2el_ms_p99"] <= 2000  # the reported level holds the default SLO
    assert 14 < m["weights_gib"] < 16  # Llama-3.1-8B in bf16

    client = mlflow_client(tmp_path)
    history = client.get_metric_history(run.info.run_id, "level_target_qps")
    assert len(history) >= 2 and [h.step for h in history] == list(range(len(history)))
    files = artifact_files(client, run.info.run_id)
    assert any(f.endswith("requests.jsonl") for f in files)
    assert any(f.endswith(".png") for f in files)
    assert any(f.endswith("config.yaml") for f in files)
    assert any(f.endswith("sim_engine.log") for f in files) and any(f.endswith("commands.txt") for f in files)

    # The flow run and one task run per stage, completed, on the Prefect server we pointed at.
    # (The server is shared by the session's tests, so find ours by the id the run was tagged with.)
    flow_runs = httpx.post(f"{prefect_api}/flow_runs/filter",
                           json={"flow_runs": {"id": {"any_": [run.data.tags["prefect_flow_run_id"]]}}}).json()
    assert [fr["state_type"] for fr in flow_runs] == ["COMPLETED"]
    task_runs = httpx.post(f"{prefect_api}/task_runs/filter",
                           json={"flow_runs": {"id": {"any_": [flow_runs[0]["id"]]}}}).json()
    assert {tr["name"].rsplit("-", 1)[0] for tr in task_runs} == STAGES
    assert all(tr["state_type"] == "COMPLETED" for tr in task_runs)
    assert engine_processes(tmp_path) == []


def test_multirun_is_a_parent_with_children(tmp_path, prefect_api):
    # The A10 cannot hold the KV the default SLO needs next to bf16 weights: two infeasible children,
    # recorded as such, while the sweep itself succeeds.
    res = run_dolphin(["run", "-m", "gpu=a10,h100", "deploy=agg,pd", *FAST],
                      tmp_path, api_url=prefect_api, timeout=600)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    runs = all_runs(tmp_path)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and len(children) == 4
    assert parents[0].info.status == "FINISHED"
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parents[0].info.run_id}
    assert {(c.data.tags["gpu"], c.data.tags["deploy"]) for c in children} == {
        ("a10", "agg"), ("a10", "pd"), ("h100", "agg"), ("h100", "pd")}
    assert len({c.data.tags["config_hash"] for c in children}) == 4
    by_gpu = {(c.data.tags["gpu"], c.data.tags["deploy"]): c for c in children}
    for deploy in ("agg", "pd"):
        assert by_gpu[("h100", deploy)].info.status == "FINISHED"
        assert by_gpu[("h100", deploy)].data.metrics["max_sustainable_qps"] > 0
        a10 = by_gpu[("a10", deploy)]
        assert a10.info.status == "FAILED" and "InfeasiblePlan" in a10.data.tags["dolphin.status_reason"]
    assert "Dolphin sweep: 4 configs" in res.stdout
    assert engine_processes(tmp_path) == []


def test_slo_never_met_is_a_finished_run_with_zero_qps(tmp_path, prefect_api):
    res = run_dolphin(["run", *FAST, "+slo.targets.ttft_ms_p90=5"], tmp_path, api_url=prefect_api)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    assert "SLO never met" in res.stdout
    (run,) = all_runs(tmp_path)
    assert run.info.status == "FINISHED" and run.data.metrics["max_sustainable_qps"] == 0
    history = mlflow_client(tmp_path).get_metric_history(run.info.run_id, "level_slo_met")
    assert history and all(h.value == 0 for h in history)


def test_infeasible_plan_stops_before_launch(tmp_path):
    # Also the ephemeral-Prefect path (no PREFECT_API_URL), as `make run` uses it.
    res = run_dolphin(["run", "model=llama-3.1-70b", "gpu=a10", "quant=fp16"], tmp_path)
    assert res.returncode == 1
    out = res.stdout + res.stderr
    assert "InfeasiblePlan" in out and "GiB" in out
    runs = all_runs(tmp_path)
    assert len(runs) == 1 and runs[0].info.status == "FAILED"
    reason = runs[0].data.tags["dolphin.status_reason"]
    assert re.search(r"short by \d+\.\d GiB per GPU", reason), reason
    assert not list((tmp_path / "artifacts" / "runs").glob("*/engine"))  # nothing was launched


def test_unknown_gpu_lists_choices(tmp_path):
    res = run_dolphin(["run", "gpu=b999"], tmp_path, timeout=120)
    assert res.returncode != 0
    err = res.stdout + res.stderr
    assert "b999" in err and "h100" in err and "a10" in err
    assert not (tmp_path / "artifacts" / "mlflow.db").exists()


def test_trace_missing_column_names_it(tmp_path, prefect_api):
    bad = tmp_path / "bad.csv"
    bad.write_text("TIMESTAMP,ContextTokens\n2023-11-16 18:17:03.9799600,100\n")
    res = run_dolphin(["run", "workload.format=azure", f"workload.trace={bad}"], tmp_path, api_url=prefect_api)
    assert res.returncode == 1
    assert "GeneratedTokens" in res.stdout + res.stderr


def test_engine_death_fails_the_run_keeps_data_and_leaves_nothing(tmp_path, prefect_api):
    res = run_dolphin(["run", *FAST, "engine.crash_after_requests=90"], tmp_path, api_url=prefect_api)
    assert res.returncode == 1
    runs = all_runs(tmp_path)
    assert len(runs) == 1 and runs[0].info.status == "FAILED"
    assert "exited" in runs[0].data.tags["dolphin.status_reason"]
    records = list((tmp_path / "artifacts" / "runs").glob("*/requests.jsonl"))
    assert records and records[0].read_text().count("\n") >= 50  # the levels measured before the crash
    levels = (records[0].parent / "levels.jsonl").read_text().splitlines()
    assert levels and all(json.loads(line)["num_requests"] > 0 for line in levels)
    files = artifact_files(mlflow_client(tmp_path), runs[0].info.run_id)
    assert {"levels.jsonl", "requests.jsonl"} <= {f.rsplit("/", 1)[-1] for f in files}
    assert engine_processes(tmp_path) == []


def test_ui_serves_the_store_on_loopback_and_stops(tmp_path):
    env = base_env(tmp_path)
    port = free_port()
    proc = subprocess.Popen([DOLPHIN, "ui", "--port", str(port)], env=env, cwd=REPO_ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=ctrl_c_reaches_it)
    try:
        line = ""
        deadline = time.monotonic() + 90
        while "MLflow UI: " not in line:
            assert time.monotonic() < deadline and proc.poll() is None, line
            line = proc.stdout.readline()
        url = line.split("MLflow UI: ")[1].split()[0]
        assert url == f"http://127.0.0.1:{port}"
        assert httpx.get(f"{url}/health", timeout=5).status_code == 200
        server_pids = [p.pid for p in psutil.Process(proc.pid).children(recursive=True)]
        assert server_pids
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    time.sleep(0.5)
    assert not [pid for pid in server_pids if psutil.pid_exists(pid) and
                psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]
