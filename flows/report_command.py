"""`dolphin report`: rank an experiment's configs by cost at the target QPS while holding the SLO."""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="rank an experiment's configs by $ per 1M output tokens at the target QPS")
    p.add_argument("overrides", nargs="*", help="Hydra overrides selecting the store and the default "
                   "experiment, e.g. experiment=long_context_rag or tracking.uri=...")
    p.add_argument("--experiment", help="MLflow experiment (default: the config's tracking.experiment)")
    p.add_argument("--parent", metavar="RUN_ID", help="a sweep's parent run (default: the latest sweep)")
    p.add_argument("--all", action="store_true", help="rank every config run of the experiment, not one sweep")
    p.add_argument("--baseline", metavar="KEY=VAL,...", help="the config savings are against, e.g. "
                   "gpu=h100,deploy=agg,quant=fp16 (default: 16-bit, agg, largest-memory GPU)")
    p.add_argument("--target-qps", type=float, help="cost at this QPS (default: each run's slo.target_qps, "
                   "or its workload's mean QPS)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--html", metavar="PATH", help="write the self-contained HTML report (plots embedded) here")


def run(args: argparse.Namespace) -> int:
    from flows.cli import compose
    from flows.console import print_report
    from tasks.report import build_report, parse_baseline, write_html, write_plots

    if args.target_qps is not None and args.target_qps <= 0:
        raise ValueError("--target-qps must be positive")
    _, cfg = compose(args.overrides)
    report = build_report(cfg.tracking.uri, args.experiment or cfg.tracking.experiment, parent_run_id=args.parent,
                          all_runs=args.all, baseline=parse_baseline(args.baseline), target_qps=args.target_qps)
    if args.html:
        with tempfile.TemporaryDirectory() as tmp:  # the PNGs end up inside the HTML
            write_html(report, Path(args.html), write_plots(report, Path(tmp)))
    if args.json:
        print(json.dumps(report.to_json(), indent=2, default=str))
    else:
        print_report(report)
        if args.html:
            print(f"HTML report: {Path(args.html).resolve()}")
    return 0
