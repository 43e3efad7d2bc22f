"""What a person reads at the end of a run: one row per config."""
from __future__ import annotations

from typing import TYPE_CHECKING

from rich.console import Console
from rich.table import Table

from tasks.track import ui_url

if TYPE_CHECKING:
    from flows.pipeline import PipelineOutcome
    from tasks.report import Report

# Logs and CI captures are not terminals; rich would fold the table to 80 columns there.
console = Console(width=None if Console().is_terminal else 170)


def _fmt(value: float | None, spec: str = ".1f") -> str:
    return "—" if value is None else format(value, spec)


def results_table(outcomes: list["PipelineOutcome"], title: str = "Dolphin results") -> Table:
    simulated = any(o.cfg.engine.kind == "sim" for o in outcomes)
    table = Table(
        title=title + (" — SIMULATED (sim engine: timings from the performance model)" if simulated else ""),
        show_lines=True,
    )
    for col, justify in [
        ("config", "left"), ("status", "left"), ("weights\nGiB", "right"), ("KV lower\nbound GiB", "right"),
        ("KV capacity\ntokens (GiB)", "right"), ("quant\nweights/KV", "left"), ("max QPS\n@ SLO", "right"),
        ("p99 TTFT\nms", "right"), ("p99 TPOT\nms", "right"), ("p99 E2EL\nms", "right"),
        ("$ / 1M\nout tok", "right"), ("MLflow\nrun", "left"),
    ]:
        table.add_column(col, justify=justify, overflow="fold")
    for o in outcomes:
        cfg, plan = o.cfg, (o.quant.plan if o.quant else None)
        best = None
        if o.bench and o.bench.best_level is not None:
            best = next(lv for lv in o.bench.levels if lv.index == o.bench.best_level)
        status = o.status if not o.error else f"{o.status}\n{o.error[:160]}"
        if o.bench and o.bench.best_level is None and o.bench.levels:
            lowest = min(lv.target_qps for lv in o.bench.levels)
            status += f"\nSLO never met (lowest QPS tried {lowest:.3g})"
        mlflow_cell = o.track.run_id[:8] if o.track else (o.reused_run_id or "—")[:8]
        if o.reused_run_id:
            status += "\nalready measured: see that run"
        table.add_row(
            f"{cfg.model.name}\n{cfg.gpu.name} × {cfg.deploy.num_gpus} · {cfg.deploy.mode} · {cfg.engine.kind}",
            status,
            _fmt(plan.weights_gib if plan else None),
            _fmt(plan.kv_lower_bound_gib if plan else None, ".2f"),
            f"{plan.kv_capacity_tokens:,} ({plan.kv_capacity_gib:.1f})" if plan else "—",
            f"{o.quant.weights_dtype}/{o.quant.kv_dtype}" if o.quant else "—",
            _fmt(o.bench.max_sustainable_qps if o.bench else None, ".2f"),
            _fmt(best.ttft_ms.p99 if best else None),
            _fmt(best.tpot_ms.p99 if best else None, ".2f"),
            _fmt(best.e2el_ms.p99 if best else None),
            _fmt(o.cost_per_mtok, ".3f"),
            mlflow_cell,
        )
    return table


def print_results(outcomes: list["PipelineOutcome"], title: str = "Dolphin results") -> None:
    console.print(results_table(outcomes, title))
    tracked = [o.track for o in outcomes if o.track]
    if tracked:
        console.print(f"MLflow store {tracked[0].tracking_uri}, experiment [bold]{tracked[0].experiment}[/bold]. "
                      "Browse it with [bold]dolphin ui[/bold], then:")
        for t in tracked:
            console.print(f"  {t.run_id[:8]} ({t.status.lower()}): "
                          + ui_url(t.tracking_uri, t.experiment_id, t.run_id), soft_wrap=True)


def report_tables(report: "Report") -> list[Table]:
    """The ranking (cheapest first, saving against the baseline) and the rejected configs with reasons."""
    sim = " — SIMULATED (sim engine: timings from the performance model)" if report.simulated else ""
    ranking = Table(title=f"Dolphin report: {report.experiment}{sim}", show_lines=False,
                    caption=f"{report.scope}; {report.baseline_note}")
    cols = [("#", "rank", "d"), ("config", "config", ""), ("max QPS\n/replica", "max_qps_per_replica", ".3g"),
            ("target\nQPS", "target_qps", ".3g"), ("replicas", "replicas", "d"), ("GPUs", "gpus", "d"),
            ("$ / h", "usd_per_hour", ",.2f"), ("$ / 1M out tok\n@ target", "usd_per_mtok_at_target", ".3f"),
            ("saving vs\nbaseline", "saving_vs_baseline_pct", "+.1f"), ("tok/s\n/GPU", "tok_s_per_gpu", ",.0f"),
            ("tok/s\n/user", "tok_s_per_user", ".1f"), ("p99 E2EL\nms", "e2el_ms_p99", ".0f"),
            ("MLflow\nrun", "run_id", "")]
    for head, *_ in cols:
        ranking.add_column(head, justify="left" if head in ("config", "MLflow\nrun") else "right")
    for row in report.ranked.to_dict(orient="records"):
        cells = []
        for head, key, spec in cols:
            v = row.get(key)
            if key == "run_id":
                cells.append(str(v)[:8])
            elif v is None or (isinstance(v, float) and v != v):
                cells.append("—")
            else:
                cells.append(format(int(v) if spec == "d" else v, spec) + ("%" if key.startswith("saving") else ""))
        ranking.add_row(*cells)
    rejected = Table(title="Rejected configs", show_lines=True)
    for col in ("config", "why", "MLflow run"):
        rejected.add_column(col, overflow="fold")
    for row in report.rejected.to_dict(orient="records"):
        rejected.add_row(row["config"], row["reason"][:300], row["run_id"][:8])
    return [ranking] + ([rejected] if len(report.rejected) else [])


def print_report(report: "Report") -> None:
    for table in report_tables(report):
        console.print(table)
