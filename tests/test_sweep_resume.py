"""Resumable, idempotent sweeps: a re-run measures only what has no answer yet, and the sweep's report
(logged to the parent run) covers every config. The `dolphin` CLI in a subprocess, the sim engine, a real
Prefect server and a real MLflow store."""
from __future__ import annotations

import json

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import FAST, engine_processes, run_dolphin

pytestmark = pytest.mark.integration

# a10: infeasible (bf16 8B + the SLO's KV do not fit; no launch); h100: a real sim measurement. The e2el
# bound is twice the default: the sim measures h100 near 2 s p99 at ~4.6 QPS, and a re-run landing just over
# the default bound is noise this test is not about (it checks what is re-measured, not the SLO).
SWEEP = ["run", "-m", "gpu=a10,h100", *FAST, "slo.targets.e2el_ms_p99=4000"]


def runs(home) -> tuple[MlflowClient, list, list]:
    client = MlflowClient(f"sqlite:///{home}/artifacts/mlflow.db")
    exp_ids = [e.experiment_id for e in client.search_experiments()]
    found = client.search_runs(exp_ids, order_by=["attributes.start_time ASC"])
    parents = [r for r in found if "sweep" in r.data.tags]
    return client, parents, [r for r in found if "sweep" not in r.data.tags]


def sweep(home, api, *extra) -> str:
    res = run_dolphin([*SWEEP, *extra], home, api_url=api, timeout=400)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    return res.stdout


def test_rerun_skips_answered_configs_and_resumes_only_the_missing_one(tmp_path, prefect_api):
    out = sweep(tmp_path, prefect_api)
    client, parents, children = runs(tmp_path)
    assert len(parents) == 1 and len(children) == 2
    by_gpu = {c.data.tags["gpu"]: c for c in children}
    assert by_gpu["h100"].info.status == "FINISHED" and by_gpu["a10"].data.tags["dolphin.infeasible"] == "true"
    # The report ran at the end of the multirun and is on the parent run.
    assert "Dolphin report" in out and "SIMULATED" in out
    arts = {a.path for a in client.list_artifacts(parents[0].info.run_id, "report")}
    assert {"report/ranking.json", "report/rejected.json", "report/report.html", "report/pareto.png"} <= arts

    # Re-run: nothing new is measured; the new parent points at the earlier answers.
    out = sweep(tmp_path, prefect_api)
    assert f"skipped: already measured in run {by_gpu['h100'].info.run_id}" in out
    assert f"skipped: already measured in run {by_gpu['a10'].info.run_id}" in out
    client, parents, again = runs(tmp_path)
    assert len(parents) == 2 and {r.info.run_id for r in again} == {r.info.run_id for r in children}
    reused = {k: v for k, v in parents[-1].data.tags.items() if k.startswith("dolphin.reused.")}
    assert set(reused.values()) == {c.info.run_id for c in children}
    assert parents[-1].info.status == "FINISHED"

    # The h100 run was interrupted (FAILED): the next re-run measures it, and only it.
    client.set_terminated(by_gpu["h100"].info.run_id, "FAILED")
    out = sweep(tmp_path, prefect_api)
    client, parents, final = runs(tmp_path)
    new = [r for r in final if r.info.run_id not in {c.info.run_id for c in children}]
    assert len(new) == 1 and new[0].data.tags["gpu"] == "h100" and new[0].info.status == "FINISHED"
    assert new[0].data.tags["config_hash"] == by_gpu["h100"].data.tags["config_hash"]
    assert new[0].data.tags["mlflow.parentRunId"] == parents[-1].info.run_id
    assert "skipped: already measured in run" in out and engine_processes(tmp_path) == []

    # The report of the latest sweep: the new h100 run ranked, the a10 rejected with the plan's reason.
    res = run_dolphin(["report", "--json"], tmp_path, timeout=120)
    assert res.returncode == 0, res.stderr
    rep = json.loads(res.stdout)
    assert [r["run_id"] for r in rep["ranking"]] == [new[0].info.run_id]
    assert rep["ranking"][0]["gpus"] >= 1 and rep["simulated"] is True
    (rejected,) = rep["rejected"]
    assert rejected["config"].startswith("a10") and "infeasible memory" in rejected["reason"]
    assert "GiB" in rejected["reason"]


def test_force_remeasures_and_a_single_skipped_infeasible_run_still_fails(tmp_path, prefect_api):
    # Infeasible configs stop before launch: quick.
    one = ["run", "gpu=a10", *FAST]
    assert run_dolphin(one, tmp_path, api_url=prefect_api).returncode == 1
    skipped = run_dolphin(one, tmp_path, api_url=prefect_api)
    assert skipped.returncode == 1 and "skipped: already measured in run" in skipped.stdout
    assert len(runs(tmp_path)[2]) == 1
    forced = run_dolphin([*one, "force=true"], tmp_path, api_url=prefect_api)
    assert forced.returncode == 1 and "skipped" not in forced.stdout
    _, _, children = runs(tmp_path)
    assert len(children) == 2 and len({c.data.tags["config_hash"] for c in children}) == 1


def test_sweep_expansion_and_run_control_keys_leave_the_hash_alone():
    from tasks.compose import compose_config, expand_sweep, split_run_control
    from tasks.track import config_hash

    combos = expand_sweep(["gpu=a10,h100", "deploy=agg,pd", "force=true"])
    assert len(combos) == 4 and ["gpu=h100", "deploy=pd", "force=true"] in combos
    plain, control = split_run_control(compose_config(["gpu=h100"]))
    forced, control_f = split_run_control(compose_config(["gpu=h100", "force=true", "schedule=nightly"]))
    assert control == {"force": False} and control_f["force"] is True and control_f["schedule"]["cron"] == "0 3 * * *"
    assert config_hash(plain) == config_hash(forced)  # run_dir (a timestamp) differs too
    assert config_hash(plain) != config_hash(split_run_control(compose_config(["gpu=a10"]))[0])
