"""`dolphin deploy` on a real Prefect server (127.0.0.1, its database under tmp): register the scheduled
deployment, start a process worker, trigger a run, and find its measurement in the MLflow store."""
from __future__ import annotations

import json
import subprocess
import time
import uuid

import httpx
import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import BIN, FAST, base_env, engine_processes, run_dolphin, stop_group
from tasks.paths import REPO_ROOT

pytestmark = pytest.mark.integration

# One quick, feasible config on the sim engine. Enough levels that the search reaches a QPS well inside
# the SLO: with 3 the last one held E2EL within 5% of its bound, and a loaded CI host pushed it over.
OVERRIDES = ["gpu=h100", *FAST, "bench.max_levels=5", "bench.requests_per_level=20", "schedule=nightly"]


def test_deploy_on_a_schedule_and_a_triggered_run_lands_in_mlflow(tmp_path, prefect_api):
    pool = f"dolphin-test-{uuid.uuid4().hex[:6]}"
    res = run_dolphin(["deploy", *OVERRIDES, "--work-pool", pool, "--name", "nightly", "--json"], tmp_path,
                      api_url=prefect_api, timeout=180)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    info = json.loads(res.stdout.strip().splitlines()[-1])
    assert info["schedule"] == {"cron": "0 3 * * *", "timezone": "UTC"}  # from conf/schedule/nightly.yaml

    dep = httpx.get(f"{prefect_api}/deployments/{info['deployment_id']}").json()
    assert dep["parameters"] == {"overrides": OVERRIDES, "force": True}
    assert dep["work_pool_name"] == pool
    assert [s["schedule"]["cron"] for s in dep["schedules"]] == ["0 3 * * *"]

    env = base_env(tmp_path) | {"PREFECT_API_URL": prefect_api, "PREFECT_WORKER_QUERY_SECONDS": "1",
                                "PREFECT_RUNNER_POLL_FREQUENCY": "1"}
    log = open(tmp_path / "worker.log", "wb")
    worker = subprocess.Popen([str(BIN / "prefect"), "worker", "start", "--pool", pool, "--type", "process"],
                              env=env, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        flow_run = httpx.post(f"{prefect_api}/deployments/{info['deployment_id']}/create_flow_run",
                              json={}).json()
        deadline = time.monotonic() + 240
        state = None
        while time.monotonic() < deadline:
            assert worker.poll() is None, (tmp_path / "worker.log").read_text()[-3000:]
            state = httpx.get(f"{prefect_api}/flow_runs/{flow_run['id']}").json()["state"]["type"]
            if state in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
                break
            time.sleep(1)
        assert state == "COMPLETED", f"{state}\n" + (tmp_path / "worker.log").read_text()[-4000:]
    finally:
        stop_group(worker)
        log.close()

    client = MlflowClient(f"sqlite:///{tmp_path}/artifacts/mlflow.db")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED" and run.data.tags["gpu"] == "h100"
    assert run.data.metrics["max_sustainable_qps"] > 0 and run.data.tags["simulated"] == "true"
    assert engine_processes(tmp_path) == []


def test_deploy_rejects_bad_input_before_registering(tmp_path, prefect_api):
    bad_cron = run_dolphin(["deploy", "gpu=h100", "--cron", "61 * * *"], tmp_path, api_url=prefect_api,
                           timeout=120)
    assert bad_cron.returncode == 2 and "--cron" in bad_cron.stderr
    bad_gpu = run_dolphin(["deploy", "gpu=b999"], tmp_path, api_url=prefect_api, timeout=120)
    assert bad_gpu.returncode == 2 and "b999" in bad_gpu.stderr
    deployments = httpx.post(f"{prefect_api}/deployments/filter", json={}).json()
    assert not [d for d in deployments if d["name"] == "dolphin-sweep"]
