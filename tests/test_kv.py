"""The memory plan and `dolphin kv`: vLLM's KV sizing figures, GQA/MLA/sliding-window arithmetic, TP,
feasibility and its shortfall."""
from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from tasks.catalog import GIB, ModelArch, load_gpu, load_model
from tasks.config import DeployConfig, MemoryConfig, PoolSpec, SLOConfig
from tasks.kv import plan_memory
from tasks.kv_sizing import activation_reserve_bytes, kv_capacity_tokens, kv_groups, vllm_kv_capacity
from tasks.paths import REPO_ROOT
from tasks.profile_stats import profile_trace, synthetic_profile
from tasks.trace import read_trace

AGG = DeployConfig(mode="agg")
SLO = SLOConfig(targets={"e2el_ms_p99": 2000})
TINY = dict(name="tiny", num_layers=2, hidden_size=256, num_attention_heads=4, num_kv_heads=2, head_dim=64,
            intermediate_size=512, vocab_size=1000, max_position_embeddings=2048)


def model(name: str) -> ModelArch:
    return load_model(name)


def gpu(name: str):
    return load_gpu(name)


def dolphin_kv(*args: str) -> dict:
    out = subprocess.run([sys.executable, "-m", "flows.cli", "kv", *args, "--json"], cwd=REPO_ROOT,
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def test_one_gib_holds_a_million_tokens_of_a_tiny_model():
    tiny = ModelArch(**TINY)
    bpt = tiny.kv_bytes_per_token("bf16")
    assert bpt == 2 * 2 * 2 * 64 * 2
    kv = vllm_kv_capacity(tiny, 1 * GIB, "bf16", tp=1, block_size=16, max_model_len=2048)
    assert kv.num_blocks * 16 == kv.logged_tokens == 1_048_576
    assert kv.max_concurrency == 512  # 65,536 blocks / (2048 / 16) blocks per request
    assert kv_capacity_tokens(1 * GIB, bpt, 16) == 1_048_576


def test_llama_8b_matches_vllms_log():
    # vLLM logged 1,952 blocks (31,232 tokens) and 1.56x for max_model_len 20,000 with "3.81 GiB", a figure
    # it rounds for the log: 1,952 blocks are 3.8125 GiB.
    m = model("llama-3.1-8b")
    assert m.kv_bytes_per_token("bf16") == 131072  # GQA: 8 KV heads of 128, not 32 attention heads
    kv = vllm_kv_capacity(m, 3.8125 * GIB, "bf16", 1, 16, 20_000)
    assert (kv.num_blocks, kv.logged_tokens, round(kv.max_concurrency, 2)) == (1952, 31_232, 1.56)
    assert vllm_kv_capacity(m, 3.81 * GIB, "bf16", 1, 16, 20_000).num_blocks == 1950
    # The CLI says the same, and what the log's rounding leaves open.
    out = dolphin_kv("--model", "llama-3.1-8b", "--kv-gib", "3.81", "--block-size", "16", "--max-model-len", "20000")
    assert out["kv_bytes_per_token"] == 131072 and out["num_blocks"] == 1950
    lo, hi = out["num_blocks_if_rounded"]
    assert lo <= 1952 <= hi
    exact = dolphin_kv("--model", "llama-3.1-8b", "--kv-gib", "3.8125", "--max-model-len", "20000")
    assert (exact["num_blocks"], exact["kv_capacity_tokens"]) == (1952, 31_232)
    assert round(exact["max_concurrency"], 2) == 1.56


def test_logged_tokens_follow_whole_blocks_per_request():
    # vLLM 0.32 logs int(concurrency x max_model_len), concurrency counting whole blocks per request.
    kv = vllm_kv_capacity(ModelArch(**TINY), 1 * GIB, "bf16", 1, 16, 3000)
    assert kv.max_concurrency == 65_536 / math.ceil(3000 / 16)
    assert kv.logged_tokens == int(65_536 / 188 * 3000) < kv.pool_tokens == 1_048_576


def test_head_dim_is_read_not_derived(tmp_path):
    cfg = {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "num_hidden_layers": 64,
           "hidden_size": 5120, "num_attention_heads": 64, "num_key_value_heads": 8, "head_dim": 128,
           "intermediate_size": 25600, "vocab_size": 151936, "max_position_embeddings": 40960,
           "torch_dtype": "bfloat16", "tie_word_embeddings": False}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    m = ModelArch.from_hf_config(tmp_path)
    assert m.head_dim == 128 != 5120 // 64
    assert m.kv_bytes_per_token("bf16") == model("qwen3-32b").kv_bytes_per_token("bf16") == 2 * 64 * 8 * 128 * 2
    out = dolphin_kv("--model", str(tmp_path), "--kv-gib", "1", "--max-model-len", "4096")
    assert out["kv_bytes_per_token"] == 262144 and out["num_blocks"] == GIB // (16 * 262144)


def test_mla_latent_is_whole_on_every_tp_rank():
    ds = model("deepseek-v3")
    assert ds.is_mla and ds.kv_bytes_per_token("bf16") == 61 * (512 + 64) * 2
    assert ds.kv_bytes_per_token("bf16", tp=8) == ds.kv_bytes_per_token("bf16", tp=1)
    assert ds.kv_bytes_per_token("fp8") == 61 * 576
    llama = model("llama-3.1-70b")
    assert llama.kv_bytes_per_token("bf16", tp=4) == llama.kv_bytes_per_token("bf16") / 4
    # TP beyond the KV heads replicates them (vLLM keeps at least one head per rank).
    assert llama.kv_bytes_per_token("bf16", tp=16) == llama.kv_bytes_per_token("bf16", tp=8)


def test_moe_weights_and_active_parameters():
    mix = model("mixtral-8x7b")
    assert mix.is_moe and mix.active_params / 1e9 == pytest.approx(12.9, rel=0.01)
    ds = model("deepseek-v3")
    assert ds.active_params / 1e9 == pytest.approx(37, rel=0.03)
    # Only the linear layers shrink: embeddings, LM head, routers and norms stay 16-bit.
    c = mix.param_counts()
    assert mix.weight_bytes("fp8") == pytest.approx((c["attention"] + c["mlp"]) + 2 * (mix.num_params - c["attention"] - c["mlp"]))
    assert mix.weight_bytes("bf16") == 2 * mix.num_params


def test_sliding_window_groups_and_concurrency(tmp_path):
    # A Gemma-3-like layout: 5 local layers per global one, a 1,024-token window.
    cfg = {"model_type": "gemma3_text", "num_hidden_layers": 12, "hidden_size": 1024, "num_attention_heads": 8,
           "num_key_value_heads": 4, "head_dim": 128, "intermediate_size": 4096, "vocab_size": 1000,
           "max_position_embeddings": 32768, "sliding_window": 1024, "sliding_window_pattern": 6}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    m = ModelArch.from_hf_config(tmp_path)
    assert (m.num_sliding_layers, m.sliding_window) == (10, 1024)
    # vLLM: 2 full + 10 sliding layers -> groups of 2 layers: 1 full group, 5 sliding groups.
    assert kv_groups(m) == (("full", 2),) + (("sliding", 2),) * 5
    kv = vllm_kv_capacity(m, 1 * GIB, "bf16", 1, 16, 32768, max_in_flight_tokens=8192)
    page = 16 * 2 * 4 * 128 * 2
    assert kv.num_blocks == GIB // (2 * page)
    # Per request: every token in the full group, window - 1 + in-flight tokens (+1 block) per sliding group.
    per_request = 32768 // 16 + 5 * (math.ceil((1024 - 1 + 8192) / 16) + 1)
    assert kv.max_concurrency == kv.num_blocks / per_request
    # A short request never fills the window, and memory per request is capped by it.
    assert m.kv_bytes_for_context(100_000, "bf16") == (2 * 100_000 + 10 * 1024) * 2 * 4 * 128 * 2
    # Off, the hybrid manager treats every layer as full attention.
    assert kv_groups(m, hybrid=False) == (("full", 12),)
    mistral = ModelArch(**{**TINY, "sliding_window": 512, "num_sliding_layers": 2})
    assert kv_groups(mistral) == (("sliding", 2),)


def test_sparse_attention_config_keeps_its_indexer_keys(tmp_path):
    cfg = {"model_type": "deepseek_v32", "num_hidden_layers": 4, "hidden_size": 1024, "num_attention_heads": 8,
           "intermediate_size": 4096, "vocab_size": 1000, "kv_lora_rank": 512, "qk_rope_head_dim": 64,
           "qk_nope_head_dim": 128, "v_head_dim": 128, "index_topk": 2048, "index_n_heads": 64,
           "index_head_dim": 128}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    m = ModelArch.from_hf_config(tmp_path)
    assert (m.index_topk, m.index_n_heads, m.index_head_dim) == (2048, 64, 128)
    # Every cached token keeps its latent and its indexer key (FP8 + a 4-byte scale) in every layer.
    assert m.kv_bytes_per_token("bf16") == 4 * ((512 + 64) * 2 + 128 + 4)
    with pytest.raises(ValueError, match="index_topk"):
        ModelArch(**{**TINY, "index_topk": 2048})


def test_tp_halves_kv_bytes_per_gpu():
    m = model("llama-3.1-8b")
    prof = synthetic_profile(1000, 100, qps=1.0, n=50)
    one = plan_memory(m, gpu("h100"), AGG, prof, SLO, "bf16", "bf16")
    two = plan_memory(m, gpu("h100"), DeployConfig(mode="agg", tp=2), prof, SLO, "bf16", "bf16")
    assert two.kv_bytes_per_token == one.kv_bytes_per_token / 2 == 65536
    assert two.weights_gib == one.weights_gib  # whole model; each GPU holds half
    assert two.kv_capacity_tokens > 2 * one.kv_capacity_tokens  # half the bytes/token and more free memory
    assert two.knobs.tensor_parallel_size == 2
    # Under PD the decode pool holds the running requests' KV, so its TP is the plan's.
    pd = DeployConfig(mode="pd", prefill=PoolSpec(tp=1), decode=PoolSpec(tp=2))
    assert plan_memory(m, gpu("h100"), pd, prof, SLO, "bf16", "bf16").tp == 2


def test_8b_on_h100_is_feasible():
    prof = profile_trace(read_trace(REPO_ROOT / "data" / "traces" / "azure_llm_2023_code.csv"), "azure")
    m, g = model("llama-3.1-8b"), gpu("h100")
    plan = plan_memory(m, g, AGG, prof, SLO, "bf16", "bf16")
    assert plan.feasible and plan.shortfall_gib == 0 and plan.min_tp == 1
    free = g.memory_bytes * 0.9 - m.weight_bytes("bf16") - plan.activation_reserve_gib * GIB
    assert plan.kv_capacity_gib == pytest.approx(free / GIB, abs=1e-6)
    assert plan.kv_capacity_tokens == kv_capacity_tokens(free, 131072, 16)
    assert plan.kv_num_blocks * 16 == plan.kv_capacity_tokens
    assert 45 < plan.kv_capacity_gib < 56  # vLLM reports ~50-54 GiB for this setup
    assert plan.knobs.max_model_len == math.ceil((prof.input_tokens.max + prof.output_tokens.max) / 16) * 16
    mean_ctx = math.ceil(prof.input_tokens.mean + prof.output_tokens.mean)
    assert plan.knobs.max_num_seqs == min(256, plan.kv_capacity_tokens // mean_ctx)
    assert plan.knobs.max_num_batched_tokens == 8192 and plan.knobs.block_size == 16
    assert str(plan.target_concurrency) in plan.reason


def test_70b_on_a10_is_infeasible_with_its_shortfall_and_the_tp_that_fits():
    m, g = model("llama-3.1-70b"), gpu("a10")
    prof = synthetic_profile(100, 10, qps=1.0, n=50)
    plan = plan_memory(m, g, AGG, prof, SLO, "bf16", "bf16")
    assert not plan.feasible and plan.kv_capacity_tokens == 0
    budget_gib = 0.9 * g.memory_gib
    assert plan.shortfall_gib == pytest.approx(
        plan.weights_gib + plan.activation_reserve_gib + plan.kv_lower_bound_gib - budget_gib)
    assert 111 < plan.shortfall_gib < 113.5
    assert plan.min_tp == 8  # 131 GiB of weights: 16.4 GiB per GPU at TP 8, of 19.8 usable
    assert plan_memory(m, g, AGG, synthetic_profile(30000, 10, qps=4.0, n=50), SLO, "bf16", "bf16").min_tp is None
    for fix in ("tensor parallelism 8", "quant=int4", "a10", f"{plan.shortfall_gib:.1f} GiB"):
        assert fix in plan.reason
    assert "quant=fp8" not in plan.reason  # the A10 has no FP8; on an H100 it is a fix
    on_h100 = plan_memory(m, gpu("h100"), AGG, prof, SLO, "bf16", "bf16")
    assert "quant=fp8" in on_h100.reason and on_h100.min_tp == 2 and "tensor parallelism 2" in on_h100.reason


def test_lower_bound_math_and_a_kv_shortfall():
    m, g = model("llama-3.1-8b"), gpu("a10")
    prof = synthetic_profile(8000, 200, qps=1.0, n=50)
    slo = SLOConfig(targets={"e2el_ms_p50": 1000, "e2el_ms_p99": 4000, "ttft_ms_p99": 300}, target_qps=1.5)
    plan = plan_memory(m, g, AGG, prof, slo, "bf16", "bf16")
    assert plan.p99_context_tokens == 8200
    assert plan.target_concurrency == 6  # 1.5 QPS x the p99 E2EL bound of 4 s
    assert plan.kv_lower_bound_gib == pytest.approx(6 * 8200 * 131072 / GIB)
    assert plan.max_concurrency_at_p99 == pytest.approx(plan.kv_num_blocks / math.ceil(8200 / 16))
    assert plan.weights_gib + plan.activation_reserve_gib < 0.9 * g.memory_gib  # weights fit, KV does not
    assert not plan.feasible
    need_blocks = 6 * math.ceil(8200 / 16)
    assert plan.shortfall_gib == pytest.approx((need_blocks - plan.kv_num_blocks) * 16 * 131072 / GIB)
    assert "KV cache holds" in plan.reason and "short by" in plan.reason
    # Without an E2EL target the latency is 2 s, and without target_qps the profile's mean QPS.
    ttft_only = plan_memory(m, g, AGG, prof, SLOConfig(targets={"ttft_ms_p99": 300}), "bf16", "bf16")
    assert ttft_only.target_concurrency == 2 and ttft_only.feasible


def test_prefix_discount_counts_a_shared_prefix_once():
    m, g = model("qwen3-32b"), gpu("h100")
    prof = synthetic_profile(4900, 10, qps=4.0, n=100, shared_prefix_len=4500)
    slo = SLOConfig(targets={"e2el_ms_p99": 2000})
    full = plan_memory(m, g, AGG, prof, slo, "fp8", "fp8")
    shared = plan_memory(m, g, AGG, prof, slo, "fp8", "fp8", MemoryConfig(prefix_discount=True))
    bpt = m.kv_bytes_per_token("fp8")
    assert full.kv_lower_bound_gib == pytest.approx(8 * 4910 * bpt / GIB)
    assert shared.kv_lower_bound_gib == pytest.approx((8 * 410 + 4500) * bpt / GIB)


def test_explicit_max_model_len():
    m, g = model("llama-3.1-8b"), gpu("h100")
    prof = synthetic_profile(1000, 100, qps=1.0, n=50)
    assert plan_memory(m, g, AGG, prof, SLO, "bf16", "bf16",
                       MemoryConfig(max_model_len=4096)).knobs.max_model_len == 4096
    huge = plan_memory(m, g, AGG, prof, SLO, "bf16", "bf16", MemoryConfig(max_model_len=10_000_000))
    assert not huge.feasible and "max_model_len" in huge.reason


@pytest.mark.parametrize("gpu_name", ["a10", "l20", "h100"])
@pytest.mark.parametrize("model_name", ["llama-3.1-8b", "llama-3.1-70b", "qwen3-30b-a3b"])
def test_activation_reserve_is_bounded(gpu_name, model_name):
    g = gpu(gpu_name)
    act = activation_reserve_bytes(model(model_name), g, tp=1)
    assert 0.5 * GIB <= act <= 0.05 * g.memory_bytes
    assert activation_reserve_bytes(model(model_name), g, tp=1, cap_fraction=0.01) <= 0.01 * g.memory_bytes


def test_kv_cli_errors_are_one_sentence():
    for args, needle in ((["--model", "llama-3.1-8b"], "--kv-gib"),
                         (["--model", "no-such-model", "--kv-gib", "1"], "unknown model"),
                         (["--model", "llama-3.1-8b", "--gpu", "h100", "--tp", "3"], "--tp 3")):
        out = subprocess.run([sys.executable, "-m", "flows.cli", "kv", *args], cwd=REPO_ROOT,
                             capture_output=True, text=True)
        assert out.returncode == 2 and needle in out.stderr and "Traceback" not in out.stderr


def test_kv_cli_with_a_gpu_matches_the_plan():
    out = dolphin_kv("--model", "llama-3.1-8b", "--gpu", "h100", "--max-model-len", "9344")
    prof = profile_trace(read_trace(REPO_ROOT / "data" / "traces" / "azure_llm_2023_code.csv"), "azure")
    plan = plan_memory(model("llama-3.1-8b"), gpu("h100"), AGG, prof, SLO, "bf16", "bf16")
    assert out["num_blocks"] == plan.kv_num_blocks and out["kv_gib"] == pytest.approx(plan.kv_capacity_gib)


def test_hybrid_configs_count_linear_mixers_and_their_state(tmp_path):
    # Qwen3-Next style: Gated DeltaNet everywhere but every 4th layer, gated full attention there.
    gdn = {"model_type": "qwen3_next", "num_hidden_layers": 8, "hidden_size": 1024, "num_attention_heads": 8,
           "num_key_value_heads": 2, "head_dim": 128, "intermediate_size": 2048, "vocab_size": 1000,
           "max_position_embeddings": 4096, "full_attention_interval": 4, "linear_conv_kernel_dim": 4,
           "linear_num_key_heads": 4, "linear_key_head_dim": 64, "linear_num_value_heads": 8,
           "linear_value_head_dim": 64, "mamba_ssm_dtype": "float32"}
    (tmp_path / "config.json").write_text(json.dumps(gdn))
    m = ModelArch.from_hf_config(tmp_path)
    assert (m.num_layers, m.num_linear_layers, m.num_attention_layers) == (8, 6, 2)
    key, value = 4 * 64, 8 * 64
    conv = 2 * key + value
    assert m.linear_mixer_params == 1024 * (2 * key + 2 * value + 2 * 8) + conv * 4 + 2 * 8 + 64 + value * 1024
    assert m.linear_state_elems == 8 * 64 * 64 + 3 * conv and m.linear_state_dtype == "fp32"
    assert m.linear_state_bytes(tp=2) == 6 * m.linear_state_elems * 4 / 2
    # Only the two attention layers cache tokens; their q_proj also emits the output gate.
    assert m.kv_bytes_for_context(1000, "bf16") == 2 * 1000 * 2 * 2 * 128 * 2
    q, kv = 8 * 128, 2 * 128
    assert m.param_counts()["attention"] == 2 * (1024 * (2 * q + 2 * kv) + q * 1024) + 6 * m.linear_mixer_params
    with pytest.raises(ValueError, match="linear-attention"):
        vllm_kv_capacity(m, GIB, "bf16", 1, 16, 4096)


def test_nemotron_h_blocks_and_nas_blocks(tmp_path):
    # Nemotron-H: one mixer (M Mamba2, * attention) or one FFN (- relu2 MLP, E MoE) per block.
    nh = {"model_type": "nemotron_h", "num_hidden_layers": 8, "hybrid_override_pattern": "MEM*EMEE",
          "hidden_size": 512, "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 64,
          "intermediate_size": 256, "moe_intermediate_size": 256, "moe_shared_expert_intermediate_size": 512,
          "n_routed_experts": 16, "num_experts_per_tok": 2, "n_shared_experts": 1, "vocab_size": 1000,
          "max_position_embeddings": 4096, "mamba_num_heads": 16, "mamba_head_dim": 64, "ssm_state_size": 128,
          "n_groups": 2, "conv_kernel": 4, "use_conv_bias": True, "mamba_ssm_cache_dtype": "float32"}
    (tmp_path / "config.json").write_text(json.dumps(nh))
    m = ModelArch.from_hf_config(tmp_path)
    assert (m.num_layers, m.num_linear_layers, m.ffn_layers, m.moe_layers) == (4, 3, 4, 4)
    assert (m.mlp_gated, m.num_shared_experts) == (False, 2)  # a 512-wide shared expert is two 256-wide ones
    conv = 16 * 64 + 2 * 2 * 128
    assert m.linear_state_elems == 16 * 64 * 128 + 3 * conv
    assert m.expert_params() == 4 * 2 * 512 * 256  # up and down only
    # Nemotron-NAS: blocks without attention do not count as layers; FFN widths average.
    blocks = [{"attention": {"no_op": False, "n_heads_in_group": 4}, "ffn": {"ffn_mult": 3.0}},
              {"attention": {"no_op": True, "n_heads_in_group": None}, "ffn": {"ffn_mult": 1.5}}]
    nas = {"model_type": "nemotron-nas", "num_hidden_layers": 2, "hidden_size": 1024, "num_attention_heads": 8,
           "num_key_value_heads": None, "intermediate_size": None, "vocab_size": 1000,
           "max_position_embeddings": 4096, "block_configs": blocks}
    (tmp_path / "config.json").write_text(json.dumps(nas))
    m = ModelArch.from_hf_config(tmp_path)
    assert (m.num_layers, m.ffn_layers, m.num_kv_heads) == (1, 2, 2)
    assert m.intermediate_size == (2048 + 1024) / 2  # 2/3 x mult x hidden, rounded up to 256
