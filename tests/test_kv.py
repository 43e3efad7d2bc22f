"""The memory plan: vLLM's KV sizing figures, GQA and TP arithmetic, feasibility and its shortfall."""
from __future__ import annotations

import math

import pytest
import yaml

from tasks.catalog import GIB, GpuSpec, ModelArch
from tasks.config import DeployConfig, PoolSpec, SLOConfig
from tasks.kv import activation_reserve_bytes, kv_capacity_tokens, plan_memory
from tasks.paths import CONF_DIR, REPO_ROOT
from tasks.profile import profile_trace, read_trace, synthetic_profile

AGG = DeployConfig(mode="agg")
SLO = SLOConfig(targets={"e2el_ms_p99": 2000})


def model(name: str) -> ModelArch:
    return ModelArch(**yaml.safe_load((CONF_DIR / "model" / f"{name}.yaml").read_text()))


def gpu(name: str) -> GpuSpec:
    return GpuSpec(**yaml.safe_load((CONF_DIR / "gpu" / f"{name}.yaml").read_text()))


def test_one_gib_holds_a_million_tokens_of_a_tiny_model():
    tiny = ModelArch(name="tiny", num_layers=2, hidden_size=256, num_attention_heads=4, num_kv_heads=2,
                     head_dim=64, intermediate_size=512, vocab_size=1000, max_position_embeddings=2048,
                     params_b=0.001)
    bpt = tiny.kv_bytes_per_token("bf16")
    assert bpt == 2 * 2 * 2 * 64 * 2
    assert kv_capacity_tokens(1 * GIB, bpt, 16) == 1_048_576


def test_llama_8b_blocks_match_vllm():
    bpt = model("llama-3.1-8b").kv_bytes_per_token("bf16")
    assert bpt == 131072  # GQA: 8 KV heads of 128, not 32 attention heads
    # vLLM logged 1,952 blocks (31,232 tokens) for "3.81 GiB", which it had rounded for the log.
    tokens = kv_capacity_tokens(3.81 * GIB, bpt, 16)
    assert tokens % 16 == 0 and tokens // 16 == 1950
    assert kv_capacity_tokens(3.8125 * GIB, bpt, 16) == 31_232
    assert kv_capacity_tokens(-1.0, bpt, 16) == 0


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
    assert plan.feasible and plan.shortfall_gib == 0
    free = g.memory_bytes * 0.9 - m.weight_bytes("bf16") - plan.activation_reserve_gib * GIB
    assert plan.kv_capacity_gib == pytest.approx(free / GIB)
    assert plan.kv_capacity_tokens == kv_capacity_tokens(free, 131072, 16)
    assert 45 < plan.kv_capacity_gib < 56  # vLLM reports ~50-54 GiB for this setup
    assert plan.knobs.max_model_len == math.ceil((prof.input_tokens.max + prof.output_tokens.max) / 16) * 16
    mean_ctx = math.ceil(prof.input_tokens.mean + prof.output_tokens.mean)
    assert plan.knobs.max_num_seqs == min(256, plan.kv_capacity_tokens // mean_ctx)
    assert plan.knobs.max_num_batched_tokens == 8192 and plan.knobs.block_size == 16
    assert str(plan.target_concurrency) in plan.reason


def test_70b_on_a10_is_infeasible_with_its_shortfall():
    m, g = model("llama-3.1-70b"), gpu("a10")
    prof = synthetic_profile(100, 10, qps=1.0, n=50)
    plan = plan_memory(m, g, AGG, prof, SLO, "bf16", "bf16")
    assert not plan.feasible and plan.kv_capacity_tokens == 0
    budget_gib = 0.9 * g.memory_gib
    assert plan.weights_gib - budget_gib == pytest.approx(131.6 - 19.8, abs=0.2)  # weights alone
    assert plan.shortfall_gib == pytest.approx(
        plan.weights_gib + plan.activation_reserve_gib + plan.kv_lower_bound_gib - budget_gib)
    assert 112 < plan.shortfall_gib < 113.5
    for fix in ("tensor parallelism", "quant=int4", "a10", f"{plan.shortfall_gib:.1f} GiB"):
        assert fix in plan.reason
    assert "quant=fp8" not in plan.reason  # the A10 has no FP8; on an H100 it is a fix
    assert "quant=fp8" in plan_memory(m, gpu("h100"), AGG, prof, SLO, "bf16", "bf16").reason


def test_lower_bound_math_and_a_kv_shortfall():
    m, g = model("llama-3.1-8b"), gpu("a10")
    prof = synthetic_profile(8000, 200, qps=1.0, n=50)
    slo = SLOConfig(targets={"e2el_ms_p50": 1000, "e2el_ms_p99": 4000, "ttft_ms_p99": 300}, target_qps=1.5)
    plan = plan_memory(m, g, AGG, prof, slo, "bf16", "bf16")
    assert plan.p99_context_tokens == 8200
    assert plan.target_concurrency == 6  # 1.5 QPS x the p99 E2EL bound of 4 s
    assert plan.kv_lower_bound_gib == pytest.approx(6 * 8200 * 131072 / GIB)
    assert plan.max_concurrency_at_p99 == pytest.approx(plan.kv_capacity_tokens / 8200)
    assert plan.weights_gib + plan.activation_reserve_gib < 0.9 * g.memory_gib  # weights fit, KV does not
    assert not plan.feasible
    assert plan.shortfall_gib == pytest.approx(plan.kv_lower_bound_gib - plan.kv_capacity_tokens * 131072 / GIB)
    assert "KV cache holds" in plan.reason
    # Without an E2EL target the latency is 2 s, and without target_qps the profile's mean QPS.
    ttft_only = plan_memory(m, g, AGG, prof, SLOConfig(targets={"ttft_ms_p99": 300}), "bf16", "bf16")
    assert ttft_only.target_concurrency == 2 and ttft_only.feasible


def test_explicit_max_model_len():
    m, g = model("llama-3.1-8b"), gpu("h100")
    prof = synthetic_profile(1000, 100, qps=1.0, n=50)
    assert plan_memory(m, g, AGG, prof, SLO, "bf16", "bf16", max_model_len=4096).knobs.max_model_len == 4096
    huge = plan_memory(m, g, AGG, prof, SLO, "bf16", "bf16", max_model_len=10_000_000)
    assert not huge.feasible and "max_model_len" in huge.reason


@pytest.mark.parametrize("gpu_name", ["a10", "l20", "h100"])
@pytest.mark.parametrize("model_name", ["llama-3.1-8b", "llama-3.1-70b"])
def test_activation_reserve_is_bounded(gpu_name, model_name):
    g = gpu(gpu_name)
    act = activation_reserve_bytes(model(model_name), g, tp=1)
    assert 0.5 * GIB <= act <= 0.05 * g.memory_bytes
