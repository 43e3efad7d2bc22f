"""Track stage: one MLflow run per pipeline run, with params, tags, metrics and artifacts.

Runs are made and ended through `MlflowClient` rather than the fluent active-run API, so no call here ever
leaves an active run behind (Hydra multiruns call `track_run` many times in one process, and Prefect may
run tasks on threads). A child run carries the `mlflow.parentRunId` tag, which is exactly what
`mlflow.start_run(parent_run_id=...)` writes and what the MLflow UI nests by.

Secrets never reach MLflow: config keys that name a secret are logged as "***", and secret values in
command lines, logs and config files (`--api-key X`, `api_key: X`, `Bearer X`) are masked on the way.
"""
from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import Metric, Param, RunStatus
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.tracking.context import registry as context_registry
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME
from mlflow.utils.validation import (
    MAX_METRICS_PER_BATCH,
    MAX_PARAM_VAL_LENGTH,
    MAX_PARAMS_TAGS_PER_BATCH,
    MAX_TAG_VAL_LENGTH,
)
from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel

from tasks.config import TrackingConfig
from tasks.contracts import BenchResult, Endpoint, LevelResult, QuantChoice, TrackResult, WorkloadProfile
from tasks.plots import plot_latency_vs_qps

log = logging.getLogger(__name__)

# Dotted config keys that do not change what is measured: where outputs go, where they are tracked, a
# preset's free-text notes (its settings are already merged into the groups), and how the engine is reached.
CONFIG_HASH_IGNORED: tuple[str, ...] = (
    "run_dir",
    "tracking",
    "experiment",
    "hydra",
    "engine.host",
    "engine.port",
    "engine.startup_timeout_s",
    "force",     # re-measure a config that already has a run: how to run, not what
    "schedule",  # when a Prefect deployment runs it
)

STATUS_REASON_TAG = "dolphin.status_reason"
# A FAILED run stopped by its memory plan: a verdict about the config, as final as a measurement.
INFEASIBLE_TAG = "dolphin.infeasible"
# On a sweep's parent run: `dolphin.reused.<config_hash>` = the earlier run a skipped config answered with.
REUSED_TAG_PREFIX = "dolphin.reused."
SWEEP_TAG = "sweep"
PLOT_NAME = "plots/latency_vs_qps.png"

# A secret's name as a whole word: `_`, `-`, `.` separate words, so `hf_token` and `--api-key` match
# but `max_num_batched_tokens`, `kv_bytes_per_token` and `tokenizer` (not secrets) do not.
_SECRET_WORD = (r"(?:api[_-]?key|access[_-]?key|(?<!per[_-])token|secrets?|password|passwd|auth|authorization"
                r"|credentials?)")
SECRET_KEY = re.compile(rf"(?<![a-z0-9]){_SECRET_WORD}(?![a-z0-9])", re.IGNORECASE)
_NAME = rf"[\w.-]*?(?<![a-z0-9]){_SECRET_WORD}(?![a-z0-9])[\w.-]*"
_SECRET_IN_TEXT = re.compile(
    # `key: v`, `key=v`, `'key': 'v'`, `--key=v`  |  `--key v`, `"--key", "v"` (argv as JSON)  |  `Bearer v`
    rf"(?P<k>['\"]?{_NAME}['\"]?\s*[:=]\s*(?:(?:Bearer|Basic)\s+)?|--{_NAME}(?:[ \t]+|['\"],\s*['\"])|\bBearer\s+)"
    rf"(?P<v>\"[^\"\n]*\"|'[^'\n]*'|[^\s,'\"}}\]]+)",
    re.IGNORECASE,
)
_FLAG = re.compile(rf"--?{_NAME}", re.IGNORECASE)
# user:password@ in URLs (postgresql://dolphin:pw@db/mlflow)
_URL_PASSWORD = re.compile(r"(?P<k>[a-z][a-z0-9+.-]*://[^:/\s@]+:)(?P<v>[^@\s/]+)(?=@)", re.IGNORECASE)
REDACTED = "***"
# Files under run_dir read as text to mask secrets; others (records, images) are logged as they are.
_TEXT_SUFFIXES = {".yaml", ".yml", ".json", ".txt", ".log", ".sh", ".cmd", ".env", ".cfg", ".ini", ".toml", ""}
_MAX_SCRUB_BYTES = 64 * 2**20


# ---------------------------------------------------------------- config: hash, flatten, redact
def _without(d: Mapping[str, Any], dotted: Iterable[str]) -> dict[str, Any]:
    paths = [p.split(".") for p in dotted]
    out: dict[str, Any] = {}
    for key, value in d.items():
        if [key] in paths:
            continue
        sub = [p[1:] for p in paths if len(p) > 1 and p[0] == key]
        out[key] = _without(value, [".".join(p) for p in sub]) if sub and isinstance(value, Mapping) else value
    return out


def config_hash(resolved: Mapping[str, Any]) -> str:
    """First 12 hex digits of sha256 over the canonical JSON of the config minus CONFIG_HASH_IGNORED."""
    canonical = json.dumps(_without(resolved, CONFIG_HASH_IGNORED), sort_keys=True, separators=(",", ":"),
                           default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:12]


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested mapping -> {"a.b.c": "value"}; lists (and empty mappings) as JSON, None as "None"."""
    out: dict[str, str] = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, f"{name}."))
        elif isinstance(value, (list, tuple, Mapping)):
            out[name] = json.dumps(value, default=str)
        else:
            out[name] = str(value)
    return out


def scrub_text(text: str) -> str:
    """Mask secret values inside free text (command lines, logs, YAML/JSON), keeping quotes."""

    def mask(m: re.Match[str]) -> str:
        v = m["v"]
        quoted = len(v) >= 2 and v[0] == v[-1] and v[0] in "'\""
        return m["k"] + (f"{v[0]}{REDACTED}{v[0]}" if quoted else REDACTED)

    return _URL_PASSWORD.sub(mask, _SECRET_IN_TEXT.sub(mask, text))


def redact(flat: Mapping[str, str]) -> dict[str, str]:
    """Values of secret-named keys become "***"; secrets inside other values (argv lists) are masked."""
    return {k: REDACTED if SECRET_KEY.search(k) else scrub_text(v) for k, v in flat.items()}


def _scrub_obj(obj: Any) -> Any:
    """`redact` for a JSON-like object: secret keys, `--secret-flag value` pairs and secrets in strings."""
    if isinstance(obj, Mapping):
        return {k: REDACTED if SECRET_KEY.search(str(k)) else _scrub_obj(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        after_flag = [i > 0 and isinstance(obj[i - 1], str) and bool(_FLAG.fullmatch(obj[i - 1]))
                      for i in range(len(obj))]
        return [REDACTED if hide else _scrub_obj(v) for v, hide in zip(obj, after_flag)]
    return scrub_text(obj) if isinstance(obj, str) else obj


# ---------------------------------------------------------------- metrics
def _percentile_metrics(level: LevelResult) -> dict[str, float]:
    out = {}
    for metric in ("ttft", "tpot", "itl", "e2el"):
        for stat, value in getattr(level, f"{metric}_ms").model_dump().items():
            out[f"{metric}_ms_{stat}"] = value
    return out


def _level_metrics(level: LevelResult) -> dict[str, float]:
    return {
        "level_target_qps": level.target_qps,
        "level_achieved_qps": level.achieved_qps,
        **{f"level_{m}_ms_p99": getattr(level, f"{m}_ms").p99 for m in ("ttft", "tpot", "itl", "e2el")},
        "level_goodput_rps": level.goodput_rps,
        "level_output_tok_per_s": level.output_tok_per_s,
        "level_slo_met": float(level.slo_met),
        **{f"level_{k}": v for k, v in level.engine.items()},
    }


def collect_metrics(quant: QuantChoice | None, bench: BenchResult | None,
                    extra: Mapping[str, float | None] | None, timestamp_ms: int) -> list[Metric]:
    """Every metric of a run: summary metrics at step 0, per-QPS-level ones at step = level index."""
    summary: dict[str, float | None] = {}
    per_level: list[Metric] = []
    if quant is not None:
        plan = quant.plan
        summary |= {"weights_gib": plan.weights_gib, "kv_lower_bound_gib": plan.kv_lower_bound_gib,
                    "kv_capacity_tokens": plan.kv_capacity_tokens, "kv_capacity_gib": plan.kv_capacity_gib,
                    "kv_num_blocks": plan.kv_num_blocks, "target_concurrency": plan.target_concurrency,
                    "max_concurrency_at_p99": plan.max_concurrency_at_p99,
                    "expected_quality_loss_pct": quant.expected_quality_loss_pct}
    if bench is not None:
        summary["max_sustainable_qps"] = bench.max_sustainable_qps
        best = next((lv for lv in bench.levels if lv.index == bench.best_level), None)
        if best is not None:
            summary |= _percentile_metrics(best)
            summary |= {"goodput_rps": best.goodput_rps, "output_tok_per_s": best.output_tok_per_s}
        per_level = [Metric(k, float(v), timestamp_ms, lv.index)
                     for lv in bench.levels for k, v in _level_metrics(lv).items()]
    summary |= dict(extra or {})
    # None means "not defined here" (e.g. cost at zero throughput): no point rather than a fake number.
    return [Metric(k, float(v), timestamp_ms, 0) for k, v in summary.items() if v is not None] + per_level


# ---------------------------------------------------------------- MLflow plumbing
def _chunks(items: list[Any], size: int) -> Iterator[list[Any]]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


def _artifact_location(location: str | None) -> str | None:
    # A bare path must be absolute: MLflow would resolve a relative one against the current directory.
    if location is None or "://" in location:
        return location
    return str(Path(location).expanduser().resolve())


def _experiment_id(client: MlflowClient, tracking: TrackingConfig) -> str:
    """Get or create the experiment; tolerates a concurrent creator (parallel Hydra launcher jobs)."""
    exp = client.get_experiment_by_name(tracking.experiment)
    if exp is None:
        try:
            return client.create_experiment(tracking.experiment,
                                             artifact_location=_artifact_location(tracking.artifact_location))
        except MlflowException:
            exp = client.get_experiment_by_name(tracking.experiment)
            if exp is None:
                raise
    if exp.lifecycle_stage == "deleted":
        log.warning("restoring deleted MLflow experiment %r to log into it", tracking.experiment)
        client.restore_experiment(exp.experiment_id)
    return exp.experiment_id


def _tag_value(value: Any) -> str:
    return scrub_text(str(value))[:MAX_TAG_VAL_LENGTH]


def _create_run(client: MlflowClient, experiment_id: str, run_name: str, tags: Mapping[str, Any],
                parent_run_id: str | None = None) -> str:
    user_tags = {k: _tag_value(v) for k, v in tags.items()} | {MLFLOW_RUN_NAME: run_name}
    if parent_run_id:
        user_tags[MLFLOW_PARENT_RUN_ID] = parent_run_id
    # The same source/user tags mlflow.start_run would add.
    run = client.create_run(experiment_id, run_name=run_name, tags=context_registry.resolve_tags(user_tags))
    return run.info.run_id


def _log_params(client: MlflowClient, run_id: str, resolved: Mapping[str, Any]) -> None:
    params = [Param(k, v[:MAX_PARAM_VAL_LENGTH]) for k, v in redact(flatten(resolved)).items()]
    for batch in _chunks(params, MAX_PARAMS_TAGS_PER_BATCH):
        client.log_batch(run_id, params=batch, synchronous=True)


def _log_file(client: MlflowClient, run_id: str, path: Path, artifact_file: str) -> None:
    """Log one file at `artifact_file`, masking secrets in text files."""
    if path.suffix.lower() in _TEXT_SUFFIXES and path.stat().st_size <= _MAX_SCRUB_BYTES:
        text = path.read_text(errors="replace")
        scrubbed = scrub_text(text)
        if scrubbed != text:
            client.log_text(run_id, scrubbed, artifact_file)
            return
    parent = str(Path(artifact_file).parent)
    client.log_artifact(run_id, str(path), None if parent == "." else parent)


def _is_under(path: Path, root: Path) -> bool:
    return path.resolve().is_relative_to(root.resolve())


def _log_artifacts(client: MlflowClient, run_id: str, run_dir: Path, profile: WorkloadProfile | None,
                   quant: QuantChoice | None, endpoint: Endpoint | None, bench: BenchResult | None) -> None:
    if bench is not None and bench.levels:
        # Into run_dir, so the local copy of the run has it too.
        plot_latency_vs_qps(bench, run_dir / PLOT_NAME, bench.slo_targets)
    if run_dir.is_dir():
        for path in sorted(p for p in run_dir.rglob("*") if p.is_file()):
            _log_file(client, run_id, path, path.relative_to(run_dir).as_posix())
    # Stage outputs that live outside run_dir (the caller may keep records or engine logs elsewhere).
    outside = []
    if bench is not None:
        outside.append((Path(bench.records_path), Path(bench.records_path).name))
    if endpoint is not None:
        outside += [(Path(p), f"engine_logs/{Path(p).name}") for p in endpoint.log_paths]
    for path, name in outside:
        if path.is_file() and not _is_under(path, run_dir):
            _log_file(client, run_id, path, name)
    stages: dict[str, BaseModel | None] = {"profile.json": profile, "plan.json": quant,
                                           "endpoint.json": endpoint, "bench.json": bench}
    for name, result in stages.items():
        if result is not None:
            client.log_dict(run_id, _scrub_obj(result.model_dump(mode="json")), name)


# ---------------------------------------------------------------- public API
def track_run(*, resolved: dict, tags: dict[str, str], run_name: str, tracking: TrackingConfig, run_dir: Path,
              profile: WorkloadProfile | None = None, quant: QuantChoice | None = None,
              endpoint: Endpoint | None = None, bench: BenchResult | None = None,
              extra_metrics: dict[str, float] | None = None, status: str = "FINISHED",
              error: str | None = None) -> TrackResult:
    """Log one pipeline run to MLflow and end it with `status` ("FINISHED" or "FAILED").

    Nested under `tracking.parent_run_id` when set. If logging itself fails, the run is ended FAILED (with
    the reason in the `dolphin.status_reason` tag) and the error re-raised.
    """
    RunStatus.from_string(status)  # reject a typo before anything is created
    mlflow.set_tracking_uri(tracking.uri)  # so later fluent calls (mlflow.search_runs) read the same store
    client = MlflowClient(tracking.uri)
    experiment_id = _experiment_id(client, tracking)
    run_tags = dict(tags) | ({STATUS_REASON_TAG: error} if error else {})
    run_id = _create_run(client, experiment_id, run_name, run_tags, tracking.parent_run_id)
    try:
        _log_params(client, run_id, resolved)
        metrics = collect_metrics(quant, bench, extra_metrics, int(time.time() * 1000))
        for batch in _chunks(metrics, MAX_METRICS_PER_BATCH):
            client.log_batch(run_id, metrics=batch, synchronous=True)
        _log_artifacts(client, run_id, Path(run_dir), profile, quant, endpoint, bench)
    except BaseException as exc:
        try:
            client.set_tag(run_id, STATUS_REASON_TAG, _tag_value(f"tracking failed: {exc!r}"))
        finally:
            client.set_terminated(run_id, "FAILED")
        raise
    client.set_terminated(run_id, status)
    run = client.get_run(run_id)
    return TrackResult(run_id=run_id, experiment_id=experiment_id, experiment=tracking.experiment,
                       tracking_uri=tracking.uri, artifact_uri=run.info.artifact_uri, status=run.info.status)


def start_parent_run(tracking: TrackingConfig, run_name: str, tags: dict) -> str:
    """Create (not activate) the parent run of a sweep and return its id; children pass it as
    `tracking.parent_run_id`. End it with `end_parent_run`."""
    client = MlflowClient(tracking.uri)
    return _create_run(client, _experiment_id(client, tracking), run_name, tags)


def end_parent_run(tracking_uri: str, run_id: str, status: str = "FINISHED") -> None:
    MlflowClient(tracking_uri).set_terminated(run_id, status)


def find_answered_run(tracking: TrackingConfig, hash_: str) -> tuple[str, bool] | None:
    """(run id, infeasible) of the latest run of `tracking.experiment` with this config hash that answered
    the config: FINISHED, or FAILED by an infeasible memory plan. None when there is none."""
    client = MlflowClient(tracking.uri)
    exp = client.get_experiment_by_name(tracking.experiment)
    if exp is None:
        return None
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.config_hash = '{hash_}'",
                              order_by=["attributes.start_time DESC"], max_results=1000)
    answered = (r for r in runs if r.info.status == "FINISHED"
                or (r.info.status == "FAILED" and r.data.tags.get(INFEASIBLE_TAG) == "true"))
    run = next(answered, None)
    return None if run is None else (run.info.run_id, run.info.status == "FAILED")


def record_reused_run(tracking_uri: str, parent_run_id: str, hash_: str, run_id: str) -> None:
    """Note on the sweep's parent that config `hash_` was answered by the earlier run `run_id`. One tag per
    config, so parallel jobs never overwrite each other."""
    MlflowClient(tracking_uri).set_tag(parent_run_id, REUSED_TAG_PREFIX + hash_, run_id)


def log_report(tracking_uri: str, run_id: str, tables: Mapping[str, Any], files: Iterable[Path],
               artifact_dir: str = "report") -> None:
    """Log DataFrames as MLflow tables (`<artifact_dir>/<name>.json`, comparable in the UI) and files
    (HTML, PNGs) as artifacts of `run_id`."""
    client = MlflowClient(tracking_uri)
    for name, frame in tables.items():
        client.log_table(run_id, data=frame, artifact_file=f"{artifact_dir}/{name}.json")
    for path in files:
        client.log_artifact(run_id, str(path), artifact_dir)


def latest_sweeps(tracking_uri: str) -> list[tuple[str, str, str]]:
    """(experiment name, experiment id, run id) of the latest sweep parent run of each experiment."""
    client = MlflowClient(tracking_uri)
    out = []
    for exp in client.search_experiments():
        runs = client.search_runs([exp.experiment_id], filter_string=f"tags.{SWEEP_TAG} LIKE '%'",
                                  order_by=["attributes.start_time DESC"], max_results=1)
        out += [(exp.name, exp.experiment_id, r.info.run_id) for r in runs]
    return out


def ui_url(tracking_uri: str, experiment_id: str, run_id: str, host: str = "127.0.0.1", port: int = 5000) -> str:
    """The MLflow UI's page of a run, for `mlflow ui --backend-store-uri <tracking_uri>` on host:port."""
    del tracking_uri  # the UI serves one store; kept so callers can pass what they have
    return f"http://{host}:{port}/#/experiments/{experiment_id}/runs/{run_id}"


@task(name="track", cache_policy=NO_CACHE)
def track_task(**kwargs: Any) -> TrackResult:
    """Stage 6: the Prefect entry of `track_run` (same keyword arguments)."""
    return track_run(**kwargs)
