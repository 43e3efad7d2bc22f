"""Track stage against a real SQLite MLflow store in tmp_path."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from tasks.config import TrackingConfig
from tasks.contracts import (
    BenchResult, EngineKnobs, Endpoint, LengthStats, LevelResult, MemoryPlan, Percentiles, QuantChoice,
    WorkloadProfile,
)
from tasks.cost import cost_per_mtok_usd
from tasks.plots import plot_latency_vs_qps
from tasks.track import (
    STATUS_REASON_TAG, config_hash, end_parent_run, flatten, redact, scrub_text, start_parent_run, track_run,
    ui_url,
)

SECRET = "sk-123"


def _pct(base: float) -> Percentiles:
    return Percentiles(mean=base, p50=base, p90=base * 1.5, p95=base * 1.8, p99=base * 2.5)


def _level(index: int, qps: float, slo_met: bool) -> LevelResult:
    scale = qps  # latency grows with load
    return LevelResult(
        index=index, target_qps=qps, achieved_qps=qps * 0.97, num_requests=50, completed=50, failed=0,
        duration_s=50 / qps, ttft_ms=_pct(40 * scale), tpot_ms=_pct(8 * scale), itl_ms=_pct(7 * scale),
        e2el_ms=_pct(500 * scale), output_tok_per_s=300 * qps, goodput_rps=qps * (0.99 if slo_met else 0.4),
        slo_met=slo_met, violations=[] if slo_met else ["e2el_ms_p99"],
    )


@pytest.fixture
def stages(tmp_path: Path):
    records = tmp_path / "run" / "requests.jsonl"
    # Levels in bisection order (not sorted by QPS), as the benchmark produces them.
    levels = [_level(0, 1.0, True), _level(1, 4.0, False), _level(2, 2.0, True)]
    bench = BenchResult(slo_targets={"e2el_ms_p99": 3000.0, "ttft_ms_p99": 400.0}, levels=levels,
                        max_sustainable_qps=2.0, best_level=2, records_path=str(records), time_scale=5.0,
                        simulated=True)
    knobs = EngineKnobs(tensor_parallel_size=1, gpu_memory_utilization=0.9, max_num_seqs=64, max_model_len=8192,
                        max_num_batched_tokens=8192, block_size=16)
    plan = MemoryPlan(weights_dtype="bf16", kv_dtype="bf16", tp=1, gpu_memory_gib=74.5, gpu_memory_utilization=0.9,
                      weights_gib=14.96, activation_reserve_gib=2.0, kv_bytes_per_token=131072.0,
                      kv_capacity_gib=50.1, kv_capacity_tokens=410000, p99_context_tokens=6000,
                      target_concurrency=32, kv_lower_bound_gib=23.4, max_concurrency_at_p99=68.3, feasible=True,
                      reason="fits", knobs=knobs)
    quant = QuantChoice(weights_dtype="bf16", kv_dtype="bf16", reason="most accurate that fits", plan=plan)
    ls = LengthStats(mean=100, p50=90, p90=180, p99=300, max=400)
    profile = WorkloadProfile(source="synthetic", requests=100, duration_s=60, mean_qps=1.6, peak_qps_1s=5,
                              peak_qps_60s=1.6, interarrival_cv=1.0, gamma_shape=1.0, input_tokens=ls,
                              output_tokens=ls, length_pairs=[(90, 80), (300, 120)])
    endpoint = Endpoint(engine="sim", deploy="agg", base_url="http://127.0.0.1:8000", model_name="m",
                        commands=[f"python -m sim --port 8000 --api-key {SECRET}"], log_paths=[], pids=[1],
                        simulated=True, time_scale=5.0)
    return dict(profile=profile, quant=quant, endpoint=endpoint, bench=bench)


@pytest.fixture
def tracking(tmp_path: Path) -> TrackingConfig:
    return TrackingConfig(uri=f"sqlite:///{tmp_path / 'mlflow.db'}", experiment="scenario-a",
                          artifact_location=str(tmp_path / "mlruns"))


def _resolved(run_dir: Path) -> dict:
    return {
        "model": {"name": "llama-3.1-8b", "num_layers": 32},
        "gpu": {"name": "h100", "usd_per_hour": 3.0},
        "deploy": {"mode": "agg", "tp": 1, "num_speculative_tokens": 0},
        "engine": {"kind": "sim", "port": None, "api_key": SECRET, "extra_args": ["--api-key", SECRET]},
        "workload": {"name": "w", "columns": {}},
        "slo": {"targets": {"e2el_ms_p99": 3000.0}},
        "tracking": {"uri": "sqlite:////x.db", "experiment": "w"},
        "run_dir": str(run_dir),
        "notes": "x" * 7000,
    }


def _run_dir(tmp_path: Path) -> Path:
    run_dir = tmp_path / "run"
    (run_dir / "engine").mkdir(parents=True)
    (run_dir / "config.yaml").write_text(f"engine:\n  kind: sim\n  api_key: {SECRET}\n")
    (run_dir / "engine" / "commands.txt").write_text(f"python -m sim --api-key {SECRET} --port 8000\n")
    (run_dir / "requests.jsonl").write_text('{"ttft_ms": 10}\n')
    return run_dir


def _artifact_paths(client: MlflowClient, run_id: str, path: str | None = None) -> set[str]:
    out = set()
    for info in client.list_artifacts(run_id, path):
        out |= _artifact_paths(client, run_id, info.path) if info.is_dir else {info.path}
    return out


def test_track_run_logs_everything_and_leaves_no_active_run(tmp_path, tracking, stages):
    run_dir = _run_dir(tmp_path)
    resolved = _resolved(run_dir)
    tags = {"gpu": "h100", "deploy": "agg", "quant": "fp16", "engine": "sim", "model": "llama-3.1-8b",
            "config_hash": config_hash(resolved), "simulated": "true"}
    cost = cost_per_mtok_usd(3.0, 1, stages["bench"].levels[2].output_tok_per_s)
    res = track_run(resolved=resolved, tags=tags, run_name="h100-agg", tracking=tracking, run_dir=run_dir,
                    extra_metrics={"cost_per_mtok_usd": cost, "undefined": None}, **stages)

    assert mlflow.active_run() is None
    client = MlflowClient(tracking.uri)
    run = client.get_run(res.run_id)
    assert res.status == run.info.status == "FINISHED"
    assert run.info.run_name == "h100-agg"
    assert client.get_experiment(res.experiment_id).name == "scenario-a"
    assert res.artifact_uri.startswith(str(tmp_path / "mlruns"))  # the configured location, not ./mlruns

    # Summary metrics come from the plan and from the best level (index 2, not the last or the fastest).
    m, best, plan = run.data.metrics, stages["bench"].levels[2], stages["quant"].plan
    assert m["weights_gib"] == plan.weights_gib and m["kv_capacity_tokens"] == plan.kv_capacity_tokens
    assert m["kv_lower_bound_gib"] == plan.kv_lower_bound_gib and m["kv_capacity_gib"] == plan.kv_capacity_gib
    assert m["max_sustainable_qps"] == 2.0
    assert m["ttft_ms_p99"] == best.ttft_ms.p99 and m["e2el_ms_mean"] == best.e2el_ms.mean
    assert m["itl_ms_p95"] == best.itl_ms.p95 and m["tpot_ms_p50"] == best.tpot_ms.p50
    assert m["goodput_rps"] == best.goodput_rps and m["output_tok_per_s"] == best.output_tok_per_s
    assert m["cost_per_mtok_usd"] == pytest.approx(cost)
    assert "undefined" not in m

    # Per-level history: one point per level, step = level index.
    hist = {p.step: p.value for p in client.get_metric_history(res.run_id, "level_target_qps")}
    assert hist == {lv.index: lv.target_qps for lv in stages["bench"].levels}
    met = {p.step: p.value for p in client.get_metric_history(res.run_id, "level_slo_met")}
    assert met == {0: 1.0, 1: 0.0, 2: 1.0}
    p99 = {p.step: p.value for p in client.get_metric_history(res.run_id, "level_e2el_ms_p99")}
    assert p99 == {lv.index: lv.e2el_ms.p99 for lv in stages["bench"].levels}

    assert {k: run.data.tags[k] for k in tags} == tags
    assert STATUS_REASON_TAG not in run.data.tags

    params = run.data.params
    assert params["model.name"] == "llama-3.1-8b" and params["deploy.tp"] == "1"
    assert params["deploy.num_speculative_tokens"] == "0"  # a count, not a secret
    assert params["engine.api_key"] == "***"
    assert json.loads(params["engine.extra_args"]) == ["--api-key", "***"]
    assert not any(SECRET in v for v in params.values())
    assert len(params["notes"]) == 6000  # truncated to MLflow's limit instead of failing the run

    arts = _artifact_paths(client, res.run_id)
    assert {"config.yaml", "engine/commands.txt", "requests.jsonl", "plots/latency_vs_qps.png",
            "profile.json", "plan.json", "endpoint.json", "bench.json"} <= arts
    root = Path(client.download_artifacts(res.run_id, "", str(tmp_path / "dl")))
    assert not any(SECRET in p.read_text(errors="replace") for p in root.rglob("*") if p.is_file())
    assert "api_key: ***" in (root / "config.yaml").read_text()
    assert json.loads((root / "plan.json").read_text()) == stages["quant"].model_dump(mode="json")
    assert (root / "plots" / "latency_vs_qps.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_failed_pipeline_run_records_reason(tmp_path, tracking):
    run_dir = tmp_path / "empty"
    res = track_run(resolved={"gpu": {"name": "a10"}}, tags={"gpu": "a10"}, run_name="oom", tracking=tracking,
                    run_dir=run_dir, status="FAILED", error="infeasible: KV needs 40 GiB, 12 available")
    run = MlflowClient(tracking.uri).get_run(res.run_id)
    assert res.status == run.info.status == "FAILED"
    assert run.info.end_time is not None
    assert run.data.tags[STATUS_REASON_TAG].startswith("infeasible: KV needs 40 GiB")
    assert mlflow.active_run() is None


def test_failure_while_logging_ends_run_failed_and_reraises(tmp_path, tracking, stages):
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")  # the plot cannot be written under it
    with pytest.raises(OSError):
        track_run(resolved={"gpu": {"name": "h100"}}, tags={}, run_name="boom", tracking=tracking,
                  run_dir=not_a_dir, bench=stages["bench"])
    assert mlflow.active_run() is None
    client = MlflowClient(tracking.uri)
    (run,) = client.search_runs([client.get_experiment_by_name("scenario-a").experiment_id])
    assert run.info.status == "FAILED"
    assert run.data.tags[STATUS_REASON_TAG].startswith("tracking failed:")
    # The next call in the same process (a Hydra multirun) works.
    ok = track_run(resolved={}, tags={}, run_name="next", tracking=tracking, run_dir=tmp_path / "none")
    assert ok.status == "FINISHED"


def test_child_run_nests_under_parent(tmp_path, tracking):
    parent_id = start_parent_run(tracking, "sweep", {"sweep": "gpu=a10,h100"})
    assert mlflow.active_run() is None  # the parent is not the fluent active run
    child_tracking = tracking.model_copy(update={"parent_run_id": parent_id})
    child = track_run(resolved={"gpu": {"name": "a10"}}, tags={"gpu": "a10"}, run_name="a10",
                      tracking=child_tracking, run_dir=tmp_path / "none")
    client = MlflowClient(tracking.uri)
    assert client.get_run(child.run_id).data.tags["mlflow.parentRunId"] == parent_id
    assert child.experiment_id == client.get_run(parent_id).info.experiment_id
    assert client.get_run(parent_id).info.status == "RUNNING"
    end_parent_run(tracking.uri, parent_id)
    parent = client.get_run(parent_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["sweep"] == "gpu=a10,h100"
    assert parent.info.run_name == "sweep"


def test_config_hash_ignores_noise_but_not_what_is_measured(tmp_path):
    base = _resolved(tmp_path / "a")
    h = config_hash(base)
    assert len(h) == 12 and int(h, 16) >= 0
    reordered = dict(reversed(list(copy.deepcopy(base).items())))
    assert config_hash(reordered) == h
    moved = copy.deepcopy(base) | {"run_dir": str(tmp_path / "b"), "tracking": {"uri": "sqlite:////y.db"}}
    moved["engine"] = moved["engine"] | {"port": 8123}
    assert config_hash(moved) == h
    other_gpu = copy.deepcopy(base)
    other_gpu["gpu"]["name"] = "a10"
    assert config_hash(other_gpu) != h
    other_kind = copy.deepcopy(base)
    other_kind["engine"]["kind"] = "vllm"  # a sibling of the ignored engine.port still counts
    assert config_hash(other_kind) != h


def test_flatten_and_redact():
    flat = flatten({"a": {"b": 1, "c": [1, "x"], "d": {}}, "e": None})
    assert flat == {"a.b": "1", "a.c": '[1, "x"]', "a.d": "{}", "e": "None"}
    secret = {"engine.api_key": "k", "engine.apikey": "k", "hf_token": "k", "db.password": "k", "x.auth": "k"}
    # Counts and names that merely contain a secret word stay readable.
    plain = {"model.tokenizer": "t", "bench.max_tokens": "5", "plan.kv_bytes_per_token": "2", "x.author": "a"}
    red = redact(secret | plain | {"engine.cmd": "--token abc -v"})
    assert red == dict.fromkeys(secret, "***") | plain | {"engine.cmd": "--token *** -v"}
    assert scrub_text("args: {'api_key': 'sk-1', 'max_num_batched_tokens': 8192}") == \
        "args: {'api_key': '***', 'max_num_batched_tokens': 8192}"
    assert scrub_text("Authorization: Bearer abc") == "Authorization: Bearer ***"
    assert scrub_text("curl -H 'Bearer abc' --max-tokens 10") == "curl -H 'Bearer ***' --max-tokens 10"
    # A password inside a store URL, but not a host:port.
    assert redact({"tracking.uri": "postgresql://dolphin:pw1@db:5432/mlflow", "u": "http://h:5000/a@b"}) == {
        "tracking.uri": "postgresql://dolphin:***@db:5432/mlflow", "u": "http://h:5000/a@b"}


def test_latency_plot_is_written(tmp_path, stages):
    out = plot_latency_vs_qps(stages["bench"], tmp_path / "p" / "lat.png", {"tpot_ms_p99": 50.0, "itl_ms_p99": 9})
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000


def test_ui_url():
    assert ui_url("sqlite:////x.db", "3", "abc", port=5001) == "http://127.0.0.1:5001/#/experiments/3/runs/abc"
