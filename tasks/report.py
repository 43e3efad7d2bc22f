"""Recommendation: rank an experiment's configs by what they cost at the target QPS while holding the SLO.

For each config (one MLflow run per config_hash; the latest FINISHED run wins):
  replicas = ceil(target QPS / max sustainable QPS of one replica)   (a replica = the benchmarked deployment)
  GPUs     = replicas x GPUs per replica
  $ / 1M output tokens at the target = GPUs x $/GPU-h / (target QPS x output tokens per request x 3600) x 1e6
Configs that cannot be ranked are listed with the reason: infeasible memory plan (the plan's reason), SLO
never met, or a failed run (its error). The saving is against a baseline config (default: 16-bit weights,
aggregated, on the largest-memory GPU of the sweep).
"""
from __future__ import annotations

import base64
import html
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from mlflow.entities import Run  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID  # noqa: E402

from tasks.cost import cost_per_mtok_usd, gpus_for_qps  # noqa: E402
from tasks.track import INFEASIBLE_TAG, REUSED_TAG_PREFIX, STATUS_REASON_TAG, SWEEP_TAG, log_report  # noqa: E402

SIXTEEN_BIT = ("bf16", "fp16")
PLOT_FILES = ("pareto.png", "latency_vs_qps.png", "cost.png")
_MAX_RUNS = 50_000


@dataclass
class Report:
    experiment: str
    tracking_uri: str
    scope: str                       # which runs: "sweep <parent id>" or "all runs"
    ranked: pd.DataFrame             # one row per rankable config, cheapest first
    rejected: pd.DataFrame           # config, reason, run_id
    baseline: dict[str, Any] | None  # the ranked row the savings are against
    baseline_note: str
    simulated: bool
    slo_targets: dict[str, float]
    # config label (+ run id when two configs share a label) -> per level: target_qps, p99 of each SLO metric
    levels: dict[str, pd.DataFrame] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        def records(df: pd.DataFrame) -> list[dict[str, Any]]:
            return [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()}
                    for r in df.to_dict(orient="records")]

        return {"experiment": self.experiment, "tracking_uri": self.tracking_uri, "scope": self.scope,
                "simulated": self.simulated, "slo_targets": self.slo_targets,
                "baseline": self.baseline, "baseline_note": self.baseline_note,
                "ranking": records(self.ranked), "rejected": records(self.rejected)}


# ---------------------------------------------------------------- which runs
def select_runs(client: MlflowClient, experiment: str, parent_run_id: str | None = None,
                all_runs: bool = False) -> tuple[list[Run], str]:
    """The runs to rank: the configs of a sweep (the latest by default) -- its children, the earlier runs its
    skipped configs reused, and every other run of the same config hashes -- or every config run of the
    experiment."""
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        names = sorted(e.name for e in client.search_experiments())
        raise ValueError(f"no MLflow experiment {experiment!r}; the store has: {', '.join(names) or 'none'}")
    runs = client.search_runs([exp.experiment_id], max_results=_MAX_RUNS, order_by=["attributes.start_time DESC"])
    parents = [r for r in runs if SWEEP_TAG in r.data.tags and MLFLOW_PARENT_RUN_ID not in r.data.tags]
    parent_ids = {p.info.run_id for p in parents}
    configs = [r for r in runs if r.info.run_id not in parent_ids]
    if all_runs or (parent_run_id is None and not parents):
        return configs, "all runs"
    parent = next((p for p in parents if p.info.run_id == parent_run_id), None) if parent_run_id else parents[0]
    if parent is None:
        raise ValueError(f"run {parent_run_id} is not a sweep parent in experiment {experiment!r}")
    reused = {v for k, v in parent.data.tags.items() if k.startswith(REUSED_TAG_PREFIX)}
    pid = parent.info.run_id
    chosen = {r.info.run_id for r in configs if r.data.tags.get(MLFLOW_PARENT_RUN_ID) == pid} | reused
    # The sweep names the configs; any run of the same config hash may answer it (see `dedupe`).
    hashes = {r.data.tags.get("config_hash") for r in configs if r.info.run_id in chosen} - {None}
    return [r for r in configs if r.info.run_id in chosen or r.data.tags.get("config_hash") in hashes], \
        f"sweep {pid}"


def dedupe(runs: list[Run]) -> list[Run]:
    """One run per config_hash: the latest FINISHED one, else the latest."""
    best: dict[str, Run] = {}
    for r in sorted(runs, key=lambda r: (r.info.status == "FINISHED", r.info.start_time or 0)):
        best[r.data.tags.get("config_hash", r.info.run_id)] = r  # later (better) wins
    return list(best.values())


# ---------------------------------------------------------------- per-run facts
def _gpus_per_replica(params: dict[str, str]) -> int:
    """Older runs have no gpus_per_replica metric: the deploy section gives it (DeployConfig.num_gpus)."""
    p = {k: int(float(v)) for k, v in params.items()
         if k in ("deploy.tp", "deploy.replicas", "deploy.prefill.instances", "deploy.prefill.tp",
                  "deploy.decode.instances", "deploy.decode.tp") and v not in ("None", "")}
    if params.get("deploy.mode") == "pd":
        return (p.get("deploy.prefill.instances", 1) * p.get("deploy.prefill.tp", 1)
                + p.get("deploy.decode.instances", 1) * p.get("deploy.decode.tp", 1))
    return p.get("deploy.replicas", 1) * p.get("deploy.tp", 1)


def _num(value: Any) -> float | None:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(out) else out


def run_facts(run: Run, target_qps: float | None = None) -> dict[str, Any]:
    """Everything the ranking needs from one run, and whether (and why not) it can be ranked."""
    t, m, p = run.data.tags, run.data.metrics, run.data.params
    gpr = int(m.get("gpus_per_replica") or _gpus_per_replica(p))
    weights = t.get("weights_dtype") or p.get("quant.weights", "?")
    label = f"{t.get('gpu', '?')} x{gpr} {t.get('deploy', '?')} {t.get('quant', '?')}"
    if t.get("engine") and t.get("engine") != "sim":
        label += f" {t['engine']}"
    facts: dict[str, Any] = {
        "config": label, "gpu": t.get("gpu"), "deploy": t.get("deploy"), "quant": t.get("quant"),
        "weights_dtype": weights, "kv_dtype": t.get("kv_dtype") or p.get("quant.kv_cache"),
        "engine": t.get("engine"), "model": t.get("model"), "simulated": t.get("simulated") == "true",
        "gpu_memory_gib": _num(p.get("gpu.memory_gib")), "gpus_per_replica": gpr,
        "usd_per_gpu_hour": _num(m.get("usd_per_gpu_hour", p.get("gpu.usd_per_hour"))),
        "target_qps": target_qps or _num(m.get("target_qps", p.get("slo.target_qps"))),
        "max_qps_per_replica": m.get("max_sustainable_qps"), "config_hash": t.get("config_hash"),
        "run_id": run.info.run_id, "status": run.info.status, "reason": None,
    }
    reason = t.get(STATUS_REASON_TAG, "")
    if run.info.status != "FINISHED":
        facts["reason"] = (f"infeasible memory: {reason.split(': ', 1)[-1]}"
                           if t.get(INFEASIBLE_TAG) == "true" or reason.startswith("InfeasiblePlan")
                           else f"failed run ({run.info.status}): {reason or 'no reason recorded'}")
        return facts
    max_qps = m.get("max_sustainable_qps", 0.0)
    if max_qps <= 0:
        facts["reason"] = "SLO never met: no QPS level held the SLO"
        return facts
    if facts["target_qps"] is None or facts["usd_per_gpu_hour"] is None:
        facts["reason"] = "no target QPS or GPU price recorded (give --target-qps)"
        return facts
    out_per_req = m.get("output_tokens_per_request") or m.get("output_tok_per_s", 0.0) / max_qps
    gpus = gpus_for_qps(facts["target_qps"], max_qps, gpr)
    facts |= {
        "replicas": gpus // gpr, "gpus": gpus, "usd_per_hour": gpus * facts["usd_per_gpu_hour"],
        "usd_per_mtok_at_target": cost_per_mtok_usd(facts["usd_per_gpu_hour"], gpus,
                                                   facts["target_qps"] * out_per_req),
        "tok_s_per_gpu": m.get("output_tok_per_s", 0.0) / gpr,
        "tok_s_per_user": 1000.0 / m["tpot_ms_mean"] if m.get("tpot_ms_mean") else None,
        **{k: m.get(k) for k in ("ttft_ms_p99", "tpot_ms_p99", "e2el_ms_p99")},
    }
    return facts


def _slo_targets(runs: list[Run]) -> dict[str, float]:
    prefix = "slo.targets."
    for r in runs:
        targets = {k[len(prefix):]: float(v) for k, v in r.data.params.items() if k.startswith(prefix)}
        if targets:
            return targets
    return {}


def slo_p99_metrics(slo: dict[str, float]) -> list[str]:
    """The latency metrics the SLO bounds at p99 (the per-level history has p99 only); e2el if none."""
    return sorted({k.split("_ms_")[0] for k in slo if k.endswith("_ms_p99")}) or ["e2el"]


def _level_curve(client: MlflowClient, run_id: str, metrics: list[str]) -> pd.DataFrame:
    """Per QPS level: target_qps and the p99 (ms) of each of `metrics` (ttft, tpot, itl, e2el)."""
    def hist(name: str) -> pd.Series:
        pts = client.get_metric_history(run_id, name)
        return pd.Series({pt.step: pt.value for pt in pts}, dtype=float)

    df = pd.DataFrame({"target_qps": hist("level_target_qps")}
                      | {m: hist(f"level_{m}_ms_p99") for m in metrics})
    df = df.dropna()
    return df[(df[metrics] > 0).any(axis=1)].sort_values("target_qps")  # a level with no completed request


# ---------------------------------------------------------------- ranking
def _matches(row: dict[str, Any], params: dict[str, str], want: dict[str, str]) -> bool:
    return all(str(row.get(k)) == v or params.get(k) == v for k, v in want.items())


def parse_baseline(text: str | None) -> dict[str, str] | None:
    """`gpu=h100,deploy=agg,quant=fp16` -> dict; keys are tags (gpu, deploy, quant, weights_dtype, ...) or
    dotted params (deploy.tp)."""
    if not text:
        return None
    pairs = [kv.split("=", 1) for kv in text.split(",") if kv.strip()]
    if not pairs or any(len(kv) != 2 or not kv[0].strip() for kv in pairs):
        raise ValueError(f"--baseline {text!r} is not KEY=VAL[,KEY=VAL...], e.g. gpu=h100,deploy=agg,quant=fp16")
    return {k.strip(): v.strip() for k, v in pairs}


def build_report(tracking_uri: str, experiment: str, parent_run_id: str | None = None, all_runs: bool = False,
                 baseline: dict[str, str] | None = None, target_qps: float | None = None) -> Report:
    client = MlflowClient(tracking_uri)
    runs, scope = select_runs(client, experiment, parent_run_id, all_runs)
    runs = dedupe(runs)
    if not runs:
        raise ValueError(f"no config runs to rank in experiment {experiment!r} ({scope})")
    facts = [run_facts(r, target_qps) for r in runs]
    params = {r.info.run_id: r.data.params for r in runs}
    slo = _slo_targets(runs)
    metrics = slo_p99_metrics(slo)
    finished = [f for f in facts if f["status"] == "FINISHED"]
    names = pd.Series([f["config"] for f in finished])
    curves = {f["run_id"]: _level_curve(client, f["run_id"], metrics) for f in finished}
    levels = {(f["config"] if not dup else f"{f['config']} ({f['run_id'][:6]})"): curves[f["run_id"]]
              for f, dup in zip(finished, names.duplicated(keep=False))}
    for f in facts:  # say how far from the SLO a config that never met it was
        curve = curves.get(f["run_id"])
        if f["reason"] and f["reason"].startswith("SLO never met") and curve is not None and not curve.empty:
            low = curve.iloc[0]
            f["reason"] += f" (lowest QPS tried {low.target_qps:.3g}: " + ", ".join(
                f"p99 {m} {low[m]:.0f} ms" for m in metrics) + ")"
    ok = [f for f in facts if f["reason"] is None]
    # Equal cost: fewer GPUs, then more headroom (max QPS per replica) first.
    ranked = pd.DataFrame(ok).sort_values(["usd_per_mtok_at_target", "gpus", "max_qps_per_replica"],
                                          ascending=[True, True, False]) if ok else pd.DataFrame()
    rejected = pd.DataFrame([{k: f[k] for k in ("config", "reason", "run_id")} for f in facts if f["reason"]],
                            columns=["config", "reason", "run_id"])

    base, note = _baseline(facts, params, baseline)
    if not ranked.empty:
        ranked.insert(0, "rank", range(1, len(ranked) + 1))
        if base is not None:
            ranked["saving_vs_baseline_pct"] = 100 * (1 - ranked["usd_per_mtok_at_target"]
                                                      / base["usd_per_mtok_at_target"])
            ranked["saving_usd_per_hour"] = base["usd_per_hour"] - ranked["usd_per_hour"]
        ranked = ranked.drop(columns=["reason"]).reset_index(drop=True)

    return Report(experiment=experiment, tracking_uri=tracking_uri, scope=scope, ranked=ranked,
                  rejected=rejected, baseline=base, baseline_note=note,
                  simulated=any(f["simulated"] for f in facts), slo_targets=slo, levels=levels)


def _baseline(facts: list[dict[str, Any]], params: dict[str, dict[str, str]],
              want: dict[str, str] | None) -> tuple[dict[str, Any] | None, str]:
    if want:
        matches = [f for f in facts if _matches(f, params[f["run_id"]], want)]
        what = ",".join(f"{k}={v}" for k, v in want.items())
    else:
        mem = max((f["gpu_memory_gib"] or 0 for f in facts), default=0)
        agg = [f for f in facts if f["deploy"] == "agg" and (f["gpu_memory_gib"] or 0) == mem]
        matches = [f for f in agg if f["weights_dtype"] in SIXTEEN_BIT]
        what = "16-bit weights, deploy=agg, on the largest-memory GPU of the sweep"
        if not matches and agg:  # a sweep of quantized configs only: its aggregated one on that GPU
            matches, what = agg, "no 16-bit config: deploy=agg on the largest-memory GPU of the sweep"
    if not matches:
        return None, f"no baseline: no config matches {what}"
    usable = sorted((f for f in matches if f["reason"] is None), key=lambda f: f["usd_per_mtok_at_target"])
    if not usable:
        return None, f"no baseline: {matches[0]['config']} ({what}) is rejected: {matches[0]['reason']}"
    return usable[0], f"baseline {usable[0]['config']} ({what})"


# ---------------------------------------------------------------- plots and HTML
def _title(report: Report, what: str) -> str:
    return what + (" — SIMULATED (sim engine)" if report.simulated else "")


def pareto_front(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Indices of the points no other point beats on both axes (higher is better), by increasing x."""
    keep = [i for i in range(len(x))
            if not np.any((x >= x[i]) & (y >= y[i]) & ((x > x[i]) | (y > y[i])))]
    return np.array(sorted(keep, key=lambda i: x[i]), dtype=int)


def write_plots(report: Report, out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / name for name in PLOT_FILES]
    r = report.ranked

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    if not r.empty and r["tok_s_per_user"].notna().any():
        d = r.dropna(subset=["tok_s_per_user"])
        x, y = d["tok_s_per_user"].to_numpy(float), d["tok_s_per_gpu"].to_numpy(float)
        ax.scatter(x, y)
        front = pareto_front(x, y)
        ax.plot(x[front], y[front], "r--o", mfc="none", markersize=11, label="Pareto front")
        for xi, yi, name in zip(x, y, d["config"]):
            ax.annotate(name, (xi, yi), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.legend(fontsize=8)
    ax.set_xlabel("output tok/s per user (1000 / mean TPOT)")
    ax.set_ylabel("output tok/s per GPU at max QPS")
    ax.set_title(_title(report, "Throughput per GPU vs per user"), fontsize=10)
    ax.grid(True, alpha=0.3)
    _save(fig, paths[0])

    metrics = slo_p99_metrics(report.slo_targets)
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.6 * len(metrics), 4.2), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        for name, df in report.levels.items():
            if not df.empty:
                ax.plot(df["target_qps"], df[metric], "o-", markersize=3, label=name)
        bound = report.slo_targets.get(f"{metric}_ms_p99")
        if bound is not None:
            ax.axhline(bound, color="red", linestyle="--", label=f"SLO {metric} p99")
        ax.set_xlabel("target QPS (per replica)")
        ax.set_ylabel(f"{metric.upper()} p99 (ms)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(_title(report, "Latency vs QPS per config"), fontsize=10)
    _save(fig, paths[1])

    fig, ax = plt.subplots(figsize=(6.4, 0.6 + 0.4 * max(1, len(r))))
    if not r.empty:
        base = report.baseline["config"] if report.baseline else None
        colors = ["tab:orange" if c == base else "tab:blue" for c in r["config"]]
        ax.barh(r["config"], r["usd_per_mtok_at_target"], color=colors)
        ax.invert_yaxis()  # cheapest on top
    ax.set_xlabel("$ per 1M output tokens at the target QPS (orange: baseline)")
    ax.set_title(_title(report, "Cost at the target QPS"), fontsize=10)
    _save(fig, paths[2])
    return paths


def _save(fig: Any, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


HTML_COLUMNS = ["rank", "config", "max_qps_per_replica", "target_qps", "replicas", "gpus", "usd_per_hour",
                "usd_per_mtok_at_target", "saving_vs_baseline_pct", "tok_s_per_gpu", "tok_s_per_user",
                "ttft_ms_p99", "tpot_ms_p99", "e2el_ms_p99", "run_id"]


def write_html(report: Report, path: Path, plots: list[Path]) -> Path:
    """One self-contained HTML file: tables and the PNGs embedded as base64."""
    cols = [c for c in HTML_COLUMNS if c in report.ranked.columns]
    ranking = report.ranked[cols].to_html(index=False, float_format=lambda v: f"{v:,.3g}", na_rep="—") \
        if not report.ranked.empty else "<p>No config holds the SLO.</p>"
    rejected = report.rejected.to_html(index=False) if not report.rejected.empty else "<p>None.</p>"
    imgs = "".join(f'<img alt="{p.stem}" src="data:image/png;base64,{base64.b64encode(p.read_bytes()).decode()}">'
                   for p in plots)
    sim = ('<p class="sim"><b>SIMULATED</b>: measured on the sim engine, whose timings come from Dolphin\'s '
           'performance model, not from a GPU.</p>' if report.simulated else "")
    slo = ", ".join(f"{k} ≤ {v:g}" for k, v in report.slo_targets.items())
    title = html.escape(_title(report, f"Dolphin report: {report.experiment}"))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"""<!doctype html><html><head><meta charset="utf-8"><title>{title}</title><style>
body{{font-family:sans-serif;margin:2em}} table{{border-collapse:collapse;font-size:13px}}
td,th{{border:1px solid #ccc;padding:3px 6px;text-align:right}} .sim{{color:#b00}} img{{max-width:48%;margin:4px}}
</style></head><body><h1>{title}</h1>{sim}
<p>Scope: {html.escape(report.scope)}. SLO: {html.escape(slo)}. Ranked by $ per 1M output tokens at the target
QPS with replicas = ceil(target QPS / max sustainable QPS per replica).</p>
<p>{html.escape(report.baseline_note)}</p><h2>Ranking</h2>{ranking}<h2>Rejected</h2>{rejected}
<h2>Plots</h2>{imgs}</body></html>""")
    return path


def log_report_to_run(report: Report, tracking_uri: str, run_id: str, work_dir: Path | None = None) -> Path:
    """Log the ranking and rejections (mlflow tables), the HTML and the PNGs to `run_id`; returns the HTML."""
    import tempfile

    out = Path(work_dir or tempfile.mkdtemp(prefix="dolphin-report-"))
    plots = write_plots(report, out)
    page = write_html(report, out / "report.html", plots)
    tables = {"ranking": report.ranked, "rejected": report.rejected}
    log_report(tracking_uri, run_id, {k: v for k, v in tables.items() if not v.empty}, [page, *plots])
    return page
