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


class QuantConfig(_Section):
    """`weights`: a dtype, or `auto` to pick the most accurate candidate that fits the memory plan."""

    name: str
    weights: Literal["auto", "fp16", "bf16", "fp8", "int4"]
    kv_cache: Literal["auto", "fp16", "bf16", "fp8"] = "auto"
    candidates: list[Literal["fp16", "bf16", "fp8", "int4"]] = ["bf16", "fp8", "int4"]
    # Accuracy policy: the most aggressive weight dtype allowed when choosing automatically.
    min_weights_bits: int = Field(4, ge=4, le=16)


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
