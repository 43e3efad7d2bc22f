"""Resolve measured-run rows (aiconfigurator `silicon_sample.csv` columns) to catalogue entries.

A row names a model by its Hugging Face id, a GPU by a system name (`h100_sxm`, `b200_sxm`, ...), a backend
and a precision. This module turns those into `ModelArch`, `GpuSpec` and dtypes, or into a reason why the
row cannot be modelled; it never raises on a bad row.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from functools import lru_cache

from tasks.catalog import ConfigFileError, GpuSpec, ModelArch, load_gpu, load_model
from tasks.perf_spec import LAYER_HEADS, acceptance_from_length

# Checkpoint suffixes that do not change the architecture (quantised or instruction-tuned releases).
_SUFFIXES = re.compile(r"(-(instruct|thinking|chat|it|pt|base|hf|bf16|fp8|fp8-dynamic|fp8-block|fp4|nvfp4|mxfp4|"
                       r"awq|gptq|int4|int8|w4a16|w8a8|w4a8|gptq-int4|gptq-int8|awq-int4|dynamic|v\d+\.\d+|\d{4}))+$")
# Same architecture under another name: served exactly like the catalogue entry.
MODEL_ALIASES = {
    "meta-llama-3.1-8b": "llama-3.1-8b", "llama-3-8b": "llama-3.1-8b", "meta-llama-3-8b": "llama-3.1-8b",
    "llama-3.3-70b": "llama-3.1-70b", "meta-llama-3.1-70b": "llama-3.1-70b", "llama-3-70b": "llama-3.1-70b",
    "meta-llama-3-70b": "llama-3.1-70b", "deepseek-r1": "deepseek-v3", "deepseek-v3.1": "deepseek-v3",
    "deepseek-r1-0528": "deepseek-v3", "deepseek-v3-0324": "deepseek-v3", "meta-llama-3.1-405b": "llama-3.1-405b",
    "mixtral-8x7b-v0.1": "mixtral-8x7b", "deepseek-v3.1-nvfp4": "deepseek-v3",
    "qwen3-32b-fp8-static-pertensor": "qwen3-32b",
    # Same text model as the catalogue entry (their config.json differ only in context length or vision).
    "minimax-m2.7": "minimax-m2.5", "kimi-k2.6": "kimi-k2.5", "kimi-k2.7-code": "kimi-k2.5",
    "minimax-m2": "minimax-m2.5", "minimax-m2.1": "minimax-m2.5", "glm-4.6": "glm-4.5", "glm-4.7": "glm-4.5",
    "kimi-k2-instruct-0905": "kimi-k2", "kimi-k2-base": "kimi-k2",
    "deepseek-v3.1-terminus": "deepseek-v3", "deepseek-r1-0528-fp4-v2": "deepseek-v3",
    "qwen3-coder-30b-a3b": "qwen3-30b-a3b", "mimo-7b-rl": "mimo-7b", "mimo-7b-sft": "mimo-7b",
    # Distilled checkpoints keep their base model's architecture.
    "deepseek-r1-distill-llama-70b": "llama-3.1-70b", "deepseek-r1-distill-llama-8b": "llama-3.1-8b",
    "deepseek-r1-distill-qwen-32b": "qwen2.5-32b", "deepseek-r1-distill-qwen-14b": "qwen2.5-14b",
    "deepseek-r1-distill-qwen-7b": "qwen2.5-7b", "deepseek-r1-distill-qwen-1.5b": "qwen2.5-1.5b",
    "qwq-32b": "qwen2.5-32b",  # QwQ's config.json is Qwen2.5-32B's
    # K2-Thinking ships K2.5's INT4 experts; K2-Instruct (conf/model/kimi-k2.yaml) is block FP8.
    "kimi-k2-thinking": "kimi-k2.5",
    "deepseek-v3.2-exp": "deepseek-v3.2", "deepseek-v3.2-speciale": "deepseek-v3.2",
    # Vision-language releases: the text model is the catalogue entry's (config.json text_config).
    "qwen3-vl-235b-a22b": "qwen3-235b-a22b", "qwen3-vl-30b-a3b": "qwen3-30b-a3b",
    # Fine-tunes with their base model's config.json.
    "qwen2.5-coder-32b": "qwen2.5-32b", "qwen2.5-coder-14b": "qwen2.5-14b", "qwen2.5-coder-7b": "qwen2.5-7b",
    "qwen2.5-coder-1.5b": "qwen2.5-1.5b", "llama-3.1-nemotron-70b": "llama-3.1-70b",
    "llama-3_3-nemotron-super-49b-v1_5": "llama-3.3-nemotron-super-49b", "mistral-7b-v0.3": "mistral-7b",
    "mistral-small-3.1-24b": "mistral-small-24b", "mistral-small-3.2-24b": "mistral-small-24b",
    "mistral-large-2407": "mistral-large-2411", "granite-3.1-8b": "granite-3.3-8b", "granite-3.2-8b": "granite-3.3-8b",
}
# Attention TP beyond 8 ranks is not a layout engines run, whatever the NVLink domain (GB200 recipes use
# DP attention there); how far NVLink reaches is the GPU's own `nvlink_domain_gpus`.
NODE_GPUS = 8
# System names of aiconfigurator and cloud spellings -> conf/gpu names.
GPU_ALIASES = {"b200_sxm": "b200", "h100_sxm": "h100", "h200_sxm": "h200", "a100_sxm": "a100",
               "h100_pcie": "h100", "a100_pcie": "a100", "l40s_pcie": "l40s", "h20_sxm": "h20",
               "h20_3e": "h20-3e", "h800_sxm": "h800", "rtx_pro_6000_server": "rtx-pro-6000",
               "rtxpro6000_blackwell_server": "rtx-pro-6000", "rtx_pro_6000": "rtx-pro-6000"}
# precision / gemm_quant_mode spellings -> (weights dtype, compute dtype or None for the default).
_PRECISIONS = {
    "": ("bf16", None), "bf16": ("bf16", None), "bfloat16": ("bf16", None), "fp16": ("fp16", None),
    "float16": ("fp16", None), "auto": ("bf16", None), "none": ("bf16", None),
    "fp8": ("fp8", None), "fp8_block": ("fp8", None), "fp8_static": ("fp8", None), "fp8_dynamic": ("fp8", None),
    "fp8_ootb": ("fp8", None), "w8a8": ("fp8", None), "int8": ("int8", "int8"), "sq": ("int8", "int8"),
    "int8_wo": ("int8", "bf16"), "w8a16": ("int8", "bf16"),
    "int4": ("int4", "bf16"), "int4_wo": ("int4", "bf16"), "awq": ("int4", "bf16"), "gptq": ("int4", "bf16"),
    "w4a16": ("int4", "bf16"), "w4a16_awq": ("int4", "bf16"), "w4afp8": ("int4", "fp8"),
    # NVFP4 is W4A4: Blackwell's FP4 tensor cores (resolve_row falls back to FP8 on GPUs without them).
    # A bare "mxfp4" is taken as MXFP4 weights with FP8 activations, as gpt-oss runs them.
    "nvfp4": ("int4", "fp4"), "fp4": ("int4", "fp4"), "mxfp4": ("int4", "fp8"),
    # aiconfigurator's MoE modes (moe_quant_mode): MXFP4 experts with bf16 or FP8 activations.
    "w4a16_mxfp4": ("int4", "bf16"), "w4a16_mxfp4_cutlass": ("int4", "bf16"), "w4a8_mxfp4_mxfp8": ("int4", "fp8"),
    "w4a8_mxfp4_mxfp8_trtllm": ("int4", "fp8"),
}
BACKENDS = ("vllm", "sglang", "trtllm")
_MODE_ALIASES = {"": "agg", "aggregated": "agg", "ifb": "agg", "disaggregated": "disagg", "pd": "disagg"}
_BACKEND_ALIASES = {"tensorrt-llm": "trtllm", "tensorrt_llm": "trtllm", "trt-llm": "trtllm", "trt": "trtllm"}


def _norm(s: object) -> str:
    return "" if s is None or (isinstance(s, float) and math.isnan(s)) else str(s).strip().lower()


@lru_cache(maxsize=1)
def _model_index() -> dict[str, str]:
    """Normalised name -> catalogue name, from every conf/model file's name and HF id."""
    from tasks.paths import CONF_DIR
    import yaml

    index: dict[str, str] = {}
    for f in sorted((CONF_DIR / "model").glob("*.yaml")):
        data = yaml.safe_load(f.read_text()) or {}
        index[f.stem.lower()] = f.stem
        if data.get("hf_id"):
            index[data["hf_id"].lower()] = f.stem
            index[_strip(data["hf_id"].split("/")[-1].lower())] = f.stem
    return index


def _strip(name: str) -> str:
    return _SUFFIXES.sub("", name)


@lru_cache(maxsize=256)
def resolve_model(model_path: str) -> ModelArch:
    """Catalogue model for an HF id or catalogue name (case-insensitive; -Instruct/-FP8/... stripped)."""
    key = _norm(model_path)
    index = _model_index()
    for cand in (key, key.split("/")[-1], _strip(key.split("/")[-1])):
        cand = MODEL_ALIASES.get(cand, cand)
        if cand in index:
            return load_model(index[cand])
    raise ValueError(f"model {model_path!r} is not in the catalogue (conf/model)")


def catalogue_model(model_path: str | None) -> ModelArch | None:
    """`resolve_model`, or None when no model is named or the catalogue lacks it (a speculative draft model,
    say, whose cost is then left out)."""
    try:
        return resolve_model(model_path) if model_path else None
    except ValueError:
        return None


@lru_cache(maxsize=64)
def resolve_gpu(system: str) -> GpuSpec:
    key = _norm(system)
    key = GPU_ALIASES.get(key, key)
    for cand in (key, re.sub(r"[_-](sxm\d?|pcie|nvl\d*|\d+gb)$", "", key)):
        try:
            return load_gpu(cand)
        except ConfigFileError:
            continue
    raise ValueError(f"system {system!r} is not in the GPU catalogue (conf/gpu)")


def resolve_backend(backend: str) -> str:
    # The engine is what is costed: Dynamo's "dynamo-trt" / "dynamo-sglang" and "-disagg" variants name
    # the same engines run under an orchestrator (the topology is in the row's own columns).
    b = re.sub(r"^dynamo[-_]|[-_](disagg|agg)$", "", _norm(backend))
    b = _BACKEND_ALIASES.get(b, b)
    if b not in BACKENDS:
        raise ValueError(f"backend {backend!r} unknown; modelled: {', '.join(BACKENDS)}")
    return b


def resolve_precision(precision: object, gemm_quant_mode: object, model: ModelArch) -> tuple[str, str | None]:
    """(weights dtype, compute dtype or None) from the row's precision columns; the checkpoint's own dtype
    when neither says."""
    for raw in (_norm(gemm_quant_mode), _norm(precision)):
        if raw not in ("", "none", "auto"):
            return _precision(raw, "precision")
    return model.dtype, None


def _precision(raw: str, column: str) -> tuple[str, str | None]:
    if raw not in _PRECISIONS:
        raise ValueError(f"{column} {raw!r} unknown; known: {', '.join(sorted(p for p in _PRECISIONS if p))}")
    return _PRECISIONS[raw]


def resolve_expert_dtype(moe_quant_mode: object, model: ModelArch) -> str | None:
    """Dtype of a MoE model's routed experts as `moe_quant_mode` names it; unstated (None), the catalogue
    decides (`ModelArch.experts_stored_as`)."""
    raw = _norm(moe_quant_mode)
    if not model.is_moe or raw in ("", "none", "auto"):
        return None
    return _precision(raw, "moe_quant_mode")[0]


def _int(v: object, default: int = 0) -> int:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return default
    return default if math.isnan(f) else int(round(f))


@dataclass(frozen=True)
class ResolvedRow:
    """Everything the performance model needs from one row."""

    model: ModelArch
    gpu: GpuSpec
    backend: str
    weights_dtype: str
    compute_dtype: str | None
    kv_dtype: str
    mode: str
    isl: int
    osl: int
    concurrency: int
    tp: int  # GPUs of one pipeline stage of an aggregated instance (or of the decode pool): TP x attention-DP
    prefill_workers: int = 0
    prefill_tp: int = 0
    prefill_batch: int = 0  # prompts per prefill step per attention-DP rank, where the row caps it (0: not stated)
    decode_workers: int = 0
    decode_tp: int = 0
    attn_dp: int = 1  # attention data-parallel groups within one instance (agg, or the decode pool)
    prefill_attn_dp: int = 1
    expert_dtype: str | None = None  # routed experts' dtype when the row names one (moe_quant_mode)
    pp: int = 1  # pipeline stages of one instance (agg, or the decode pool)
    prefill_pp: int = 1
    ep: int = 1  # expert-parallel ranks of one instance (agg, or the decode pool)
    prefill_ep: int = 1
    backend_version: str = ""  # as the row states it ("" when it does not)
    wide_ep: bool = False  # the aggregated layout's attention DP is inferred (`reads_as_wide_ep`), not stated
    layout_note: str = ""  # how the row's layout columns were read where not literally (pred_reason)
    spec_method: str = ""  # speculative decoding ("" none; else ngram or a one-layer head: `resolve_spec`)
    spec_k: int = 0  # draft tokens per verify step
    spec_acceptance: float = 0.0  # per draft token, given the ones before it
    decode_max_batch: int = 0  # sequences per decode attention-DP rank, where the row caps it (0: not stated)


@dataclass(frozen=True)
class Parallelism:
    stage_gpus: int  # GPUs of one pipeline stage
    attn_dp: int
    pp: int
    ep: int = 1  # expert-parallel ranks (moe_ep_size)
    wide_ep: bool = False  # attention DP on every rank inferred from a MoE TP beyond a node (`reads_as_wide_ep`)
    note: str = ""  # how the columns were read where not literally (`_unsquared`)


def reads_as_wide_ep(model: ModelArch, tp: int, attn_dp: int) -> bool:
    """Whether a layout of `tp` attention-TP ranks without attention DP is really wide EP with DP attention
    on every rank: a MoE model's attention TP beyond one node is not a layout engines run."""
    return model.is_moe and attn_dp == 1 and tp > NODE_GPUS


def _unsquared(tp: int, dp: int, moe_tp: int, ep: int, gpu: GpuSpec) -> tuple[int, int] | None:
    """(GPUs, attention DP) of a MoE layout that an export multiplied by its EP size, else None.

    InferenceMAX's 2026-04 exports do this three ways. TP8 with EP8 (id `tp8_ep8`) becomes tp 64, moe_tp 8,
    moe_ep 8, and DEP8 becomes attention DP 64, moe_tp 8, moe_ep 8: the same runs appear in the 2026-03
    export as tp 8 (or DP 8) with moe_ep 8 and identical measurements. vLLM's TP4 with expert parallelism
    (id `tp4_ep4`) becomes tp 4, attention DP 4, moe_ep 16. Read literally these are 64- and 16-GPU
    instances (attention TP 64 across eight HGX nodes; TP4 x DP4), which those benchmarks did not run. The
    first two forms are taken as squared only beyond the GPU's NVLink domain: inside an NVL72 rack tp 64
    is a real wide layout (`reads_as_wide_ep`)."""
    beyond = tp * dp > gpu.nvlink_domain_gpus
    if beyond and dp == 1 and 1 < moe_tp == ep and tp == moe_tp * ep:
        return moe_tp, 1
    if beyond and tp == 1 and 1 < moe_tp == ep and dp == moe_tp * ep:
        return moe_tp, moe_tp
    if 1 < tp == dp and moe_tp == 1 and ep == tp * dp:
        return tp, 1
    return None


def _parallelism(row: dict, prefix: str, model: ModelArch, gpu: GpuSpec) -> Parallelism:
    """One instance's layout. aiconfigurator counts tp_size per attention-DP rank (GPUs = tp x dp x pp, and
    moe_tp x moe_ep = tp x dp); SGLang's own `--tp 8 --dp 8` counts every rank in tp, which the MoE sizes
    then show (moe_tp x moe_ep = tp). A MoE row claiming attention TP beyond an 8-GPU node with no
    attention DP (InferenceMAX's GB200 exports: tp 12-72 for DeepSeek, whose 128 heads 12, 36 or 72 ranks
    cannot even split) is its wide-EP layout with DP attention on every rank, as those recipes run.

    Except where an export squared the layout (`_unsquared`)."""
    tp = max(1, _int(row.get(f"{prefix}tp_size"), 1))
    dp = max(1, _int(row.get(f"{prefix}attention_dp_size"), 1))
    pp = max(1, _int(row.get(f"{prefix}pp_size"), 1))
    ep = max(1, _int(row.get(f"{prefix}moe_ep_size"), 1))
    moe_tp = max(1, _int(row.get(f"{prefix}moe_tp_size"), 1))
    moe = moe_tp * ep
    if model.is_moe and (squared := _unsquared(tp, dp, moe_tp, ep, gpu)):
        gpus, adp = squared
        return Parallelism(gpus, adp, pp, ep=gpus, note=(
            f"{prefix}tp_size {tp} x attention_dp_size {dp} with moe_tp_size {moe_tp} x moe_ep_size {ep} read as "
            f"{gpus} GPUs ({'attention DP' if adp > 1 else 'TP'} {gpus}, EP {gpus}): an export that multiplied the "
            "layout by its EP size"))
    if reads_as_wide_ep(model, tp, dp):
        return Parallelism(tp, tp, pp, tp, wide_ep=True)
    sglang_counting = dp > 1 and moe == tp and tp % dp == 0
    stage = tp if sglang_counting else tp * dp
    return Parallelism(stage, dp, pp, ep if stage % ep == 0 else 1)


def _concurrency(row: dict) -> int:
    """The closed loop's concurrency. The `silicon_concurrency=N` that measured-data exports record in
    `silicon_data_source` is what the benchmark client ran, so it wins; else `concurrency`, else
    `batch_size` counted aiconfigurator's way, per attention-DP rank (x `attention_dp_size`: its
    exports pair c512 with batch 128 at attention DP 4); 0 when nothing says."""
    found = re.search(r"silicon_concurrency=(\d+)", str(row.get("silicon_data_source") or ""))
    if found and int(found.group(1)) > 0:
        return int(found.group(1))
    if _int(row.get("concurrency")):
        return _int(row.get("concurrency"))
    return _int(row.get("batch_size")) * max(1, _int(row.get("attention_dp_size"), 1))


def _float(v: object) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(f) else f


def resolve_spec(row: dict) -> tuple[str, int, float]:
    """(method, draft tokens, per-token acceptance) of a row's speculative decoding; ("", 0, 0.0) without.

    `spec_method` (or InferenceX's `spec_decoding`): none, ngram, mtp, eagle or eagle3; `num_speculative_tokens`;
    the acceptance as `acceptance_rate` (per draft token) or `acceptance_length` (tokens per verify step,
    vLLM's "mean acceptance length"). A measured row's acceptance is its run's, which the model cannot know."""
    method = _norm(row.get("spec_method")) or _norm(row.get("spec_decoding"))
    if method in ("", "none", "no", "off", "false"):
        return "", 0, 0.0
    if method not in ("ngram", *LAYER_HEADS):
        raise ValueError(f"spec_method {method!r} not modelled by dolphin predict; use one of ngram, "
                         f"{', '.join(LAYER_HEADS)} (a draft model needs its own rows)")
    k = _int(row.get("num_speculative_tokens"), 0)
    if k < 1:
        raise ValueError(f"spec_method {method} needs num_speculative_tokens >= 1 (draft tokens per verify step)")
    rate, length = _float(row.get("acceptance_rate")), _float(row.get("acceptance_length"))
    if rate is None and length is None:
        raise ValueError(f"spec_method {method} needs acceptance_rate (0-1, per draft token) or acceptance_length "
                         "(tokens per verify step, as vLLM reports it)")
    if rate is None:
        rate = acceptance_from_length(k, length)
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"acceptance_rate {rate} must lie in [0, 1)")
    return method, k, rate


def resolve_row(row: dict) -> ResolvedRow:
    """Raise ValueError with a one-line reason when the row cannot be modelled."""
    model = resolve_model(row.get("model_path") or row.get("model") or "")
    gpu = resolve_gpu(row.get("system") or row.get("gpu") or "")
    backend = resolve_backend(row.get("backend") or "vllm")
    weights, compute = resolve_precision(row.get("precision"), row.get("gemm_quant_mode"), model)
    if model.expert_dtype and weights == model.expert_dtype and not _norm(row.get("gemm_quant_mode")):
        # "precision: mxfp4" of gpt-oss names its released checkpoint: MXFP4 experts, bf16 elsewhere.
        weights, compute = model.dtype, None
    experts = resolve_expert_dtype(row.get("moe_quant_mode"), model)
    kv_raw = _norm(row.get("kvcache_quant_mode") or row.get("kv_cache_quant_mode") or row.get("kv_cache_dtype"))
    # Unstated, an FP8 deployment keeps its KV cache in FP8 too (aiconfigurator's FP8 default), and so does an
    # NVFP4 one (NVIDIA's NVFP4 checkpoints set kv_cache_quant_algo FP8). INT8 KV is one byte anywhere; NVFP4
    # KV (TensorRT-LLM on Blackwell) is 4-bit with scales, as our int4.
    kv_fp8 = kv_raw.startswith("fp8") if kv_raw else (weights == "fp8" and compute != "bf16") or compute == "fp4"
    kv = ("int8" if kv_raw.startswith("int8") else "int4" if kv_raw in ("nvfp4", "fp4") and gpu.fp4_tflops
          else "fp8" if kv_fp8 and gpu.supports_fp8 else "bf16")
    compute = gpu.compute_path(compute) if compute else None  # NVFP4 on Hopper: its FP8 path
    mode = _MODE_ALIASES.get(_norm(row.get("mode")), _norm(row.get("mode")))
    version = _norm(row.get("backend_version"))
    spec = dict(zip(("spec_method", "spec_k", "spec_acceptance"), resolve_spec(row)))
    isl, osl = _int(row.get("isl")), _int(row.get("osl"))
    if isl < 1 or osl < 1:
        raise ValueError("isl and osl must be positive")
    if mode == "agg":
        conc = _concurrency(row)
        if conc < 1:
            raise ValueError("batch_size (closed-loop concurrency) must be >= 1")
        par = _parallelism(row, "", model, gpu)
        return ResolvedRow(model, gpu, backend, weights, compute, kv, mode, isl, osl, conc, par.stage_gpus,
                           attn_dp=par.attn_dp, expert_dtype=experts, pp=par.pp, ep=par.ep, backend_version=version,
                           wide_ep=par.wide_ep, layout_note=par.note, **spec)
    if mode == "disagg":
        # Worker counts left out (0): the performance model sizes those pools to the load.
        pw, dw = _int(row.get("prefill_num_workers"), 0), _int(row.get("decode_num_workers"), 0)
        pre, dec = _parallelism(row, "prefill_", model, gpu), _parallelism(row, "decode_", model, gpu)
        # Else every decode worker's batch, per attention-DP rank as aiconfigurator counts it.
        conc = _concurrency(row) or _int(row.get("decode_batch_size")) * dec.attn_dp * max(dw, 1)
        if conc < 1 or pw < 0 or dw < 0:
            raise ValueError("disagg row needs concurrency (batch_size or decode_batch_size) and worker counts >= 0")
        return ResolvedRow(model, gpu, backend, weights, compute, kv, mode, isl, osl, conc, dec.stage_gpus, pw,
                           pre.stage_gpus, max(0, _int(row.get("prefill_batch_size"), 0)), dw, dec.stage_gpus,
                           attn_dp=dec.attn_dp, prefill_attn_dp=pre.attn_dp, expert_dtype=experts, pp=dec.pp,
                           prefill_pp=pre.pp, ep=dec.ep, prefill_ep=pre.ep, backend_version=version,
                           layout_note="; ".join(n for n in (pre.note, dec.note) if n),
                           decode_max_batch=max(0, _int(row.get("decode_max_batch_size"), 0)), **spec)
    raise ValueError(f"mode {mode!r} unknown; modelled: agg, disagg")
