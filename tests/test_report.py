"""`dolphin report`: ranking, baseline, rejections, dedup and the HTML, against a real SQLite MLflow store
filled with runs the way the pipeline tracks them."""
from __future__ import annotations

import json
import math
import time

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from flows.cli import main
from tasks.config import TrackingConfig
from tasks.report import build_report, log_report_to_run, pareto_front, parse_baseline, write_html, write_plots
from tasks.track import INFEASIBLE_TAG, REUSED_TAG_PREFIX, end_parent_run, start_parent_run, track_run
from tests.conftest import run_dolphin

TARGET_QPS = 10.0
OUT_TOKENS = 150.0
GPUS = {"h100": (79.2, 2.99), "a10": (22.0, 0.75), "l40s": (44.4, 1.2)}  # memory GiB, $/h


@pytest.fixture
def tracking(tmp_path) -> TrackingConfig:
    return TrackingConfig(uri=f"sqlite:///{tmp_path / 'mlflow.db'}", experiment="rag",
                          artifact_location=str(tmp_path / "mlruns"))


def add_run(tracking, tmp_path, gpu="h100", deploy="agg", quant="fp16", weights="bf16", tp=1, max_qps=3.0,
            status="FINISHED", reason=None, infeasible=False, config_hash=None, parent=None, tpot=20.0):
    mem, price = GPUS[gpu]
    resolved = {"gpu": {"name": gpu, "memory_gib": mem, "usd_per_hour": price},
                "deploy": {"mode": deploy, "tp": tp, "replicas": 1}, "quant": {"name": quant, "weights": weights},
                "slo": {"targets": {"e2el_ms_p99": 2000.0}, "target_qps": TARGET_QPS}}
    tags = {"gpu": gpu, "deploy": deploy, "quant": quant, "engine": "sim", "simulated": "true",
            "weights_dtype": weights, "config_hash": config_hash or f"{gpu}-{deploy}-{quant}-{tp}"}
    if infeasible:
        tags[INFEASIBLE_TAG] = "true"
    metrics = {} if status != "FINISHED" else {
        "max_sustainable_qps": max_qps, "output_tok_per_s": max_qps * OUT_TOKENS, "tpot_ms_mean": tpot,
        "e2el_ms_p99": 1500.0, "output_tokens_per_request": OUT_TOKENS, "target_qps": TARGET_QPS}
    t = tracking.model_copy(update={"parent_run_id": parent})
    res = track_run(resolved=resolved, tags=tags, run_name=tags["config_hash"], tracking=t,
                    run_dir=tmp_path / "none", extra_metrics=metrics, status=status, error=reason)
    client = MlflowClient(tracking.uri)
    for step, qps in enumerate([max_qps / 2, max_qps, max_qps * 2] if max_qps else [1.0]):
        client.log_metric(res.run_id, "level_target_qps", qps, step=step)
        client.log_metric(res.run_id, "level_e2el_ms_p99", 700.0 * (step + 1), step=step)
    time.sleep(0.01)  # distinct start times: "latest" is well defined
    return res.run_id


def expected_cost(gpu: str, gpus: int) -> float:
    return gpus * GPUS[gpu][1] / (TARGET_QPS * OUT_TOKENS * 3600) * 1e6


def test_ranks_by_cost_at_target_with_baseline_and_reasons(tracking, tmp_path):
    base = add_run(tracking, tmp_path, "h100", "agg", "fp16", "bf16", max_qps=3.0)
    fp8 = add_run(tracking, tmp_path, "h100", "agg", "fp8", "fp8", max_qps=7.0)
    l40s = add_run(tracking, tmp_path, "l40s", "pd", "fp8", "fp8", max_qps=1.1)
    add_run(tracking, tmp_path, "a10", "agg", "fp16", status="FAILED", infeasible=True,
            reason="InfeasiblePlan: KV needs 30 GiB, short by 12.3 GiB per GPU")
    add_run(tracking, tmp_path, "l40s", "agg", "fp16", max_qps=0.0)
    add_run(tracking, tmp_path, "a10", "pd", "int4", "int4", status="FAILED", reason="RuntimeError: engine exited 1")

    rep = build_report(tracking.uri, "rag")
    r = rep.ranked.set_index("run_id")
    # replicas = ceil(target / max QPS per replica); PD on 2 GPUs per replica (prefill 1 + decode 1)
    for run_id, gpu, max_qps, gpr in ((base, "h100", 3.0, 1), (fp8, "h100", 7.0, 1), (l40s, "l40s", 1.1, 2)):
        replicas = math.ceil(TARGET_QPS / max_qps)
        assert r.loc[run_id, "replicas"] == replicas and r.loc[run_id, "gpus"] == replicas * gpr
        assert r.loc[run_id, "usd_per_mtok_at_target"] == pytest.approx(expected_cost(gpu, replicas * gpr))
    costs = list(rep.ranked["usd_per_mtok_at_target"])
    assert costs == sorted(costs) and list(rep.ranked["rank"]) == [1, 2, 3]
    # Default baseline: 16-bit, aggregated, on the largest-memory GPU (h100, not the l40s 16-bit run).
    assert rep.baseline["run_id"] == base
    saving = r["saving_vs_baseline_pct"]
    assert saving[base] == pytest.approx(0)
    assert saving[fp8] == pytest.approx(100 * (1 - expected_cost("h100", 2) / expected_cost("h100", 4)))

    why = dict(zip(rep.rejected["config"], rep.rejected["reason"]))
    assert len(why) == 3
    assert why["a10 x1 agg fp16"].startswith("infeasible memory") and "short by 12.3 GiB" in why["a10 x1 agg fp16"]
    assert "SLO never met" in why["l40s x1 agg fp16"]
    assert "failed run" in why["a10 x2 pd int4"] and "engine exited 1" in why["a10 x2 pd int4"]
    assert rep.simulated and rep.to_json()["ranking"][0]["run_id"] == rep.ranked["run_id"][0]


def test_named_baseline_and_bad_spec(tracking, tmp_path):
    add_run(tracking, tmp_path, "h100", "agg", "fp16", max_qps=3.0)
    fp8 = add_run(tracking, tmp_path, "h100", "agg", "fp8", "fp8", max_qps=7.0)
    rep = build_report(tracking.uri, "rag", baseline=parse_baseline("gpu=h100, quant=fp8"))
    assert rep.baseline["run_id"] == fp8
    assert rep.ranked.set_index("run_id").loc[fp8, "saving_vs_baseline_pct"] == pytest.approx(0)
    none = build_report(tracking.uri, "rag", baseline={"gpu": "b200"})
    assert none.baseline is None and "b200" in none.baseline_note and "saving_vs_baseline_pct" not in none.ranked
    with pytest.raises(ValueError, match="KEY=VAL"):
        parse_baseline("gpu")
    with pytest.raises(ValueError, match="no MLflow experiment 'nope'.*rag"):
        build_report(tracking.uri, "nope")


def test_latest_sweep_with_reused_runs_and_dedup_by_hash(tracking, tmp_path):
    old = add_run(tracking, tmp_path, "h100", "agg", "fp8", "fp8", max_qps=5.0, config_hash="hash-a")
    outside = add_run(tracking, tmp_path, "l40s", "agg", "fp8", "fp8", max_qps=5.0, config_hash="hash-z")
    parent = start_parent_run(tracking, "sweep", {"sweep": "gpu=h100"})
    # hash-a: the re-run failed after an earlier finished run -> the finished one counts
    add_run(tracking, tmp_path, "h100", "agg", "fp8", "fp8", status="FAILED", reason="KeyboardInterrupt",
            config_hash="hash-a", parent=parent)
    first_b = add_run(tracking, tmp_path, "h100", "agg", "fp16", max_qps=2.0, config_hash="hash-b", parent=parent)
    latest_b = add_run(tracking, tmp_path, "h100", "agg", "fp16", max_qps=2.5, config_hash="hash-b", parent=parent)
    reused = add_run(tracking, tmp_path, "a10", "agg", "int4", "int4", max_qps=1.0, config_hash="hash-c")
    MlflowClient(tracking.uri).set_tag(parent, REUSED_TAG_PREFIX + "hash-c", reused)
    end_parent_run(tracking.uri, parent)

    rep = build_report(tracking.uri, "rag")
    assert rep.scope == f"sweep {parent}"
    ids = set(rep.ranked["run_id"])
    assert ids == {old, latest_b, reused}  # old: the finished run of hash-a (reached through no tag: dedup)
    assert first_b not in ids and outside not in ids
    assert rep.rejected.empty
    every = build_report(tracking.uri, "rag", all_runs=True)
    assert outside in set(every.ranked["run_id"]) and every.scope == "all runs"


def test_html_is_self_contained_and_logged_to_the_parent(tracking, tmp_path):
    parent = start_parent_run(tracking, "sweep", {"sweep": "gpu=h100"})
    add_run(tracking, tmp_path, "h100", "agg", "fp16", max_qps=3.0, parent=parent)
    add_run(tracking, tmp_path, "h100", "agg", "fp8", "fp8", max_qps=7.0, parent=parent)
    rep = build_report(tracking.uri, "rag", parent_run_id=parent)
    assert set(rep.levels) == set(rep.ranked["config"])
    page = log_report_to_run(rep, tracking.uri, parent, tmp_path / "out")
    text = page.read_text()
    assert text.count('src="data:image/png;base64,') == 3 and "http" not in text.split("<body>")[1]
    assert "SIMULATED" in text and "h100 x1 agg fp8" in text

    client = MlflowClient(tracking.uri)
    arts = {a.path for a in client.list_artifacts(parent, "report")}
    assert {"report/ranking.json", "report/report.html", "report/pareto.png", "report/cost.png",
            "report/latency_vs_qps.png"} <= arts
    table = json.loads(open(client.download_artifacts(parent, "report/ranking.json", str(tmp_path))).read())
    col = table["columns"].index("config")
    assert [row[col] for row in table["data"]] == list(rep.ranked["config"])

    html = write_html(rep, tmp_path / "r.html", write_plots(rep, tmp_path / "plots"))
    assert all((tmp_path / "plots" / n).read_bytes()[:4] == b"\x89PNG" for n in ("pareto.png", "cost.png"))
    assert html.stat().st_size > 10_000


def test_pareto_front_keeps_only_undominated_points():
    x = np.array([10.0, 20.0, 15.0, 30.0, 5.0])
    y = np.array([100.0, 80.0, 70.0, 20.0, 100.0])
    front = pareto_front(x, y)
    assert list(front) == [0, 1, 3]  # 2 is beaten by 1 on both; 4 ties 0 on y but is slower per user


def test_cli_json_and_errors(tracking, tmp_path, capsys):
    run_id = add_run(tracking, tmp_path, "h100", "agg", "fp8", "fp8", max_qps=4.0)
    args = ["report", f"tracking.uri={tracking.uri}", "--experiment", "rag"]
    res = run_dolphin([*args, "--json", "--html", str(tmp_path / "rep.html")], tmp_path, timeout=120)
    assert res.returncode == 0, res.stderr
    data = json.loads(res.stdout)
    assert data["ranking"][0]["run_id"] == run_id and data["ranking"][0]["gpus"] == math.ceil(TARGET_QPS / 4.0)
    assert data["simulated"] is True and (tmp_path / "rep.html").stat().st_size > 10_000
    assert main([*args, "--baseline", "gpu"]) == 2  # in-process: the same entry point, no second start-up
    assert "dolphin report: --baseline" in capsys.readouterr().err
