"""Engine telemetry from /metrics: real vLLM 0.32 expositions (tests/data/vllm_metrics, recorded from the
tiny model on the CPU build) served over real HTTP on 127.0.0.1, and a sampler against changing gauges."""
from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from tasks.bench.engine_metrics import (
    EngineSnapshot, LevelProbe, Sampler, level_telemetry, parse_snapshot, scrape, snapshot,
)

DATA = Path(__file__).parent / "data" / "vllm_metrics"


def fixture(name: str) -> str:
    return (DATA / name).read_text()


def total(text: str, sample: str) -> float:
    """A sample's value summed over label sets, read with a regex (an oracle independent of the parser)."""
    pat = re.compile(rf"^{re.escape(sample)}(?:{{[^}}]*}})? (\S+)$", re.MULTILINE)
    values = [float(v) for v in pat.findall(text)]
    assert values, f"{sample} not in the fixture"
    return sum(values)


def delta(before: str, after: str, sample: str) -> float:
    return total(after, sample) - total(before, sample)


# ---------------------------------------------------------------- a /metrics server on 127.0.0.1
class MetricsServer:
    """Serves `page()` at /metrics (404 when there is no page or it returns None), in a thread; logs
    every body served."""

    def __init__(self, page: Callable[[], str | None] | None) -> None:
        self.page, self.served = page, []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                body = outer.page() if outer.page is not None and self.path == "/metrics" else None
                if body is None:
                    self.send_error(404)
                    return
                outer.served.append((time.time(), body))
                data = body.encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> MetricsServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join()


@pytest.fixture
def files_server() -> Iterator[MetricsServer]:
    """Serves whichever fixture file `server.current` names."""
    server = MetricsServer(None)
    server.current = "idle.txt"
    server.page = lambda: fixture(server.current)
    with server:
        yield server


def snap_of(server: MetricsServer, name: str) -> EngineSnapshot:
    server.current = name
    snap = snapshot(server.url)
    assert snap is not None
    return snap


# ---------------------------------------------------------------- real vLLM expositions
BUSY = [f"busy_{i:02d}.txt" for i in range(7)]


def test_level_from_real_vllm_pages_through_sampler() -> None:
    """A level replayed from real pages: idle before, the busy pages to the sampler (then 404s, which
    it skips), done after."""
    pages = [fixture(n) for n in ["idle.txt", *BUSY]]
    with MetricsServer(lambda: pages.pop(0) if pages else None) as server:
        probe = LevelProbe(server.url, interval_s=0.01).start()
        deadline = time.time() + 10
        while pages and time.time() < deadline:
            time.sleep(0.01)
        time.sleep(0.05)  # a few more polls, all 404
        samples = probe.sampler.stop()
        pages.append(fixture("done.txt"))
        out = probe.stop()
    assert len(samples) == len(BUSY)

    idle_t, done_t = fixture("idle.txt"), fixture("done.txt")
    assert out["engine_preemptions"] == delta(idle_t, done_t, "vllm:num_preemptions_total") > 0
    assert out["engine_requests_finished"] == delta(idle_t, done_t, "vllm:request_success_total") > 0
    assert out["engine_generation_tokens"] == delta(idle_t, done_t, "vllm:generation_tokens_total")
    assert out["engine_prompt_tokens"] == delta(idle_t, done_t, "vllm:prompt_tokens_total")
    hit_rate = (delta(idle_t, done_t, "vllm:prefix_cache_hits_total")
                / delta(idle_t, done_t, "vllm:prefix_cache_queries_total"))
    assert 0 < hit_rate < 1 and out["engine_prefix_hit_rate"] == pytest.approx(hit_rate)
    queue_ms = 1e3 * (delta(idle_t, done_t, "vllm:request_queue_time_seconds_sum")
                      / delta(idle_t, done_t, "vllm:request_queue_time_seconds_count"))
    assert out["engine_queue_time_ms_mean"] == pytest.approx(queue_ms)
    assert out["engine_ttft_ms_mean"] >= out["engine_queue_time_ms_mean"]  # TTFT includes the queue
    # Gauges come from the samples only (not from idle/done, where everything is 0).
    for key, sample in [("running", "vllm:num_requests_running"), ("waiting", "vllm:num_requests_waiting"),
                        ("kv_usage", "vllm:kv_cache_usage_perc")]:
        values = np.array([total(fixture(n), sample) for n in BUSY])
        assert values.max() > 0
        assert out[f"engine_{key}_max"] == values.max()
        assert out[f"engine_{key}_mean"] == pytest.approx(values.mean())
    assert out["engine_gauge_samples"] == len(BUSY)
    assert not any(k.startswith("engine_spec_") for k in out)  # no speculative decoding: absent, not 0
    assert all(re.fullmatch(r"engine_[a-z0-9_]+", k) for k in out)  # MLflow-safe, stable names


def test_spec_decode_acceptance_from_real_vllm(files_server: MetricsServer) -> None:
    before, busy, after = (snap_of(files_server, f"spec_{n}.txt") for n in ("idle", "busy", "done"))
    b, a = fixture("spec_idle.txt"), fixture("spec_done.txt")
    out = level_telemetry(before, after, [busy])
    accepted = delta(b, a, "vllm:spec_decode_num_accepted_tokens_total")
    rate = accepted / delta(b, a, "vllm:spec_decode_num_draft_tokens_total")
    assert 0 < rate < 1 and out["engine_spec_acceptance_rate"] == pytest.approx(rate)
    per_draft = accepted / delta(b, a, "vllm:spec_decode_num_drafts_total")
    assert out["engine_spec_mean_accepted_tokens"] == pytest.approx(per_draft)
    assert out["engine_running_max"] == total(fixture("spec_busy.txt"), "vllm:num_requests_running") > 0


def test_parse_keeps_only_telemetry_families() -> None:
    text = fixture("done.txt")
    snap = parse_snapshot(text, at=12.5)
    assert snap.time == 12.5
    assert set(snap.gauges) == {"vllm:kv_cache_usage_perc", "vllm:num_requests_running", "vllm:num_requests_waiting"}
    # Counters by family (no _total, no _created), histograms as _sum/_count, buckets skipped.
    assert snap.counters["vllm:num_preemptions"] == total(text, "vllm:num_preemptions_total")
    assert "vllm:request_queue_time_seconds_count" in snap.counters
    assert not any(k.endswith(("_total", "_created", "_bucket")) for k in snap.counters)
    assert "vllm:prompt_tokens_cached" not in snap.counters  # a family that only shares a prefix
    with pytest.raises(TypeError):
        snap.counters["vllm:num_preemptions"] = 0  # frozen


def test_scrape_still_flattens_samples(files_server: MetricsServer) -> None:
    files_server.current = "done.txt"
    flat = scrape(files_server.url)
    assert flat["vllm:num_preemptions_total"] == total(fixture("done.txt"), "vllm:num_preemptions_total")
    assert not any(k.endswith("_created") or "_bucket" in k for k in flat)


# ---------------------------------------------------------------- missing metrics
def test_no_metrics_endpoint_gives_empty() -> None:
    with MetricsServer(None) as server:  # answers 404
        assert snapshot(server.url) is None
        assert scrape(server.url) == {}
        probe = LevelProbe(server.url, interval_s=0.02).start()
        time.sleep(0.1)
        assert probe.stop() == {}
    assert snapshot(server.url, timeout_s=1) is None  # nothing listening any more
    assert level_telemetry(None, None, []) == {}


def test_counter_reset_or_missing_family_leaves_key_out() -> None:
    before = EngineSnapshot(0.0, {}, {"vllm:num_preemptions": 5.0, "vllm:prefix_cache_queries": 100.0,
                                      "vllm:prefix_cache_hits": 40.0})
    restarted = EngineSnapshot(1.0, {}, {"vllm:num_preemptions": 1.0, "vllm:prefix_cache_queries": 100.0,
                                         "vllm:prefix_cache_hits": 40.0})
    out = level_telemetry(before, restarted)
    assert "engine_preemptions" not in out  # went backwards: the engine restarted
    assert "engine_prefix_hit_rate" not in out  # no queries in the level: nothing to divide by
    assert "engine_generation_tokens" not in out  # not exported at all


# ---------------------------------------------------------------- sampler
def test_sampler_follows_changing_gauges() -> None:
    t0 = time.time()

    def page() -> str:  # running rises by one every 50 ms; KV usage follows it
        running = int((time.time() - t0) / 0.05)
        return ("# TYPE vllm:num_requests_running gauge\n"
                f'vllm:num_requests_running{{engine="0"}} {running}\n'
                "# TYPE vllm:kv_cache_usage_perc gauge\n"
                f'vllm:kv_cache_usage_perc{{engine="0"}} {running / 100}\n'
                f'vllm:kv_cache_usage_perc{{engine="1"}} {running / 200}\n')

    with MetricsServer(page) as server:
        sampler = Sampler(server.url, interval_s=0.03)
        started = time.time()
        with sampler:
            time.sleep(0.5)
        stopped = time.time()
        samples = sampler.samples
    served = np.array([float(re.search(r"running\S* (\d+)", body)[1]) for _, body in server.served])
    assert len(samples) == len(served) >= 5
    assert samples[0].time >= started + 0.03  # not at the level's (idle) start
    assert stopped - started < 0.5 + 0.2  # stop() does not hang
    running = [s.gauges["vllm:num_requests_running"] for s in samples]
    assert running == sorted(running) and running[-1] > running[0]
    assert [s.gauges["vllm:kv_cache_usage_perc"] for s in samples] == [r / 100 for r in running]  # max over engines
    out = level_telemetry(None, None, samples)
    assert out["engine_running_max"] == served.max()
    assert out["engine_running_mean"] == pytest.approx(served.mean())
    assert out["engine_kv_usage_max"] == pytest.approx(served.max() / 100)
    assert "engine_waiting_max" not in out  # never exported
    with pytest.raises(RuntimeError):
        sampler.start()  # one run per sampler


# ---------------------------------------------------------------- the sim engine (optional, real process)
@pytest.mark.integration
def test_probe_around_sim_engine_load(tmp_path: Path) -> None:
    from tests.test_sim_server import completion, make_spec, post, sim_server

    spec = make_spec(mode="spec", num_speculative_tokens=4, acceptance_rate=0.6, time_scale=10.0,
                     kv_capacity_tokens=2048, max_model_len=1024)
    with sim_server(spec, tmp_path) as sim:
        probe = LevelProbe(sim.url, interval_s=0.02).start()
        replies = post(sim.url + "/v1/completions", completion(100, 200), copies=8)
        out = probe.stop()
    assert all(r.done for r in replies)
    assert out["engine_requests_finished"] == 8
    assert out["engine_generation_tokens"] == 8 * 200
    assert out["engine_running_max"] >= 1 and 0 < out["engine_kv_usage_max"] <= 1
    assert 0 < out["engine_spec_acceptance_rate"] < 1
    assert out["engine_ttft_ms_mean"] > 0
    assert "engine_prefix_hit_rate" not in out  # the sim does not export prefix-cache counters
