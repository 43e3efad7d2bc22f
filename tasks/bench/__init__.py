"""SLO benchmark stage: a streaming OpenAI client, Poisson load levels and the max-sustainable-QPS search."""
from tasks.bench.client import RequestRecord, load_records, request_chat, request_completions
from tasks.bench.load import poisson_arrivals
from tasks.bench.metrics import parse_target, percentiles, summarize_level
from tasks.bench.search import run_slo_search

__all__ = [
    "RequestRecord", "load_records", "parse_target", "percentiles", "poisson_arrivals", "request_chat",
    "request_completions", "run_slo_search", "summarize_level",
]
