"""Hardware and model specs as typed data.

GPUs and model architectures live in `conf/gpu/*.yaml` and `conf/model/*.yaml`; these classes are their
schema. Adding a GPU or a model is adding a YAML file that validates here.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

GIB = 1024**3
GB = 1000**3
FP8_MIN_CAPABILITY = (8, 9)
MARLIN_MIN_CAPABILITY = (8, 0)

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
    """One accelerator. Throughputs are dense (no sparsity) vendor peaks; each YAML cites its sources."""

    name: str
    display_name: str
    device: Literal["cuda", "cpu"] = Field("cuda", description="cpu: the host runs vLLM's CPU build (tests)")
    memory_gb: float = Field(gt=0, description="nominal memory on the datasheet (GB as the vendor counts it)")
    memory_gib: float = Field(
        gt=0, description="usable: total device memory as CUDA reports it, GiB (an '80GB' H100 shows "
        "~79.2 GiB); gpu-memory-utilization applies to this"
    )
    hbm_bandwidth_gbps: float = Field(gt=0, description="memory bandwidth, GB/s")
    bf16_tflops: float = Field(gt=0, description="dense BF16/FP16 tensor-core peak")
    fp8_tflops: float | None = Field(None, description="dense FP8 peak; null if the GPU has no FP8")
    int8_tops: float | None = None
    fp4_tflops: float | None = Field(None, description="dense FP4 (NVFP4/MXFP4 W4A4) peak; Blackwell and later")
    compute_capability: str = Field(pattern=r"^\d+\.\d+$")
    interconnect: Literal["nvlink", "pcie"]
    link_bandwidth_gbps: float = Field(gt=0, description="GPU-to-GPU bandwidth, one direction, GB/s")
    nvlink_domain_gpus: int = Field(8, ge=1, description="GPUs one NVLink domain joins: 8 in an HGX node, "
                                    "72 in a GB200/GB300 NVL72 rack; beyond it traffic takes the scale-out NIC")
    scale_out_gbps: float = Field(50.0, gt=0, description="scale-out NIC bandwidth per GPU, one direction, GB/s "
                                  "(400 Gb/s InfiniBand/RoCE)")
    usd_per_hour: float = Field(gt=0, description="price of one GPU-hour; override with your contract")

    @model_validator(mode="after")
    def _fp8_matches_arch(self) -> "GpuSpec":
        if (self.fp8_tflops is not None) != (self.capability >= FP8_MIN_CAPABILITY):
            raise ValueError(f"fp8_tflops must be set exactly when compute_capability >= 8.9 "
                             f"(Ada/Hopper and later); {self.name} has {self.compute_capability}")
        if self.fp4_tflops is not None and self.capability < (10, 0):
            raise ValueError(f"fp4_tflops is for Blackwell and later (compute capability >= 10.0); "
                             f"{self.name} has {self.compute_capability}")
        return self

    @property
    def capability(self) -> tuple[int, int]:
        major, minor = self.compute_capability.split(".")
        return int(major), int(minor)

    @property
    def memory_bytes(self) -> float:
        return self.memory_gib * GIB

    @property
    def supports_fp8(self) -> bool:
        """FP8 tensor cores (W8A8 GEMMs, FP8 KV cache attention): compute capability >= 8.9."""
        return self.capability >= FP8_MIN_CAPABILITY

    @property
    def supports_marlin(self) -> bool:
        """vLLM's Marlin kernels for int4 AWQ/GPTQ weights need compute capability >= 8.0 (Ampere)."""
        return self.capability >= MARLIN_MIN_CAPABILITY

    def peak_flops(self, compute_dtype: str) -> float:
        """FLOP/s of the tensor cores for GEMMs whose activations are in `compute_dtype`."""
        if compute_dtype == "fp8":
            if self.fp8_tflops is None:
                raise ValueError(f"GPU {self.name} has no FP8 tensor cores")
            return self.fp8_tflops * 1e12
        if compute_dtype == "fp4":
            if self.fp4_tflops is None:
                raise ValueError(f"GPU {self.name} has no FP4 tensor cores")
            return self.fp4_tflops * 1e12
        if compute_dtype == "int8" and self.int8_tops is not None:
            return self.int8_tops * 1e12
        return self.bf16_tflops * 1e12

    def compute_path(self, compute_dtype: str) -> str:
        """The tensor-core dtype GEMMs asked to run in `compute_dtype` take here: FP4 without FP4 cores runs
        the FP8 path, FP8 without FP8 cores the bf16 one."""
        if compute_dtype == "fp4" and self.fp4_tflops is None:
            compute_dtype = "fp8"
        if compute_dtype == "fp8" and not self.supports_fp8:
            compute_dtype = "bf16"
        return compute_dtype


class ModelArch(_Spec):
    """A decoder-only transformer, as far as serving memory and cost are concerned.

    Field names follow Hugging Face `config.json` where one exists. Besides plain GQA models it covers
    MLA (DeepSeek: a compressed latent KV of `kv_lora_rank + qk_rope_head_dim` per layer), mixtures of
    experts (`num_experts` routed experts of `moe_intermediate_size`, `num_shared_experts` always on,
    the first `num_dense_layers` layers dense), sliding-window attention (`num_sliding_layers`
    layers attend to the last `sliding_window` tokens only) and DeepSeek sparse attention (DSA: a
    lightning indexer of `index_n_heads` x `index_head_dim` scores every cached token, each query then
    attends its `index_topk` best) and hybrid models whose `num_linear_layers` token mixers are linear
    attention or state-space layers (Gated DeltaNet, Mamba2) keeping a fixed state per sequence instead of
    a KV cache; Nemotron-H-style models whose mixer and MLP are separate blocks set `num_ffn_layers`.
    """

    name: str
    hf_id: str | None = None
    path: str | None = Field(None, description="local model directory an engine serves, when not a hub id")
    dtype: Literal["bf16", "fp16", "fp8"] = Field("bf16", description="dtype of the released checkpoint")
    num_layers: int = Field(gt=0)
    hidden_size: int = Field(gt=0)
    num_attention_heads: int = Field(gt=0)
    num_kv_heads: int = Field(gt=0)
    head_dim: int = Field(gt=0, description="from config.json; never hidden_size / heads")
    intermediate_size: int = Field(gt=0, description="dense MLP width")
    vocab_size: int = Field(gt=0)
    max_position_embeddings: int = Field(gt=0)
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    attention_output_gate: bool = Field(False, description="q_proj also emits a sigmoid gate on the attention "
                                        "output (Qwen3-Next/3.5): twice the query width")
    mlp_gated: bool = Field(True, description="SwiGLU (gate, up, down); false: a plain up/down MLP (Nemotron-H)")
    # MLA (multi-head latent attention)
    kv_lora_rank: int | None = Field(None, gt=0)
    q_lora_rank: int | None = Field(None, gt=0)
    qk_rope_head_dim: int = Field(0, ge=0)
    qk_nope_head_dim: int = Field(0, ge=0)
    v_head_dim: int = Field(0, ge=0)
    # Mixture of experts
    num_experts: int = Field(0, ge=0, description="routed experts per MoE layer; 0: dense model")
    num_experts_per_tok: int = Field(0, ge=0)
    moe_intermediate_size: int = Field(0, ge=0)
    num_shared_experts: int = Field(0, ge=0)
    num_dense_layers: int = Field(0, ge=0, description="leading layers with a dense MLP in a MoE model")
    moe_latent_size: int | None = Field(None, gt=0, description="routed experts work in a latent of this width, "
                                        "projected from and back to hidden (Nemotron-3-Super)")
    expert_dtype: Literal["int4", "fp8"] | None = Field(None, description="routed experts' dtype in the released "
                                                        "checkpoint when it differs from `dtype` (gpt-oss: MXFP4)")
    # Sliding-window attention
    sliding_window: int | None = Field(None, gt=0)
    num_sliding_layers: int = Field(0, ge=0)
    # DeepSeek sparse attention (DeepSeek-V3.2, GLM-5)
    index_topk: int | None = Field(None, gt=0, description="tokens each query attends (DSA); null: all")
    index_n_heads: int = Field(0, ge=0)
    index_head_dim: int = Field(0, ge=0)
    # Hybrid models (Qwen3-Next/3.5: Gated DeltaNet; Nemotron-H: Mamba2). `num_layers` counts the token
    # mixers; the linear ones cache no tokens, only `linear_state_elems` per sequence.
    num_linear_layers: int = Field(0, ge=0, description="token mixers that are linear attention / SSM layers")
    linear_mixer_params: int = Field(0, ge=0, description="parameters of one linear mixer (projections, conv)")
    linear_state_elems: int = Field(0, ge=0, description="one linear mixer's recurrent + conv state, per sequence")
    linear_state_dtype: Literal["bf16", "fp32"] = Field("bf16", description="dtype engines keep that state in "
                                                        "(config.json `mamba_ssm_dtype`)")
    num_ffn_layers: int | None = Field(None, ge=0, description="layers with an MLP or MoE; null: every layer "
                                       "(Nemotron-H interleaves mixer-only and MLP-only blocks)")
    params_b: float | None = Field(None, gt=0, description="published total parameters, billions; a "
                                   "cross-check of the count computed from the architecture")

    @model_validator(mode="after")
    def _consistent(self) -> "ModelArch":
        if self.num_attention_heads % self.num_kv_heads:
            raise ValueError(f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                             f"num_kv_heads ({self.num_kv_heads})")
        if self.is_mla and not (self.qk_rope_head_dim and self.qk_nope_head_dim and self.v_head_dim):
            raise ValueError("an MLA model (kv_lora_rank set) needs qk_rope_head_dim, qk_nope_head_dim, v_head_dim")
        if self.is_moe and not (self.num_experts_per_tok and self.moe_intermediate_size):
            raise ValueError("a MoE model (num_experts > 0) needs num_experts_per_tok and moe_intermediate_size")
        if self.num_experts_per_tok > self.num_experts:
            raise ValueError(f"num_experts_per_tok ({self.num_experts_per_tok}) exceeds num_experts "
                             f"({self.num_experts})")
        if self.num_sliding_layers + self.num_linear_layers > self.num_layers:
            raise ValueError("num_sliding_layers + num_linear_layers cannot exceed num_layers")
        if self.num_dense_layers > self.ffn_layers:
            raise ValueError("num_dense_layers cannot exceed the layers with an MLP (num_ffn_layers)")
        if self.num_linear_layers and not (self.linear_mixer_params and self.linear_state_elems):
            raise ValueError("num_linear_layers > 0 needs linear_mixer_params and linear_state_elems")
        if self.num_sliding_layers and self.sliding_window is None:
            raise ValueError("num_sliding_layers > 0 needs sliding_window")
        if self.index_topk is not None and not (self.is_mla and self.index_n_heads and self.index_head_dim):
            raise ValueError("index_topk (sparse attention) needs an MLA model with index_n_heads and index_head_dim")
        return self

    @property
    def is_mla(self) -> bool:
        return self.kv_lora_rank is not None

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def ffn_layers(self) -> int:
        """Layers with an MLP or MoE block."""
        return self.num_layers if self.num_ffn_layers is None else self.num_ffn_layers

    @property
    def moe_layers(self) -> int:
        return self.ffn_layers - self.num_dense_layers if self.is_moe else 0

    @property
    def num_attention_layers(self) -> int:
        """Token mixers with a KV cache (full or sliding-window attention)."""
        return self.num_layers - self.num_linear_layers

    # ------------------------------------------------------------ parameters
    def param_counts(self) -> dict[str, float]:
        """Parameters by component. `attention` and `mlp` are the linear layers that weight
        quantization compresses; `embedding`, `lm_head`, `router` and `norms` stay 16-bit."""
        h, layers = self.hidden_size, self.num_layers
        if self.is_mla:
            qk_head = self.qk_nope_head_dim + self.qk_rope_head_dim
            q = (h * self.q_lora_rank + self.q_lora_rank * self.num_attention_heads * qk_head
                 if self.q_lora_rank else h * self.num_attention_heads * qk_head)
            kv = (h * (self.kv_lora_rank + self.qk_rope_head_dim)
                  + self.kv_lora_rank * self.num_attention_heads * (self.qk_nope_head_dim + self.v_head_dim))
            attn = q + kv + self.num_attention_heads * self.v_head_dim * h
            attn_norms = self.kv_lora_rank + (self.q_lora_rank or 0)
        else:
            q_out, kv_out = self.num_attention_heads * self.head_dim, self.num_kv_heads * self.head_dim
            q_proj = q_out * (2 if self.attention_output_gate else 1)
            attn = h * (q_proj + 2 * kv_out) + q_out * h + (q_proj + 2 * kv_out) * self.attention_bias
            attn_norms = 0
        mats = 3 if self.mlp_gated else 2  # (gate,) up, down
        dense_mlp = mats * h * self.intermediate_size
        moe_layers = self.moe_layers
        shared = mats * h * self.moe_intermediate_size
        latent = 2 * h * self.moe_latent_size if self.moe_latent_size else 0  # in and out projections
        mlp = ((self.ffn_layers - moe_layers) * dense_mlp
               + moe_layers * (self.num_shared_experts * shared + latent) + self.num_experts * self.expert_params())
        embed = self.vocab_size * h
        mixers = self.num_attention_layers * attn + self.num_linear_layers * self.linear_mixer_params
        return {
            "embedding": float(embed),
            "lm_head": 0.0 if self.tie_word_embeddings else float(embed),
            "attention": float(mixers),
            "mlp": float(mlp),
            "router": float(moe_layers * h * self.num_experts),
            "norms": float(layers * h + self.ffn_layers * h + self.num_attention_layers * attn_norms + h),
        }

    @property
    def num_params(self) -> float:
        return sum(self.param_counts().values())

    @property
    def active_params(self) -> float:
        """Parameters one token multiplies through: all but the routed experts it is not sent to."""
        if not self.is_moe:
            return self.num_params
        idle = self.num_experts - self.num_experts_per_tok
        return self.num_params - idle * self.expert_params()

    def expert_params(self) -> float:
        """Parameters of one routed expert summed over the MoE layers (gate, up, down in each)."""
        if not self.is_moe:
            return 0.0
        width = self.moe_latent_size or self.hidden_size
        return self.moe_layers * (3 if self.mlp_gated else 2) * width * self.moe_intermediate_size

    def experts_stored_as(self, weights_dtype: str, expert_dtype: str | None = None) -> str:
        """Dtype of the routed experts: `expert_dtype` when given, else the released checkpoint's own
        (gpt-oss: MXFP4) while the rest stays as released, else `weights_dtype` (the whole model quantised)."""
        if expert_dtype:
            return expert_dtype
        return self.expert_dtype if self.expert_dtype and weights_dtype == self.dtype else weights_dtype

    def weight_bytes(self, weights_dtype: str, expert_dtype: str | None = None) -> float:
        """Bytes of all weights when the linear layers are stored in `weights_dtype` and the routed experts
        as `experts_stored_as` says; embeddings, the LM head, MoE routers and norms stay 16-bit (as in
        vLLM's FP8 and AWQ/GPTQ checkpoints)."""
        c = self.param_counts()
        quantized = c["attention"] + c["mlp"]
        experts = self.num_experts * self.expert_params()
        return ((quantized - experts) * DTYPE_BYTES[weights_dtype]
                + experts * DTYPE_BYTES[self.experts_stored_as(weights_dtype, expert_dtype)]
                + (self.num_params - quantized) * DTYPE_BYTES["bf16"])

    # ------------------------------------------------------------ KV cache
    def kv_heads_per_gpu(self, tp: int = 1) -> int:
        """KV heads one GPU stores: split across TP, replicated when TP exceeds them (as vLLM does)."""
        return max(1, self.num_kv_heads // tp)

    def kv_bytes_per_token_layer(self, kv_dtype: str, tp: int = 1) -> float:
        """Bytes one token occupies in one layer's KV cache on one GPU.

        GQA: K and V, kv_heads/TP heads of head_dim. MLA: one latent of kv_lora_rank + qk_rope_head_dim,
        whole on every TP rank (the latent is not split by head)."""
        if self.is_mla:
            return (self.kv_lora_rank + self.qk_rope_head_dim) * DTYPE_BYTES[kv_dtype] + self.index_key_bytes
        return 2 * self.kv_heads_per_gpu(tp) * self.head_dim * DTYPE_BYTES[kv_dtype]

    @property
    def index_key_bytes(self) -> float:
        """A DSA indexer's cached key of one token in one layer: FP8 plus one fp32 scale, whatever the KV
        dtype (as vLLM and SGLang store it); 0 without sparse attention."""
        return self.index_head_dim + 4 if self.index_topk else 0

    def kv_bytes_per_token(self, kv_dtype: str, tp: int = 1) -> float:
        """KV bytes of one token of context in every layer, on one GPU (a sliding-window layer holds a
        token only while it is inside the window; `kv_bytes_for_context` accounts for that)."""
        return self.num_layers * self.kv_bytes_per_token_layer(kv_dtype, tp)

    def layer_tokens(self, context_sum, queries=1):
        """Context tokens summed over the layers, for `context_sum` context over `queries` sequences or
        query rows: full-attention layers keep (and attend) all of it, sliding-window layers at most
        `sliding_window` per query, linear (state) layers none. Element-wise on numpy arrays; exact when
        every context passes the window or none does."""
        full = self.num_attention_layers - self.num_sliding_layers
        if not self.num_sliding_layers:
            return full * context_sum
        windowed = np.minimum(context_sum, np.asarray(queries, dtype=float) * self.sliding_window)
        return full * context_sum + self.num_sliding_layers * windowed

    def linear_state_bytes(self, tp: int = 1) -> float:
        """Recurrent state one sequence keeps on one GPU over every linear mixer, split by heads across TP."""
        return self.num_linear_layers * self.linear_state_elems * DTYPE_BYTES[self.linear_state_dtype] / tp

    def kv_bytes_for_context(self, context_tokens: float, kv_dtype: str, tp: int = 1) -> float:
        """KV bytes on one GPU of one request holding `context_tokens` tokens (see `layer_tokens`)."""
        return self.layer_tokens(context_tokens) * self.kv_bytes_per_token_layer(kv_dtype, tp)

    @classmethod
    def from_hf_config(cls, path: str | Path, name: str | None = None) -> "ModelArch":
        """Read a local Hugging Face `config.json` (a file, or a directory holding one).

        Understands Llama, Mistral, Qwen2/2.5/3, Qwen3-MoE, Mixtral, DeepSeek-V2/V3/V3.2 (MLA + MoE, DSA), Gemma 2/3
        and any config with `layer_types` (sliding vs full attention). Raises ConfigFileError naming the
        missing key otherwise.
        """
        p = Path(path).expanduser()
        file = p / "config.json" if p.is_dir() else p
        try:
            cfg = json.loads(file.read_text())
        except (OSError, ValueError) as exc:
            raise ConfigFileError(f"cannot read a model config from {file}: {exc}") from None
        cfg = {**cfg.get("text_config", {}), **{k: v for k, v in cfg.items() if k != "text_config"}}
        try:
            fields = _hf_fields(cfg)
        except KeyError as exc:
            raise ConfigFileError(f"{file} has no {exc.args[0]!r}: not a decoder-only transformer config "
                                  f"this catalogue understands") from None
        local = p if p.is_dir() else p.parent
        return cls(name=name or local.name, path=str(local.resolve()), **fields)


class ConfigFileError(ValueError):
    """A model config.json that cannot be read or understood; the message names the file and key."""


def _gated_deltanet(cfg: dict) -> tuple[int, int]:
    """(parameters, state elements per sequence) of one Gated DeltaNet layer (Qwen3-Next/3.5): q, k, v, z and
    b, a projections, a depthwise causal conv over q, k, v, dt bias, A, the gated norm and out_proj; the
    state is one dk x dv matrix per value head plus the conv's last kernel-1 inputs."""
    h, kc = cfg["hidden_size"], cfg["linear_conv_kernel_dim"]
    nk, dk = cfg["linear_num_key_heads"], cfg["linear_key_head_dim"]
    nv, dv = cfg["linear_num_value_heads"], cfg["linear_value_head_dim"]
    key, value = nk * dk, nv * dv
    conv = 2 * key + value
    params = h * (2 * key + 2 * value + 2 * nv) + conv * kc + 2 * nv + dv + value * h
    return params, nv * dk * dv + (kc - 1) * conv


def _mamba2(cfg: dict) -> tuple[int, int]:
    """(parameters, state elements per sequence) of one Mamba2 mixer (Nemotron-H): in_proj to x, z, B, C and
    dt, a depthwise conv over x, B, C, dt bias, A, D, the gated norm and out_proj; the state is
    heads x head_dim x ssm_state_size plus the conv's last kernel-1 inputs."""
    h, kc = cfg["hidden_size"], cfg["conv_kernel"]
    heads, n = cfg["mamba_num_heads"], cfg["ssm_state_size"]
    inner = heads * cfg["mamba_head_dim"]
    conv = inner + 2 * cfg["n_groups"] * n
    bias = h if cfg.get("use_bias") else 0
    params = (h * (inner + conv + heads) + conv * kc + conv * bool(cfg.get("use_conv_bias", True))
              + 3 * heads + inner + inner * h + bias)
    return params, heads * cfg["mamba_head_dim"] * n + (kc - 1) * conv


def _hybrid_fields(cfg: dict) -> dict:
    """Linear-mixer fields of a hybrid config (Qwen3-Next/3.5 `layer_types`, Nemotron-H
    `hybrid_override_pattern`); empty for a plain transformer."""
    types = cfg.get("layer_types") or []
    if "linear_attention" in types:
        linear = types.count("linear_attention")
    elif "full_attention_interval" in cfg and "linear_num_value_heads" in cfg:  # Qwen3-Next: every Nth is full
        n = cfg["full_attention_interval"]
        linear = sum((i + 1) % n != 0 for i in range(cfg["num_hidden_layers"]))
    else:
        linear = 0
    ssm_dtype = cfg.get("mamba_ssm_dtype") or cfg.get("mamba_ssm_cache_dtype") or ""
    state_dtype = "fp32" if str(ssm_dtype) in ("float32", "fp32") else "bf16"
    if linear:
        params, state = _gated_deltanet(cfg)
        return dict(num_linear_layers=linear, linear_mixer_params=params, linear_state_elems=state,
                    linear_state_dtype=state_dtype, attention_output_gate=bool(cfg.get("attn_output_gate", True)))
    if cfg.get("block_configs"):  # Nemotron-NAS (DeciLM): per block, attention or none, FFNs of many widths
        return _nas_fields(cfg)
    pattern = cfg.get("hybrid_override_pattern")
    if pattern:  # M: Mamba2, *: attention, -: MLP, E: MoE, each its own block
        params, state = _mamba2(cfg)
        return dict(num_layers=pattern.count("M") + pattern.count("*"), num_linear_layers=pattern.count("M"),
                    linear_mixer_params=params, linear_state_elems=state, linear_state_dtype=state_dtype,
                    num_ffn_layers=pattern.count("-") + pattern.count("E"),
                    num_dense_layers=pattern.count("-") if "E" in pattern else 0, mlp_gated=False)
    return {}


def _nas_fields(cfg: dict) -> dict:
    """Nemotron-NAS blocks as this schema counts them: `num_layers` the blocks that attend, `num_ffn_layers`
    those with an FFN, whose width is averaged (FLOPs and bytes are linear in it). DeciLM's FFN width is
    2/3 x ffn_mult x hidden rounded up to 256; KV heads are heads / n_heads_in_group."""
    h, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    blocks = cfg["block_configs"]
    if any(b["attention"].get("replace_with_linear") or b["ffn"].get("replace_with_linear") for b in blocks):
        raise KeyError("block_configs without replace_with_linear")
    attn = [b["attention"] for b in blocks if not b["attention"].get("no_op")]
    ffn = [b["ffn"] for b in blocks if not b["ffn"].get("no_op")]
    groups = {a["n_heads_in_group"] for a in attn}
    if len(groups) != 1:
        raise KeyError("one n_heads_in_group for every attention block")
    widths = [-(-int(2 * f["ffn_mult"] * h / 3) // 256) * 256 for f in ffn]
    return dict(num_layers=len(attn), num_kv_heads=heads // groups.pop(), num_ffn_layers=len(ffn),
                intermediate_size=round(sum(widths) / len(widths)))


def _sliding_layers(cfg: dict, layers: int) -> int:
    """How many layers use sliding-window attention, by the conventions of each model family."""
    if "layer_types" in cfg:
        return sum(t == "sliding_attention" for t in cfg["layer_types"])
    if not cfg.get("sliding_window") or cfg.get("use_sliding_window") is False:
        return 0
    if cfg.get("sliding_window_pattern"):  # Gemma 3: every Nth layer is global
        n = int(cfg["sliding_window_pattern"])
        return sum((i + 1) % n != 0 for i in range(layers))
    if cfg.get("model_type") == "gemma2":  # alternating, starting with a local layer
        return (layers + 1) // 2
    if cfg.get("use_sliding_window") and "max_window_layers" in cfg:  # Qwen2: layers past the first N
        return max(0, layers - int(cfg["max_window_layers"]))
    return layers  # Mistral: every layer


def _hf_fields(cfg: dict) -> dict:
    heads, hidden = cfg["num_attention_heads"], cfg["hidden_size"]
    layers = cfg["num_hidden_layers"]
    experts = cfg.get("n_routed_experts") or cfg.get("num_local_experts") or cfg.get("num_experts") or 0
    quant = (cfg.get("quantization_config") or {}).get("quant_method")
    torch_dtype = str(cfg.get("torch_dtype") or cfg.get("dtype") or "bfloat16")
    sliding = _sliding_layers(cfg, layers)
    fields = dict(
        hf_id=cfg.get("_name_or_path") or None,
        dtype="fp8" if quant == "fp8" else "fp16" if torch_dtype == "float16" else "bf16",
        num_layers=layers,
        hidden_size=hidden,
        num_attention_heads=heads,
        num_kv_heads=cfg.get("num_key_value_heads") or heads,
        # HF's own default when a config omits head_dim (Llama, Mistral, Qwen2); Qwen3 and Gemma set it.
        head_dim=cfg.get("head_dim") or cfg.get("attention_head_dim") or hidden // heads,
        # All-MoE configs (Qwen3.5-MoE) give no dense width; it is then unused.
        intermediate_size=(cfg.get("intermediate_size") or cfg.get("moe_intermediate_size")
                           or (0 if cfg.get("block_configs") else cfg["intermediate_size"])),
        vocab_size=cfg["vocab_size"],
        max_position_embeddings=cfg.get("max_position_embeddings", 4096),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        # Qwen2's q/k/v projections always carry a bias; others say so in attention_bias.
        attention_bias=bool(cfg.get("attention_bias", cfg.get("model_type") == "qwen2")),
        sliding_window=cfg.get("sliding_window") if sliding else None,
        num_sliding_layers=sliding,
    )
    if cfg.get("kv_lora_rank"):
        fields.update(kv_lora_rank=cfg["kv_lora_rank"], q_lora_rank=cfg.get("q_lora_rank"),
                      qk_rope_head_dim=cfg["qk_rope_head_dim"], qk_nope_head_dim=cfg["qk_nope_head_dim"],
                      v_head_dim=cfg["v_head_dim"], head_dim=cfg["qk_nope_head_dim"] + cfg["qk_rope_head_dim"])
        if cfg.get("index_topk"):  # DeepSeek sparse attention (DeepSeek-V3.2, GLM-5)
            fields.update(index_topk=cfg["index_topk"], index_n_heads=cfg["index_n_heads"],
                          index_head_dim=cfg["index_head_dim"])
    if experts:
        moe_width = cfg.get("moe_intermediate_size") or cfg["intermediate_size"]
        # Qwen2/3-Next and Nemotron-H give the shared expert's width, in units of a routed expert here.
        shared_width = (cfg.get("shared_expert_intermediate_size")
                        or cfg.get("moe_shared_expert_intermediate_size") or 0)
        fields.update(
            num_experts=experts,
            num_experts_per_tok=cfg["num_experts_per_tok"],
            moe_intermediate_size=moe_width,
            num_shared_experts=round(shared_width / moe_width) if shared_width else cfg.get("n_shared_experts") or 0,
            moe_latent_size=cfg.get("moe_latent_size"),
            num_dense_layers=cfg.get("first_k_dense_replace") or len(cfg.get("mlp_only_layers") or []),
        )
    fields.update(_hybrid_fields(cfg))
    return fields


def load_gpu(name: str) -> GpuSpec:
    """A GPU of the catalogue (`conf/gpu/<name>.yaml`)."""
    return GpuSpec(**_catalogue_entry("gpu", name))


def load_model(name_or_path: str) -> ModelArch:
    """A model of the catalogue (`conf/model/<name>.yaml`), or a local HF config.json (file or directory)."""
    p = Path(name_or_path).expanduser()
    if p.is_dir() or p.suffix == ".json":
        return ModelArch.from_hf_config(p)
    return ModelArch(**_catalogue_entry("model", name_or_path))


def _catalogue_entry(group: str, name: str) -> dict:
    import yaml

    from tasks.paths import CONF_DIR, register_resolvers

    file = CONF_DIR / group / f"{name}.yaml"
    if not file.is_file():
        known = sorted(f.stem for f in (CONF_DIR / group).glob("*.yaml"))
        hint = " or a directory holding an HF config.json" if group == "model" else ""
        raise ConfigFileError(f"unknown {group} {name!r}: use one of {', '.join(known)}{hint}")
    data = yaml.safe_load(file.read_text())
    if any("${" in str(v) for v in data.values()):  # interpolations such as ${root:...}
        from omegaconf import OmegaConf

        register_resolvers()
        data = OmegaConf.to_container(OmegaConf.create(data), resolve=True)
    return data
