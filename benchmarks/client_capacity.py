"""How fast can the benchmark client go? Our `dolphin bench` against `vllm bench serve`, same machine, same
zero-delay streaming endpoint (tests/bench_servers.py --raw: every chunk at once, its own process).

For rising target rates (each tried up to --attempts times) each client runs as its own process for
about --seconds of arrivals; a rate is sustained when the achieved request throughput is within 5% of the
target and, for ours (vLLM does not measure it), the client's p99 send lag is <= 2 ms. Arrivals are
near-constant (gamma shape --burstiness, the same for both), so the achieved rate is not Poisson noise.
Prints a markdown table.

Run it alone (2 cores): flock /tmp/dolphin-cpu.lock .venv/bin/python benchmarks/client_capacity.py
"""
from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from _paths import DOLPHIN, TINY_LLAMA as TOKENIZER, VLLM
from tests.bench_servers import bench_server
RATE_TOLERANCE = 0.05
MAX_LAG_MS = 2.0


def run_ours(url: str, rate: float, n: int, args) -> dict:
    cmd = [str(DOLPHIN), "bench", url, "--model", "zero", "--request-rate", str(rate), "--num-prompts", str(n),
           "--burstiness", str(args.burstiness), "--random-input-len", str(args.input_len),
           "--random-output-len", str(args.output_len), "--ignore-eos", "--json", "--quiet",
           "--max-lag-ms", str(MAX_LAG_MS), "--seed", "0"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if not p.stdout.strip():
        raise RuntimeError(f"dolphin bench failed ({p.returncode}): {p.stderr[-2000:]}")
    d = json.loads(p.stdout)
    return {"achieved": d["request_throughput"], "lag_p99_ms": d["dolphin"]["send_lag_ms"]["p99"],
            "failed": d["failed"]}


def run_vllm(url: str, rate: float, n: int, args) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "r.json"
        cmd = [str(VLLM), "bench", "serve", "--backend", "openai", "--base-url", url, "--model", "zero",
               "--tokenizer", str(TOKENIZER), "--dataset-name", "random", "--random-input-len", str(args.input_len),
               "--random-output-len", str(args.output_len), "--num-prompts", str(n), "--request-rate", str(rate),
               "--burstiness", str(args.burstiness), "--ignore-eos", "--seed", "0", "--disable-tqdm",
               "--save-result", "--result-filename", str(out)]
        env = {"HF_HUB_OFFLINE": "1", "VLLM_HOST_IP": "127.0.0.1", "PATH": "/usr/bin:/bin"}
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
        if not out.exists():
            raise RuntimeError(f"vllm bench serve failed ({p.returncode}): {(p.stdout + p.stderr)[-2000:]}")
        d = json.loads(out.read_text())
    return {"achieved": d["request_throughput"], "lag_p99_ms": None, "failed": d["failed"]}


def sustained(res: dict, rate: float) -> bool:
    ok_rate = res["achieved"] >= (1 - RATE_TOLERANCE) * rate and res["failed"] == 0
    return ok_rate and (res["lag_p99_ms"] is None or res["lag_p99_ms"] <= MAX_LAG_MS)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rates", default="100,200,400,600,800,1000,1200,1600,2000,2400,3200")
    ap.add_argument("--seconds", type=float, default=5.0, help="arrival span per run")
    ap.add_argument("--min-prompts", type=int, default=300)
    ap.add_argument("--input-len", type=int, default=32)
    ap.add_argument("--output-len", type=int, default=16)
    ap.add_argument("--burstiness", type=float, default=1000.0)
    ap.add_argument("--clients", default="dolphin,vllm")
    ap.add_argument("--attempts", type=int, default=2, help="tries per client and rate (noisy machines)")
    args = ap.parse_args()
    # SIGTERM unwinds like Ctrl-C, so the endpoint process is stopped by bench_server's finally.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    runners = {"dolphin": run_ours, "vllm": run_vllm}
    clients = args.clients.split(",")
    rates = [float(r) for r in args.rates.split(",")]
    results: dict[str, dict[float, dict]] = {c: {} for c in clients}
    misses = dict.fromkeys(clients, 0)
    with bench_server(raw=True) as url:  # framework-free: the server must outrun both clients
        for rate in rates:
            n = max(args.min_prompts, int(rate * args.seconds))
            for c in clients:
                if misses[c] >= 2:  # two misses in a row: this client's limit is behind us
                    continue
                for _ in range(args.attempts):  # the machine is shared: a rate counts if any attempt holds it
                    res = runners[c](url, rate, n, args)
                    res["ok"] = sustained(res, rate)
                    if res["ok"]:
                        break
                misses[c] = 0 if res["ok"] else misses[c] + 1
                results[c][rate] = res
                lag = "" if res["lag_p99_ms"] is None else f", lag p99 {res['lag_p99_ms']:.2f} ms"
                print(f"{c:8s} target {rate:7.0f}/s: achieved {res['achieved']:8.1f}/s{lag} "
                      f"-> {'sustained' if res['ok'] else 'NOT sustained'}", file=sys.stderr, flush=True)
    best = {c: max([r for r, res in results[c].items() if res["ok"]], default=0.0) for c in clients}
    header = "| target req/s | " + " | ".join(f"{c} achieved (lag p99 ms)" for c in clients) + " |"
    print(header)
    print("|" + "---|" * (1 + len(clients)))
    for rate in rates:
        cells = []
        for c in clients:
            res = results[c].get(rate)
            if res is None:
                cells.append("—")
                continue
            lag = "" if res["lag_p99_ms"] is None else f" ({res['lag_p99_ms']:.2f})"
            cells.append(f"{res['achieved']:.0f}{lag} {'✓' if res['ok'] else '✗'}")
        print(f"| {rate:.0f} | " + " | ".join(cells) + " |")
    print("| **max sustained** | " + " | ".join(f"**{best[c]:.0f}**" for c in clients) + " |")
    if len(clients) == 2 and best[clients[1]] > 0:
        print(f"\n{clients[0]} / {clients[1]} = {best[clients[0]] / best[clients[1]]:.2f}x")


if __name__ == "__main__":
    main()
