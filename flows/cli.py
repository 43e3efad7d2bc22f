"""`dolphin` command line. Thin: each command composes stages from `tasks/` or calls the flow."""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from importlib import import_module

# Before Prefect is imported: its ephemeral server needs time to start on small machines, and sends no
# analytics from ours. Users' own settings win.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


def _sigterm_as_exit(signum, frame):  # noqa: ARG001 - signal handler signature
    raise SystemExit(128 + signum)  # unwinds like Ctrl-C, so every `finally` stops its engines


def host_gpu_default(argv: list[str]) -> list[str]:
    """`dolphin run engine=vllm ...` without gpu= (nor an experiment, which picks its own) on a host with no
    NVIDIA GPU measures vLLM's CPU build on this CPU: the cpu_smoke preset (gpu=cpu, tiny-llama, short
    synthetic requests, 1 GiB of KV), under the user's other overrides; and say so. The default workload
    (the Azure code trace, 7k-token prompts) would take hours on a CPU. An explicit gpu= is kept (and
    refused before launch if this host lacks it)."""
    from tasks.launch import host_has_nvidia_gpu

    keys = {a.split("=", 1)[0].lstrip("+~") for a in argv if "=" in a}
    engines = {v for a in argv if a.split("=", 1)[0].lstrip("+") == "engine" for v in a.split("=", 1)[1].split(",")}
    if keys & {"gpu", "experiment"} or not engines & {"vllm", "vllm_cpu"} or host_has_nvidia_gpu():
        return argv
    print("dolphin run: this host has no NVIDIA GPU, so the real vLLM runs on its CPU with the cpu_smoke preset "
          "(experiment=cpu_smoke: gpu=cpu, vLLM's CPU build from `make engines`, tiny-llama, short requests); "
          "give gpu=... to plan for a GPU instead", file=sys.stderr)
    # Beside the other overrides: Hydra's parser takes them as one run of positionals (not after --cfg job).
    first = next(i for i, a in enumerate(argv) if "=" in a and not a.startswith("-"))
    return [*argv[:first], "experiment=cpu_smoke", *argv[first:]]


def cmd_run(argv: list[str]) -> int:
    """Run the pipeline; everything after `run` is Hydra's (overrides, -m, --cfg job, ...)."""
    from flows import hydra_app

    sys.argv = ["dolphin"] + host_gpu_default(argv)
    try:
        hydra_app.main()
    finally:
        hydra_app.finish_parent_run(failed=True)  # no-op unless a sweep aborted before its end callback
    if not hydra_app.OUTCOMES:  # --help, --cfg job, or a parallel launcher ran the jobs elsewhere
        return 0 if hydra_app.SWEEP_ANSWERED is not False else 1
    return 0 if hydra_app.all_answered(hydra_app.OUTCOMES, hydra_app.IN_SWEEP) else 1


def compose(overrides: list[str]):
    """(the resolved config to measure, its validated DolphinConfig) for overrides."""
    from tasks.compose import compose_config, split_run_control
    from tasks.config import load_config

    resolved, _ = split_run_control(compose_config(overrides))
    return resolved, load_config(resolved)


def _perf_backend(cfg) -> str:
    """Whose scheduler and host costs the prediction plays (the sim engine plays SIM_BACKEND's)."""
    from tasks.engines.sim_spec import SIM_BACKEND

    return cfg.engine.kind if cfg.engine.kind in ("vllm", "sglang") else SIM_BACKEND


def _predict_plan(cfg, choice, plan, profile, qps: float):
    """Predicted TTFT/TPOT/throughput of the planned deployment at `qps` (tasks/perf_plan.py)."""
    from tasks.perf_model import PerfModel
    from tasks.perf_plan import predict_agg, predict_disagg

    backend = _perf_backend(cfg)
    overhead = cfg.engine.step_overhead_ms / 1000

    def perf(tp: int) -> PerfModel:
        return PerfModel(cfg.model, cfg.gpu, choice.weights_dtype, choice.kv_dtype, tp=tp, step_overhead_s=overhead,
                         backend=backend)

    mean_in, mean_out = profile.input_tokens.mean, profile.output_tokens.mean
    deploy = cfg.deploy
    if deploy.mode == "pd":
        return predict_disagg(perf(deploy.prefill.tp), perf(deploy.decode.tp), backend, qps, mean_in, mean_out,
                              deploy.prefill.instances, deploy.decode.instances)
    spec, caveat = _plan_spec(deploy, perf(plan.tp), overhead, backend)
    out = predict_agg(perf(plan.tp), backend, qps, mean_in, mean_out,
                      max_num_batched_tokens=plan.knobs.max_num_batched_tokens, max_num_seqs=plan.knobs.max_num_seqs,
                      kv_capacity_tokens=plan.kv_capacity_tokens, replicas=deploy.replicas, spec=spec)
    out.note = "; ".join(filter(None, (out.note, caveat)))
    return out


def _plan_spec(deploy, target, step_overhead_s: float, backend: str):
    """(the deployment's speculative decoding as the performance model costs it, a caveat)."""
    from tasks.perf_rows import catalogue_model
    from tasks.perf_spec import speculation

    return speculation(deploy.spec_method if deploy.mode == "spec" else None, deploy.num_speculative_tokens,
                       deploy.acceptance_rate, target, catalogue_model(deploy.draft_model),
                       step_overhead_s, backend=backend, verify_tokens=deploy.num_draft_tokens)


def cmd_plan(args: argparse.Namespace) -> int:
    """Stages 1-3 and the predicted capacity, no launch."""
    from rich.console import Console
    from rich.table import Table

    from tasks.kv import kv_task
    from tasks.perf_model import PerfModel
    from tasks.profile import profile_task
    from tasks.quantize import check_quant, quant_task

    _, cfg = compose(args.overrides)
    check_quant(cfg.quant, cfg.gpu, cfg.quality)
    profile = profile_task.fn(cfg.workload, cfg.slo, None)
    plans = kv_task.fn(cfg.model, cfg.gpu, cfg.deploy, cfg.quant, cfg.quality, profile, cfg.slo, cfg.memory)
    choice = quant_task.fn(plans, cfg.gpu, cfg.quant, cfg.model, cfg.quality)
    plan = choice.plan
    model = PerfModel(cfg.model, cfg.gpu, choice.weights_dtype, choice.kv_dtype, tp=plan.tp,
                      step_overhead_s=cfg.engine.step_overhead_ms / 1000, backend=_perf_backend(cfg))
    capacity = model.capacity_qps(profile.input_tokens.mean, profile.output_tokens.mean,
                                  plan.knobs.max_num_seqs, plan.kv_capacity_tokens)
    target_qps = cfg.slo.target_qps or profile.mean_qps
    predicted = _predict_plan(cfg, choice, plan, profile, target_qps) if plan.feasible else None
    if args.show_commands:
        from tasks.engines.commands import build_launch_specs, engine_for_device, format_commands

        if cfg.engine.kind == "sim":
            raise ValueError("engine=sim is Dolphin's own process; use engine=vllm or engine=sglang with "
                             "--show-commands to see a real engine's command lines")
        cores = sorted(os.sched_getaffinity(0)) if cfg.gpu.device == "cpu" else None  # as the launch splits them
        engine = engine_for_device(cfg.engine, cfg.gpu.device)
        specs = build_launch_specs(cfg.model, cfg.deploy, choice, engine, vllm_version=cfg.engine.vllm_version,
                                   cpu_cores=cores)
        print(format_commands(specs), end="")
        return 0 if plan.feasible else 2
    if args.json:
        print(json.dumps({"quant": choice.model_dump(), "predicted_capacity_qps": capacity,
                          "predicted": None if predicted is None else {"target_qps": target_qps, **vars(predicted)},
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
        ("smallest TP that fits", str(plan.min_tp) if plan.min_tp else "none up to 8"),
        ("engine knobs", ", ".join(f"{k}={v}" for k, v in plan.knobs.model_dump().items())),
        ("quantization flags", f"vLLM: {' '.join(choice.vllm_args) or '(none)'}; "
                               f"SGLang: {' '.join(choice.sglang_args) or '(none)'}"),
        ("predicted capacity", f"~{capacity:.1f} QPS (rough upper bound from the performance model)"),
    ]
    if predicted is not None:
        rows.append((f"predicted at {target_qps:.2f} QPS",
                     f"TTFT {predicted.ttft_ms:,.0f} ms, TPOT {predicted.tpot_ms:.1f} ms, "
                     f"{predicted.output_tok_s:,.0f} output tok/s" + (f" ({predicted.note})" if predicted.note else "")))
        if args.explain:
            for name, parts in (("TTFT", predicted.ttft_parts_ms), ("TPOT", predicted.tpot_parts_ms)):
                rows.append((f"  {name} split", ", ".join(f"{k} {v:,.1f} ms" for k, v in parts.items())
                             or "(no split for this mode)"))
    for k, v in rows:
        table.add_row(k, v)
    Console().print(table)
    return 0 if plan.feasible else 2


def cmd_profile(args: argparse.Namespace) -> int:
    """Profile one trace file: a table, or the profile as JSON; PNG plots with --plots."""
    from pathlib import Path

    from rich.console import Console
    from rich.table import Table

    from tasks.profile_stats import plot_profile, profile_trace
    from tasks.trace import read_trace_with_bad_rows

    bad_maps = [kv for kv in args.column if "=" not in kv]
    if bad_maps:
        raise ValueError(f"--column {bad_maps[0]!r} is not OURS=THEIRS, e.g. --column input=prompt_tokens")
    if (args.ttft_ms is None) != (args.tpot_ms is None):
        raise ValueError("--ttft-ms and --tpot-ms go together: give both for the per-token latency model, "
                         "or neither for the fixed --e2el-s")
    columns = dict(kv.split("=", 1) for kv in args.column)
    df, bad = read_trace_with_bad_rows(args.trace, args.format, columns or None, args.max_bad_fraction)
    per_token = args.tpot_ms is not None
    profile = profile_trace(df, source=str(args.trace), latency_s=args.e2el_s, bad_rows=bad,
                            ttft_s=args.ttft_ms / 1e3 if per_token else None,
                            tpot_s=args.tpot_ms / 1e3 if per_token else None)
    plots = plot_profile(df, Path(args.plots)) if args.plots else []
    data = profile.model_dump(exclude={"length_pairs", "shared_prefix_len"})
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    lines, reasons = data.pop("bad_row_lines"), data.pop("bad_row_reasons")
    if bad.count:
        shown = ", ".join(f"line {n} ({why})" for n, why in zip(lines, reasons))
        data["bad_rows"] = (f"{bad.count:,} of {bad.rows:,} rows dropped ({bad.fraction:.2%}): {shown}"
                            + (" ..." if bad.count > len(lines) else ""))
    table = Table(title=f"Workload profile: {args.trace}", show_header=False)
    for key, value in data.items():
        if isinstance(value, dict):
            value = "  ".join(f"{k} {v:,.1f}" for k, v in value.items())
        elif isinstance(value, float):
            value = f"{value:,.3f}"
        table.add_row(key, "-" if value is None else str(value))
    for path in plots:
        table.add_row("plot", str(path))
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
        from tasks.track import latest_sweeps, ui_url

        for exp_name, exp_id, run_id in latest_sweeps(cfg.tracking.uri):  # where a sweep's report is
            print(f"  latest sweep of {exp_name}: {ui_url(cfg.tracking.uri, exp_id, run_id, args.host, args.port)}"
                  " (ranking and report.html under Artifacts > report)", flush=True)
        while proc.alive():
            time.sleep(0.5)
        return proc.popen.returncode or 0
    except KeyboardInterrupt:
        return 0
    finally:
        proc.stop()


# Commands that live in their own module (flows/<name>.py with add_parser(sub) and run(args)); the
# subcommand name is the one the module's add_parser registers.
COMMAND_MODULES = ("kv_command", "report_command", "deploy_command", "bench_command", "predict_command")


def _command_modules():
    return [import_module(f"flows.{name}") for name in COMMAND_MODULES]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dolphin", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("run", help="run the pipeline: dolphin run [hydra overrides] (-m to sweep)", add_help=False)

    plan = sub.add_parser("plan", help="profile, memory plan, quantization and predicted capacity; no launch")
    plan.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. gpu=a10 model=llama-3.1-70b")
    plan.add_argument("--json", action="store_true")
    plan.add_argument("--explain", action="store_true",
                      help="split predicted TTFT and TPOT into compute, memory, comm, overhead and queueing")
    plan.add_argument("--show-commands", action="store_true",
                      help="print the engine command lines, environment and router command (engine=vllm|sglang)")

    prof = sub.add_parser("profile", help="profile a trace file (Azure CSV, Mooncake JSONL, generic)")
    prof.add_argument("trace")
    prof.add_argument("--format", default="auto", choices=["auto", "azure", "mooncake", "csv", "jsonl", "parquet"])
    prof.add_argument("--column", action="append", default=[], metavar="OURS=THEIRS",
                      help="map a column: arrival=, input=, output=, hash_ids=, or arrival_unit=s|ms|us|ns")
    prof.add_argument("--json", action="store_true")
    prof.add_argument("--e2el-s", type=float, default=2.0,
                      help="every request's latency (s) for peak and Little's-law concurrency (default 2.0)")
    prof.add_argument("--ttft-ms", type=float, help="with --tpot-ms: latency = TTFT + TPOT x (output - 1)")
    prof.add_argument("--tpot-ms", type=float, help="with --ttft-ms; replaces --e2el-s")
    from tasks.config import WorkloadConfig  # the default lives in the config schema

    max_bad = WorkloadConfig.model_fields["max_bad_row_fraction"].default
    prof.add_argument("--max-bad-fraction", type=float, default=max_bad,
                      help=f"reject the trace past this share of bad rows (default {max_bad:g}, "
                           f"workload.max_bad_row_fraction)")
    prof.add_argument("--plots", metavar="DIR", help="write length histograms and QPS over time as PNGs here")

    for module in _command_modules():
        module.add_parser(sub)

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
    commands = {"plan": cmd_plan, "profile": cmd_profile, "ui": cmd_ui}
    commands.update({args.command: module.run for module in _command_modules()
                     if args.command == module.__name__.rsplit(".", 1)[-1].removesuffix("_command")})
    try:
        return commands[args.command](args)
    except (ValueError, FileNotFoundError) as exc:  # config and input errors: say what, no traceback
        print(f"dolphin {args.command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
