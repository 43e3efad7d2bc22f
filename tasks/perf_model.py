"""Roofline cost of one continuous-batching engine step.

A step processes T tokens; its time is the larger of tensor-core time and HBM time (weights streamed once
per step, KV read by attention and written for new tokens), plus the tensor-parallel all-reduces and the
engine's host work (a fixed cost per step and one per sequence in it, however many GPUs). GEMM efficiency rises with tokens per step and saturates
(`mfu * T / (T + gemm_half_tokens)`); a MoE step reads only the experts its tokens touch. The efficiencies
are a few physical parameters per GPU family (`PerfParams`), fitted by `tasks/perf_calibration.py` and
stored in `conf/perf/<family>.yaml`; without a file the named constants below apply.

All arithmetic is plain float math that also works element-wise on numpy arrays, so callers can cost a
whole grid of batch shapes at once.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from functools import lru_cache

import numpy as np
from scipy.special import ndtr

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
# A collective between nodes (an instance larger than its NVLink domain) crosses the NICs: NCCL's small
# all-reduce over InfiniBand takes tens of microseconds.
SCALE_OUT_LATENCY_S = 25e-6
# Fixed cost of moving one request's KV between instances (connector handshake, descriptor exchange).
KV_TRANSFER_LATENCY_S = 0.5e-3
# Activations exchanged by all-reduce are 16-bit whatever the weight dtype.
ACT_BYTES = 2.0
# FLOPs per state element per token of a linear-attention / SSM layer (Gated DeltaNet: S^T k, the rank-1
# update, the decay and the S^T q readout, ~2 each; Mamba2's scan is of the same order).
LINEAR_FLOPS_PER_STATE_ELEM = 6.0

# GPU families sharing kernels and calibration (conf/perf/<family>.yaml).
GPU_FAMILY = {"h100": "hopper", "h200": "hopper", "h20": "hopper", "h20-3e": "hopper", "h800": "hopper",
              "b200": "blackwell", "b300": "blackwell", "gb200": "blackwell", "gb300": "blackwell",
              "rtx-pro-6000": "blackwell-rtx", "a100": "ampere", "a10": "ampere", "l40s": "ada", "l20": "ada",
              "cpu": "cpu"}


@dataclass(frozen=True)
class PerfParams:
    """The physical parameters of the step model for one GPU family (+ engine overheads per backend)."""

    mfu: float = MFU  # GEMM efficiency at saturation
    gemm_half_tokens: float = 0.0  # tokens per step at which GEMMs reach half of `mfu` (0: flat)
    attn_eff: float = MFU  # FlashAttention efficiency (bf16 peak)
    mbu: float = MBU
    kv_read_scale: float = 1.0  # paged-attention KV reads reach this share of the weights' bandwidth
    fp8_gemm_scale: float = 1.0  # FP8 GEMMs (scaling, block quantisation) reach this share of bf16's `mfu`
    # Compute and memory overlap imperfectly near the ridge point: a step takes (c^p + m^p)^(1/p) of its
    # compute and memory times (p -> infinity: the ideal roofline max; p = 1: no overlap). 0: max.
    roofline_p: float = 0.0
    link_eff: float = LINK_EFFICIENCY
    allreduce_latency_s: float = 8e-6  # per all-reduce call (NVLink); PCIe keeps its higher floor
    # Minimum time of one layer's kernels in a step (norms, rope, attention, GEMMs, routing each last a few
    # microseconds however small the batch); MoE layers run about twice the kernels (gate, dispatch, combine).
    layer_latency_s: float = 0.0
    # Routed experts run as fused grouped GEMMs, each expert over a slice of `moe_intermediate_size / (tp /
    # ep)` columns per GPU: fixed per-expert and per-tile work (token gather, scales, pipeline fill) is
    # amortised over that width, so they reach width / (width + moe_half_width) of the dense GEMMs'
    # efficiency (0: as dense).
    moe_half_width: float = 0.0
    # Engine behaviour, by backend (also physical: CPU-side scheduling, sampling, detokenisation).
    step_overhead_s: dict | None = None  # {"vllm": s, "sglang": s, "trtllm": s}
    # CPU time per running sequence per step (scheduling, sampling, detokenising and streaming its token):
    # host work that does not shrink with TP, so large batches on many GPUs are CPU-bound.
    seq_overhead_s: dict | None = None
    request_overhead_s: dict | None = None  # fixed TTFT cost: HTTP, tokenisation, first detokenise
    memory_reserve_gib: float = 4.0  # activations, CUDA graphs, NCCL buffers per GPU, off the KV cache
    # Share of a closed loop's concurrent requests whose prompts reach the engine in the same step: a
    # benchmark starts them together, and a scheduler that finishes them together keeps them so (1.0); one
    # that staggers completions spreads them out (towards 1/concurrency).
    sync_frac: dict | None = None
    # How that group grows with the running batch R and the prompt length: sync * R^conc_exp *
    # (isl / 1024)^isl_exp requests (exponents 1 and 0: a fixed share of R). An empirical law: vLLM's
    # measured TTFTs imply groups growing about as sqrt(R) and with prompt length.
    sync_conc_exp: dict | None = None
    sync_isl_exp: dict | None = None
    # ... and with the output length (requests whose decodes run longer drift apart before they finish:
    # a negative exponent; the closed loop then refills them one by one).
    sync_osl_exp: dict | None = None

    # Serial host time of the serving frontend (HTTP, tokenising, streaming) per request and per output
    # token: a throughput ceiling, reached by small fast models at high concurrency (trtllm-serve near 50
    # requests/s and 13k tokens/s on H100 whatever the TP).
    frontend_request_s: dict | None = None
    frontend_token_s: dict | None = None
    # The engine versions whose frontends those costs were measured on ({backend: [version, ...]}; None: any).
    # A frontend is one build's host code: trtllm-serve 1.0 streamed at most ~15k tokens/s from one process,
    # later builds (post-processing workers) and orchestrators' frontends far more, so the ceiling is not
    # carried to a version the calibration did not run.
    frontend_versions: dict | None = None

    def frontend(self, backend: str, version: str | None = None) -> tuple[float, float]:
        """Serial (per request, per output token) seconds of `backend`'s serving frontend. With a `version`
        (a row's; "" when it names none) not among `frontend_versions`' measured builds, the frontend is
        unmeasured and none is charged; without one (plans, simulations), the calibrated build's."""
        if version is not None and self.frontend_versions is not None \
                and version not in self.frontend_versions.get(backend, ()):
            return 0.0, 0.0
        return (self.frontend_request_s or {}).get(backend, 0.0), (self.frontend_token_s or {}).get(backend, 0.0)

    def sync(self, backend: str) -> float:
        return (self.sync_frac or {}).get(backend, 0.1)

    def sync_exps(self, backend: str) -> tuple[float, float, float]:
        return ((self.sync_conc_exp or {}).get(backend, 1.0), (self.sync_isl_exp or {}).get(backend, 0.0),
                (self.sync_osl_exp or {}).get(backend, 0.0))

    def overhead(self, backend: str, default: float = 0.002) -> float:
        return (self.step_overhead_s or {}).get(backend, default)

    def seq_overhead(self, backend: str) -> float:
        return (self.seq_overhead_s or {}).get(backend, 0.0)

    def request_overhead(self, backend: str) -> float:
        return (self.request_overhead_s or {}).get(backend, 0.0)

    def to_dict(self) -> dict:
        return asdict(self)


def perf_params_path(gpu_name: str):
    from tasks.paths import CONF_DIR

    return CONF_DIR / "perf" / f"{GPU_FAMILY.get(gpu_name, gpu_name)}.yaml"


@lru_cache(maxsize=32)
def load_perf_params(gpu_name: str) -> PerfParams:
    """Calibrated parameters of `gpu_name`'s family; the Hopper fit (the only measured family) stands in for
    families without their own file, its efficiencies being fractions of each GPU's own peaks."""
    import yaml

    if GPU_FAMILY.get(gpu_name) == "cpu":  # the host CPU in tests: the plain roofline, no GPU fit
        return PerfParams()
    for path in (perf_params_path(gpu_name), perf_params_path("h100")):
        if path.is_file():
            data = yaml.safe_load(path.read_text()) or {}
            known = {f.name for f in fields(PerfParams)}
            return PerfParams(**{k: v for k, v in data.items() if k in known})
    return PerfParams()


def distinct_experts(num_experts: float, per_token: float, tokens):
    """Expected distinct experts a step touches when `tokens` each pick `per_token` of `num_experts`."""
    tokens = np.asarray(tokens, dtype=float)
    return num_experts * (1.0 - (1.0 - per_token / num_experts) ** tokens)


@lru_cache(maxsize=64)
def expected_max_normal(n: int) -> float:
    """E[max of n independent standard normals] (0 for n = 1, 1/sqrt(pi) for 2)."""
    x, dx = np.linspace(-10.0, 10.0, 20001, retstep=True)
    pdf = np.exp(-0.5 * x * x) / np.sqrt(2 * np.pi)
    return float(np.sum(x * n * pdf * ndtr(x) ** (n - 1)) * dx)  # the integrand vanishes at both ends


def busiest_rank_experts(num_experts: float, touched, ep: int):
    """Experts the busiest of `ep` expert-parallel ranks (each holding num_experts / ep) must stream when a
    step touches `touched` distinct experts in all: each rank's count is about binomial, and every rank waits
    for the slowest at the layer's all-to-all. Mean + E[max of ep normals] x std, at most a rank's share."""
    n = num_experts / ep
    q = np.clip(np.asarray(touched, dtype=float) / num_experts, 0.0, 1.0)
    return np.minimum(n, n * q + expected_max_normal(ep) * np.sqrt(n * q * (1.0 - q)))


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
        params: PerfParams | None = None,
        compute_dtype: str | None = None,
        attention_dp: int = 1,
        expert_dtype: str | None = None,
        backend: str | None = None,
        pp: int = 1,
        ep: int = 1,
    ) -> None:
        # A MoE checkpoint may store its routed experts in another dtype than the rest (gpt-oss: MXFP4).
        self.expert_dtype = model.experts_stored_as(weights_dtype, expert_dtype)
        for dt in (weights_dtype, kv_dtype, self.expert_dtype):
            if dt not in DTYPE_BYTES:
                raise ValueError(f"unknown dtype {dt!r}; use one of {sorted(DTYPE_BYTES)}")
        self.model, self.gpu, self.tp, self.pp = model, gpu, tp, pp
        self.ep = ep if model.is_moe else 1  # expert-parallel ranks (experts whole, spread over them)
        self.weights_dtype, self.kv_dtype = weights_dtype, kv_dtype
        self.weight_bytes_total = model.weight_bytes(weights_dtype, self.expert_dtype)
        self.params = p = params if params is not None else load_perf_params(gpu.name)
        moe_layers = model.moe_layers
        # Per-step cost outside the roofline: the engine's own (scheduler, sampling) and the kernels' floor,
        # `layer_latency_s` per ~8 launches. A GQA attention block and a dense MLP are ~9 kernels (1 unit);
        # absorbed MLA decode ~12 (latent projections and norms, absorbed q/v BMMs, rope, FlashMLA: 2 units);
        # a routed MoE block ~11 (gate, top-k, permute, two grouped GEMMs, shared expert, combine: +1 unit).
        attn_units = 2 if model.is_mla else 1
        self._layer_units = attn_units + (1 if model.is_moe else 0)  # a typical layer's (draft heads are one)
        self.step_overhead_s = step_overhead_s + p.layer_latency_s * (model.num_layers * attn_units + moe_layers)
        # Host work per sequence in a step, as the named engine's calibration says (none without one).
        self.seq_overhead_s = p.seq_overhead(backend) if backend else 0.0
        # W8A8 uses FP8 tensor cores; int4 (W4A16) and FP8 on a GPU without FP8 (W8A16) dequantise to bf16.
        self.compute_dtype = compute_dtype or gpu.compute_path("fp8" if weights_dtype == "fp8" else "bf16")

        embed = model.vocab_size * model.hidden_size
        # The embedding lookup gathers T rows: it is neither a GEMM nor streamed. Tied, it is the LM head.
        self.gemm_params = model.active_params - (0 if model.tie_word_embeddings else embed)
        lookup_bytes = 0 if model.tie_word_embeddings else embed * DTYPE_BYTES["bf16"]
        # Attention data parallelism (DeepSeek-style) splits the requests, hence their KV, over
        # `attention_dp` groups of tp / attention_dp ranks; each group keeps whole attention weights.
        self.attention_dp = attention_dp
        attn_tp = max(1, tp // attention_dp)
        attn_bytes = model.param_counts()["attention"] * DTYPE_BYTES[weights_dtype]
        self.weight_bytes_per_gpu = (self.weight_bytes_total - lookup_bytes - attn_bytes) / tp + attn_bytes / attn_tp
        self.kv_bytes_per_token = model.kv_bytes_per_token(kv_dtype, attn_tp) / attention_dp
        # Step costs are one pass over every layer on `tp` GPUs: with pipeline parallelism each of the `pp`
        # stages holds (and streams) its share of the layers, and `pp` micro-batches are in flight at once.
        # Memory held per GPU, for capacity:
        self.resident_weight_bytes = (self.weight_bytes_total - attn_bytes) / (tp * pp) + attn_bytes / (attn_tp * pp)
        self.resident_kv_bytes_per_token = self.kv_bytes_per_token / pp
        # Linear-attention / SSM layers keep a fixed state per sequence, read and rewritten every decode
        # step; it shares the KV pool, counted as `state_tokens` tokens' worth of KV.
        self.state_bytes = model.linear_state_bytes(attn_tp) / attention_dp
        self.state_tokens = self.state_bytes / self.kv_bytes_per_token
        # A MoE step streams the dense part and only the routed experts its tokens touch.
        self._expert_bytes = model.expert_params() * DTYPE_BYTES[self.expert_dtype] / tp
        if model.is_moe:
            self._dense_bytes = self.weight_bytes_per_gpu - model.num_experts * self._expert_bytes

        # Precomputed per-unit rates so `step` is a handful of multiply-adds.
        # Low-precision tensor cores reach a smaller share of their peak (FP4 borrows FP8's fitted scale).
        mfu = p.mfu * (p.fp8_gemm_scale if self.compute_dtype in ("fp8", "fp4") else 1.0)
        routed = model.num_experts_per_tok * model.expert_params()  # per token, in its routed experts
        self.expert_width = model.moe_intermediate_size * self.ep / tp if model.is_moe else 0.0  # per GPU
        moe_eff = self.expert_width / (self.expert_width + p.moe_half_width) if routed else 1.0
        self._gemm_s_per_token = (2 * (self.gemm_params - routed + routed / moe_eff)
                                  / (gpu.peak_flops(self.compute_dtype) * mfu) / tp)
        # FlashAttention runs in bf16 whatever the weights are.
        # Per query row and attended token: QK^T and PV, 2 FLOPs per multiply-add. MLA prefills as plain
        # attention over its decompressed heads, but decodes "absorbed": every head attends the whole
        # latent (kv_lora_rank + rope keys), about 3x the FLOPs of a GQA head of its size.
        h = model.num_attention_heads
        if model.is_mla:
            prefill_flops = 2 * h * (model.qk_nope_head_dim + model.qk_rope_head_dim + model.v_head_dim)
            decode_flops = 2 * h * (2 * model.kv_lora_rank + model.qk_rope_head_dim)
        else:
            prefill_flops = decode_flops = 4 * h * model.head_dim
        attn_rate = gpu.peak_flops("bf16") * p.attn_eff * tp / model.num_layers
        self._attn_s_per_ctx = prefill_flops / attn_rate
        self._decode_attn_s_per_ctx = decode_flops / attn_rate
        # A linear mixer updates, decays and reads its state once per token: a few FLOPs per element.
        self._linear_s_per_token = (LINEAR_FLOPS_PER_STATE_ELEM * model.num_linear_layers * model.linear_state_elems
                                    / (gpu.peak_flops("bf16") * p.attn_eff * tp))
        # Sparse attention (DSA): every layer attends `index_topk` tokens per query, picked by an indexer
        # that scores every cached token with FP8 logits (run whole on each TP rank) and reads its keys.
        self._topk = float(model.index_topk or 0)
        index_flops_per_ctx = 2 * model.num_layers * model.index_n_heads * model.index_head_dim
        self._index_s_per_ctx = index_flops_per_ctx / (gpu.peak_flops(gpu.compute_path("fp8"))
                                                       * p.attn_eff) if self._topk else 0.0
        self._index_bytes_per_token = model.num_layers * model.index_key_bytes / attention_dp
        self._hbm_bps = gpu.hbm_bandwidth_gbps * 1e9 * p.mbu
        self._link_bps = gpu.link_bandwidth_gbps * 1e9 * p.link_eff
        # 2 all-reduces per layer (after attention and after the MLP), ring algorithm. An instance spanning
        # more GPUs than one NVLink domain (DeepSeek on 16 H100s) runs its collectives through the nodes'
        # NICs: their bandwidth and latency bound every layer's exchange.
        calls = model.num_layers + model.ffn_layers
        ring = 2 * (tp - 1) / tp
        multi_node = tp > gpu.nvlink_domain_gpus
        collective_bps = (min(gpu.scale_out_gbps, gpu.link_bandwidth_gbps) * 1e9 * p.link_eff if multi_node
                          else self._link_bps)
        self._comm_s_per_token = calls * ring * model.hidden_size * ACT_BYTES / collective_bps
        # PCIe all-reduces cannot be faster than their own latency floor, whatever family file stands in.
        latency = max(p.allreduce_latency_s, ALLREDUCE_LATENCY_S[gpu.interconnect],
                      SCALE_OUT_LATENCY_S if multi_node else 0.0)
        self._comm_fixed_s = calls * latency if tp > 1 else 0.0

    def bound_s(self, compute_s, memory_s):
        """Time of a step's compute and memory traffic together (see PerfParams.roofline_p)."""
        p = self.params.roofline_p
        if p <= 0:
            return np.maximum(compute_s, memory_s)
        hi = np.maximum(np.maximum(compute_s, memory_s), 1e-12)
        return hi * ((compute_s / hi) ** p + (memory_s / hi) ** p) ** (1.0 / p)

    def weights_read_bytes(self, tokens):
        """Weight bytes one GPU streams in a step of `tokens` tokens (MoE: the touched experts only)."""
        if not self._expert_bytes:
            return self.weight_bytes_per_gpu
        m = self.model
        touched = distinct_experts(m.num_experts, m.num_experts_per_tok, np.maximum(tokens, 1))
        if self.ep > 1:  # the same bytes on average, but the step waits for the busiest rank
            touched = self.ep * busiest_rank_experts(m.num_experts, touched, self.ep)
        return self._dense_bytes + touched * self._expert_bytes

    def attended(self, context_sum, queries):
        """`context_sum` (context attended, summed over `queries` query rows) averaged over the layers: a
        sliding-window layer attends at most its window per query, a sparse (DSA) one its top-k. Exact when
        every context passes the cap or none does."""
        if self._topk:
            return np.minimum(context_sum, np.asarray(queries, dtype=float) * self._topk)
        return self.held(context_sum, queries)

    def held(self, context_sum, queries=1):
        """Cached tokens the layers keep, averaged over them (sliding-window layers: their window, linear
        layers: none)."""
        if not (self.model.num_sliding_layers or self.model.num_linear_layers):
            return context_sum
        return self.model.layer_tokens(context_sum, queries) / self.model.num_layers

    def gemm_efficiency(self, tokens):
        """Fraction of the saturated GEMM rate reached at `tokens` tokens per step."""
        h = self.params.gemm_half_tokens
        return 1.0 if h <= 0 else np.asarray(tokens, dtype=float) / (np.asarray(tokens, dtype=float) + h) + 1e-12

    def step(
        self,
        prefill_tokens: int = 0,
        prefill_attn_context: int = 0,
        decode_seqs: int = 0,
        decode_context_tokens: int = 0,
        tokens_per_decode_seq: int = 1,
        prefill_prefix_tokens: int = 0,
        prefill_seqs=None,
    ) -> StepCost:
        """Cost of one step.

        prefill_attn_context: sum over prefill tokens of the context each attends (see `causal_context`).
        decode_context_tokens: sum of the decode sequences' contexts (KV tokens read).
        tokens_per_decode_seq: query tokens per decode sequence (k+1 when verifying k draft tokens).
        prefill_prefix_tokens: KV tokens already cached before each prefill chunk, read by its attention
            (chunked prefill, or a disaggregated decode instance's first step).
        prefill_seqs: sequences whose prompts the step prefills (default: one if it prefills at all).
        """
        decode_tokens = decode_seqs * tokens_per_decode_seq
        tokens = prefill_tokens + decode_tokens
        decode_ctx = self.attended(decode_context_tokens, decode_seqs)
        prefill_ctx = self.attended(prefill_attn_context, prefill_tokens)
        # A DSA indexer scores (and reads the keys of) every cached token, the attention only the top-k.
        index_ctx = prefill_attn_context + decode_context_tokens * tokens_per_decode_seq
        compute_s = (tokens * self._gemm_s_per_token / self.gemm_efficiency(tokens)
                     + prefill_ctx * self._attn_s_per_ctx
                     + decode_ctx * tokens_per_decode_seq * self._decode_attn_s_per_ctx
                     + index_ctx * self._index_s_per_ctx
                     + tokens * self._linear_s_per_token)
        index_bytes = (decode_context_tokens - decode_ctx) * self._index_bytes_per_token
        # New tokens' KV is written in every attention layer (a linear layer updates its state instead).
        written = self.held(tokens, tokens)
        kv_bytes = (decode_ctx + prefill_prefix_tokens + written) * self.kv_bytes_per_token + index_bytes
        prefilling = np.minimum(prefill_tokens, 1) if prefill_seqs is None else prefill_seqs
        state_bytes = self.state_bytes * (2 * decode_seqs + prefilling)  # decode: read and rewrite
        memory_s = (self.weights_read_bytes(tokens) + kv_bytes / self.params.kv_read_scale
                    + state_bytes) / self._hbm_bps
        comm_s = tokens * self._comm_s_per_token + self._comm_fixed_s
        seqs = decode_seqs + prefilling
        # Each attention-DP rank schedules (and samples) its own share of the sequences, in parallel.
        overhead_s = self.step_overhead_s + self.seq_overhead_s * seqs / self.attention_dp
        seconds = self.bound_s(compute_s, memory_s) + comm_s + overhead_s
        return StepCost(seconds, compute_s, memory_s, comm_s, overhead_s)

    def draft_layer_step(self, seqs, context_tokens) -> StepCost:
        """One pass of a one-layer draft head over `seqs` sequences holding `context_tokens` in all (DeepSeek's
        MTP module, an EAGLE head): a decoder layer's share of a decode step, that layer's kernel floor, and
        the 16-bit LM head it shares with the target (read whole, one row of logits per sequence); sampling
        and scheduling are the target step's."""
        full = self.step(decode_seqs=seqs, decode_context_tokens=context_tokens)
        share = 1.0 / self.model.num_layers
        head = self.model.vocab_size * self.model.hidden_size
        compute_s = (full.compute_s * share
                     + 2 * head * np.asarray(seqs, float) / (self.gpu.peak_flops("bf16") * self.params.mfu * self.tp))
        memory_s = full.memory_s * share + head * DTYPE_BYTES["bf16"] / self.tp / self._hbm_bps
        comm_s = full.comm_s * share
        overhead_s = self.params.layer_latency_s * (self._layer_units + 1) + 0 * compute_s  # + its LM head
        return StepCost(self.bound_s(compute_s, memory_s) + comm_s + overhead_s, compute_s, memory_s, comm_s,
                        overhead_s)

    def prefill_s(self, prompt_tokens: int) -> float:
        """One step prefilling a whole prompt alone (no chunking, no other work)."""
        return self.step(
            prefill_tokens=prompt_tokens, prefill_attn_context=causal_context(0, prompt_tokens)
        ).seconds

    def kv_bytes_held(self, context_tokens):
        """KV bytes one request holding `context_tokens` keeps on a GPU (a sliding layer: its window)."""
        return self.kv_bytes_per_token * self.held(context_tokens)

    def footprint(self, context_tokens):
        """KV-cache tokens (of every layer) one request holding `context_tokens` occupies, its linear
        layers' state included."""
        return self.held(context_tokens) + self.state_tokens

    def kv_transfer_s(self, tokens: int) -> float:
        """Moving `tokens` of KV (and the linear layers' state) to another instance: each TP rank sends
        its shard over its own link."""
        return (self.kv_bytes_held(tokens) + self.state_bytes) / self._link_bps + KV_TRANSFER_LATENCY_S

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
