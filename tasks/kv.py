"""Stage 2: the memory plan of one engine instance, computed the way vLLM sizes its KV cache.

vLLM gives the KV cache what is left of `gpu_memory_utilization` x GPU memory after the weights (its TP
shard) and the activation peak of a profiling forward pass; `tasks.kv_sizing` reproduces how it cuts
that into blocks. Every GPU holds every layer for its shard of KV heads, so the instance's token
capacity equals one GPU's.

The plan is feasible when the weights and activations fit and the KV cache holds the target
concurrency (Little's law at the target QPS) at the p99 context.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from prefect import task

from tasks.catalog import GIB, GpuSpec, ModelArch
from tasks.kv_sizing import MAX_NUM_SEQS, KvCapacity, static_bytes, vllm_kv_capacity
from tasks.config import DeployConfig, MemoryConfig, QualityTable, QuantConfig, SLOConfig
from tasks.contracts import EngineKnobs, MemoryPlan, WorkloadProfile
from tasks.quantize import WEIGHT_BITS, candidate_pairs

TP_CHOICES = (1, 2, 4, 8)


def _ceil(x: float) -> int:
    """Ceiling that ignores float noise (5.0000000001 -> 5)."""
    return math.ceil(round(x, 9))


def slo_latency_s(slo: SLOConfig, default_s: float = 2.0) -> float:
    """The E2EL bound with the highest percentile in the SLO, in seconds; `default_s` without one."""
    e2el = {float(k.rsplit("_p", 1)[1]): v for k, v in slo.targets.items() if k.startswith("e2el_")}
    return e2el[max(e2el)] / 1000.0 if e2el else default_s


def plan_tp(deploy: DeployConfig) -> int:
    """TP of the instance that holds running requests' KV: the decode pool's under PD."""
    return deploy.decode.tp if deploy.mode == "pd" else deploy.tp


def _round_up(x: float, multiple: int) -> int:
    return _ceil(x / multiple) * multiple


def _fixes(weights_dtype: str, tp: int, gpu: GpuSpec, min_tp: int | None) -> str:
    smaller = [f"quant={d}" for d in ("fp8", "int4")
               if WEIGHT_BITS[d] < WEIGHT_BITS[weights_dtype] and (d != "fp8" or gpu.supports_fp8)]
    more_tp = (f"tensor parallelism {min_tp} (deploy.tp, or deploy.decode.tp under pd)" if min_tp
               else f"more tensor parallelism than {tp} (deploy.tp, or deploy.decode.tp under pd; "
                    f"none up to {TP_CHOICES[-1]} fits)")
    text = f"Fixes: {more_tp}"
    text += f", a smaller dtype ({' or '.join(smaller)})" if smaller else ""
    return text + f", or a GPU with more memory than {gpu.name}."


@dataclass(frozen=True)
class _Fit:
    """The memory arithmetic of one (TP, dtypes) candidate, before any verdict."""

    budget: float
    static: float  # weights shard + activation reserve, per GPU
    kv: KvCapacity
    need_blocks: int
    explicit_kv: bool = False  # memory.kv_cache_gib set: the KV cache has a size of its own

    @property
    def static_fits(self) -> bool:
        """Weights and reserve fit beside the KV cache (its explicit size, or none when it takes the rest)."""
        return self.static + (self.kv.kv_bytes if self.explicit_kv else 0) <= self.budget


def _fit(model: ModelArch, gpu: GpuSpec, tp: int, weights_dtype: str, kv_dtype: str, memory: MemoryConfig,
         model_len: int, p99_ctx: int, concurrency: int, shared_prefix: int) -> _Fit:
    budget = gpu.memory_bytes * memory.gpu_memory_utilization
    static = static_bytes(model, gpu, tp, weights_dtype, memory)
    kv_bytes = memory.kv_cache_gib * GIB if memory.kv_cache_gib else budget - static
    kv = vllm_kv_capacity(model, kv_bytes, kv_dtype, tp, memory.block_size, model_len,
                          memory.max_num_batched_tokens)
    # Whole blocks per request; a shared prefix's full blocks are stored once for all requests.
    per_request = kv.blocks_per_request(p99_ctx)
    shared_blocks = min(shared_prefix // memory.block_size, per_request) if memory.prefix_discount else 0
    need = concurrency * (per_request - shared_blocks) + shared_blocks
    return _Fit(budget=budget, static=static, kv=kv, need_blocks=need, explicit_kv=memory.kv_cache_gib is not None)


def smallest_tp(model: ModelArch, gpu: GpuSpec, weights_dtype: str, kv_dtype: str, memory: MemoryConfig,
                model_len: int, p99_ctx: int, concurrency: int, shared_prefix: int = 0) -> int | None:
    """The smallest TP in 1, 2, 4, 8 (dividing the attention heads) at which the target concurrency
    fits at the p99 context; None when even TP 8 does not."""
    for tp in TP_CHOICES:
        if model.num_attention_heads % tp:
            continue
        f = _fit(model, gpu, tp, weights_dtype, kv_dtype, memory, model_len, p99_ctx, concurrency, shared_prefix)
        if f.static_fits and f.kv.num_blocks >= f.need_blocks:
            return tp
    return None


def plan_memory(model: ModelArch, gpu: GpuSpec, deploy: DeployConfig, profile: WorkloadProfile,
                slo: SLOConfig, weights_dtype: str, kv_dtype: str, memory: MemoryConfig | None = None,
                ) -> MemoryPlan:
    """The memory plan of one instance for one (weights, KV) dtype pair; see the module docstring.

    Target concurrency = ceil(target QPS x latency) by Little's law, the latency being the SLO's E2EL
    bound (2 s without one). The KV lower bound is that many requests at the p99 context (input p99 +
    output p99), in bytes per TP rank; with `memory.prefix_discount` the workload's fixed shared prefix
    counts once. Sliding-window layers hold at most their window. The plan is feasible when the weights
    and activation reserve fit the usable memory and the KV pool has the blocks those requests take.
    The shortfall of an infeasible plan is the memory per GPU still missing: for weights, activations
    and the lower bound together when the weights do not fit, else for the KV cache alone.

    Engine knobs: max_model_len = `memory.max_model_len`, else the trace's longest input + longest
    output (block aligned, at most the model's max_position_embeddings, and at most the KV capacity
    when that holds the p99 context, since vLLM refuses to start when one sequence cannot fit); an
    explicit max_model_len above the capacity makes the plan infeasible. max_num_seqs = what the KV
    cache holds at the mean context, at most 256: admitting more only makes the scheduler preempt.
    """
    memory = memory or MemoryConfig()
    if deploy.mode == "pd" and deploy.decode.gpu_memory_utilization is not None:  # the pool that holds the KV
        memory = memory.model_copy(update={"gpu_memory_utilization": deploy.decode.gpu_memory_utilization})
    gib = lambda b: b / GIB  # noqa: E731 - local unit conversion
    tp = plan_tp(deploy)
    p99_ctx = _ceil(profile.input_tokens.p99 + profile.output_tokens.p99)
    longest = _round_up(profile.input_tokens.max + profile.output_tokens.max, memory.block_size)
    model_len = memory.max_model_len or min(model.max_position_embeddings, longest)
    target_qps = slo.target_qps or profile.mean_qps
    latency_s = slo_latency_s(slo)
    concurrency = max(1, _ceil(target_qps * latency_s))
    shared = profile.shared_prefix_len if memory.prefix_discount else 0

    fit = _fit(model, gpu, tp, weights_dtype, kv_dtype, memory, model_len, p99_ctx, concurrency, shared)
    kv, budget, static = fit.kv, fit.budget, fit.static
    per_request_bytes = model.kv_bytes_for_context(p99_ctx, kv_dtype, tp)
    shared_bytes = model.kv_bytes_for_context(min(shared, p99_ctx), kv_dtype, tp)
    lower_bound = concurrency * (per_request_bytes - shared_bytes) + shared_bytes
    block_bytes = kv.page_bytes * max(n for _, n in kv.groups)
    min_tp = smallest_tp(model, gpu, weights_dtype, kv_dtype, memory, model_len, p99_ctx, concurrency, shared)
    fixes = _fixes(weights_dtype, tp, gpu, min_tp)

    capacity = kv.pool_tokens
    at_p99 = kv.concurrency_for(p99_ctx)
    feasible, shortfall = False, 0.0
    usable = f"{memory.gpu_memory_utilization:g} x {gpu.memory_gib:.1f} GiB = {gib(budget):.1f} GiB"
    kv_what = "cache (memory.kv_cache_gib)" if fit.explicit_kv else "lower bound"
    if not fit.static_fits:
        shortfall = static + (kv.kv_bytes if fit.explicit_kv else lower_bound) - budget
        reason = (f"{weights_dtype} weights ({gib(model.weight_bytes(weights_dtype) / tp):.1f} GiB per GPU at "
                  f"TP {tp}) and activations ({gib(static - model.weight_bytes(weights_dtype) / tp):.1f} GiB) "
                  f"exceed the usable {usable}; with the KV {kv_what} of "
                  f"{gib(kv.kv_bytes if fit.explicit_kv else lower_bound):.1f} GiB, the "
                  f"plan is short by {gib(shortfall):.1f} GiB per GPU. {fixes}")
    elif kv.num_blocks < fit.need_blocks:
        shortfall = (fit.need_blocks - kv.num_blocks) * block_bytes
        reason = (f"the KV cache holds {capacity:,} tokens ({gib(kv.kv_bytes):.1f} GiB per GPU) but {concurrency} "
                  f"concurrent requests ({target_qps:.2f} QPS x {latency_s:g} s) at the p99 context of "
                  f"{p99_ctx:,} tokens need {gib(lower_bound):.1f} GiB: short by {gib(shortfall):.1f} GiB "
                  f"per GPU. {fixes}")
    elif memory.max_model_len and kv.concurrency_for(model_len) < 1:
        shortfall = (kv.blocks_per_request(model_len) - kv.num_blocks) * block_bytes
        reason = (f"max_model_len={model_len:,} exceeds what the KV cache holds for one request "
                  f"({capacity:,} tokens), so vLLM refuses to start; lower memory.max_model_len. {fixes}")
    else:
        feasible = True
        reason = (f"{gib(kv.kv_bytes):.1f} GiB KV per GPU holds {capacity:,} tokens: "
                  f"{at_p99:.0f} concurrent requests at the p99 context of {p99_ctx:,} tokens, "
                  f">= the target {concurrency} ({target_qps:.2f} QPS x {latency_s:g} s)")
    if not memory.max_model_len and capacity >= p99_ctx:
        model_len = min(model_len, _round_down(capacity, memory.block_size))  # longer could never run

    mean_ctx = max(1, _ceil(profile.input_tokens.mean + profile.output_tokens.mean))
    return MemoryPlan(
        weights_dtype=weights_dtype,
        kv_dtype=kv_dtype,
        tp=tp,
        gpu_memory_gib=gpu.memory_gib,
        gpu_memory_utilization=memory.gpu_memory_utilization,
        weights_gib=gib(model.weight_bytes(weights_dtype)),
        activation_reserve_gib=gib(static - model.weight_bytes(weights_dtype) / tp),
        kv_bytes_per_token=kv.kv_bytes_per_token,
        kv_capacity_gib=gib(kv.kv_bytes),
        kv_capacity_tokens=capacity,
        kv_num_blocks=kv.num_blocks,
        kv_logged_tokens=int(kv.concurrency_for(model_len) * model_len),
        p99_context_tokens=p99_ctx,
        target_concurrency=concurrency,
        kv_lower_bound_gib=gib(lower_bound),
        max_concurrency_at_p99=at_p99,
        feasible=feasible,
        reason=reason,
        shortfall_gib=gib(max(shortfall, 0.0)),
        min_tp=min_tp,
        knobs=EngineKnobs(
            tensor_parallel_size=tp,
            gpu_memory_utilization=memory.gpu_memory_utilization,
            max_num_seqs=min(MAX_NUM_SEQS, max(1, capacity // mean_ctx)),
            max_model_len=model_len,
            max_num_batched_tokens=memory.max_num_batched_tokens,
            block_size=memory.block_size,
            kv_cache_memory_bytes=kv.kv_bytes if memory.pin_kv_cache and kv.kv_bytes > 0 else None,
        ),
    )


def _round_down(x: int, multiple: int) -> int:
    return x // multiple * multiple


@task(name="kv-lower-bound")
def kv_task(model: ModelArch, gpu: GpuSpec, deploy: DeployConfig, quant: QuantConfig, quality: QualityTable,
            profile: WorkloadProfile, slo: SLOConfig, memory: MemoryConfig | None = None) -> list[MemoryPlan]:
    """One memory plan per quantization candidate the GPU can run within the quality budget."""
    candidates, _ = candidate_pairs(quant, gpu, quality)
    return [plan_memory(model, gpu, deploy, profile, slo, w, kv, memory) for w, kv in candidates]
