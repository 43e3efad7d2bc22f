"""Engine-side telemetry from Prometheus /metrics (vLLM names; the sim engine exports the same ones).

`scrape` flattens every counter and gauge once (the run's end state). Per load level: `snapshot` before,
a `Sampler` polling gauges while the level runs, `snapshot` after, and `level_telemetry` turns them into
flat, MLflow-safe numbers (`engine_*`). `LevelProbe` does all three around one level. A metric the engine
does not export, or a rate with nothing to divide by, leaves its key out: never a fake 0.
"""
from __future__ import annotations

import http.client
import threading
import time
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType

import numpy as np
from prometheus_client.parser import text_string_to_metric_families

# vLLM (v1, 0.32) family names as prometheus_client reports them (a counter's family drops `_total`).
GAUGES: dict[str, str] = {  # short key -> family
    "kv_usage": "vllm:kv_cache_usage_perc",  # a fraction (1 = 100 %) despite the name
    "running": "vllm:num_requests_running",
    "waiting": "vllm:num_requests_waiting",
}
# Several label sets (data-parallel engines) of one gauge combine this way; the rest are summed.
GAUGE_COMBINE: dict[str, Callable[[float, float], float]] = {"vllm:kv_cache_usage_perc": max}
COUNTERS: dict[str, str] = {
    "preemptions": "vllm:num_preemptions",
    "prompt_tokens": "vllm:prompt_tokens",
    "generation_tokens": "vllm:generation_tokens",
    "requests_finished": "vllm:request_success",
    "prefix_queries": "vllm:prefix_cache_queries",  # tokens looked up in the prefix cache
    "prefix_hits": "vllm:prefix_cache_hits",  # of which found
    "spec_drafts": "vllm:spec_decode_num_drafts",
    "spec_draft_tokens": "vllm:spec_decode_num_draft_tokens",
    "spec_accepted_tokens": "vllm:spec_decode_num_accepted_tokens",
}
# Histograms summarised by their mean over a level (delta sum / delta count), engine seconds -> ms.
HISTOGRAMS: dict[str, str] = {
    "queue_time": "vllm:request_queue_time_seconds",
    "prefill_time": "vllm:request_prefill_time_seconds",
    "decode_time": "vllm:request_decode_time_seconds",
    "ttft": "vllm:time_to_first_token_seconds",
    "itl": "vllm:inter_token_latency_seconds",
    "e2el": "vllm:e2e_request_latency_seconds",
}
# Exported counters straight as deltas, under engine_<key>.
COUNT_KEYS = ("preemptions", "prompt_tokens", "generation_tokens", "requests_finished")

_GAUGE_FAMILIES = frozenset(GAUGES.values())
_COUNTER_FAMILIES = frozenset(COUNTERS.values())
_HIST_FAMILIES = frozenset(HISTOGRAMS.values())
# Exact sample names (a counter's carries `_total`; a histogram's `_sum` and `_count`, not its buckets) and
# the TYPE lines to keep: the text parser costs ~40 us a line, and vLLM exposes ~600 lines, so only these
# few dozen reach it.
_SAMPLE_NAMES = frozenset([*GAUGES.values(), *(f"{c}_total" for c in COUNTERS.values()),
                           *(f"{h}{s}" for h in HISTOGRAMS.values() for s in ("_sum", "_count"))])
_TYPE_NAMES = frozenset([*GAUGES.values(), *COUNTERS.values(), *(f"{c}_total" for c in COUNTERS.values()),
                         *HISTOGRAMS.values()])


def _wanted(line: str) -> bool:
    if line.startswith("#"):
        return line.startswith("# TYPE ") and line[7:].split(" ", 1)[0] in _TYPE_NAMES
    return line.split("{", 1)[0].split(" ", 1)[0] in _SAMPLE_NAMES


@dataclass(frozen=True)
class EngineSnapshot:
    """One read of /metrics: gauges and counters by family name, summed over label sets (a histogram
    appears as two counters, `<family>_sum` and `<family>_count`). `time` is time.time()."""
    time: float
    gauges: Mapping[str, float] = field(default_factory=dict)
    counters: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:  # frozen all the way down
        object.__setattr__(self, "gauges", MappingProxyType(dict(self.gauges)))
        object.__setattr__(self, "counters", MappingProxyType(dict(self.counters)))


def parse_snapshot(text: str, at: float | None = None) -> EngineSnapshot:
    """The telemetry families of a Prometheus text exposition (other families are skipped unparsed)."""
    lines = [ln for ln in text.splitlines() if _wanted(ln)]
    gauges: dict[str, float] = {}
    counters: dict[str, float] = {}
    for fam in text_string_to_metric_families("\n".join(lines) + "\n"):
        if fam.name in _GAUGE_FAMILIES and fam.type == "gauge":
            combine = GAUGE_COMBINE.get(fam.name, float.__add__)
            for s in fam.samples:
                gauges[fam.name] = combine(gauges[fam.name], s.value) if fam.name in gauges else s.value
        elif fam.name in _COUNTER_FAMILIES and fam.type == "counter":
            for s in fam.samples:
                counters[fam.name] = counters.get(fam.name, 0.0) + s.value
        elif fam.name in _HIST_FAMILIES and fam.type == "histogram":
            for s in fam.samples:
                if s.name.endswith(("_sum", "_count")):
                    counters[s.name] = counters.get(s.name, 0.0) + s.value
    return EngineSnapshot(time.time() if at is None else at, gauges, counters)


# Straight to the engine, never through an environment proxy (as the load client, aiohttp, does). urllib
# rather than httpx: an httpx call builds a TLS context each time, ~0.1-0.4 s of CPU on a busy 2-core box.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _get_metrics(base_url: str, timeout_s: float) -> str | None:
    try:
        with _OPENER.open(f"{base_url}/metrics", timeout=timeout_s) as resp:
            return resp.read().decode()
    except (OSError, http.client.HTTPException, ValueError):  # refused, 404, timeout, cut off, bad URL
        return None


def snapshot(base_url: str, timeout_s: float = 5.0) -> EngineSnapshot | None:
    """Read the engine's telemetry now; None if it has no /metrics (or does not answer)."""
    at = time.time()
    text = _get_metrics(base_url, timeout_s)
    return None if text is None else parse_snapshot(text, at)


def _delta(before: EngineSnapshot, after: EngineSnapshot, name: str) -> float | None:
    """after - before of a counter present in both; None if absent or reset (the engine restarted)."""
    if name not in before.counters or name not in after.counters:
        return None
    d = after.counters[name] - before.counters[name]
    return d if d >= 0 else None


def _ratio(num: float | None, den: float | None) -> float | None:
    return num / den if num is not None and den else None


def level_telemetry(before: EngineSnapshot | None, after: EngineSnapshot | None,
                    samples: Sequence[EngineSnapshot] = ()) -> dict[str, float]:
    """Per-level engine numbers: counter deltas and rates between `before` and `after`, and the max and
    mean of each gauge over `samples` (taken while the level ran). Keys are `engine_*`; absent when the
    engine does not export what they need, or when a rate's denominator did not move."""
    out: dict[str, float | None] = {}
    if before is not None and after is not None:
        d = {k: _delta(before, after, fam) for k, fam in COUNTERS.items()}
        out |= {f"engine_{k}": d[k] for k in COUNT_KEYS}
        out["engine_prefix_hit_rate"] = _ratio(d["prefix_hits"], d["prefix_queries"])
        out["engine_spec_acceptance_rate"] = _ratio(d["spec_accepted_tokens"], d["spec_draft_tokens"])
        # Accepted draft tokens per draft; vLLM logs "mean acceptance length" = 1 + this (the bonus token).
        out["engine_spec_mean_accepted_tokens"] = _ratio(d["spec_accepted_tokens"], d["spec_drafts"])
        for k, fam in HISTOGRAMS.items():
            mean_s = _ratio(_delta(before, after, f"{fam}_sum"), _delta(before, after, f"{fam}_count"))
            out[f"engine_{k}_ms_mean"] = None if mean_s is None else mean_s * 1e3
    for k, fam in GAUGES.items():
        values = np.array([s.gauges[fam] for s in samples if fam in s.gauges])
        if values.size:
            out[f"engine_{k}_max"], out[f"engine_{k}_mean"] = float(values.max()), float(values.mean())
    if samples:
        out["engine_gauge_samples"] = float(len(samples))
    return {k: float(v) for k, v in out.items() if v is not None}


class Sampler:
    """Polls /metrics every `interval_s` on a daemon thread from start() to stop() (a thread, not an
    asyncio task: the load generator's event loop keeps its timestamps, and sync callers can use it too).
    The first sample is taken one interval after start, so an idle engine at the level's start does not
    count. Failed reads are skipped."""

    def __init__(self, base_url: str, interval_s: float = 1.0, timeout_s: float = 2.0) -> None:
        if interval_s <= 0:
            raise ValueError("interval_s must be > 0")
        self.base_url, self.interval_s, self.timeout_s = base_url, interval_s, timeout_s
        self._samples: list[EngineSnapshot] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def samples(self) -> list[EngineSnapshot]:
        return list(self._samples)

    def start(self) -> Sampler:
        if self._thread is not None:
            raise RuntimeError("Sampler already started")
        self._thread = threading.Thread(target=self._run, name="engine-metrics-sampler", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            if (snap := snapshot(self.base_url, self.timeout_s)) is not None:
                self._samples.append(snap)

    def stop(self) -> list[EngineSnapshot]:
        """Stop polling (waits for a read in progress, at most timeout_s) and return the samples."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        return self.samples

    def __enter__(self) -> Sampler:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class LevelProbe:
    """`snapshot` + `Sampler` + `snapshot` around one level; `stop()` returns `level_telemetry`.

        probe = LevelProbe(base_url, interval_s=0.5).start()
        ...run the level...
        engine = probe.stop()   # {"engine_kv_usage_max": ..., ...}; {} without /metrics
    """

    def __init__(self, base_url: str, interval_s: float = 1.0, timeout_s: float = 2.0) -> None:
        self.base_url, self.timeout_s = base_url, timeout_s
        self.sampler = Sampler(base_url, interval_s, timeout_s)
        self.before: EngineSnapshot | None = None
        self.after: EngineSnapshot | None = None

    def start(self) -> LevelProbe:
        self.before = snapshot(self.base_url, timeout_s=self.timeout_s)
        self.sampler.start()
        return self

    def stop(self) -> dict[str, float]:
        samples = self.sampler.stop()
        self.after = snapshot(self.base_url, timeout_s=self.timeout_s)
        return level_telemetry(self.before, self.after, samples)


def scrape(base_url: str, prefixes: tuple[str, ...] = ("vllm:", "sglang:", "dolphin:"),
           timeout_s: float = 5.0) -> dict[str, float]:
    """Counters and gauges whose name starts with one of `prefixes`, summed over label sets.
    Histograms are left out: the client measures latencies itself. Empty if the endpoint has no /metrics."""
    text = _get_metrics(base_url, timeout_s)
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text or ""):
        if family.type not in ("counter", "gauge") or not family.name.startswith(prefixes):
            continue
        for sample in family.samples:
            if sample.name.endswith("_created"):
                continue
            out[sample.name] = out.get(sample.name, 0.0) + sample.value
    return out
