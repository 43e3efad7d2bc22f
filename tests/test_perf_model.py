"""Behaviour of the step model on real catalog entries (Llama-3.1-8B on H100).

The roofline tests pin the default (uncalibrated) parameters so they check the roofline's semantics; the
calibrated parameters get their own tests at the end."""
from __future__ import annotations

import numpy as np
import pytest
import yaml

from tasks.catalog import GpuSpec, ModelArch
from tasks.paths import CONF_DIR
from tasks.perf_model import (MBU, PerfModel, PerfParams, busiest_rank_experts, causal_context, distinct_experts,
                              expected_max_normal, load_perf_params)


def _pm(*args, **kwargs) -> PerfModel:
    """The roofline with its named default efficiencies (ideal overlap, flat GEMM efficiency)."""
    return PerfModel(*args, params=PerfParams(), **kwargs)


def _load(group: str, name: str) -> dict:
    return yaml.safe_load((CONF_DIR / group / f"{name}.yaml").read_text())


@pytest.fixture(scope="module")
def llama() -> ModelArch:
    return ModelArch(**_load("model", "llama-3.1-8b"))


@pytest.fixture(scope="module")
def h100() -> GpuSpec:
    return GpuSpec(**_load("gpu", "h100"))


def test_small_batch_decode_is_memory_bound_at_weight_streaming_time(llama: ModelArch, h100: GpuSpec) -> None:
    pm = _pm(llama, h100, "bf16", "bf16")
    cost = pm.step(decode_seqs=4, decode_context_tokens=4 * 512)
    assert cost.memory_s > 10 * cost.compute_s
    weights_s = llama.weight_bytes("bf16") / (h100.hbm_bandwidth_gbps * 1e9)
    # Between streaming every weight at full bandwidth and at the assumed efficiency (+ a little KV).
    assert 0.9 * weights_s < cost.memory_s < 1.1 * weights_s / MBU
    assert cost.seconds == pytest.approx(cost.memory_s + cost.overhead_s)


def test_long_prefill_is_compute_bound(llama: ModelArch, h100: GpuSpec) -> None:
    pm = _pm(llama, h100, "bf16", "bf16")
    cost = pm.step(prefill_tokens=4096, prefill_attn_context=causal_context(0, 4096))
    assert cost.compute_s > 5 * cost.memory_s
    # No faster than the dense GEMMs at the vendor peak.
    assert cost.compute_s > 2 * llama.num_params * 0.9 * 4096 / (h100.bf16_tflops * 1e12)
    # Attention makes prefill super-linear in prompt length.
    half = pm.step(prefill_tokens=2048, prefill_attn_context=causal_context(0, 2048))
    assert cost.compute_s > 2 * half.compute_s


def test_lower_precision_weights_speed_up_decode(llama: ModelArch, h100: GpuSpec) -> None:
    shape = dict(decode_seqs=8, decode_context_tokens=8 * 1024)
    bf16, fp8, int4 = (_pm(llama, h100, w, "bf16").step(**shape).seconds for w in ("bf16", "fp8", "int4"))
    assert int4 < fp8 < bf16
    # fp8 (W8A8) also halves prefill compute; int4 (W4A16) runs bf16 math.
    prefill = dict(prefill_tokens=4096, prefill_attn_context=causal_context(0, 4096))
    c16, c8, c4 = (_pm(llama, h100, w, "bf16").step(**prefill).compute_s for w in ("bf16", "fp8", "int4"))
    assert c8 < 0.6 * c16
    assert c4 == pytest.approx(c16)


def test_fp8_weights_on_gpu_without_fp8_compute_in_bf16(llama: ModelArch) -> None:
    a100 = GpuSpec(**_load("gpu", "a100"))
    assert not a100.supports_fp8
    pm = _pm(llama, a100, "fp8", "bf16")
    assert pm.compute_dtype == "bf16"
    assert pm.step(decode_seqs=1, decode_context_tokens=100).seconds > 0


def test_tensor_parallel_cuts_step_time_but_adds_communication(llama: ModelArch, h100: GpuSpec) -> None:
    shape = dict(prefill_tokens=1024, prefill_attn_context=causal_context(0, 1024), decode_seqs=32,
                 decode_context_tokens=32 * 2048)
    tp1, tp2 = (_pm(llama, h100, "bf16", "bf16", tp=tp).step(**shape) for tp in (1, 2))
    assert tp1.comm_s == 0.0
    assert tp2.comm_s > 0.0
    assert tp2.seconds < tp1.seconds
    # Not a free halving: communication eats part of the gain.
    assert tp2.seconds - tp2.overhead_s > 0.5 * (tp1.seconds - tp1.overhead_s)


def test_an_instance_beyond_its_nvlink_domain_communicates_over_the_nics(llama: ModelArch, h100: GpuSpec) -> None:
    # TP16 on HGX H100s spans two nodes; the same layout inside one 16-GPU NVLink domain stays on NVLink.
    shape = dict(prefill_tokens=2048, prefill_attn_context=causal_context(0, 2048))
    two_nodes = _pm(llama, h100, "bf16", "bf16", tp=16).step(**shape)
    one_domain = _pm(llama, h100.model_copy(update={"nvlink_domain_gpus": 16}), "bf16", "bf16", tp=16).step(**shape)
    eight = _pm(llama, h100, "bf16", "bf16", tp=8).step(**shape)
    ratio = h100.link_bandwidth_gbps / h100.scale_out_gbps
    assert two_nodes.comm_s > 0.8 * ratio * one_domain.comm_s
    assert two_nodes.comm_s > 4 * eight.comm_s  # the NICs, not the extra ranks, make the difference


def test_kv_transfer_scales_linearly_with_tokens(llama: ModelArch, h100: GpuSpec) -> None:
    pm = _pm(llama, h100, "bf16", "bf16")
    t = np.array([pm.kv_transfer_s(n) for n in (0, 1000, 2000, 4000)])
    assert t[0] > 0  # fixed connector latency
    per_token = np.diff(t) / np.diff([0, 1000, 2000, 4000])
    assert per_token == pytest.approx(np.full(3, per_token[0]))
    assert per_token[0] >= llama.kv_bytes_per_token("bf16") / (h100.link_bandwidth_gbps * 1e9)
    fp8 = _pm(llama, h100, "bf16", "fp8")
    assert fp8.kv_transfer_s(4000) - fp8.kv_transfer_s(0) == pytest.approx((t[3] - t[0]) / 2)


def test_capacity_decreases_with_longer_inputs_and_is_vectorised(llama: ModelArch, h100: GpuSpec) -> None:
    pm = _pm(llama, h100, "bf16", "bf16")
    inputs = np.array([128.0, 512.0, 2048.0, 8192.0])
    qps = pm.capacity_qps(inputs, 256.0, 256, 400_000)
    assert np.all(qps > 0) and np.all(np.diff(qps) < 0)
    assert qps[1] == pytest.approx(pm.capacity_qps(512.0, 256.0, 256, 400_000))
    # A smaller KV cache (smaller decode batch) lowers capacity.
    assert pm.capacity_qps(512.0, 256.0, 256, 20_000) < qps[1]


def test_step_is_vectorised_elementwise(llama: ModelArch, h100: GpuSpec) -> None:
    pm = _pm(llama, h100, "fp8", "fp8", tp=2)
    seqs = np.array([1, 16, 128, 512])
    batch = pm.step(decode_seqs=seqs, decode_context_tokens=seqs * 3000).seconds
    single = [pm.step(decode_seqs=int(s), decode_context_tokens=int(s) * 3000).seconds for s in seqs]
    assert batch == pytest.approx(single)
    assert np.all(np.diff(batch) > 0)  # more sequences, more KV to read


# ------------------------------------------------------------ calibrated parameters, MoE, efficiency curve
def test_calibrated_parameters_are_loaded_by_family_and_physical(h100: GpuSpec) -> None:
    p = load_perf_params("h100")
    assert p == load_perf_params("h200")  # one Hopper family
    assert 0.25 <= p.mfu <= 0.9 and 0.5 <= p.mbu <= 0.95
    assert set(p.step_overhead_s) == {"vllm", "sglang", "trtllm"}
    assert all(0 <= v < 0.05 for v in p.step_overhead_s.values())
    assert set(p.seq_overhead_s) == {"vllm", "sglang", "trtllm"}
    assert all(1e-6 <= v <= 2e-4 for v in p.seq_overhead_s.values())  # tens of microseconds of host work
    # A family without its own file borrows the fitted efficiencies as fractions of its own peaks.
    assert load_perf_params("l40s") == p


def test_host_work_per_sequence_grows_with_the_batch_whatever_the_tp(llama: ModelArch, h100: GpuSpec) -> None:
    params = PerfParams(step_overhead_s={"vllm": 0.002}, seq_overhead_s={"vllm": 5e-5})
    for tp in (1, 8):
        pm = PerfModel(llama, h100, "bf16", "bf16", tp=tp, params=params, backend="vllm")
        small, large = (pm.step(decode_seqs=n, decode_context_tokens=n * 1000) for n in (8, 128))
        assert large.overhead_s - small.overhead_s == pytest.approx(120 * 5e-5)  # not divided by tp
        # A prefill-only step pays for the sequences it prefills (one by default).
        assert pm.step(prefill_tokens=512).overhead_s == pytest.approx(pm.step_overhead_s + 5e-5)
        assert pm.step(prefill_tokens=2048, prefill_seqs=4).overhead_s == pytest.approx(pm.step_overhead_s + 2e-4)
    # Without a named engine there is no calibrated host work to charge.
    plain = PerfModel(llama, h100, "bf16", "bf16", params=params)
    assert plain.step(decode_seqs=128, decode_context_tokens=128_000).overhead_s == pytest.approx(plain.step_overhead_s)


def test_gemm_efficiency_curve_saturates(llama: ModelArch, h100: GpuSpec) -> None:
    pm = PerfModel(llama, h100, "bf16", "bf16", params=PerfParams(gemm_half_tokens=64))
    eff = pm.gemm_efficiency(np.array([1, 64, 512, 8192]))
    assert eff[1] == pytest.approx(0.5, abs=1e-6)
    assert np.all(np.diff(eff) > 0) and eff[-1] > 0.99
    # Per-token compute falls as the step grows.
    c = np.array([pm.step(prefill_tokens=t).compute_s / t for t in (16, 256, 4096)])
    assert np.all(np.diff(c) < 0)


def test_moe_decode_reads_only_touched_experts(h100: GpuSpec) -> None:
    moe = ModelArch(**_load("model", "qwen3-30b-a3b"))
    pm = PerfModel(moe, h100, "bf16", "bf16", params=PerfParams())
    touched = distinct_experts(moe.num_experts, moe.num_experts_per_tok, np.array([1, 8, 64, 4096]))
    assert touched[0] == pytest.approx(moe.num_experts_per_tok)
    assert np.all(np.diff(touched) > 0) and touched[-1] == pytest.approx(moe.num_experts, rel=1e-3)
    one = pm.weights_read_bytes(1)
    assert one < 0.3 * pm.weight_bytes_per_gpu  # 8 of 128 experts
    assert pm.weights_read_bytes(100_000) == pytest.approx(pm.weight_bytes_per_gpu, rel=1e-3)
    # So a batch of 1 decodes faster than streaming every expert would allow.
    full_s = pm.weight_bytes_per_gpu / (h100.hbm_bandwidth_gbps * 1e9 * pm.params.mbu)
    assert pm.step(decode_seqs=1, decode_context_tokens=1000).memory_s < 0.5 * full_s


def test_sliding_window_layers_read_and_attend_only_their_window(h100: GpuSpec) -> None:
    oss = ModelArch(**_load("model", "gpt-oss-120b"))  # 18 of 36 layers slide over 128 tokens
    full = oss.model_copy(update={"num_sliding_layers": 0, "sliding_window": None})
    sliding, dense = (_pm(m, h100, "bf16", "bf16") for m in (oss, full))
    seqs, ctx = 64, 8000
    a, b = (pm.step(decode_seqs=seqs, decode_context_tokens=seqs * ctx) for pm in (sliding, dense))
    per_token_s = sliding.kv_bytes_per_token / (h100.hbm_bandwidth_gbps * 1e9 * sliding.params.mbu)
    # Half the layers read 128 tokens per sequence instead of 8000.
    assert b.memory_s - a.memory_s == pytest.approx(0.5 * seqs * (ctx - 128) * per_token_s, rel=1e-9)
    # A prompt shorter than the window attends the same in both; a long one attends far less.
    short, long_ = causal_context(0, 100), causal_context(0, 8000)
    assert sliding.step(prefill_tokens=100, prefill_attn_context=short).compute_s == pytest.approx(
        dense.step(prefill_tokens=100, prefill_attn_context=short).compute_s)
    assert (sliding.step(prefill_tokens=8000, prefill_attn_context=long_).compute_s
            < dense.step(prefill_tokens=8000, prefill_attn_context=long_).compute_s)


def test_sparse_attention_attends_top_k_but_its_indexer_reads_every_key(h100: GpuSpec) -> None:
    v3, v32 = (ModelArch(**_load("model", n)) for n in ("deepseek-v3", "deepseek-v3.2"))
    assert v32.kv_bytes_per_token_layer("fp8") == v3.kv_bytes_per_token_layer("fp8") + 128 + 4  # FP8 key + scale
    dense, sparse = (_pm(m, h100, "fp8", "fp8", tp=8) for m in (v3, v32))
    bps = h100.hbm_bandwidth_gbps * 1e9 * dense.params.mbu
    for ctx in (1000, 32000):
        a, b = (pm.step(decode_seqs=16, decode_context_tokens=16 * ctx) for pm in (dense, sparse))
        attended = min(ctx, 2048)
        latent = dense.kv_bytes_per_token  # per token over all layers
        expect = b.memory_s - a.memory_s
        # Sparse: the latent of the top-k only, the indexer's keys of every token (and one new token each).
        want = 16 * ((attended - ctx) * latent + (ctx + 1) * 61 * 132) / bps
        assert expect == pytest.approx(want, rel=1e-9)
    short = {"decode_seqs": 16, "decode_context_tokens": 16 * 1000}
    assert sparse.step(**short).compute_s > dense.step(**short).compute_s  # the indexer's logits are extra work
    long_ = {"decode_seqs": 16, "decode_context_tokens": 16 * 32000}
    assert sparse.step(**long_).memory_s < dense.step(**long_).memory_s


def test_smooth_roofline_lies_between_max_and_sum(llama: ModelArch, h100: GpuSpec) -> None:
    shape = dict(prefill_tokens=256, prefill_attn_context=causal_context(0, 256), decode_seqs=64,
                 decode_context_tokens=64 * 2000)
    ideal = PerfModel(llama, h100, "bf16", "bf16", params=PerfParams()).step(**shape)
    soft = PerfModel(llama, h100, "bf16", "bf16", params=PerfParams(roofline_p=2.0)).step(**shape)
    body = soft.seconds - soft.overhead_s - soft.comm_s
    assert max(soft.compute_s, soft.memory_s) < body < soft.compute_s + soft.memory_s
    assert ideal.seconds < soft.seconds


def test_arrival_groups_grow_with_prompt_length_and_batch_as_their_exponents_say(llama: ModelArch,
                                                                                 h100: GpuSpec) -> None:
    from tasks.perf_steady import SYNC_ISL_REF, SYNC_OSL_REF, agg_steady

    pm = _pm(llama, h100, "bf16", "bf16")
    isl, osl, conc = np.array([SYNC_ISL_REF, 4096.0]), np.array([256.0, 256.0]), np.array([32.0, 32.0])
    fixed = agg_steady(pm, "vllm", isl, osl, conc, sync=0.25)
    assert np.allclose(agg_steady(pm, "vllm", isl, osl, conc, sync=0.25, sync_exps=(1.0, 0.0))["ttft_s"],
                       fixed["ttft_s"])  # exponents 1 and 0: a fixed share of the running batch
    longer = agg_steady(pm, "vllm", isl, osl, conc, sync=0.25, sync_exps=(1.0, 0.5))
    # At the reference length nothing changes; a longer prompt gathers more prompts into its prefill.
    assert longer["ttft_s"][0] == pytest.approx(fixed["ttft_s"][0])
    assert longer["ttft_s"][1] > fixed["ttft_s"][1] * 1.1
    # A sub-linear batch exponent: smaller groups at the same share, so less prefill in each TTFT.
    assert (agg_steady(pm, "vllm", isl, osl, conc, sync=0.25, sync_exps=(0.5, 0.0))["ttft_s"] < fixed["ttft_s"]).all()
    # A negative output exponent: longer decodes drift apart, so fewer prompts arrive together and each
    # waits behind less prefill; at the reference output length nothing changes.
    outs = np.array([SYNC_OSL_REF, 4 * SYNC_OSL_REF])
    args = (pm, "sglang", isl[:1].repeat(2), outs, conc)
    waves, drift = (agg_steady(*args, sync=1.0, sync_exps=(1.0, 0.0, e)) for e in (0.0, -0.5))
    assert drift["ttft_s"][0] == pytest.approx(waves["ttft_s"][0])
    assert drift["ttft_s"][1] < 0.9 * waves["ttft_s"][1]


def test_a_serial_frontend_bounds_only_a_fast_engines_closed_loop(llama: ModelArch, h100: GpuSpec) -> None:
    from tasks.perf_steady import agg_steady, frontend_wait

    front = (0.015, 6e-5)  # per request, per streamed token
    assert frontend_wait(1.0, 128, 128, (0.0, 0.0)) == 0.0
    need = 128 * (0.015 + 6e-5 * 128)  # 2.9 s for the loop's 128 requests to pass the frontend once
    assert frontend_wait(1.0, 128, 128, front) == pytest.approx(need - 1.0, rel=0.01)
    assert frontend_wait(10.0, 128, 128, front) < 0.01 * 10.0  # an engine-bound loop barely notices
    # Llama-8B on 8 H100s at concurrency 128 outruns the frontend: TTFT grows, TPOT (the engine) does not.
    pm = _pm(llama, h100, "bf16", "bf16", tp=8)
    args = (pm, "trtllm", np.array([1024.0, 1024.0]), np.array([128.0, 128.0]), np.array([128.0, 4.0]))
    free, bound = agg_steady(*args), agg_steady(*args, frontend_s=front)
    assert bound["ttft_s"][0] > free["ttft_s"][0] + 0.5
    assert bound["tpot_s"][0] == free["tpot_s"][0]
    assert bound["ttft_s"][1] < free["ttft_s"][1] + 1e-3  # 4 users, far from the cap: under a millisecond


def test_linear_attention_layers_keep_a_state_not_a_kv_cache(h100: GpuSpec) -> None:
    """Qwen3.5-27B: 16 of 64 layers attend (and cache KV); the other 48 are Gated DeltaNet layers whose fp32
    state each decode step reads and rewrites, whatever the context."""
    m = ModelArch(**_load("model", "qwen3.5-27b"))
    assert (m.num_attention_layers, m.num_linear_layers) == (16, 48)
    pm = _pm(m, h100, "bf16", "bf16", tp=2)
    assert pm.state_bytes == 48 * m.linear_state_elems * 4 / 2
    bps = h100.hbm_bandwidth_gbps * 1e9 * pm.params.mbu
    ctx = 6000
    a, b = (pm.step(decode_seqs=n, decode_context_tokens=n * ctx) for n in (16, 32))
    kv = (ctx + 1) * pm.kv_bytes_per_token * 16 / 64 / pm.params.kv_read_scale
    assert b.memory_s - a.memory_s == pytest.approx(16 * (kv + 2 * pm.state_bytes) / bps, rel=1e-9)
    # In the KV pool a request takes its context in the attention layers plus its state.
    assert pm.footprint(ctx) == pytest.approx(ctx * 16 / 64 + pm.state_bytes / pm.kv_bytes_per_token)
    # With every layer attending (same weights otherwise), long contexts read far more.
    dense = _pm(m.model_copy(update={"num_linear_layers": 0}), h100, "bf16", "bf16", tp=2)
    long_ = {"decode_seqs": 32, "decode_context_tokens": 32 * 32000}
    assert pm.step(**long_).memory_s < 0.5 * dense.step(**long_).memory_s


def test_expert_parallel_steps_wait_for_the_busiest_rank(h100: GpuSpec) -> None:
    assert expected_max_normal(1) == pytest.approx(0.0, abs=1e-9)
    assert expected_max_normal(2) == pytest.approx(1 / np.sqrt(np.pi), rel=1e-6)
    ds = ModelArch(**_load("model", "deepseek-v3"))
    tp, ep = (_pm(ds, h100, "fp8", "fp8", tp=8, ep=e) for e in (1, 8))
    # One token touches 8 of 256 experts: one per rank on average, but the busiest of 8 ranks streams ~2.4.
    touched = distinct_experts(256, 8, 1)
    busiest = busiest_rank_experts(256, touched, 8)
    assert busiest == pytest.approx(1 + expected_max_normal(8) * np.sqrt(32 * (1 / 32) * (31 / 32)))
    extra = ep.weights_read_bytes(1) - tp.weights_read_bytes(1)
    assert extra == pytest.approx((8 * busiest - touched) * tp._expert_bytes)
    assert ep.step(decode_seqs=4, decode_context_tokens=4000).memory_s > tp.step(
        decode_seqs=4, decode_context_tokens=4000).memory_s
    # A big batch touches every expert on every rank: no imbalance left.
    assert ep.weights_read_bytes(8192) == pytest.approx(tp.weights_read_bytes(8192), rel=1e-6)
    # A dense model has no experts to spread.
    llama = ModelArch(**_load("model", "llama-3.1-70b"))
    assert _pm(llama, h100, "fp8", "fp8", tp=8, ep=8).ep == 1


def test_narrow_expert_slices_run_below_dense_gemm_efficiency(h100: GpuSpec) -> None:
    """TP splits every expert's columns over the GPUs (DeepSeek at TP8: 256 of 2,048 each), EP keeps experts
    whole: with `moe_half_width` the same prefill costs the routed experts width / (width + half) of dense
    efficiency, so TP8 pays far more than EP8; the dense part of the model and dense models are untouched."""
    from dataclasses import replace

    ds, llama = ModelArch(**_load("model", "deepseek-v3")), ModelArch(**_load("model", "llama-3.1-70b"))
    flat = replace(load_perf_params("h100"), moe_half_width=0.0)
    narrow = replace(flat, moe_half_width=1400.0)
    step = dict(prefill_tokens=8192, prefill_attn_context=causal_context(0, 8192))

    def gemm_s(model, params, **kw):
        return PerfModel(model, h100, "fp8", "fp8", params=params, **kw)._gemm_s_per_token

    assert PerfModel(ds, h100, "fp8", "fp8", tp=8, params=narrow).expert_width == 256
    assert PerfModel(ds, h100, "fp8", "fp8", tp=8, ep=8, params=narrow).expert_width == 2048
    routed = 8 * ds.expert_params() / ds.active_params  # the routed experts' share of a token's GEMMs (~0.6)
    for ep, width in ((1, 256), (8, 2048)):
        slow = gemm_s(ds, narrow, tp=8, ep=ep) / gemm_s(ds, flat, tp=8, ep=ep)
        assert slow == pytest.approx(1 + routed * 1400 / width, rel=0.02)  # 1/eff = 1 + half/width
    tp8, ep8 = (PerfModel(ds, h100, "fp8", "fp8", tp=8, ep=e, params=narrow).step(**step).compute_s for e in (1, 8))
    assert tp8 > 2 * ep8
    assert gemm_s(llama, narrow, tp=8) == gemm_s(llama, flat, tp=8)
