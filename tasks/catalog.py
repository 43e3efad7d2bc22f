"""Hardware and model specs as typed data.

GPUs and model architectures live in `conf/gpu/*.yaml` and `conf/model/*.yaml`; these classes are their
schema. Adding a GPU or a model is adding a YAML file that validates here.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

GIB = 1024**3
GB = 1000**3

# Bytes per element of a tensor stored in each dtype. int4 weights carry group scales (group 128, fp16):
# 0.5 B + 2 B / 128 = 0.515625 B per weight.
DTYPE_BYTES: dict[str, float] = {
    "fp32": 4.0,
    "fp16": 2.0,
    "bf16": 2.0,
    "fp8": 1.0,
    "int8": 1.0,
    "int4": 0.5 + 2.0 / 128,
}


class _Spec(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class GpuSpec(_Spec):
    """One accelerator. Throughputs are dense (no sparsity) vendor peaks."""

    name: str
    display_name: str
    memory_gib: float = Field(
        gt=0, description="total device memory as CUDA reports it, GiB (an '80GB' H100 shows ~79.2 GiB); "
        "gpu-memory-utilization applies to this"
    )
    hbm_bandwidth_gbps: float = Field(gt=0, description="memory bandwidth, GB/s")
    bf16_tflops: float = Field(gt=0, description="dense BF16/FP16 tensor-core peak")
    fp8_tflops: float | None = Field(None, description="dense FP8 peak; null if the GPU has no FP8")
    int8_tops: float | None = None
    compute_capability: str
    interconnect: Literal["nvlink", "pcie"]
    link_bandwidth_gbps: float = Field(gt=0, description="GPU-to-GPU bandwidth, one direction, GB/s")
    usd_per_hour: float = Field(gt=0, description="price of one GPU-hour; override with your contract")

    @property
    def memory_bytes(self) -> float:
        return self.memory_gib * GIB

    @property
    def supports_fp8(self) -> bool:
        return self.fp8_tflops is not None

    def peak_flops(self, compute_dtype: str) -> float:
        """FLOP/s of the tensor cores for GEMMs whose activations are in `compute_dtype`."""
        if compute_dtype == "fp8":
            if self.fp8_tflops is None:
                raise ValueError(f"GPU {self.name} has no FP8 tensor cores")
            return self.fp8_tflops * 1e12
        if compute_dtype == "int8" and self.int8_tops is not None:
            return self.int8_tops * 1e12
        return self.bf16_tflops * 1e12


class ModelArch(_Spec):
    """A decoder-only transformer, as far as serving cost is concerned (HF config.json field names)."""

    name: str
    hf_id: str | None = None
    num_layers: int = Field(gt=0)
    hidden_size: int = Field(gt=0)
    num_attention_heads: int = Field(gt=0)
    num_kv_heads: int = Field(gt=0)
    head_dim: int = Field(gt=0, description="from config.json; never hidden_size / heads")
    intermediate_size: int = Field(gt=0)
    vocab_size: int = Field(gt=0)
    max_position_embeddings: int = Field(gt=0)
    params_b: float = Field(gt=0, description="total parameters, billions")
    tie_word_embeddings: bool = False

    @model_validator(mode="after")
    def _heads_divide(self) -> "ModelArch":
        if self.num_attention_heads % self.num_kv_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_kv_heads ({self.num_kv_heads})"
            )
        return self

    @property
    def num_params(self) -> float:
        return self.params_b * 1e9

    def kv_bytes_per_token(self, kv_dtype: str, tp: int = 1) -> float:
        """KV-cache bytes one token occupies on one GPU: 2 (K and V) x layers x kv_heads/TP x head_dim."""
        kv_heads_per_gpu = max(1, self.num_kv_heads // tp)  # heads are replicated when TP > kv_heads
        return 2 * self.num_layers * kv_heads_per_gpu * self.head_dim * DTYPE_BYTES[kv_dtype]

    def weight_bytes(self, weights_dtype: str) -> float:
        """Bytes of all weights. Embeddings and the LM head stay 16-bit under weight quantization."""
        embed = self.vocab_size * self.hidden_size * (1 if self.tie_word_embeddings else 2)
        body = self.num_params - embed
        return body * DTYPE_BYTES[weights_dtype] + embed * DTYPE_BYTES["bf16"]

    @classmethod
    def from_hf_config(cls, path: str | Path, name: str | None = None) -> "ModelArch":
        """Read a local Hugging Face `config.json` (Llama/Qwen/Mistral-style dense models)."""
        p = Path(path)
        cfg = json.loads((p / "config.json" if p.is_dir() else p).read_text())
        heads = cfg["num_attention_heads"]
        hidden = cfg["hidden_size"]
        head_dim = cfg.get("head_dim") or hidden // heads
        layers = cfg["num_hidden_layers"]
        kv_heads = cfg.get("num_key_value_heads", heads)
        inter = cfg["intermediate_size"]
        vocab = cfg["vocab_size"]
        tied = bool(cfg.get("tie_word_embeddings", False))
        attn = hidden * head_dim * (heads + 2 * kv_heads) + heads * head_dim * hidden
        mlp = 3 * hidden * inter
        params = layers * (attn + mlp + 2 * hidden) + vocab * hidden * (1 if tied else 2) + hidden
        return cls(
            name=name or p.stem if not p.is_dir() else (name or p.name),
            num_layers=layers,
            hidden_size=hidden,
            num_attention_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            intermediate_size=inter,
            vocab_size=vocab,
            max_position_embeddings=cfg.get("max_position_embeddings", 4096),
            params_b=params / 1e9,
            tie_word_embeddings=tied,
        )
