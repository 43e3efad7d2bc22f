"""Evidence that prefill/decode disaggregation moved KV, from a vLLM decode server's /metrics.

vLLM (v1) splits the prompt tokens it admitted by where their KV came from
(`vllm:prompt_tokens_by_source{source=local_compute|local_cache_hit|external_kv_transfer}`); a decode
instance behind a PD router computes almost none of a prompt itself: the rest arrived through the KV
connector. NixlConnector also exports histograms of each transfer's bytes and time.
"""
from __future__ import annotations

import urllib.request

from prometheus_client.parser import text_string_to_metric_families

SOURCE_FAMILY = "vllm:prompt_tokens_by_source"  # a counter: prometheus_client drops `_total` from the family
# Histogram families summarised as total (sum) and count.
NIXL_HISTOGRAMS = {"nixl_bytes": "vllm:nixl_bytes_transferred", "nixl_xfer_s": "vllm:nixl_xfer_time_seconds"}
NIXL_FAILURES = "vllm:nixl_num_failed_transfers"


def parse_transfer_metrics(text: str) -> dict[str, float]:
    """prompt_tokens_<source> per source, nixl_bytes_sum/_count, nixl_xfer_s_sum/_count and
    nixl_failed_transfers, summed over engines; a series the server does not export is left out."""
    out: dict[str, float] = {}

    def add(key: str, value: float) -> None:
        out[key] = out.get(key, 0.0) + value

    hist_keys = {family: key for key, family in NIXL_HISTOGRAMS.items()}
    for family in text_string_to_metric_families(text):
        if family.name == SOURCE_FAMILY:
            for s in family.samples:
                if s.name.endswith("_total"):
                    add(f"prompt_tokens_{s.labels.get('source', 'unknown')}", s.value)
        elif family.name in hist_keys:
            for s in family.samples:
                for suffix in ("_sum", "_count"):
                    if s.name == family.name + suffix:
                        add(hist_keys[family.name] + suffix, s.value)
        elif family.name == NIXL_FAILURES:
            for s in family.samples:
                if s.name.endswith("_total"):
                    add("nixl_failed_transfers", s.value)
    return out


def transfer_metrics(base_url: str, timeout_s: float = 5.0) -> dict[str, float]:
    """`parse_transfer_metrics` of a live server; {} when it does not answer."""
    try:
        with urllib.request.urlopen(f"{base_url}/metrics", timeout=timeout_s) as resp:
            return parse_transfer_metrics(resp.read().decode())
    except OSError:
        return {}


def transferred_share(metrics: dict[str, float]) -> float | None:
    """The share of the decode server's prompt tokens whose KV arrived by transfer."""
    total = sum(v for k, v in metrics.items() if k.startswith("prompt_tokens_"))
    return metrics.get("prompt_tokens_external_kv_transfer", 0.0) / total if total else None
