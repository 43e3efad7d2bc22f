"""Scrape an engine's Prometheus /metrics (vLLM names) into flat numbers."""
from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families


def scrape(base_url: str, prefixes: tuple[str, ...] = ("vllm:", "sglang:", "dolphin:"),
           timeout_s: float = 5.0) -> dict[str, float]:
    """Counters and gauges whose name starts with one of `prefixes`, summed over label sets.
    Histograms are left out: the client measures latencies itself. Empty if the endpoint has no /metrics."""
    try:
        resp = httpx.get(f"{base_url}/metrics", timeout=timeout_s)
        resp.raise_for_status()
    except httpx.HTTPError:
        return {}
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(resp.text):
        if family.type not in ("counter", "gauge") or not family.name.startswith(prefixes):
            continue
        for sample in family.samples:
            if sample.name.endswith("_created"):
                continue
            out[sample.name] = out.get(sample.name, 0.0) + sample.value
    return out
