"""Scale-out: concurrent jobs log to one real `mlflow server` (127.0.0.1, SQLite under tmp) without losing
runs -- parallel processes tracking runs directly, and a Hydra joblib multirun of the pipeline."""
from __future__ import annotations

import multiprocessing
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tasks.config import TrackingConfig
from tasks.track import end_parent_run, start_parent_run, track_run
from tests.conftest import BIN, base_env, free_port, healthy_server, run_dolphin

pytestmark = pytest.mark.integration

N_JOBS = 8


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory) -> str:
    home = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    env = base_env(home) | {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # no job-runner children
    argv = [str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{home}/mlflow.db",
            "--artifacts-destination", str(home / "mlruns"), "--host", "127.0.0.1", "--port", str(port),
            "--workers", "1"]
    url = f"http://127.0.0.1:{port}"
    with healthy_server(argv, env, home / "server.log", f"{url}/health"):
        yield url


def _log_one(args: tuple[str, str, int, str]) -> str:
    uri, parent, i, work = args
    run_dir = Path(work) / f"job{i}"
    run_dir.mkdir(parents=True)
    (run_dir / "summary.json").write_text(f'{{"job": {i}}}')
    tracking = TrackingConfig(uri=uri, experiment="parallel", parent_run_id=parent)
    res = track_run(resolved={"gpu": {"name": "h100"}, "job": i}, tags={"config_hash": f"h{i}"},
                    run_name=f"job{i}", tracking=tracking, run_dir=run_dir,
                    extra_metrics={"max_sustainable_qps": float(i)})
    return res.run_id


def test_parallel_processes_lose_no_run(mlflow_server, tmp_path):
    parent = start_parent_run(TrackingConfig(uri=mlflow_server, experiment="parallel"), "sweep", {"sweep": "x"})
    # fork: the workers start at once (no re-import), so their requests overlap
    with multiprocessing.get_context("fork").Pool(N_JOBS) as pool:
        ids = pool.map(_log_one, [(mlflow_server, parent, i, str(tmp_path)) for i in range(N_JOBS)])
    end_parent_run(mlflow_server, parent)

    client = MlflowClient(mlflow_server)
    exp = client.get_experiment_by_name("parallel")
    children = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parent}'")
    assert {c.info.run_id for c in children} == set(ids) and len(ids) == N_JOBS
    assert sorted(c.data.metrics["max_sustainable_qps"] for c in children) == [float(i) for i in range(N_JOBS)]
    assert all(c.info.status == "FINISHED" for c in children)
    assert all([a.path for a in client.list_artifacts(c.info.run_id)] == ["summary.json"] for c in children)


def test_joblib_multirun_logs_every_job_to_the_server(mlflow_server, tmp_path, prefect_api):
    # Llama-70B in bf16 fits on none of these at TP1: the plan stops each job before launch, so the test
    # exercises the launcher and the tracking, not the engine.
    gpus = ["a10", "l40s", "h100"]
    res = run_dolphin(["run", "-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "model=llama-3.1-70b",
                       "quant=fp16", f"gpu={','.join(gpus)}", f"tracking.uri={mlflow_server}",
                       "tracking.artifact_location=null", "tracking.experiment=joblib-sweep"],
                      tmp_path, api_url=prefect_api, timeout=400)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    client = MlflowClient(mlflow_server)
    exp = client.get_experiment_by_name("joblib-sweep")
    found = client.search_runs([exp.experiment_id])
    parents = [r for r in found if "sweep" in r.data.tags]
    children = [r for r in found if "sweep" not in r.data.tags]
    assert len(parents) == 1 and sorted(c.data.tags["gpu"] for c in children) == sorted(gpus)
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parents[0].info.run_id}
    assert all(c.data.tags["dolphin.infeasible"] == "true" for c in children)
    # Every job answered (infeasible is an answer), though no outcome came back to the main process.
    assert parents[0].info.status == "FINISHED"
    arts = {a.path for a in client.list_artifacts(parents[0].info.run_id, "report")}
    assert "report/rejected.json" in arts and "report/report.html" in arts
