"""How vLLM sizes an engine's memory: the activation reserve, KV blocks, groups and concurrency.

Pure arithmetic (no Prefect), shared by the memory plan (`tasks.kv`) and `dolphin kv`. It reproduces vLLM
0.32's allocator (`vllm/v1/core/kv_cache_utils.py`): layers are grouped by attention type, the pool is
cut into blocks of `block_size` tokens x the layers of one group, and the startup log reports
"KV cache size: int(max_concurrency x max_model_len) tokens, Maximum concurrency for max_model_len
tokens per request: X.XXx". The CPU build gets exactly VLLM_CPU_KVCACHE_SPACE GiB of KV memory.
"""
from __future__ import annotations

from dataclasses import dataclass

from tasks.catalog import GIB, GpuSpec, ModelArch
from tasks.config import MemoryConfig

# vLLM's default cap on concurrently running sequences.
MAX_NUM_SEQS = 256
# NCCL/cuBLAS workspaces and CUDA-graph pools that vLLM counts as "non-torch" memory.
NON_TORCH_BYTES = 0.25 * GIB
ACTIVATION_FLOOR_BYTES = 0.5 * GIB


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class KvCapacity:
    """What vLLM allocates and logs for `kv_bytes` of KV memory on one GPU."""

    kv_bytes: int
    kv_bytes_per_token: float  # one token in every layer, this GPU
    page_bytes: float  # one block of one layer
    groups: tuple[tuple[str, int], ...]  # (attention type, layers) of each KV cache group
    num_blocks: int
    block_size: int
    max_model_len: int
    sliding_window: int | None
    max_in_flight_tokens: int

    def blocks_per_request(self, context_tokens: int) -> int:
        """Blocks one request of `context_tokens` takes from the shared pool, summed over groups: a
        full-attention group holds every token, a sliding-window group the window plus the tokens in
        flight (+1 block: the window need not start at a block boundary)."""
        total = 0
        for kind, _ in self.groups:
            if kind == "sliding":
                tokens = min(self.sliding_window - 1 + self.max_in_flight_tokens, context_tokens)
                total += _cdiv(tokens, self.block_size) + 1
            else:
                total += _cdiv(context_tokens, self.block_size)
        return total

    def concurrency_for(self, context_tokens: int) -> float:
        return self.num_blocks / self.blocks_per_request(context_tokens) if self.num_blocks > 0 else 0.0

    @property
    def max_concurrency(self) -> float:
        """vLLM's "Maximum concurrency for max_model_len tokens per request"."""
        return self.concurrency_for(self.max_model_len)

    @property
    def logged_tokens(self) -> int:
        """vLLM 0.32's "KV cache size: N tokens" = int(max concurrency x max_model_len)."""
        return int(self.max_concurrency * self.max_model_len)

    @property
    def pool_tokens(self) -> int:
        """Tokens of full-attention context the pool holds: blocks / groups x block_size."""
        return self.num_blocks // len(self.groups) * self.block_size


def kv_groups(model: ModelArch, hybrid: bool = True) -> tuple[tuple[str, int], ...]:
    """vLLM's KV cache groups (`_get_kv_cache_groups_uniform_page_size`): one group when every layer
    has the same attention type (or the hybrid manager is off: sliding layers then keep all tokens);
    otherwise each type is split into groups of `group_size` layers, `group_size` being the smaller
    type's count (the larger one's when it is under 1.5x the smaller), layers dealt round-robin."""
    sliding, full = model.num_sliding_layers, model.num_layers - model.num_sliding_layers
    if sliding == 0 or not hybrid:
        return (("full", model.num_layers),)
    if full == 0:
        return (("sliding", model.num_layers),)
    small, large = min(full, sliding), max(full, sliding)
    group_size = large if large < small * 1.5 else small
    groups = []
    for kind, n in (("full", full), ("sliding", sliding)):
        k = _cdiv(n, group_size)
        groups += [(kind, len(range(i, n, k))) for i in range(k)]
    return tuple(groups)


def vllm_kv_capacity(model: ModelArch, kv_bytes: float, kv_dtype: str, tp: int, block_size: int,
                     max_model_len: int, max_in_flight_tokens: int = 8192, hybrid: bool = True) -> KvCapacity:
    """vLLM 0.32's KV cache sizing for `kv_bytes` of KV memory per GPU.

    num_blocks = kv_bytes // (page bytes x layers in the largest group), a page being one block of one
    layer (GQA: 2 x block_size x kv_heads/TP x head_dim x dtype bytes; MLA: block_size x (kv_lora_rank +
    qk_rope_head_dim) x dtype bytes). `max_in_flight_tokens` matters only for sliding-window layers:
    max_num_batched_tokens, doubled under async scheduling (vLLM's CUDA default; off on CPU).
    """
    if block_size < 1:
        raise ValueError(f"block_size={block_size} must be >= 1")
    if max_model_len < 1:
        raise ValueError(f"max_model_len={max_model_len} must be >= 1")
    if model.num_linear_layers:
        raise ValueError(f"model {model.name} has linear-attention/SSM layers: vLLM's hybrid state allocator "
                         "is not modelled here; size its KV cache with vLLM itself (gpu_memory_utilization)")
    groups = kv_groups(model, hybrid)
    page = block_size * model.kv_bytes_per_token_layer(kv_dtype, tp)
    bytes_per_block = page * max(n for _, n in groups)
    kv_bytes = int(max(kv_bytes, 0))
    return KvCapacity(
        kv_bytes=kv_bytes,
        kv_bytes_per_token=model.kv_bytes_per_token(kv_dtype, tp),
        page_bytes=page,
        groups=groups,
        num_blocks=int(kv_bytes // bytes_per_block),
        block_size=block_size,
        max_model_len=max_model_len,
        sliding_window=model.sliding_window,
        max_in_flight_tokens=max_in_flight_tokens,
    )


def kv_capacity_tokens(kv_bytes: float, kv_bytes_per_token: float, block_size: int) -> int:
    """Tokens that `kv_bytes` hold when allocated in whole blocks of `block_size` tokens (one group)."""
    if kv_bytes <= 0:
        return 0
    return int(kv_bytes // (block_size * kv_bytes_per_token)) * block_size


def activation_reserve_bytes(model: ModelArch, gpu: GpuSpec, tp: int, max_num_batched_tokens: int = 8192,
                             cap_fraction: float = 0.05) -> float:
    """Per-GPU peak of transient memory in vLLM's profiling pass, capped at `cap_fraction` of the GPU.

    The largest live tensors of a forward pass over `max_num_batched_tokens` tokens are in the MLP:
    its input (hidden), the fused gate/up output (2 x intermediate / TP) and the activated product
    (intermediate / TP), all 16-bit: tokens x (hidden + 3 x intermediate / TP) x 2 B. MoE layers use
    the experts' width times the experts a token visits. The sampler adds fp32 logits for up to 256
    sequences (vocab x 4 B each), and NCCL/cuBLAS/CUDA graphs ~0.25 GiB. The result is at least 0.5 GiB
    (allocator fragmentation) and at most `cap_fraction` of GPU memory.
    """
    width = model.intermediate_size
    if model.is_moe:
        width = max(width if model.num_dense_layers else 0,
                    model.moe_intermediate_size * (model.num_experts_per_tok + model.num_shared_experts))
    mlp = max_num_batched_tokens * (model.hidden_size + 3 * width / tp) * 2
    logits = MAX_NUM_SEQS * model.vocab_size * 4
    estimate = max(mlp + logits + NON_TORCH_BYTES, ACTIVATION_FLOOR_BYTES)
    return min(estimate, cap_fraction * gpu.memory_bytes)


def static_bytes(model: ModelArch, gpu: GpuSpec, tp: int, weights_dtype: str, memory: MemoryConfig) -> float:
    """Per-GPU memory that is not KV cache: the weights' TP shard and the activation reserve."""
    return model.weight_bytes(weights_dtype) / tp + activation_reserve_bytes(
        model, gpu, tp, memory.max_num_batched_tokens, memory.reserve_fraction)
