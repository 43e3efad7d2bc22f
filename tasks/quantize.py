"""Stage 3: choose the weight and KV-cache dtypes, and the engine flags that serve them.

Candidates are (weights, KV) pairs tried from the most accurate down (the config's order). Before any
memory is planned, a candidate is ruled out when the GPU cannot run it (FP8 W8A8 and FP8 KV need
compute capability >= 8.9, int4 Marlin kernels >= 8.0) or when its expected quality loss (the
`conf/quality/` table: weights' entry + KV entry) exceeds `quant.max_quality_loss_pct`. The first
survivor whose memory plan holds the target concurrency wins.
"""
from __future__ import annotations

from prefect import task

from tasks.catalog import GpuSpec, ModelArch
from tasks.config import ConfigError, QualityTable, QuantConfig
from tasks.contracts import MemoryPlan, QuantChoice, Rejection

WEIGHT_BITS = {"fp16": 16, "bf16": 16, "fp8": 8, "int4": 4}
# GPUs in conf/gpu/ with FP8 tensor cores, named in the advice when a GPU has none.
FP8_GPU_EXAMPLES = "l20/l40s/h100"
_TORCH_DTYPE = {"bf16": "bfloat16", "fp16": "float16"}


def default_kv_dtype(weights_dtype: str) -> str:
    """KV dtype for kv_cache=auto: FP8 with FP8 weights (the FP8 checkpoints' calibrated KV scales);
    16-bit otherwise (W4A16 computes attention in 16 bit). fp16 keeps its own name."""
    if weights_dtype == "fp8":
        return "fp8"
    return "fp16" if weights_dtype == "fp16" else "bf16"


def parse_candidate(text: str, kv_cache: str = "auto") -> tuple[str, str]:
    """"W" or "W/KV" -> (weights, kv). Without "/KV", `kv_cache` decides (auto: `default_kv_dtype`)."""
    weights, _, kv = text.partition("/")
    kv = kv or (default_kv_dtype(weights) if kv_cache == "auto" else kv_cache)
    return weights, kv


def label(weights: str, kv: str) -> str:
    return f"{weights} weights, {kv} KV"


def expected_loss_pct(weights: str, kv: str, quality: QualityTable) -> float:
    return quality.weights[weights] + quality.kv_cache[kv]


def gpu_problem(weights: str, kv: str, gpu: GpuSpec) -> str | None:
    """Why `gpu` cannot run this pair in vLLM/SGLang, or None."""
    have = f"gpu={gpu.name} has compute capability {gpu.compute_capability}"
    if weights == "fp8" and not gpu.supports_fp8:
        return (f"fp8 W8A8 weights need FP8 tensor cores (compute capability >= 8.9: Ada, Hopper, "
                f"Blackwell); {have}")
    if kv == "fp8" and not gpu.supports_fp8:
        return f"an fp8 KV cache needs FP8 support (compute capability >= 8.9); {have}"
    if weights == "int4" and not gpu.supports_marlin:
        return f"int4 AWQ/GPTQ weights run on Marlin kernels, which need compute capability >= 8.0; {have}"
    return None


def candidate_pairs(quant: QuantConfig, gpu: GpuSpec, quality: QualityTable,
                    ) -> tuple[list[tuple[str, str]], list[Rejection]]:
    """(weights, KV) pairs to plan, in preference order, and those ruled out before planning (GPU
    support, quality budget). An explicit `quant.weights` is the only candidate, whatever its loss."""
    explicit = quant.weights != "auto"
    names = [quant.weights] if explicit else list(quant.candidates)
    pairs, rejected = [], []
    for name in names:
        w, kv = parse_candidate(name, quant.kv_cache)
        loss = expected_loss_pct(w, kv, quality)
        problem = gpu_problem(w, kv, gpu)
        if problem:
            rejected.append(Rejection(candidate=f"{w}/{kv}", reason=problem))
        elif not explicit and loss > quant.max_quality_loss_pct:
            rejected.append(Rejection(candidate=f"{w}/{kv}", reason=(
                f"expected quality loss {loss:g}% ({w} weights {quality.weights[w]:g}% + {kv} KV "
                f"{quality.kv_cache[kv]:g}%, conf/quality/{quality.name}.yaml) exceeds "
                f"quant.max_quality_loss_pct={quant.max_quality_loss_pct:g}")))
        else:
            pairs.append((w, kv))
    return pairs, rejected


def check_quant(quant: QuantConfig, gpu: GpuSpec, quality: QualityTable) -> None:
    """Fail fast, before anything expensive, when the requested quantization cannot run on the GPU."""
    pairs, rejected = candidate_pairs(quant, gpu, quality)
    if pairs:
        return
    detail = "; ".join(f"{r.candidate}: {r.reason}" for r in rejected)
    if quant.weights != "auto":
        raise ConfigError(f"quant={quant.name}: {detail}. Use quant=fp16 or quant=int4, or a GPU such as "
                          f"{FP8_GPU_EXAMPLES}.")
    raise ConfigError(f"quant={quant.name}: no candidate can run on gpu={gpu.name} within the quality budget "
                      f"({detail}). Widen quant.candidates or raise quant.max_quality_loss_pct.")


def engine_flags(weights: str, kv: str, model: ModelArch, int4_method: str = "awq") -> dict[str, list[str]]:
    """Command-line flags that make vLLM and SGLang serve this pair.

    FP8 weights from a 16-bit checkpoint are quantized at load time (`--quantization fp8`); an FP8
    checkpoint (e.g. DeepSeek-V3) declares its own quantization, so no flag. int4 needs an AWQ or GPTQ
    checkpoint, served by the Marlin kernels. An FP8 KV cache is E4M3 in both engines.
    """
    vllm: list[str] = []
    sglang: list[str] = []
    if weights in _TORCH_DTYPE:
        vllm += ["--dtype", _TORCH_DTYPE[weights]]
        sglang += ["--dtype", _TORCH_DTYPE[weights]]
    elif weights == "fp8" and model.dtype != "fp8":
        vllm += ["--quantization", "fp8"]
        sglang += ["--quantization", "fp8"]
    elif weights == "int4":
        vllm += ["--quantization", f"{int4_method}_marlin"]
        sglang += ["--quantization", f"{int4_method}_marlin"]
    if kv == "fp8":
        vllm += ["--kv-cache-dtype", "fp8"]
        sglang += ["--kv-cache-dtype", "fp8_e4m3"]
    return {"vllm": vllm, "sglang": sglang}


def select_quant(plans: list[MemoryPlan], rejected: list[Rejection], quant: QuantConfig, model: ModelArch,
                 quality: QualityTable) -> QuantChoice:
    """The first feasible plan, in candidate order. The more accurate candidates are reported as
    rejected, with why (GPU, quality budget, or their plan's memory reason). With none feasible, the
    first plan (feasible=False says why) and every rejection."""
    if not plans:
        raise ValueError(f"quant={quant.name}: no plan to choose from (every candidate was rejected)")
    first_fit = next((i for i, p in enumerate(plans) if p.feasible), None)
    chosen = plans[first_fit or 0]
    skipped = plans[:first_fit] if first_fit is not None else plans[1:]
    skipped = [Rejection(candidate=f"{p.weights_dtype}/{p.kv_dtype}", reason=p.reason) for p in skipped]
    name = label(chosen.weights_dtype, chosen.kv_dtype)
    loss = expected_loss_pct(chosen.weights_dtype, chosen.kv_dtype, quality)
    if not chosen.feasible:
        reason = f"no candidate fits; {name}: {chosen.reason}"
    else:
        why = "requested" if quant.weights != "auto" else "the most accurate candidate that fits"
        reason = (f"{name} ({why}; expected quality loss {loss:g}%): {chosen.kv_capacity_gib:.1f} GiB KV per "
                  f"GPU for {chosen.max_concurrency_at_p99:.0f} concurrent requests at the p99 context "
                  f"({chosen.p99_context_tokens:,} tokens); target {chosen.target_concurrency}")
    # Report rejections in candidate order, whichever step ruled them out; after a feasible choice only
    # the more accurate candidates matter (the less accurate ones were never needed).
    order = {"/".join(parse_candidate(c, quant.kv_cache)): i for i, c in enumerate(quant.candidates)}
    rank = lambda r: order.get(r.candidate, len(order))  # noqa: E731 - sort key
    rejections = sorted([*rejected, *skipped], key=rank)
    if chosen.feasible:
        chosen_rank = order.get(f"{chosen.weights_dtype}/{chosen.kv_dtype}", len(order))
        rejections = [r for r in rejections if rank(r) < chosen_rank]
    flags = engine_flags(chosen.weights_dtype, chosen.kv_dtype, model, quant.int4_method)
    return QuantChoice(weights_dtype=chosen.weights_dtype, kv_dtype=chosen.kv_dtype, reason=reason,
                       plan=chosen, rejected=rejections, expected_quality_loss_pct=loss,
                       vllm_args=flags["vllm"], sglang_args=flags["sglang"])


@task(name="quantization")
def quant_task(plans: list[MemoryPlan], gpu: GpuSpec, quant: QuantConfig, model: ModelArch,
               quality: QualityTable) -> QuantChoice:
    """Pick among the memory plans of `tasks.kv.kv_task` (same candidate order)."""
    _, rejected = candidate_pairs(quant, gpu, quality)
    return select_quant(plans, rejected, quant, model, quality)
