"""What one sim engine server process simulates: written by the launcher, read by the server."""
from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from tasks.catalog import DTYPE_BYTES, GpuSpec, ModelArch
from tasks.perf_model import PerfModel
from tasks.perf_spec import SpecDecode, speculation

# The sim engine schedules as vLLM does (chunked prefill mixed with decodes), so it plays vLLM's costs.
SIM_BACKEND = "vllm"


class SimSpec(BaseModel):
    """The sim server's whole configuration.

    `kv_capacity_tokens` is per instance (each prefill/decode instance in `pd` mode has its own cache).
    `port=0` binds any free port; the server prints the bound port in its "listening on" line.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    model: ModelArch
    gpu: GpuSpec
    weights_dtype: str = "bf16"
    kv_dtype: str = "bf16"
    mode: Literal["agg", "pd", "spec"] = "agg"
    tp: int = Field(1, ge=1)
    prefill_instances: int = Field(1, ge=1)
    prefill_tp: int = Field(1, ge=1)
    decode_instances: int = Field(1, ge=1)
    decode_tp: int = Field(1, ge=1)
    num_speculative_tokens: int = Field(0, ge=0)
    acceptance_rate: float = Field(0.0, ge=0.0, lt=1.0)
    # How drafts are proposed, as the performance model costs them (`tasks/perf_spec.py`): n-gram lookup is
    # free, an EAGLE-3 head one decoder layer per draft token, a separate draft model (`draft`) its own steps.
    spec_method: Literal["ngram", "eagle3", "draft_model"] = "ngram"
    draft: ModelArch | None = None
    kv_capacity_tokens: int = Field(gt=0)
    block_size: int = Field(16, ge=1)
    max_num_seqs: int = Field(256, ge=1)
    max_num_batched_tokens: int = Field(8192, ge=1)
    max_model_len: int = Field(ge=2)
    served_model_name: str
    host: str = "127.0.0.1"
    port: int = Field(0, ge=0, le=65535)
    time_scale: float = Field(1.0, gt=0, description="engine seconds per wall second")
    step_overhead_ms: float = Field(2.0, ge=0)
    crash_after_requests: int | None = Field(None, ge=1)
    parent_pid: int | None = None
    seed: int = 0

    @field_validator("weights_dtype", "kv_dtype")
    @classmethod
    def _known_dtype(cls, v: str) -> str:
        if v not in DTYPE_BYTES:
            raise ValueError(f"unknown dtype {v!r}; resolve 'auto' first; known: {sorted(DTYPE_BYTES)}")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> "SimSpec":
        if self.mode == "spec" and self.num_speculative_tokens < 1:
            raise ValueError("mode=spec needs num_speculative_tokens >= 1")
        # As vLLM refuses to start: one max-length sequence must fit in the KV cache.
        if self.max_model_len > self.kv_capacity_tokens:
            raise ValueError(
                f"max_model_len ({self.max_model_len}) is larger than the KV cache "
                f"({self.kv_capacity_tokens} tokens); lower max_model_len or give more KV memory"
            )
        if self.kv_capacity_tokens < self.block_size:
            raise ValueError("kv_capacity_tokens must hold at least one block")
        return self

    def spec_decode(self, target: PerfModel) -> SpecDecode:
        """The speculative decoding `target` runs (none outside mode=spec; `perf_spec.speculation`)."""
        spec, _ = speculation(self.spec_method if self.mode == "spec" else None, self.num_speculative_tokens,
                              self.acceptance_rate, target, self.draft, self.step_overhead_ms / 1e3,
                              backend=SIM_BACKEND)
        return spec

    def perf_model(self, tp: int | None = None) -> PerfModel:
        """The step-cost model of one instance at `tp` (default: the aggregated `tp`), with the calibrated
        host work per sequence of the engine the sim plays."""
        return PerfModel(self.model, self.gpu, self.weights_dtype, self.kv_dtype, tp or self.tp,
                         self.step_overhead_ms / 1e3, backend=SIM_BACKEND)

    def write(self, path: str | Path) -> Path:
        p = Path(path)
        p.write_text(self.model_dump_json(indent=2))
        return p

    @classmethod
    def read(cls, path: str | Path) -> "SimSpec":
        return cls.model_validate_json(Path(path).read_text())
