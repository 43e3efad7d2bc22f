"""Typed results that pass between pipeline stages.

Each stage takes and returns these (and config sections from `tasks.config`); no stage reads another's
internals. All are JSON-serialisable pydantic models, so Prefect can hand them around and MLflow can log
them as they are.
"""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class _Contract(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


# ---------------------------------------------------------------- profile
class LengthStats(_Contract):
    mean: float
    p50: float
    p90: float
    p99: float
    max: float


class WorkloadProfile(_Contract):
    source: str
    requests: int
    duration_s: float = Field(description="last arrival - first arrival")
    mean_qps: float
    peak_qps_1s: float
    peak_qps_60s: float
    interarrival_cv: float
    gamma_shape: float | None
    input_tokens: LengthStats
    output_tokens: LengthStats
    prefix_reuse_ratio: float | None = None
    shared_prefix_len: int = 0
    # Data rows dropped as bad, and the first of them: file line numbers with the reason of each.
    bad_rows: int = 0
    bad_row_lines: list[int] = []
    bad_row_reasons: list[str] = []
    # Requests in flight when each lasts its `latency_model` latency (see tasks.profile_stats.profile_trace):
    # the most at once from the arrivals, and mean_qps x mean latency (Little's law). None: no model given.
    peak_concurrency: int | None = None
    littles_law_concurrency: float | None = None
    latency_model: str | None = None
    # (input, output) pairs drawn from the trace, from which scenario datasets are sampled jointly.
    length_pairs: list[tuple[int, int]]


class BenchRequest(_Contract):
    """One request of a scenario dataset. Token counts follow `tasks.tokenizer`."""

    prompt: str
    prompt_tokens: int
    max_tokens: int


# ---------------------------------------------------------------- kv lower bound
class EngineKnobs(_Contract):
    tensor_parallel_size: int
    gpu_memory_utilization: float
    max_num_seqs: int
    max_model_len: int
    max_num_batched_tokens: int
    block_size: int
    kv_cache_memory_bytes: int | None = Field(None, description="vLLM --kv-cache-memory-bytes; null: vLLM sizes it")


class MemoryPlan(_Contract):
    """Memory of one engine instance (TP GPUs) for one weight/KV dtype pair."""

    weights_dtype: str
    kv_dtype: str
    tp: int
    gpu_memory_gib: float = Field(description="per GPU")
    gpu_memory_utilization: float
    weights_gib: float = Field(description="whole model, all TP ranks")
    activation_reserve_gib: float = Field(description="per GPU")
    kv_bytes_per_token: float = Field(description="per GPU")
    kv_capacity_gib: float = Field(description="per GPU")
    kv_capacity_tokens: int = Field(description="per instance: full-attention tokens the block pool holds")
    kv_num_blocks: int = Field(0, description="vLLM's block count (blocks of block_size tokens x one group's layers)")
    kv_logged_tokens: int = Field(0, description="the 'KV cache size: N tokens' vLLM will log for this plan")
    p99_context_tokens: int
    target_concurrency: int
    kv_lower_bound_gib: float = Field(description="per GPU, for target_concurrency at the p99 context")
    max_concurrency_at_p99: float
    feasible: bool
    reason: str
    shortfall_gib: float = 0.0
    min_tp: int | None = Field(None, description="smallest TP (1/2/4/8) at which this plan fits; null: none")
    knobs: EngineKnobs


class Rejection(_Contract):
    candidate: str
    reason: str


class QuantChoice(_Contract):
    weights_dtype: str
    kv_dtype: str
    reason: str
    plan: MemoryPlan
    rejected: list[Rejection] = []
    expected_quality_loss_pct: float = 0.0
    vllm_args: list[str] = Field([], description="e.g. --quantization fp8 --kv-cache-dtype fp8")
    sglang_args: list[str] = []


# ---------------------------------------------------------------- launch
class Endpoint(_Contract):
    engine: str
    deploy: str
    base_url: str = Field(description="e.g. http://127.0.0.1:8000 (no /v1)")
    model_name: str = Field(description="the served model name to put in requests")
    commands: list[str] = Field(description="exact shell-quoted command lines")
    log_paths: list[str]
    pids: list[int]
    simulated: bool
    time_scale: float = Field(1.0, description="engine seconds per wall second (sim only)")
    engine_kv_tokens: int | None = Field(None, description="the KV capacity the engine logged (vLLM)")
    greedy_outputs: list[str] = Field([], description="texts of the launch's greedy probe (real engines), "
                                                     "equal across deploy modes of one model and dtypes")
    server_urls: dict[str, str] = Field({}, description="role -> base URL of each engine server (pd: prefill-0, "
                                                        "decode-0, ...; the router is base_url)")

    @property
    def metrics_url(self) -> str:
        """The server whose /metrics show the serving engine's state: the decode server under pd (it holds
        the running requests' KV), else the one server."""
        decode = sorted(url for role, url in self.server_urls.items() if role.startswith("decode"))
        return decode[0] if decode else self.base_url


# ---------------------------------------------------------------- SLO benchmark
class Percentiles(_Contract):
    mean: float
    p50: float
    p90: float
    p95: float
    p99: float


class LevelResult(_Contract):
    index: int
    target_qps: float
    achieved_qps: float
    num_requests: int
    completed: int
    failed: int
    duration_s: float
    ttft_ms: Percentiles
    tpot_ms: Percentiles
    itl_ms: Percentiles
    e2el_ms: Percentiles
    output_tok_per_s: float
    goodput_rps: float
    slo_met: bool
    violations: list[str] = []
    # The engine's telemetry over the level (`engine_*` keys, tasks.bench.engine_metrics.level_telemetry);
    # a key is absent when the engine does not export that metric.
    engine: dict[str, float] = {}


class BenchResult(_Contract):
    slo_targets: dict[str, float]
    levels: list[LevelResult]
    max_sustainable_qps: float = Field(description="0 when no level held the SLO")
    best_level: int | None = Field(description="index of the level at max_sustainable_qps")
    records_path: str = Field(description="JSONL, one line per request")
    time_scale: float
    simulated: bool
    # Counters and gauges scraped from the engine's /metrics after the last level (summed over labels),
    # e.g. vllm:num_preemptions_total, vllm:spec_decode_num_accepted_tokens_total.
    engine_metrics: dict[str, float] = {}


# ---------------------------------------------------------------- track
class TrackResult(_Contract):
    run_id: str
    experiment_id: str
    experiment: str
    tracking_uri: str
    artifact_uri: str
    status: str
