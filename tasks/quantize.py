"""Stage 3: choose the weight and KV-cache dtypes.

Candidates are tried from the most accurate down (the config's order), skipping those the accuracy
policy (`min_weights_bits`) or the GPU forbids; the first whose memory plan is feasible wins.
"""
from __future__ import annotations

from prefect import task

from tasks.catalog import GpuSpec
from tasks.config import ConfigError, QuantConfig
from tasks.contracts import MemoryPlan, QuantChoice, Rejection

WEIGHT_BITS = {"fp16": 16, "bf16": 16, "fp8": 8, "int4": 4}
# GPUs in conf/gpu/ with FP8 tensor cores, named in the advice when a GPU has none.
FP8_GPU_EXAMPLES = "l20/h100"


def default_kv_dtype(weights_dtype: str) -> str:
    """KV dtype for kv_cache=auto: FP8 with FP8 weights (the FP8 checkpoints' calibrated KV scales);
    16-bit otherwise (W4A16 computes attention in 16 bit). fp16 keeps its own name."""
    if weights_dtype == "fp8":
        return "fp8"
    return "fp16" if weights_dtype == "fp16" else "bf16"


def _kv_dtype(quant: QuantConfig, weights_dtype: str) -> str:
    return default_kv_dtype(weights_dtype) if quant.kv_cache == "auto" else quant.kv_cache


def _fp8_problem(gpu: GpuSpec, what: str, verb: str = "needs") -> str:
    return (f"{what} {verb} FP8 tensor cores (compute capability >= 8.9); "
            f"gpu={gpu.name} has {gpu.compute_capability}")


def weight_candidates(quant: QuantConfig, gpu: GpuSpec) -> tuple[list[tuple[str, str]], list[Rejection]]:
    """(weights, KV) dtype pairs to plan, in preference order, and the candidates ruled out before
    planning (accuracy policy or GPU support). An explicit `quant.weights` is the only candidate."""
    explicit = quant.weights != "auto"
    names = [quant.weights] if explicit else list(quant.candidates)
    pairs, rejected = [], []
    for w in names:
        kv = _kv_dtype(quant, w)
        if not explicit and WEIGHT_BITS[w] < quant.min_weights_bits:
            rejected.append(Rejection(candidate=w, reason=(
                f"{w} weights have {WEIGHT_BITS[w]} bits, below the accuracy policy "
                f"quant.min_weights_bits={quant.min_weights_bits}")))
        elif "fp8" in (w, kv) and not gpu.supports_fp8:
            problem = (_fp8_problem(gpu, "fp8 weights", "need") if w == "fp8"
                       else _fp8_problem(gpu, f"an fp8 KV cache (with {w} weights)"))
            rejected.append(Rejection(candidate=w, reason=problem))
        else:
            pairs.append((w, kv))
    return pairs, rejected


def check_quant(quant: QuantConfig, gpu: GpuSpec) -> None:
    """Fail fast, before anything expensive, when the requested quantization cannot run on the GPU."""
    if quant.weights == "fp8" and not gpu.supports_fp8:
        raise ConfigError(f"{_fp8_problem(gpu, f'quant={quant.name}')}. Use quant=fp16 or quant=int4, "
                          f"or a GPU such as {FP8_GPU_EXAMPLES}.")
    if quant.kv_cache == "fp8" and not gpu.supports_fp8:
        raise ConfigError(f"{_fp8_problem(gpu, 'quant.kv_cache=fp8')}. Use quant.kv_cache=auto, "
                          f"or a GPU such as {FP8_GPU_EXAMPLES}.")
    pairs, rejected = weight_candidates(quant, gpu)
    if not pairs:
        detail = "; ".join(f"{r.candidate}: {r.reason}" for r in rejected)
        raise ConfigError(f"quant={quant.name}: no candidate can run on gpu={gpu.name} ({detail}). "
                          f"Widen quant.candidates or lower quant.min_weights_bits.")


def select_quant(plans: list[MemoryPlan], rejected: list[Rejection], quant: QuantConfig) -> QuantChoice:
    """The first feasible plan, in candidate order; more accurate candidates that did not fit join
    `rejected` with their plan's reason. With none feasible, the first plan (feasible=False says why)."""
    if not plans:
        raise ValueError(f"quant={quant.name}: no plan to choose from (every candidate was rejected)")
    first_fit = next((i for i, p in enumerate(plans) if p.feasible), None)
    chosen = plans[first_fit or 0]
    skipped = plans[:first_fit] if first_fit is not None else plans[1:]
    skipped = [Rejection(candidate=p.weights_dtype, reason=p.reason) for p in skipped]
    label = f"{chosen.weights_dtype} weights, {chosen.kv_dtype} KV"
    if not chosen.feasible:
        reason = f"no candidate fits; {label}: {chosen.reason}"
    else:
        why = "requested" if quant.weights != "auto" else "the most accurate candidate that fits"
        reason = (f"{label} ({why}): {chosen.kv_capacity_gib:.1f} GiB KV per GPU for "
                  f"{chosen.max_concurrency_at_p99:.0f} concurrent requests at the p99 context "
                  f"({chosen.p99_context_tokens:,} tokens); target {chosen.target_concurrency}")
    # Report rejections in candidate order, whichever step ruled them out.
    order = {name: i for i, name in enumerate(quant.candidates)}
    rejections = sorted([*rejected, *skipped], key=lambda r: order.get(r.candidate, len(order)))
    return QuantChoice(weights_dtype=chosen.weights_dtype, kv_dtype=chosen.kv_dtype, reason=reason,
                       plan=chosen, rejected=rejections)


@task(name="quantization")
def quant_task(plans: list[MemoryPlan], gpu: GpuSpec, quant: QuantConfig) -> QuantChoice:
    """Pick among the memory plans of `tasks.kv.kv_task` (same candidate order)."""
    _, rejected = weight_candidates(quant, gpu)
    return select_quant(plans, rejected, quant)
