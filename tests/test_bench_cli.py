"""`dolphin bench` end to end against the streaming test servers on 127.0.0.1 (zero-delay, slow, failing,
truncating, single-queue), run in-process through the real CLI entry; plus the pieces its verdicts
rest on (send-lag validity, bootstrap CIs, vLLM's result keys and peak metrics)."""
from __future__ import annotations

import json
import math

import httpx
import numpy as np
import pytest
from tests.bench_servers import bench_server

from flows.cli import main
from tasks.bench.client import RequestRecord, load_records
from tasks.bench.metrics import bootstrap_ci, lag_verdict, target_cis
from tasks.bench.report import read_records, vllm_result

TTFT, ITL = 0.03, 0.004
# The keys `vllm bench serve --save-result` writes for a text-generation run (vllm/benchmarks/serve.py,
# `benchmark` and `main_async`), with the default --percentile-metrics ttft,tpot,itl and
# --metric-percentiles 99; --save-detailed adds DETAILED.
VLLM_KEYS = {
    "date", "endpoint_type", "backend", "label", "model_id", "tokenizer_id", "num_prompts", "request_rate",
    "burstiness", "max_concurrency", "duration", "completed", "failed", "total_input_tokens",
    "total_output_tokens", "request_throughput", "request_goodput", "output_throughput",
    "total_token_throughput", "latencies", "queue_times", "max_output_tokens_per_s", "max_concurrent_requests",
    "rtfx", *(f"{s}_{m}_ms" for s in ("mean", "median", "std", "p99") for m in ("ttft", "tpot", "itl")),
}
DETAILED = {"input_lens", "output_lens", "start_times", "ttfts", "itls", "generated_texts", "errors"}


@pytest.fixture(scope="module")
def server() -> str:
    with bench_server(ttft=TTFT, itl=ITL) as url:
        yield url


def bench(capsys, url: str, model: str, *extra: str, n: int = 30, out: int = 5) -> tuple[int, dict]:
    # No send-lag check (shared machine), except where a test turns it on.
    code = main(["bench", url, "--model", model, "--num-prompts", str(n), "--random-input-len", "6",
                 "--random-output-len", str(out), "--json", "--quiet", "--max-lag-ms", "0", *extra])
    return code, json.loads(capsys.readouterr().out)


def test_result_keys_and_metrics_recomputed_from_records(server, capsys, tmp_path):
    recs_path = tmp_path / "recs.jsonl"
    code, d = bench(capsys, server, "stream", "--request-rate", "200", "--ignore-eos", "--records", str(recs_path),
                    "--save-result", "--result-dir", str(tmp_path / "res"), "--goodput", "ttft:1000", "tpot:1")
    assert code == 0
    assert set(d) == VLLM_KEYS | {"dolphin"}
    assert json.loads(next((tmp_path / "res").glob("openai-200.0qps-stream-*.json")).read_text()).keys() == d.keys()
    recs = load_records(recs_path)
    assert len(recs) == d["num_prompts"] == d["completed"] == 30 and d["failed"] == 0
    ttft = np.array([r.ttft_s for r in recs]) * 1e3
    e2el = np.array([r.e2el_s for r in recs]) * 1e3
    tpot = (e2el - ttft) / (np.array([r.output_tokens for r in recs]) - 1)
    itl = np.concatenate([r.itl_s for r in recs]) * 1e3
    assert d["median_ttft_ms"] == pytest.approx(np.median(ttft))
    assert d["p99_tpot_ms"] == pytest.approx(np.percentile(tpot, 99))
    assert d["mean_itl_ms"] == pytest.approx(itl.mean())
    assert d["request_throughput"] == pytest.approx(30 / d["duration"])
    assert d["total_output_tokens"] == 30 * 5 and d["output_throughput"] == pytest.approx(150 / d["duration"])
    assert d["request_goodput"] == pytest.approx(np.count_nonzero(tpot <= 1) / d["duration"])
    # Latency from the scheduled send: never below the server's delays; the lag is recorded apart.
    assert ttft.min() >= TTFT * 1e3 and np.min(tpot) >= ITL * 1e3 * 0.75
    assert d["dolphin"]["usage_mismatches"] == {"tokens": 0, "no_usage": 0,
                                                                          "chunks_over_tokens": 0}
    assert d["dolphin"]["percentiles_ms"]["e2el"]["p99.9"] == pytest.approx(np.percentile(e2el, 99.9))


def test_detailed_keys_and_selected_percentiles(server, capsys):
    code, d = bench(capsys, server, "zero", "--save-detailed", "--percentile-metrics", "ttft,e2el",
                    "--metric-percentiles", "50,99.9", n=10)
    assert code == 0 and DETAILED <= set(d)
    assert {"p50_ttft_ms", "p99.9_e2el_ms", "median_e2el_ms"} <= set(d) and "p99_ttft_ms" not in d
    assert not any(k.endswith("_tpot_ms") for k in d)
    assert d["request_rate"] == "inf" and len(d["ttfts"]) == len(d["itls"]) == 10


@pytest.mark.parametrize("model,cls", [("error500", "http"), ("truncate", "truncated"), ("abort", "truncated")])
def test_failures_are_classified_not_fatal(server, capsys, model, cls):
    code, d = bench(capsys, server, model, "--request-rate", "300", n=12)
    assert code == 0
    assert (d["completed"], d["failed"]) == (0, 12) and d["dolphin"]["error_classes"] == {cls: 12}
    assert d["median_ttft_ms"] == 0.0 and d["request_throughput"] == 0.0


def test_usage_short_of_the_requested_count_is_reported(server, capsys):
    _, d = bench(capsys, server, "short", "--ignore-eos", n=8)
    assert d["dolphin"]["usage_mismatches"]["tokens"] == 8 and d["total_output_tokens"] == 8 * 4
    _, d = bench(capsys, server, "nousage", "--ignore-eos", n=8)
    assert d["dolphin"]["usage_mismatches"]["no_usage"] == 8


def test_closed_loop_never_exceeds_max_concurrency(server, capsys):
    httpx.post(f"{server}/stats/reset")
    code, d = bench(capsys, server, "stream", "--max-concurrency", "3", "--save-detailed", n=24)
    stats = httpx.get(f"{server}/stats").json()
    assert code == 0 and d["completed"] == 24 and d["max_concurrency"] == 3
    assert stats["requests"] == 24 and stats["max_in_flight"] == 3
    # All arrive at 0: later requests wait for a slot, and their latency counts from when it freed.
    queues = np.sort(d["queue_times"])
    assert queues[:3].max() < 0.01 and queues[-1] > 6 * TTFT
    assert np.median(d["ttfts"]) < TTFT + 0.05  # not the queueing: that is in queue_times


def test_trace_replay_keeps_scaled_timestamps(server, capsys, tmp_path):
    trace = tmp_path / "t.csv"
    arrivals = [0.0, 0.1, 0.15, 0.4, 0.42, 0.8]
    trace.write_text("arrival_s,input_tokens,output_tokens\n" +
                     "".join(f"{a},{3 + i},{2 + i}\n" for i, a in enumerate(arrivals)))
    code, d = bench(capsys, server, "stream", "--trace", str(trace), "--time-scale", "2", "--ignore-eos",
                    "--records", str(tmp_path / "r.parquet"))
    assert code == 0 and d["num_prompts"] == d["completed"] == 6
    recs = read_records(tmp_path / "r.parquet")
    assert [r.scheduled_s for r in recs] == pytest.approx([a / 2 for a in arrivals])
    assert [r.prompt_tokens for r in recs] == [3 + i for i in range(6)]  # the test server counts words
    assert [r.output_tokens for r in recs] == [r.requested_tokens for r in recs] == [2 + i for i in range(6)]


def test_lag_over_threshold_makes_the_run_invalid(server, capsys):
    code, d = bench(capsys, server, "zero", "--request-rate", "100", "--max-lag-ms", "1e-6", n=10)
    assert code == 1 and not d["dolphin"]["valid"]
    assert d["dolphin"]["invalid_reason"].startswith("client send lag p99 ")


def test_lag_verdict():
    recs = [RequestRecord(level=0, request_id=i, scheduled_s=0.01 * i, send_lag_s=lag, prompt_tokens=1)
            for i, lag in enumerate([0.0005] * 98 + [0.02, 0.03])]
    assert lag_verdict(recs, 50.0) is None and lag_verdict(recs, None) is None
    assert "> 2 ms" in lag_verdict(recs, 2.0)  # p99 of the lags is ~20 ms
    assert not vllm_result(recs, 1.0, endpoint="completions", model_id="m", tokenizer_id="m", num_prompts=100,
                           request_rate=100.0, burstiness=1.0, max_concurrency=None,
                           max_lag_ms=2.0)["dolphin"]["valid"]


@pytest.mark.parametrize("model", ["bad", "ttft_ms_p99=-1", "goodput_pct=120", "latency_ms_p99=5"])
def test_bad_slo_is_a_usage_error(server, capsys, model):
    assert main(["bench", server, "--model", "stream", "--slo", model]) == 2
    assert capsys.readouterr().err.startswith("dolphin bench: --slo")


def test_search_reports_curve_cis_and_plots(capsys, tmp_path):
    # One request at a time, 10 ms each: capacity 100 QPS; p50 E2EL <= 60 ms holds well below it. At
    # exactly 100 QPS a 40-request level may still hold its median (the queue has no time to grow), so 100
    # is a fair answer; above it arrivals outpace service.
    with bench_server(ttft=0.0, itl=0.0, service=0.01) as url:
        code, d = bench(capsys, url, "queue", "--search", "--slo", "e2el_ms_p50=60", "--start-qps", "25",
                        "--tolerance", "0.25", "--plots", str(tmp_path / "p"), "--result-dir", str(tmp_path / "r"),
                        "--max-levels", "6", n=40)
    assert code == 0
    s = d["dolphin"]["search"]
    assert 25 <= s["max_sustainable_qps"] <= 100
    held = [lv for lv in s["levels"] if lv["slo_met"]]
    assert held and all(lv["target_qps"] <= s["max_sustainable_qps"] for lv in held)
    assert any(not lv["slo_met"] for lv in s["levels"])
    for lv in s["levels"]:
        ci = lv["ci"]["e2el_ms_p50"]
        if ci["n"]:
            assert ci["ci_low_ms"] <= ci["value_ms"] <= ci["ci_high_ms"]
    assert d["request_rate"] == s["max_sustainable_qps"] and d["completed"] >= 40
    assert sorted(p.name for p in (tmp_path / "p").iterdir()) == ["latency_vs_qps.png", "ttft_cdf.png"]


def test_bootstrap_ci_holds_the_estimate_and_narrows_with_n():
    rng = np.random.default_rng(3)
    widths = []
    for n in (200, 2000, 20000):
        v = rng.lognormal(0, 1, n)
        lo, hi = bootstrap_ci(v, 99, resamples=400, seed=1)
        assert lo <= np.percentile(v, 99) <= hi
        widths.append(hi - lo)
    assert widths[0] > widths[1] > widths[2]
    assert all(math.isnan(x) for x in bootstrap_ci([], 99))


def test_target_ci_verdicts():
    def recs(e2el):
        return [RequestRecord(level=0, request_id=i, scheduled_s=0.0, send_lag_s=0.0, prompt_tokens=1,
                              output_tokens=3, ttft_s=0.01, e2el_s=float(e), ok=True) for i, e in enumerate(e2el)]

    v = np.random.default_rng(0).uniform(0.5, 1.5, 2000)
    assert target_cis(recs(v), {"e2el_ms_p50": 2000})["e2el_ms_p50"]["ci_verdict"] == "holds"
    assert target_cis(recs(v), {"e2el_ms_p50": 500})["e2el_ms_p50"]["ci_verdict"] == "violated"
    assert target_cis(recs(v), {"e2el_ms_p50": float(np.median(v)) * 1e3})["e2el_ms_p50"]["ci_verdict"] == "uncertain"


def vllm_peaks(starts, ttfts, itls, latencies):
    """vLLM's own loop (serve.py, calculate_metrics) for max_output_tokens_per_s / max_concurrent_requests."""
    t0 = min(starts)
    n = int(np.ceil(max(s + lat for s, lat in zip(starts, latencies)) - t0)) + 1
    tokens, conc = np.zeros(n), np.zeros(n)
    for s, ttft, itl, lat in zip(starts, ttfts, itls, latencies):
        times = [s + ttft]
        for gap in itl:
            times.append(times[-1] + gap)
        for t in times:
            if 0 <= int(t - t0) < n:
                tokens[int(t - t0)] += 1
        for sec in range(int(s - t0), int(s + lat - t0) + 1):
            conc[sec] += 1
    return float(tokens.max()), int(conc.max())


def test_peak_throughput_and_concurrency_match_vllms_loop():
    rng = np.random.default_rng(2)
    recs = []
    for i in range(300):
        itl = rng.exponential(0.05, int(rng.integers(0, 30))).tolist()
        ttft = float(rng.uniform(0.01, 0.5))
        recs.append(RequestRecord(level=0, request_id=i, scheduled_s=float(rng.uniform(0, 20)), send_lag_s=0.0,
                                  prompt_tokens=3, output_tokens=len(itl) + 1, ttft_s=ttft,
                                  e2el_s=ttft + sum(itl), itl_s=itl, ok=True))
    d = vllm_result(recs, 25.0, endpoint="chat", model_id="m", tokenizer_id="m", num_prompts=300,
                    request_rate=12.0, burstiness=1.0, max_concurrency=None)
    expected = vllm_peaks([r.scheduled_s for r in recs], [r.ttft_s for r in recs], [r.itl_s for r in recs],
                          [r.e2el_s for r in recs])
    assert (d["max_output_tokens_per_s"], d["max_concurrent_requests"]) == expected
    assert d["backend"] == "openai-chat"


def test_stage_writes_level_cis(tmp_path):
    from tasks.bench.metrics import summarize_level
    from tasks.bench.report import write_records
    from tasks.bench.stage import write_level_cis
    from tasks.contracts import BenchResult

    rng = np.random.default_rng(0)
    recs = [RequestRecord(level=lv, request_id=i, scheduled_s=0.01 * i, send_lag_s=0.0, prompt_tokens=3,
                          output_tokens=4, ttft_s=0.01, e2el_s=float(rng.uniform(0.1, 0.2) * (1 + 9 * lv)), ok=True)
            for lv in (0, 1) for i in range(200)]
    write_records(recs, tmp_path / "requests.jsonl")
    targets = {"e2el_ms_p90": 500.0}
    levels = [summarize_level(lv, 1.0 + lv, [r for r in recs if r.level == lv], 3.0, targets) for lv in (0, 1)]
    result = BenchResult(slo_targets=targets, levels=levels, max_sustainable_qps=1.0, best_level=0,
                         records_path=str(tmp_path / "requests.jsonl"), time_scale=1.0, simulated=True)
    cis = json.loads(write_level_cis(result, tmp_path / "cis.json").read_text())
    assert cis["0"]["e2el_ms_p90"]["ci_verdict"] == "holds" and cis["1"]["e2el_ms_p90"]["ci_verdict"] == "violated"


def test_search_stops_at_its_time_budget(capsys):
    with bench_server(ttft=0.0, itl=0.0, service=0.005) as url:
        code, d = bench(capsys, url, "queue", "--search", "--slo", "e2el_ms_p50=500", "--start-qps", "25",
                        "--time-budget-s", "0.5", n=40)
    s = d["dolphin"]["search"]
    assert code == 0 and len(s["levels"]) == 1 and s["max_sustainable_qps"] == 25
    assert s["notes"][0].startswith("time budget: level 1 at 50 QPS")


@pytest.mark.parametrize("http", ["lean", "aiohttp"])
@pytest.mark.parametrize("model", ["split", "zero"])
def test_sse_lines_cut_across_http_chunks_and_kept_alive_connections(server, capsys, monkeypatch, http, model):
    monkeypatch.setenv("DOLPHIN_BENCH_HTTP", http)
    code, d = bench(capsys, server, model, "--request-rate", "400", "--ignore-eos", "--save-detailed", n=40, out=9)
    assert code == 0 and d["completed"] == 40 and d["output_lens"] == [9] * 40
    assert all(len(itl) == 8 for itl in d["itls"]) and sum(d["dolphin"]["usage_mismatches"].values()) == 0


def test_raw_zero_endpoint_serves_our_client():
    with bench_server(raw=True) as url:
        code = main(["bench", url, "--model", "any", "--num-prompts", "50", "--request-rate", "500",
                     "--random-input-len", "4", "--random-output-len", "3", "--ignore-eos", "--quiet", "--json",
                     "--max-lag-ms", "0"])
        assert code == 0
        assert httpx.get(f"{url}/metrics").status_code == 404
