"""`dolphin bench URL --model M`: benchmark any OpenAI-compatible endpoint, one run (as `vllm bench serve`,
same flags where the concept matches, same result JSON keys) or an SLO search for the largest QPS that
holds the SLO (`--slo ... --search`)."""
from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from datetime import datetime
from functools import partial
from pathlib import Path

ENDPOINTS = {"/v1/completions": "completions", "/v1/chat/completions": "chat"}


def add_parser(sub) -> None:
    b = sub.add_parser("bench", help="benchmark an OpenAI-compatible endpoint (one run, or --slo --search)")
    b.add_argument("url", help="base URL, e.g. http://127.0.0.1:8000")
    b.add_argument("--model", required=True, help="the served model name to put in requests")
    b.add_argument("--endpoint", default="/v1/completions", choices=list(ENDPOINTS))
    b.add_argument("--label", help="result label (vLLM's --label; default the backend)")
    load = b.add_argument_group("load")
    load.add_argument("--request-rate", type=float, default=float("inf"), help="QPS; inf sends all at once")
    load.add_argument("--burstiness", type=float, default=1.0, help="gamma shape of the gaps; 1 = Poisson")
    load.add_argument("--arrivals", choices=["gamma", "constant"], default="gamma",
                      help="gamma (Poisson at burstiness 1) or evenly spaced")
    load.add_argument("--max-concurrency", type=int, help="at most this many requests in flight (closed loop)")
    load.add_argument("--num-prompts", type=int, help="requests (default 1000; a trace: all its rows; "
                                                       "with --search: requests per level, default 200)")
    load.add_argument("--warmup", "--num-warmups", dest="warmup", type=int, default=0,
                      help="sequential requests first, not recorded")
    load.add_argument("--seed", type=int, default=0)
    load.add_argument("--timeout-s", type=float, default=300.0, help="per request")
    data = b.add_argument_group("dataset")
    data.add_argument("--random-input-len", type=int, default=1024)
    data.add_argument("--random-output-len", type=int, default=128)
    data.add_argument("--random-range-ratio", type=float, default=0.0,
                      help="lengths uniform in [L(1-r), L(1+r)]")
    data.add_argument("--ignore-eos", action="store_true", help="ask for exactly the output length; "
                                                                 "the server's usage is then cross-checked")
    data.add_argument("--tokenizer", metavar="PATH", help="tokenizer.json (or its model dir) for exact token "
                                                          "counts; default Dolphin's word tokenizer")
    data.add_argument("--trace", metavar="FILE", help="replay a trace: arrivals and lengths from the file")
    data.add_argument("--trace-format", default="auto", choices=["auto", "azure", "mooncake", "csv", "jsonl",
                                                                 "parquet"])
    data.add_argument("--time-scale", type=float, default=1.0, help="replay the trace this many times faster")
    out = b.add_argument_group("metrics and output")
    out.add_argument("--goodput", nargs="+", metavar="KEY:VALUE", help="ms bounds on ttft, tpot, e2el")
    out.add_argument("--percentile-metrics", default="ttft,tpot,itl")
    out.add_argument("--metric-percentiles", default="99")
    out.add_argument("--max-lag-ms", type=float, default=10.0,
                     help="client send-lag p99 over this marks the run invalid (exit 1); <= 0 disables")
    out.add_argument("--save-result", action="store_true")
    out.add_argument("--save-detailed", action="store_true", help="keep per-request lists in the JSON")
    out.add_argument("--result-filename")
    out.add_argument("--result-dir")
    out.add_argument("--records", metavar="FILE", help="per-request records, .jsonl or .parquet")
    out.add_argument("--plots", metavar="DIR", help="PNG plots here")
    out.add_argument("--json", action="store_true", help="print the result JSON on stdout")
    out.add_argument("--quiet", "--disable-tqdm", dest="quiet", action="store_true", help="no live progress")
    slo = b.add_argument_group("SLO search")
    slo.add_argument("--slo", help="targets, e.g. ttft_ms_p99=500,e2el_ms_p99=2000[,goodput_pct=90]")
    slo.add_argument("--search", action="store_true", help="find the largest QPS that holds --slo")
    slo.add_argument("--tolerance", type=float, default=0.05, help="bisect to this relative QPS gap")
    slo.add_argument("--time-budget-s", type=float, help="start no level that would end past this")
    slo.add_argument("--start-qps", type=float, help="first level (default --request-rate if finite, else 1)")
    slo.add_argument("--growth", type=float, default=2.0)
    slo.add_argument("--max-levels", type=int, default=12)


# ---------------------------------------------------------------- argument checks
def parse_slo(text: str | None) -> tuple[dict[str, float], float | None]:
    """'ttft_ms_p99=500,goodput_pct=90' -> ({'ttft_ms_p99': 500.0}, 90.0)."""
    from tasks.bench.metrics import parse_target

    targets: dict[str, float] = {}
    goodput = None
    for item in filter(None, (t.strip() for t in (text or "").split(","))):
        key, sep, value = item.partition("=")
        try:
            bound = float(value)
        except ValueError:
            bound = float("nan")
        if not sep or not bound > 0:
            raise ValueError(f"--slo {item!r}: use KEY=VALUE with a positive value, e.g. ttft_ms_p99=500")
        if key == "goodput_pct":
            if bound > 100:
                raise ValueError(f"--slo {item!r}: goodput_pct is a share in (0, 100]")
            goodput = bound
        else:
            try:
                parse_target(key)
            except ValueError as exc:
                raise ValueError(f"--slo {item!r}: {exc}; or goodput_pct=<share>") from None
            targets[key] = bound
    return targets, goodput


def _floats(text: str, flag: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"{flag} {text!r}: use comma-separated numbers, e.g. 50,90,99") from None


def _check(args: argparse.Namespace) -> None:
    for flag in ("num_prompts", "max_concurrency", "random_input_len", "random_output_len", "max_levels"):
        v = getattr(args, flag)
        if v is not None and v < 1:
            raise ValueError(f"--{flag.replace('_', '-')} {v} must be >= 1")
    if not args.request_rate > 0:
        raise ValueError(f"--request-rate {args.request_rate} must be > 0 (inf: all at once)")
    if not args.burstiness > 0:
        raise ValueError(f"--burstiness {args.burstiness} must be > 0")
    if not 0 <= args.random_range_ratio < 1:
        raise ValueError(f"--random-range-ratio {args.random_range_ratio} must be in [0, 1)")
    if args.warmup < 0:
        raise ValueError(f"--warmup {args.warmup} must be >= 0")
    if args.search and not args.slo:
        raise ValueError("--search needs --slo, e.g. --slo ttft_ms_p99=500,e2el_ms_p99=2000")
    if args.search and (args.trace or args.max_concurrency):
        raise ValueError("--search sets the arrival rate itself: drop --trace / --max-concurrency")
    if not 0 < args.tolerance < 1:
        raise ValueError(f"--tolerance {args.tolerance} must be in (0, 1)")
    bad = set(args.percentile_metrics.split(",")) - {"ttft", "tpot", "itl", "e2el"}
    if bad:
        raise ValueError(f"--percentile-metrics: unknown {sorted(bad)}; use ttft,tpot,itl,e2el")
    pcts = _floats(args.metric_percentiles, "--metric-percentiles")
    if not pcts or any(not 0 < p <= 100 for p in pcts):
        raise ValueError(f"--metric-percentiles {args.metric_percentiles!r}: percentiles in (0, 100]")


# ---------------------------------------------------------------- dataset
def build_dataset(args: argparse.Namespace, n_default: int):
    """(requests, trace arrival offsets or None, tokenizer id)."""
    import numpy as np

    from tasks.dataset import build_requests
    from tasks.tokenizer import load_tokenizer

    tok = load_tokenizer(args.tokenizer)
    tokenizer_id = args.tokenizer or args.model
    if args.trace:
        from tasks.bench.single import trace_offsets
        from tasks.trace import read_trace

        df = read_trace(args.trace, args.trace_format)
        n = min(args.num_prompts or len(df), len(df))
        rows = df.iloc[:n]
        hashes = rows["hash_ids"].tolist() if "hash_ids" in rows.columns else None
        reqs = build_requests(rows["input_tokens"].to_numpy(), rows["output_tokens"].to_numpy(), args.seed,
                              hash_ids=hashes, tokenizer=tok)
        return reqs, trace_offsets(df, n, args.time_scale), tokenizer_id
    n = args.num_prompts or n_default
    rng = np.random.default_rng(args.seed)
    r = args.random_range_ratio

    def lengths(mean: int) -> np.ndarray:
        lo, hi = max(1, int(mean * (1 - r))), max(1, int(mean * (1 + r)))
        return rng.integers(lo, hi + 1, size=n)

    reqs = build_requests(lengths(args.random_input_len), lengths(args.random_output_len), args.seed,
                          tokenizer=tok)
    return reqs, None, tokenizer_id


# ---------------------------------------------------------------- outputs
def _write_outputs(args, result: dict, records, plots: list[Path]) -> int:
    from tasks.bench.report import result_filename, write_records

    if args.records:
        result["dolphin"]["records_path"] = str(write_records(records, args.records))
    result["dolphin"]["plots"] = [str(p) for p in plots]
    if args.save_result:
        name = args.result_filename or result_filename(ENDPOINTS[args.endpoint], args.request_rate,
                                                       args.max_concurrency, args.model, args.label,
                                                       result["date"])
        path = Path(args.result_dir, name) if args.result_dir else Path(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result))
        result["dolphin"]["result_path"] = str(path)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        _print_summary(result)
    if not result["dolphin"]["valid"]:
        print(f"dolphin bench: INVALID run: {result['dolphin']['invalid_reason']}", file=sys.stderr)
        return 1
    return 0


def _print_summary(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    d = result["dolphin"]
    table = Table(title="Serving benchmark" + ("" if d["valid"] else " — INVALID"), show_header=False)
    rows = [("successful / failed", f"{result['completed']} / {result['failed']}"),
            ("duration (s)", f"{result['duration']:.2f}"),
            ("request throughput (req/s)", f"{result['request_throughput']:.2f}"),
            ("output throughput (tok/s)", f"{result['output_throughput']:.1f}")]
    if result["request_goodput"] is not None:
        rows.append(("request goodput (req/s)", f"{result['request_goodput']:.2f}"))
    for metric, stats in d["percentiles_ms"].items():
        rows.append((f"{metric.upper()} ms", "  ".join(f"{k} {v:.2f}" for k, v in stats.items())))
    rows += [("send lag p99 (ms)", f"{d['send_lag_ms']['p99']:.2f}"),
             ("error classes", json.dumps(d["error_classes"]) if d["error_classes"] else "none")]
    if d.get("usage_mismatches"):
        rows.append(("usage mismatches", json.dumps(d["usage_mismatches"])))
    if "search" in d:
        s = d["search"]
        rows.append(("max sustainable QPS", f"{s['max_sustainable_qps']:.3g}"))
        for lv in s["levels"]:
            cis = "; ".join(f"{k} {c['value_ms']:.0f} [{c['ci_low_ms']:.0f}, {c['ci_high_ms']:.0f}]"
                            for k, c in lv["ci"].items())
            rows.append((f"level {lv['index']} @ {lv['target_qps']:.3g} QPS",
                         ("holds" if lv["slo_met"] else "violated: " + "; ".join(lv["violations"])) +
                         f" — {cis}"))
        rows += [("note", n) for n in s["notes"]]
    for k, v in rows:
        table.add_row(k, v)
    Console(width=None if Console().is_terminal else 160).print(table)


# ---------------------------------------------------------------- runs
def _result_kwargs(args, tokenizer_id: str, n: int) -> dict:
    from tasks.bench.report import parse_goodput

    return dict(endpoint=ENDPOINTS[args.endpoint], model_id=args.model, tokenizer_id=tokenizer_id, num_prompts=n,
                request_rate=args.request_rate, burstiness=args.burstiness, max_concurrency=args.max_concurrency,
                goodput=parse_goodput(args.goodput), percentile_metrics=args.percentile_metrics.split(","),
                metric_percentiles=_floats(args.metric_percentiles, "--metric-percentiles"), label=args.label,
                detailed=args.save_detailed, max_lag_ms=args.max_lag_ms if args.max_lag_ms > 0 else None,
                ignore_eos=args.ignore_eos)


def _single(args, targets: dict[str, float], goodput_pct: float | None) -> int:
    from tasks.bench.metrics import summarize_level
    from tasks.bench.report import plot_latency_hist, plot_ttft_cdf, vllm_result
    from tasks.bench.single import arrival_offsets, run_once

    reqs, offsets, tokenizer_id = build_dataset(args, 1000)
    if offsets is None:
        offsets = arrival_offsets(len(reqs), args.request_rate, args.burstiness, args.seed, args.arrivals)
    run = run_once(args.url.rstrip("/").removesuffix("/v1"), args.model, reqs, offsets,
                   endpoint=ENDPOINTS[args.endpoint], max_concurrency=args.max_concurrency,
                   warmup_requests=args.warmup, timeout_s=args.timeout_s, ignore_eos=args.ignore_eos,
                   quiet=args.quiet)
    kwargs = _result_kwargs(args, tokenizer_id, len(reqs))
    # Everything scheduled at 0 with no concurrency cap: the lag is the burst's own length, not a fault.
    open_burst = math.isinf(args.request_rate) and not args.trace and not args.max_concurrency
    if open_burst:
        kwargs["max_lag_ms"] = None
    extra = {"trace": args.trace, "time_scale": args.time_scale if args.trace else None}
    if targets:
        level = summarize_level(0, len(reqs) / run.duration_s if run.duration_s else 0.0, run.records,
                                run.duration_s, targets, min_goodput_pct=goodput_pct)
        extra["slo"] = {"targets": targets, "goodput_pct": goodput_pct, "slo_met": level.slo_met,
                        "violations": level.violations}
    result = vllm_result(run.records, run.duration_s, extra=extra, **kwargs)
    if open_burst:
        result["dolphin"]["lag_check"] = "skipped: --request-rate inf schedules every request at 0"
    plots = []
    if args.plots:
        ok_ttft = [r.ttft_s * 1e3 for r in run.records if r.ok]
        plots = [plot_ttft_cdf({"run": ok_ttft}, Path(args.plots) / "ttft_cdf.png"),
                 plot_latency_hist(run.records, Path(args.plots) / "latency_hist.png")]
    return _write_outputs(args, result, run.records, plots)


def _search(args, targets: dict[str, float], goodput_pct: float | None) -> int:
    import numpy as np

    from tasks.bench.client import load_records
    from tasks.bench.load import constant_arrivals, gamma_arrivals
    from tasks.bench.metrics import lag_verdict, send_lag_p99_ms, target_cis
    from tasks.bench.report import plot_ttft_cdf, vllm_result
    from tasks.bench.search import SearchOptions, run_slo_search
    from tasks.config import BenchConfig, SLOConfig
    from tasks.contracts import Endpoint
    from tasks.plots import plot_latency_vs_qps

    reqs, _, tokenizer_id = build_dataset(args, 200)
    start = args.start_qps or (args.request_rate if math.isfinite(args.request_rate) else 1.0)
    bench = BenchConfig(endpoint=ENDPOINTS[args.endpoint], requests_per_level=max(10, len(reqs)),
                        warmup_requests=args.warmup, start_qps=start, growth=args.growth,
                        max_levels=args.max_levels, bisect_tolerance=args.tolerance,
                        request_timeout_s=args.timeout_s, seed=args.seed)
    arrivals = (constant_arrivals if args.arrivals == "constant"
                else partial(gamma_arrivals, shape=args.burstiness))
    opts = SearchOptions(arrivals=arrivals, time_budget_s=args.time_budget_s, ignore_eos=args.ignore_eos,
                         min_goodput_pct=goodput_pct)
    endpoint = Endpoint(engine="external", deploy="external", base_url=args.url.rstrip("/").removesuffix("/v1"),
                        model_name=args.model, commands=[], log_paths=[], pids=[], simulated=False)
    out_dir = Path(args.result_dir or tempfile.mkdtemp(prefix="dolphin-bench-"))
    bench_result = run_slo_search(endpoint, reqs, bench, SLOConfig(targets=targets), out_dir, quiet=args.quiet,
                                  options=opts)
    records = load_records(bench_result.records_path)
    by_level = {lv.index: [r for r in records if r.level == lv.index] for lv in bench_result.levels}
    max_lag = args.max_lag_ms if args.max_lag_ms > 0 else None
    levels = []
    for lv in bench_result.levels:
        recs = by_level[lv.index]
        levels.append({**lv.model_dump(), "ci": target_cis(recs, targets, seed=args.seed),
                       "send_lag_p99_ms": send_lag_p99_ms(recs), "invalid_reason": lag_verdict(recs, max_lag)})
    best = bench_result.best_level
    shown = by_level[best] if best is not None else records
    shown_level = next((lv for lv in bench_result.levels if lv.index == best), None)
    kwargs = _result_kwargs(args, tokenizer_id, len(shown))
    kwargs["request_rate"] = shown_level.target_qps if shown_level else args.request_rate
    search = {"slo": targets, "goodput_pct": goodput_pct, "max_sustainable_qps": bench_result.max_sustainable_qps,
              "best_level": best, "tolerance": args.tolerance, "levels": levels, "notes": opts.notes,
              "records_path": bench_result.records_path}
    duration = shown_level.duration_s if shown_level else 0.0
    result = vllm_result(shown, duration, extra={"search": search}, **kwargs)
    plots = []
    if args.plots:
        plots.append(plot_latency_vs_qps(bench_result, Path(args.plots) / "latency_vs_qps.png", targets))
        series = {f"{lv.target_qps:.3g} qps": np.array([r.ttft_s * 1e3 for r in by_level[lv.index] if r.ok])
                  for lv in sorted(bench_result.levels, key=lambda lv: lv.target_qps)}
        ttft_bounds = [b for k, b in targets.items() if k.startswith("ttft_")]
        plots.append(plot_ttft_cdf(series, Path(args.plots) / "ttft_cdf.png", min(ttft_bounds, default=None)))
    return _write_outputs(args, result, records, plots)


def run(args: argparse.Namespace) -> int:
    _check(args)
    targets, goodput_pct = parse_slo(args.slo)
    if args.search and not targets:
        raise ValueError("--search needs at least one <metric>_ms_p<q> target in --slo")
    started = datetime.now()
    code = (_search if args.search else _single)(args, targets, goodput_pct)
    if not args.json and not args.quiet:
        print(f"dolphin bench: {(datetime.now() - started).total_seconds():.1f} s", file=sys.stderr)
    return code
