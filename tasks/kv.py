"""Stage 2: the memory plan of one engine instance, computed the way vLLM sizes its KV cache.

vLLM gives the KV cache what is left of `gpu_memory_utilization` x GPU memory after the weights (its TP
shard) and the activation peak of a profiling forward pass, and allocates it in whole blocks of
`block_size` tokens. Each GPU holds every layer for its shard of KV heads, so the instance's token
capacity equals one GPU's. The plan is feasible when the weights and activations fit and the KV cache
holds the target concurrency (Little's law) at the p99 context.
"""
from __future__ import annotations

import math

from prefect import task

from tasks.catalog import GIB, GpuSpec, ModelArch
from tasks.config import DeployConfig, QuantConfig, SLOConfig
from tasks.contracts import EngineKnobs, MemoryPlan, WorkloadProfile
from tasks.quantize import WEIGHT_BITS, weight_candidates

# vLLM's default for online serving on datacenter GPUs (chunked prefill on): tokens per engine step.
MAX_NUM_BATCHED_TOKENS = 8192
# vLLM's default cap on concurrently running sequences.
MAX_NUM_SEQS = 256
ACTIVATION_CAP_FRACTION = 0.05
ACTIVATION_FLOOR_BYTES = 0.5 * GIB
# NCCL/cuBLAS workspaces and CUDA-graph pools that vLLM counts as "non-torch" memory.
NON_TORCH_BYTES = 0.25 * GIB


def _ceil(x: float) -> int:
    """Ceiling that ignores float noise (5.0000000001 -> 5)."""
    return math.ceil(round(x, 9))


def kv_capacity_tokens(kv_bytes: float, kv_bytes_per_token: float, block_size: int) -> int:
    """Tokens that `kv_bytes` hold when allocated in whole blocks of `block_size` tokens."""
    if kv_bytes <= 0:
        return 0
    return int(kv_bytes // (block_size * kv_bytes_per_token)) * block_size


def activation_reserve_bytes(model: ModelArch, gpu: GpuSpec, tp: int,
                             max_num_batched_tokens: int = MAX_NUM_BATCHED_TOKENS) -> float:
    """Per-GPU peak of transient memory in vLLM's profiling pass, capped at 5% of the GPU.

    The largest live tensors of a forward pass over `max_num_batched_tokens` tokens are in the MLP:
    its input (hidden), the fused gate/up output (2 x intermediate / TP) and the activated product
    (intermediate / TP), all 16-bit: tokens x (hidden + 3 x intermediate / TP) x 2 B. The sampler adds
    fp32 logits for up to 256 sequences (vocab x 4 B each), and NCCL/cuBLAS/CUDA graphs ~0.25 GiB.
    The result is at least 0.5 GiB (allocator fragmentation) and at most 5% of GPU memory.
    """
    mlp = max_num_batched_tokens * (model.hidden_size + 3 * model.intermediate_size / tp) * 2
    logits = MAX_NUM_SEQS * model.vocab_size * 4
    estimate = max(mlp + logits + NON_TORCH_BYTES, ACTIVATION_FLOOR_BYTES)
    return min(estimate, ACTIVATION_CAP_FRACTION * gpu.memory_bytes)


def slo_latency_s(slo: SLOConfig, default_s: float = 2.0) -> float:
    """The E2EL bound with the highest percentile in the SLO, in seconds; `default_s` without one."""
    e2el = {float(k.rsplit("_p", 1)[1]): v for k, v in slo.targets.items() if k.startswith("e2el_")}
    return e2el[max(e2el)] / 1000.0 if e2el else default_s


def plan_tp(deploy: DeployConfig) -> int:
    """TP of the instance that holds running requests' KV: the decode pool's under PD."""
    return deploy.decode.tp if deploy.mode == "pd" else deploy.tp


def _round_up(x: float, multiple: int) -> int:
    return _ceil(x / multiple) * multiple


def _fixes(weights_dtype: str, tp: int, gpu: GpuSpec) -> str:
    smaller = [f"quant={d}" for d in ("fp8", "int4")
               if WEIGHT_BITS[d] < WEIGHT_BITS[weights_dtype] and (d != "fp8" or gpu.supports_fp8)]
    text = f"Fixes: more tensor parallelism (deploy.tp, or deploy.decode.tp under pd, above {tp})"
    text += f", a smaller dtype ({' or '.join(smaller)})" if smaller else ""
    return text + f", or a GPU with more memory than {gpu.name}."


def plan_memory(model: ModelArch, gpu: GpuSpec, deploy: DeployConfig, profile: WorkloadProfile,
                slo: SLOConfig, weights_dtype: str, kv_dtype: str, gpu_memory_utilization: float = 0.9,
                block_size: int = 16, max_model_len: int | None = None) -> MemoryPlan:
    """The memory plan of one instance for one (weights, KV) dtype pair; see the module docstring.

    Target concurrency = ceil(target QPS x latency) by Little's law, the latency being the SLO's E2EL
    bound (2 s without one); the KV lower bound is that many requests at the p99 context. The
    shortfall of an infeasible plan is the memory per GPU still missing: for weights, activations and
    the lower bound together when the weights do not fit, else for the KV cache alone.

    Engine knobs: max_model_len = the argument, else the trace's longest input + longest output (block
    aligned, at most the model's max_position_embeddings, and at most the KV capacity when that holds
    the p99 context, since vLLM refuses to start when one sequence cannot fit); an explicit
    max_model_len above the capacity makes the plan infeasible. max_num_seqs = what the KV cache
    holds at the mean context, at most 256: admitting more only makes the scheduler preempt.
    max_num_batched_tokens = 8192.
    """
    if not 0 < gpu_memory_utilization <= 1:
        raise ValueError(f"gpu_memory_utilization={gpu_memory_utilization} must be in (0, 1]")
    if block_size < 1:
        raise ValueError(f"block_size={block_size} must be >= 1")
    gib = lambda b: b / GIB  # noqa: E731 - local unit conversion
    tp = plan_tp(deploy)
    budget = gpu.memory_bytes * gpu_memory_utilization
    weights = model.weight_bytes(weights_dtype)
    batched_tokens = max(MAX_NUM_BATCHED_TOKENS, block_size)
    static = weights / tp + activation_reserve_bytes(model, gpu, tp, batched_tokens)
    kv_bpt = model.kv_bytes_per_token(kv_dtype, tp)
    kv_bytes = budget - static
    capacity = kv_capacity_tokens(kv_bytes, kv_bpt, block_size)

    p99_ctx = _ceil(profile.input_tokens.p99 + profile.output_tokens.p99)
    target_qps = slo.target_qps or profile.mean_qps
    latency_s = slo_latency_s(slo)
    concurrency = max(1, _ceil(target_qps * latency_s))
    need_tokens = concurrency * p99_ctx
    lower_bound = need_tokens * kv_bpt

    fixes = _fixes(weights_dtype, tp, gpu)
    feasible, shortfall = False, 0.0
    if static > budget:
        shortfall = static + lower_bound - budget
        reason = (f"{weights_dtype} weights ({gib(weights / tp):.1f} GiB per GPU at TP {tp}) and activations "
                  f"({gib(static - weights / tp):.1f} GiB) exceed the usable {gpu_memory_utilization:g} x "
                  f"{gpu.memory_gib:.1f} GiB = {gib(budget):.1f} GiB; with the KV lower bound of "
                  f"{gib(lower_bound):.1f} GiB, the plan is short by {gib(shortfall):.1f} GiB per GPU. {fixes}")
    elif capacity < need_tokens:
        shortfall = lower_bound - capacity * kv_bpt
        reason = (f"the KV cache holds {capacity:,} tokens ({gib(kv_bytes):.1f} GiB per GPU) but {concurrency} "
                  f"concurrent requests ({target_qps:.2f} QPS x {latency_s:g} s) at the p99 context of "
                  f"{p99_ctx:,} tokens need {need_tokens:,} ({gib(lower_bound):.1f} GiB): "
                  f"short by {gib(shortfall):.1f} GiB per GPU. {fixes}")
    elif max_model_len is not None and capacity < max_model_len:
        shortfall = (max_model_len - capacity) * kv_bpt
        reason = (f"max_model_len={max_model_len} exceeds the KV capacity of {capacity:,} tokens, so vLLM "
                  f"refuses to start; lower max_model_len. {fixes}")
    else:
        feasible = True
        reason = (f"{gib(kv_bytes):.1f} GiB KV per GPU holds {capacity:,} tokens: "
                  f"{capacity / p99_ctx:.0f} concurrent requests at the p99 context of {p99_ctx:,} tokens, "
                  f">= the target {concurrency} ({target_qps:.2f} QPS x {latency_s:g} s)")

    return MemoryPlan(
        weights_dtype=weights_dtype,
        kv_dtype=kv_dtype,
        tp=tp,
        gpu_memory_gib=gpu.memory_gib,
        gpu_memory_utilization=gpu_memory_utilization,
        weights_gib=gib(weights),
        activation_reserve_gib=gib(static - weights / tp),
        kv_bytes_per_token=kv_bpt,
        kv_capacity_gib=gib(max(kv_bytes, 0.0)),
        kv_capacity_tokens=capacity,
        p99_context_tokens=p99_ctx,
        target_concurrency=concurrency,
        kv_lower_bound_gib=gib(lower_bound),
        max_concurrency_at_p99=capacity / p99_ctx,
        feasible=feasible,
        reason=reason,
        shortfall_gib=gib(shortfall),
        knobs=_knobs(model, profile, tp, gpu_memory_utilization, block_size, capacity, p99_ctx,
                     batched_tokens, max_model_len),
    )


def _knobs(model: ModelArch, profile: WorkloadProfile, tp: int, util: float, block_size: int, capacity: int,
           p99_ctx: int, batched_tokens: int, max_model_len: int | None) -> EngineKnobs:
    """vLLM flags for this plan; the rules are in `plan_memory`'s docstring."""
    longest = _round_up(profile.input_tokens.max + profile.output_tokens.max, block_size)
    model_len = max_model_len or min(model.max_position_embeddings, longest)
    if max_model_len is None and capacity >= p99_ctx:
        model_len = min(model_len, capacity)  # a longer request could never be scheduled anyway
    mean_ctx = max(1, _ceil(profile.input_tokens.mean + profile.output_tokens.mean))
    return EngineKnobs(
        tensor_parallel_size=tp,
        gpu_memory_utilization=util,
        max_num_seqs=min(MAX_NUM_SEQS, max(1, capacity // mean_ctx)),
        max_model_len=model_len,
        max_num_batched_tokens=batched_tokens,
        block_size=block_size,
    )


@task(name="kv-lower-bound")
def kv_task(model: ModelArch, gpu: GpuSpec, deploy: DeployConfig, quant: QuantConfig,
            profile: WorkloadProfile, slo: SLOConfig) -> list[MemoryPlan]:
    """One memory plan per quantization candidate the GPU can run, in candidate order."""
    candidates, _ = weight_candidates(quant, gpu)
    return [plan_memory(model, gpu, deploy, profile, slo, w, kv) for w, kv in candidates]
