"""Do `dolphin bench` and `vllm bench serve` measure the same thing? One real vLLM CPU server (tiny-llama),
the same request set through both clients, one after the other: random prompts of the same input length
(each client's own random dataset), the same output length with ignore_eos, the same concurrency cap and
arrivals at once, --repeats times interleaved. Prints the medians of TTFT, TPOT and E2EL side by side.
With --pin (the default on 2+ cores) the server runs on the last core and each client on core 0, so that
neither client's own CPU use slows the server it measures: on a shared 2-core host that interference,
not the metric definitions, dominates the differences.

Run it alone (2 cores): flock /tmp/dolphin-cpu.lock .venv/bin/python benchmarks/bench_agreement.py
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from _paths import DOLPHIN, TINY_LLAMA as MODEL, VLLM
from tasks.bench.engine_metrics import level_telemetry, snapshot
from tasks.launch import free_ports, start_process, wait_for_http

ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "auto", "VLLM_HOST_IP": "127.0.0.1",
       "HF_HUB_OFFLINE": "1"}
METRICS = ("ttft", "tpot", "e2el")


def _client_prefix(args) -> list[str]:
    return ["taskset", "-c", "0"] if args.pin else []


def run_dolphin(url: str, args, out: Path) -> dict:
    cmd = [*_client_prefix(args), str(DOLPHIN), "bench", url, "--model", "tiny-llama", "--tokenizer", str(MODEL),
           "--num-prompts", str(args.num_prompts), "--random-input-len", str(args.input_len), "--random-output-len",
           str(args.output_len), "--ignore-eos", "--max-concurrency", str(args.max_concurrency), "--seed", "0",
           "--warmup", "2", "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,99",
           "--json", "--quiet", "--records", str(out / "dolphin.jsonl")]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
    if not p.stdout.strip():
        raise RuntimeError(f"dolphin bench failed ({p.returncode}): {p.stderr[-2000:]}")
    return json.loads(p.stdout)


def run_vllm(url: str, args, out: Path) -> dict:
    # vLLM's own random dataset at the same lengths: its `custom` dataset (our exact prompts) needs pandas,
    # which the engine environment lacks. Prompt content does not change the timing of a fixed-length,
    # ignore_eos request on random weights; lengths are checked in the table (total tokens).
    result = out / "vllm.json"
    cmd = [*_client_prefix(args), str(VLLM), "bench", "serve", "--backend", "openai", "--base-url", url,
           "--model", "tiny-llama", "--tokenizer", str(MODEL), "--dataset-name", "random",
           "--random-input-len", str(args.input_len), "--random-output-len", str(args.output_len),
           "--random-range-ratio", "0", "--num-prompts", str(args.num_prompts), "--ignore-eos",
           "--max-concurrency", str(args.max_concurrency),
           "--request-rate", "inf", "--seed", "0", "--num-warmups", "2", "--temperature", "0",
           "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,99", "--disable-tqdm",
           "--save-result", "--result-filename", str(result)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=1200, env={**os.environ, **ENV})
    if not result.exists():
        raise RuntimeError(f"vllm bench serve failed ({p.returncode}): {(p.stdout + p.stderr)[-3000:]}")
    return json.loads(result.read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=32)
    ap.add_argument("--max-concurrency", type=int, default=4)
    ap.add_argument("--order", default="vllm,dolphin", help="which client runs first")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--pin", action=argparse.BooleanOptionalAction, default=(os.cpu_count() or 1) >= 2,
                    help="server on the last core, clients on core 0 (taskset)")
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind: the server is stopped in `finally`
    port = free_ports(1)
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        argv = [str(VLLM), "serve", str(MODEL), "--served-model-name", "tiny-llama", "--host", "127.0.0.1",
                "--port", str(port), "--enforce-eager", "--max-model-len", "1024", "--dtype", "bfloat16"]
        env = dict(ENV)
        if args.pin:
            last = str((os.cpu_count() or 1) - 1)
            argv, env["VLLM_CPU_OMP_THREADS_BIND"] = ["taskset", "-c", last, *argv], last
        server = start_process("vllm-agreement", argv, out / "vllm.log", env=env)
        try:
            wait_for_http(server, f"{url}/health", timeout_s=600)
            results: dict[str, list[dict]] = {"vllm": [], "dolphin": []}
            for _ in range(args.repeats):  # interleaved: both clients see the same drift of a shared machine
                for c in args.order.split(","):
                    before = snapshot(url)
                    res = {"vllm": run_vllm, "dolphin": run_dolphin}[c](url, args, out)
                    # The server's own view of the same requests (and the client's 2 warm-ups): if it moves
                    # with a client's figures, the load pattern differed, not the measurement.
                    res["engine"] = level_telemetry(before, snapshot(url))
                    results[c].append(res)
        finally:
            server.stop()
    print(f"{args.num_prompts} prompts, {args.input_len} in / {args.output_len} out (ignore_eos), max concurrency "
          f"{args.max_concurrency}; {args.repeats} interleaved runs each ({args.order}); "
          f"{'server on the last core, clients on core 0' if args.pin else 'not pinned'}: median over runs "
          f"[min-max]\n")
    print("| metric | vllm bench serve | dolphin bench | difference of medians |")
    print("|---|---|---|---|")

    def cell(runs: list[dict], key: str) -> tuple[float, str]:
        v = np.array([r.get(key, np.nan) for r in runs], dtype=float)
        return float(np.median(v)), f"{np.median(v):.2f} [{v.min():.2f}-{v.max():.2f}]"

    for m in METRICS:
        for stat in ("median", "p99"):
            (a, ta), (b, tb) = cell(results["vllm"], f"{stat}_{m}_ms"), cell(results["dolphin"], f"{stat}_{m}_ms")
            diff = f"{100 * (b - a) / a:+.1f}%" if a else "—"
            print(f"| {stat} {m.upper()} ms | {ta} | {tb} | {diff} |")
    for key in ("completed", "failed", "total_input_tokens", "total_output_tokens", "request_throughput"):
        print(f"| {key} | {cell(results['vllm'], key)[1]} | {cell(results['dolphin'], key)[1]} | |")
    print("\nThe server's own means over each run (vllm:*_seconds histograms, /metrics before and after):\n")
    print("| mean ms | vllm bench serve: client | its server | dolphin bench: client | its server |")
    print("|---|---|---|---|---|")
    for m in ("ttft", "e2el"):
        row = []
        for c in ("vllm", "dolphin"):
            engine = [r["engine"] for r in results[c]]
            row += [cell(results[c], f"mean_{m}_ms")[1], cell(engine, f"engine_{m}_ms_mean")[1]]
        print(f"| {m.upper()} | " + " | ".join(row) + " |")
    for c in ("vllm", "dolphin"):
        q = cell([r["engine"] for r in results[c]], "engine_queue_time_ms_mean")[1]
        print(f"\n{c} runs: server queue time mean {q} ms")
    for d in (r["dolphin"] for r in results["dolphin"]):
        print(f"\ndolphin run: send lag p99 {d['send_lag_ms']['p99']:.3f} ms, usage mismatches "
              f"{d['usage_mismatches']}, errors {d['error_classes'] or 'none'}")


if __name__ == "__main__":
    main()
