"""Roofline cost of one continuous-batching engine step.

A first honest model: a step processes T tokens; its time is the larger of tensor-core time and HBM time
(weights streamed once per step, KV read by attention and written for new tokens), plus the tensor-parallel
all-reduces and a fixed scheduler/sampling overhead. Efficiencies are named constants, not fitted per GPU.

All arithmetic is plain float math that also works element-wise on numpy arrays, so callers can cost a
whole grid of batch shapes at once.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tasks.catalog import DTYPE_BYTES, GpuSpec, ModelArch

# Fraction of dense tensor-core peak that serving GEMMs/attention reach (vLLM/SGLang prefill on Hopper
# sits around 50-70 % MFU).
MFU = 0.6
# Fraction of HBM peak reached when streaming weights and KV (decode kernels reach 75-85 %).
MBU = 0.8
# Fraction of one-direction link bandwidth that NCCL ring all-reduce / KV transfers achieve.
LINK_EFFICIENCY = 0.8
# Fixed cost of one all-reduce call (launch + synchronisation): small messages are latency-bound.
ALLREDUCE_LATENCY_S = {"nvlink": 8e-6, "pcie": 25e-6}
# Fixed cost of moving one request's KV between instances (connector handshake, descriptor exchange).
KV_TRANSFER_LATENCY_S = 0.5e-3
# Activations exchanged by all-reduce are 16-bit whatever the weight dtype.
ACT_BYTES = 2.0


@dataclass(frozen=True)
class StepCost:
    seconds: float
    compute_s: float
    memory_s: float
    comm_s: float
    overhead_s: float


def causal_context(start: float, n: float) -> float:
    """Sum of attended context over `n` prompt tokens at positions start+1..start+n (a causal chunk)."""
    return n * start + n * (n + 1) / 2


class PerfModel:
    """Step costs for one engine instance: `model` on `tp` GPUs of kind `gpu`."""

    def __init__(
        self,
        model: ModelArch,
        gpu: GpuSpec,
        weights_dtype: str,
        kv_dtype: str,
        tp: int = 1,
        step_overhead_s: float = 0.002,
    ) -> None:
        for dt in (weights_dtype, kv_dtype):
            if dt not in DTYPE_BYTES:
                raise ValueError(f"unknown dtype {dt!r}; use one of {sorted(DTYPE_BYTES)}")
        self.model, self.gpu, self.tp = model, gpu, tp
        self.weights_dtype, self.kv_dtype = weights_dtype, kv_dtype
        self.step_overhead_s = step_overhead_s
        # W8A8 uses FP8 tensor cores; int4 (W4A16) and FP8 on a GPU without FP8 (W8A16) dequantise to bf16.
        self.compute_dtype = "fp8" if weights_dtype == "fp8" and gpu.supports_fp8 else "bf16"

        embed = model.vocab_size * model.hidden_size
        # The embedding lookup gathers T rows: it is neither a GEMM nor streamed. Tied, it is the LM head.
        self.gemm_params = model.active_params - (0 if model.tie_word_embeddings else embed)
        lookup_bytes = 0 if model.tie_word_embeddings else embed * DTYPE_BYTES["bf16"]
        self.weight_bytes_per_gpu = (model.weight_bytes(weights_dtype) - lookup_bytes) / tp
        self.kv_bytes_per_token = model.kv_bytes_per_token(kv_dtype, tp)  # per GPU

        # Precomputed per-unit rates so `step` is a handful of multiply-adds.
        self._gemm_s_per_token = 2 * self.gemm_params / (gpu.peak_flops(self.compute_dtype) * MFU) / tp
        # FlashAttention runs in bf16 whatever the weights are.
        attn_flops_per_ctx = 4 * model.num_layers * model.num_attention_heads * model.head_dim
        self._attn_s_per_ctx = attn_flops_per_ctx / (gpu.peak_flops("bf16") * MFU) / tp
        self._hbm_bps = gpu.hbm_bandwidth_gbps * 1e9 * MBU
        self._link_bps = gpu.link_bandwidth_gbps * 1e9 * LINK_EFFICIENCY
        # 2 all-reduces per layer (after attention and after the MLP), ring algorithm.
        calls = 2 * model.num_layers
        ring = 2 * (tp - 1) / tp
        self._comm_s_per_token = calls * ring * model.hidden_size * ACT_BYTES / self._link_bps
        self._comm_fixed_s = calls * ALLREDUCE_LATENCY_S[gpu.interconnect] if tp > 1 else 0.0

    def step(
        self,
        prefill_tokens: int = 0,
        prefill_attn_context: int = 0,
        decode_seqs: int = 0,
        decode_context_tokens: int = 0,
        tokens_per_decode_seq: int = 1,
        prefill_prefix_tokens: int = 0,
    ) -> StepCost:
        """Cost of one step.

        prefill_attn_context: sum over prefill tokens of the context each attends (see `causal_context`).
        decode_context_tokens: sum of the decode sequences' contexts (KV tokens read).
        tokens_per_decode_seq: query tokens per decode sequence (k+1 when verifying k draft tokens).
        prefill_prefix_tokens: KV tokens already cached before each prefill chunk, read by its attention
            (chunked prefill, or a disaggregated decode instance's first step).
        """
        decode_tokens = decode_seqs * tokens_per_decode_seq
        tokens = prefill_tokens + decode_tokens
        attn_ctx = prefill_attn_context + decode_context_tokens * tokens_per_decode_seq
        compute_s = tokens * self._gemm_s_per_token + attn_ctx * self._attn_s_per_ctx
        kv_bytes = (decode_context_tokens + prefill_prefix_tokens + tokens) * self.kv_bytes_per_token
        memory_s = (self.weight_bytes_per_gpu + kv_bytes) / self._hbm_bps
        comm_s = tokens * self._comm_s_per_token + self._comm_fixed_s
        seconds = np.maximum(compute_s, memory_s) + comm_s + self.step_overhead_s
        return StepCost(seconds, compute_s, memory_s, comm_s, self.step_overhead_s)

    def prefill_s(self, prompt_tokens: int) -> float:
        """One step prefilling a whole prompt alone (no chunking, no other work)."""
        return self.step(
            prefill_tokens=prompt_tokens, prefill_attn_context=causal_context(0, prompt_tokens)
        ).seconds

    def kv_transfer_s(self, tokens: int) -> float:
        """Moving `tokens` of KV to another instance: each TP rank sends its shard over its own link."""
        return tokens * self.kv_bytes_per_token / self._link_bps + KV_TRANSFER_LATENCY_S

    def capacity_qps(
        self, mean_input: float, mean_output: float, max_num_seqs: int, kv_capacity_tokens: int
    ) -> float:
        """Rough steady-state upper bound on request rate of one aggregated instance.

        Each request costs its prefill compute plus `mean_output` decode steps shared by a batch as large as
        max_num_seqs and the KV cache allow at the mean context. A hint for search starts, not a promise.
        """
        prefill_s = self.step(
            prefill_tokens=mean_input, prefill_attn_context=causal_context(0, mean_input)
        ).compute_s
        mean_ctx = mean_input + mean_output / 2
        batch = np.minimum(max_num_seqs, kv_capacity_tokens / mean_ctx)
        decode_step_s = self.step(decode_seqs=batch, decode_context_tokens=batch * mean_ctx).seconds
        return 1.0 / (prefill_s + mean_output * decode_step_s / batch)
