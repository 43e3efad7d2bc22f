"""The sim engine's Prometheus metrics, under vLLM's names, on a private registry."""
from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class Metrics:
    """vLLM's metric names on a private registry (latencies in engine seconds)."""

    TTFT_BUCKETS = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                    20.0, 40.0, 80.0, 160.0, 640.0, 2560.0]
    ITL_BUCKETS = [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                   40.0, 80.0]
    E2E_BUCKETS = [0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
                   480.0, 960.0, 1920.0, 7680.0]

    def __init__(self, model_name: str, spec_decode: bool) -> None:
        r = self.registry = CollectorRegistry()
        lab = {"model_name": model_name}

        def labelled(cls: Any, name: str, doc: str, **kw: Any) -> Any:
            return cls(name, doc, ["model_name"], registry=r, **kw).labels(**lab)

        self.running = labelled(Gauge, "vllm:num_requests_running", "Requests in a running batch")
        self.waiting = labelled(Gauge, "vllm:num_requests_waiting", "Requests waiting to be scheduled")
        self.kv_usage = labelled(Gauge, "vllm:kv_cache_usage_perc", "KV-cache usage, 1 = 100 %")
        self.prompt_tokens = labelled(Counter, "vllm:prompt_tokens", "Prefilled prompt tokens")
        self.generation_tokens = labelled(Counter, "vllm:generation_tokens", "Generated tokens")
        self.success = Counter("vllm:request_success", "Finished requests", ["model_name", "finished_reason"],
                               registry=r).labels(model_name=model_name, finished_reason="length")
        self.preemptions = labelled(Counter, "vllm:num_preemptions", "Preemptions (recompute)")
        self.ttft = labelled(Histogram, "vllm:time_to_first_token_seconds", "TTFT (engine s)",
                             buckets=self.TTFT_BUCKETS)
        self.itl = labelled(Histogram, "vllm:inter_token_latency_seconds", "ITL (engine s)",
                            buckets=self.ITL_BUCKETS)
        self.e2e = labelled(Histogram, "vllm:e2e_request_latency_seconds", "E2E latency (engine s)",
                            buckets=self.E2E_BUCKETS)
        if spec_decode:
            self.drafts = labelled(Counter, "vllm:spec_decode_num_drafts", "Draft proposals")
            self.draft_tokens = labelled(Counter, "vllm:spec_decode_num_draft_tokens", "Draft tokens")
            self.accepted = labelled(Counter, "vllm:spec_decode_num_accepted_tokens", "Accepted draft tokens")
        labelled(Gauge, "dolphin:simulated", "1: this engine is Dolphin's simulator").set(1)
        # How late (engine s) a step's tokens went out at worst: > a few ms means this process cannot keep up
        # with the chosen time_scale and measured latencies are inflated.
        self.max_lag = labelled(Gauge, "dolphin:sim_max_lag_seconds", "Worst emission lag behind engine time")
        self._worst_lag = 0.0

    def note_lag(self, lag: float) -> None:
        """Record how late (engine s) a step's tokens went out; the gauge keeps the worst."""
        if lag > self._worst_lag:
            self._worst_lag = lag
            self.max_lag.set(lag)
