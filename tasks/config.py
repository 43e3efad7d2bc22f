"""Schema of the resolved Hydra config.

`load_config` validates the whole tree before anything expensive starts, so that a typo or an impossible
value fails at once with the field's dotted path and what to write instead.
"""
from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from tasks.catalog import GpuSpec, ModelArch


class ConfigError(ValueError):
    """A config value that cannot work; the message names the field and the fix."""


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class PoolSpec(_Section):
    instances: int = Field(1, ge=1)
    tp: int = Field(1, ge=1)
    # This pool's --gpu-memory-utilization (e.g. prefill 0.9, decode 0.7); null: memory.gpu_memory_utilization.
    # The memory plan sizes the decode pool's KV cache (it holds the running requests) with it.
    gpu_memory_utilization: float | None = Field(None, gt=0, le=1)


class DeployConfig(_Section):
    """How the model is served. `agg`: `replicas` copies at TP `tp`. `pd`: a prefill pool and a decode
    pool, KV moved between them. `spec`: aggregated with speculative decoding."""

    mode: Literal["agg", "pd", "spec"]
    tp: int = Field(1, ge=1)
    replicas: int = Field(1, ge=1)
    prefill: PoolSpec = PoolSpec()
    decode: PoolSpec = PoolSpec()
    kv_connector: str | None = None
    spec_method: Literal["ngram", "draft_model", "eagle3"] | None = None
    num_speculative_tokens: int = Field(0, ge=0)
    # The sim engine's acceptance rate per draft token; real engines measure their own.
    acceptance_rate: float = Field(0.0, ge=0.0, lt=1.0)
    draft_model: str | None = None
    # SGLang's EAGLE draft tree (vLLM's EAGLE proposes a chain): candidates per step, and tokens verified
    # per step (null: num_speculative_tokens + 1, a chain).
    eagle_topk: int = Field(1, ge=1)
    num_draft_tokens: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _mode_fields(self) -> "DeployConfig":
        if self.mode == "spec" and (self.spec_method is None or self.num_speculative_tokens < 1):
            raise ValueError("deploy=spec needs spec_method and num_speculative_tokens >= 1")
        if self.spec_method == "draft_model" and not self.draft_model:
            raise ValueError("spec_method=draft_model needs deploy.draft_model")
        return self

    @property
    def num_gpus(self) -> int:
        if self.mode == "pd":
            return self.prefill.instances * self.prefill.tp + self.decode.instances * self.decode.tp
        return self.replicas * self.tp


_WEIGHTS = ("bf16", "fp16", "fp8", "int4")
_KV = ("bf16", "fp16", "fp8")


class QuantConfig(_Section):
    """`weights`: a dtype, or `auto` to pick the most accurate candidate that fits the memory plan."""

    name: str
    weights: Literal["auto", "fp16", "bf16", "fp8", "int4"]
    kv_cache: Literal["auto", "fp16", "bf16", "fp8"] = "auto"
    # "W" (the KV dtype that goes with W) or "W/KV", most accurate first.
    candidates: list[str] = ["bf16", "bf16/fp8", "fp8", "int4", "int4/fp8"]
    # Quality policy for `auto`: the largest expected loss (conf/quality/ table) a candidate may have.
    max_quality_loss_pct: float = Field(2.0, ge=0)
    int4_method: Literal["awq", "gptq"] = "awq"

    @field_validator("candidates")
    @classmethod
    def _pairs(cls, v: list[str]) -> list[str]:
        pattern = rf"({'|'.join(_WEIGHTS)})(/({'|'.join(_KV)}))?"
        for c in v:
            if not re.fullmatch(pattern, c):
                raise ValueError(f"candidate {c!r} is not W or W/KV with W in {_WEIGHTS} and KV in {_KV}, "
                                 f"e.g. int4/fp8")
        if not v:
            raise ValueError("give at least one candidate, e.g. [bf16, fp8, int4]")
        return v


class QualityTable(_Section):
    """Expected quality loss (% of the bf16 score) per weight dtype and per KV dtype; conf/quality/."""

    name: str
    weights: dict[str, float]
    kv_cache: dict[str, float]

    @model_validator(mode="after")
    def _complete(self) -> "QualityTable":
        for field, needed in (("weights", _WEIGHTS), ("kv_cache", _KV)):
            missing = set(needed) - set(getattr(self, field))
            if missing:
                raise ValueError(f"quality.{field} has no entry for {sorted(missing)}")
        return self


class MemoryConfig(_Section):
    """How the memory plan sizes an instance (vLLM's knobs and Dolphin's reserve policy)."""

    gpu_memory_utilization: float = Field(0.9, gt=0, le=1, description="share of GPU memory vLLM may use")
    reserve_fraction: float = Field(0.05, gt=0, le=0.2, description="cap on the activation/system reserve, "
                                    "as a share of GPU memory")
    block_size: int = Field(16, ge=1, description="tokens per KV block (vLLM --block-size)")
    max_model_len: int | None = Field(None, ge=2, description="null: the trace's longest request")
    max_num_batched_tokens: int = Field(8192, ge=1, description="tokens per engine step (chunked prefill)")
    prefix_discount: bool = Field(False, description="count the workload's fixed shared prefix once in "
                                  "the KV lower bound (prefix caching on)")
    kv_cache_gib: float | None = Field(None, gt=0, description="KV memory per GPU; null: what is left of "
                                       "gpu_memory_utilization after weights and the reserve")
    # Pass the planned KV size to vLLM (--kv-cache-memory-bytes), so the engine allocates exactly the plan
    # and the launch can check the capacity it logs against the plan's.
    pin_kv_cache: bool = True


class EngineConfig(_Section):
    kind: Literal["sim", "vllm", "sglang"]
    host: str = "127.0.0.1"
    port: int | None = Field(None, ge=1, le=65535, description="null: a free port")
    startup_timeout_s: float = Field(120.0, gt=0)
    # sim only: engine seconds per wall second. The client schedules and reports in engine time.
    time_scale: float = Field(1.0, gt=0)
    step_overhead_ms: float = Field(2.0, ge=0)
    # Fault injection for tests of failure handling: the engine exits after this many requests.
    crash_after_requests: int | None = Field(None, ge=1)
    executable: str | None = None
    extra_args: list[str] = []
    env: dict[str, str] = Field({}, description="added to each engine process's environment")
    # vLLM's flags and JSON config schemas change between versions (e.g. --kv-transfer-config fields).
    vllm_version: str = Field("0.32.0", pattern=r"^\d+\.\d+(\.\d+)?$")


class WorkloadConfig(_Section):
    name: str
    trace: str | None = Field(None, description="absolute path of a trace file")
    format: Literal["auto", "azure", "mooncake", "csv", "jsonl", "parquet"] = "auto"
    columns: dict[str, str] = {}
    # Synthetic scenario (used when `trace` is null, or to override lengths):
    input_len: int | None = Field(None, ge=1)
    output_len: int | None = Field(None, ge=1)
    shared_prefix_len: int = Field(0, ge=0)
    seed: int = 0
    # A trace whose share of bad rows (unparsable, missing or negative values) exceeds this is rejected.
    max_bad_row_fraction: float = Field(0.01, ge=0.0, le=1.0)


class SLOConfig(_Section):
    """`targets` maps `<metric>_ms_p<percentile>` to a bound in ms, e.g. {e2el_ms_p99: 2000}."""

    targets: dict[str, float]
    target_qps: float | None = Field(None, gt=0, description="null: the trace's mean QPS")

    @field_validator("targets")
    @classmethod
    def _target_names(cls, v: dict[str, float]) -> dict[str, float]:
        if not v:
            raise ValueError("give at least one target, e.g. slo.targets.e2el_ms_p99=2000")
        for key, bound in v.items():
            if not re.fullmatch(r"(ttft|tpot|itl|e2el)_ms_p\d+(\.\d+)?", key):
                raise ValueError(
                    f"target {key!r} is not <ttft|tpot|itl|e2el>_ms_p<percentile>, e.g. ttft_ms_p90"
                )
            if bound is None or bound <= 0:
                raise ValueError(f"target {key} must be a positive number of ms")
        return v


class BenchConfig(_Section):
    endpoint: Literal["completions", "chat"] = "completions"
    requests_per_level: int = Field(200, ge=10)
    min_level_duration_s: float = Field(0.0, ge=0)
    warmup_requests: int = Field(5, ge=0)
    start_qps: float | None = Field(None, gt=0, description="null: from the plan's predicted capacity")
    growth: float = Field(2.0, gt=1.0)
    max_levels: int = Field(10, ge=1)
    bisect_tolerance: float = Field(0.1, gt=0, lt=1)
    request_timeout_s: float = Field(300.0, gt=0)
    seed: int = 0
    # A level reports p99 only from >= this many samples beyond it (10 / (1 - 0.99) = 1000 requests at p99);
    # 0 lets requests_per_level alone size levels (smoke runs: their tails are labelled thin instead).
    min_tail_samples: int = Field(10, ge=0)


class TrackingConfig(_Section):
    uri: str
    experiment: str
    artifact_location: str | None = None
    parent_run_id: str | None = None

    @field_validator("uri")
    @classmethod
    def _absolute_sqlite(cls, v: str) -> str:
        if v.startswith("sqlite:///") and not v.startswith("sqlite:////"):
            raise ValueError(f"use an absolute SQLite path (sqlite:////abs/path.db), got {v}")
        return v


class DolphinConfig(_Section):
    model: ModelArch
    gpu: GpuSpec
    deploy: DeployConfig
    quant: QuantConfig
    quality: QualityTable
    memory: MemoryConfig = MemoryConfig()
    engine: EngineConfig
    workload: WorkloadConfig
    slo: SLOConfig
    bench: BenchConfig
    tracking: TrackingConfig
    scenario: str = "default"
    run_dir: str
    experiment: Any = None  # a preset's own notes; its settings are merged into the groups above


def load_config(cfg: Any) -> DolphinConfig:
    """Validate a resolved config mapping; raise ConfigError naming every bad field."""
    try:
        return DolphinConfig.model_validate(cfg)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            field = ".".join(str(p) for p in err["loc"]) or "<config>"
            lines.append(f"  {field}: {err['msg']}")
        raise ConfigError("invalid config:\n" + "\n".join(lines)) from None
