"""`dolphin` command line. Thin: each command composes stages from `tasks/` or calls the flow."""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time

# Before Prefect is imported: its ephemeral server needs time to start on small machines, and sends no
# analytics from ours. Users' own settings win.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


def _sigterm_as_exit(signum, frame):  # noqa: ARG001 - signal handler signature
    raise SystemExit(128 + signum)  # unwinds like Ctrl-C, so every `finally` stops its engines


def cmd_run(argv: list[str]) -> int:
    """Run the pipeline; everything after `run` is Hydra's (overrides, -m, --cfg job, ...)."""
    from flows import hydra_app

    sys.argv = ["dolphin"] + argv
    try:
        hydra_app.main()
    finally:
        hydra_app.finish_parent_run(failed=True)  # no-op unless a sweep aborted before its end callback
    if not hydra_app.OUTCOMES:  # --help, --cfg job, ...: Hydra ran no job
        return 0
    return 0 if hydra_app.all_answered(hydra_app.OUTCOMES, hydra_app.IN_SWEEP) else 1


def compose(overrides: list[str]):
    """The resolved config for overrides, without running Hydra's job machinery."""
    from hydra import compose as hydra_compose, initialize_config_dir
    from omegaconf import OmegaConf

    from tasks.config import load_config
    from tasks.paths import CONF_DIR, register_resolvers

    register_resolvers()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = hydra_compose("config", overrides=overrides)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    return resolved, load_config(resolved)


def cmd_plan(args: argparse.Namespace) -> int:
    """Stages 1-3 and the predicted capacity, no launch."""
    from rich.console import Console
    from rich.table import Table

    from tasks.kv import kv_task
    from tasks.perf_model import PerfModel
    from tasks.profile import profile_task
    from tasks.quantize import check_quant, quant_task

    _, cfg = compose(args.overrides)
    check_quant(cfg.quant, cfg.gpu)
    profile = profile_task.fn(cfg.workload, cfg.slo, None)
    plans = kv_task.fn(cfg.model, cfg.gpu, cfg.deploy, cfg.quant, profile, cfg.slo)
    choice = quant_task.fn(plans, cfg.gpu, cfg.quant)
    plan = choice.plan
    model = PerfModel(cfg.model, cfg.gpu, choice.weights_dtype, choice.kv_dtype, tp=plan.tp,
                      step_overhead_s=cfg.engine.step_overhead_ms / 1000)
    capacity = model.capacity_qps(profile.input_tokens.mean, profile.output_tokens.mean,
                                  plan.knobs.max_num_seqs, plan.kv_capacity_tokens)
    if args.json:
        print(json.dumps({"quant": choice.model_dump(), "predicted_capacity_qps": capacity,
                          "workload": profile.model_dump(exclude={"length_pairs"})}, indent=2))
        return 0 if plan.feasible else 2
    table = Table(title=f"Plan: {cfg.model.name} on {cfg.gpu.display_name}, {cfg.deploy.mode}", show_header=False)
    rows = [
        ("workload", f"{profile.source}: {profile.requests:,} requests, {profile.mean_qps:.2f} QPS mean, "
                     f"input p99 {profile.input_tokens.p99:.0f}, output p99 {profile.output_tokens.p99:.0f}"),
        ("quantization", f"weights {choice.weights_dtype}, KV {choice.kv_dtype} — {choice.reason}"),
        *[("rejected", f"{r.candidate}: {r.reason}") for r in choice.rejected],
        ("weights", f"{plan.weights_gib:.2f} GiB total, TP {plan.tp}"),
        ("activation reserve", f"{plan.activation_reserve_gib:.2f} GiB per GPU"),
        ("KV per token", f"{plan.kv_bytes_per_token:,.0f} B per GPU"),
        ("KV capacity", f"{plan.kv_capacity_tokens:,} tokens ({plan.kv_capacity_gib:.2f} GiB per GPU)"),
        ("KV lower bound", f"{plan.kv_lower_bound_gib:.2f} GiB for {plan.target_concurrency} concurrent "
                           f"requests at the p99 context of {plan.p99_context_tokens} tokens"),
        ("verdict", ("feasible: " if plan.feasible else "INFEASIBLE: ") + plan.reason),
        ("engine knobs", ", ".join(f"{k}={v}" for k, v in plan.knobs.model_dump().items())),
        ("predicted capacity", f"~{capacity:.1f} QPS (rough upper bound from the performance model)"),
    ]
    for k, v in rows:
        table.add_row(k, v)
    Console().print(table)
    return 0 if plan.feasible else 2


def cmd_profile(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from tasks.profile import profile_trace, read_trace

    columns = dict(kv.split("=", 1) for kv in args.column)
    df = read_trace(args.trace, args.format, columns or None)
    profile = profile_trace(df, source=str(args.trace))
    data = profile.model_dump(exclude={"length_pairs", "shared_prefix_len"})
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    table = Table(title=f"Workload profile: {args.trace}", show_header=False)
    for key, value in data.items():
        if isinstance(value, dict):
            value = "  ".join(f"{k} {v:,.1f}" for k, v in value.items())
        elif isinstance(value, float):
            value = f"{value:,.3f}"
        table.add_row(key, str(value))
    Console().print(table)
    return 0


def cmd_ui(args: argparse.Namespace) -> int:
    """Serve the MLflow UI on the project's store until Ctrl-C."""
    from tasks.launch import start_process, wait_for_http
    from tasks.paths import home

    _, cfg = compose(args.overrides)
    log = home() / "artifacts" / "mlflow-ui.log"
    argv = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", cfg.tracking.uri,
            "--host", args.host, "--port", str(args.port)]
    if cfg.tracking.artifact_location:
        argv += ["--default-artifact-root", cfg.tracking.artifact_location]
    # MLflow's job runner would leave child processes behind.
    proc = start_process("mlflow-ui", argv, log, env={"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    try:
        url = f"http://{args.host}:{args.port}"
        wait_for_http(proc, f"{url}/health", timeout_s=60)
        print(f"MLflow UI: {url}  (store {cfg.tracking.uri}; Ctrl-C stops it)", flush=True)
        while proc.alive():
            time.sleep(0.5)
        return proc.popen.returncode or 0
    except KeyboardInterrupt:
        return 0
    finally:
        proc.stop()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dolphin", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("run", help="run the pipeline: dolphin run [hydra overrides] (-m to sweep)", add_help=False)

    plan = sub.add_parser("plan", help="profile, memory plan, quantization and predicted capacity; no launch")
    plan.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. gpu=a10 model=llama-3.1-70b")
    plan.add_argument("--json", action="store_true")

    prof = sub.add_parser("profile", help="profile a trace file (Azure CSV, Mooncake JSONL, generic)")
    prof.add_argument("trace")
    prof.add_argument("--format", default="auto", choices=["auto", "azure", "mooncake", "csv", "jsonl", "parquet"])
    prof.add_argument("--column", action="append", default=[], metavar="OURS=THEIRS",
                      help="map a column: arrival=, input=, output=, hash_ids=")
    prof.add_argument("--json", action="store_true")

    ui = sub.add_parser("ui", help="serve the MLflow UI on 127.0.0.1")
    ui.add_argument("overrides", nargs="*", help="Hydra overrides selecting the tracking store")
    ui.add_argument("--host", default="127.0.0.1")
    ui.add_argument("--port", type=int, default=5000)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    signal.signal(signal.SIGTERM, _sigterm_as_exit)
    if argv[:1] == ["run"]:
        return cmd_run(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return {"plan": cmd_plan, "profile": cmd_profile, "ui": cmd_ui}[args.command](args)
    except (ValueError, FileNotFoundError) as exc:  # config and input errors: say what, no traceback
        print(f"dolphin {args.command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
