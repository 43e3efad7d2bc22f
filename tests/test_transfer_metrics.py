"""PD transfer evidence parsed from Prometheus text as a vLLM decode server exposes it."""
from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from tasks.engines.transfer_metrics import parse_transfer_metrics, transferred_share


def exposition(by_source: dict[str, float], transfers: list[tuple[float, float]], failed: float | None,
               engines: int = 1) -> str:
    """The families vLLM 0.32 registers (v1/metrics/loggers.py, nixl/stats.py), one label set per engine."""
    reg = CollectorRegistry()
    src = Counter("vllm:prompt_tokens_by_source", "Prompt tokens by source", ["source", "engine"], registry=reg)
    nbytes = Histogram("vllm:nixl_bytes_transferred", "bytes", ["engine"], registry=reg,
                       buckets=(2**16, 2**20, 2**24))
    secs = Histogram("vllm:nixl_xfer_time_seconds", "s", ["engine"], registry=reg)
    fails = Counter("vllm:nixl_num_failed_transfers", "failed", ["engine"], registry=reg)
    Counter("vllm:prompt_tokens", "all prompt tokens", ["engine"], registry=reg).labels("0").inc(7)  # not ours
    for e in map(str, range(engines)):
        for source, value in by_source.items():
            src.labels(source, e).inc(value)
        for b, t in transfers:
            nbytes.labels(e).observe(b)
            secs.labels(e).observe(t)
        if failed is not None:
            fails.labels(e).inc(failed)
    return generate_latest(reg).decode()


def test_decode_side_counts_by_source_and_nixl_histograms():
    text = exposition({"local_compute": 10, "local_cache_hit": 64, "external_kv_transfer": 3072},
                      [(32768, 0.02), (65536, 0.03)], failed=0, engines=2)
    m = parse_transfer_metrics(text)
    assert m["prompt_tokens_external_kv_transfer"] == 2 * 3072 and m["prompt_tokens_local_compute"] == 20
    assert (m["nixl_bytes_sum"], m["nixl_bytes_count"]) == (2 * 98304, 4)
    assert m["nixl_xfer_s_sum"] == pytest.approx(0.1) and m["nixl_failed_transfers"] == 0
    assert transferred_share(m) == pytest.approx(3072 / (10 + 64 + 3072))


def test_a_server_without_a_connector_reports_no_transfer():
    m = parse_transfer_metrics(exposition({"local_compute": 500}, [], failed=None))
    assert m == {"prompt_tokens_local_compute": 500}
    assert transferred_share(m) == 0.0
    assert transferred_share(parse_transfer_metrics("")) is None
