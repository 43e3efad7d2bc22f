"""Quantization: candidates by GPU support and quality budget, the first plan that fits, engine flags."""
from __future__ import annotations

import pytest
import yaml

from tasks.catalog import GpuSpec, load_gpu, load_model
from tasks.config import ConfigError, DeployConfig, QualityTable, QuantConfig, SLOConfig
from tasks.kv import kv_task
from tasks.paths import CONF_DIR
from tasks.profile_stats import synthetic_profile
from tasks.quantize import candidate_pairs, check_quant, engine_flags, quant_task, select_quant

QUALITY = QualityTable(**yaml.safe_load((CONF_DIR / "quality" / "published.yaml").read_text()))
AUTO = QuantConfig(**yaml.safe_load((CONF_DIR / "quant" / "auto.yaml").read_text()))
SLO = SLOConfig(targets={"e2el_ms_p99": 2000})
PROFILE = synthetic_profile(3000, 150, qps=2.0, n=100)


def choose(model_name: str, gpu_name: str, quant: QuantConfig = AUTO, tp: int = 1):
    m, g = load_model(model_name), load_gpu(gpu_name)
    plans = kv_task.fn(m, g, DeployConfig(mode="agg", tp=tp), quant, QUALITY, PROFILE, SLO)
    return quant_task.fn(plans, g, quant, m, QUALITY)


def test_auto_picks_bf16_when_it_fits():
    choice = choose("llama-3.1-8b", "h100")
    assert (choice.weights_dtype, choice.kv_dtype) == ("bf16", "bf16")
    assert choice.plan.feasible and choice.rejected == [] and choice.expected_quality_loss_pct == 0
    assert f"{choice.plan.kv_capacity_gib:.1f} GiB" in choice.reason
    assert choice.vllm_args == ["--dtype", "bfloat16"] == choice.sglang_args


def test_auto_falls_back_in_order_and_says_why():
    # 70B on one A100: 16-bit weights (131 GiB) cannot fit, the A100 has no FP8, int4 (37 GiB) fits.
    choice = choose("llama-3.1-70b", "a100")
    assert (choice.weights_dtype, choice.kv_dtype) == ("int4", "bf16") and choice.plan.feasible
    reasons = {r.candidate: r.reason for r in choice.rejected}
    assert list(reasons) == ["bf16/bf16", "bf16/fp8", "fp8/fp8"]  # the more accurate ones, in order
    assert "short by" in reasons["bf16/bf16"]  # memory
    assert "8.9" in reasons["fp8/fp8"] and "8.0" in reasons["fp8/fp8"]  # the GPU
    assert "8.9" in reasons["bf16/fp8"]  # an fp8 KV cache needs FP8 support too
    assert choice.vllm_args == ["--quantization", "awq_marlin"]
    # On an H200 fp8 fits; the 16-bit candidates are rejected for memory, with the smallest TP that fits.
    h200 = choose("llama-3.1-70b", "h200")
    assert (h200.weights_dtype, h200.kv_dtype) == ("fp8", "fp8") and h200.plan.feasible
    assert [r.candidate for r in h200.rejected] == ["bf16/bf16", "bf16/fp8"]
    assert "tensor parallelism 2" in h200.rejected[0].reason
    assert h200.vllm_args == ["--quantization", "fp8", "--kv-cache-dtype", "fp8"]
    assert h200.sglang_args == ["--quantization", "fp8", "--kv-cache-dtype", "fp8_e4m3"]
    # With TP 4 on H100s, bf16 fits.
    assert choose("llama-3.1-70b", "h100", tp=4).weights_dtype == "bf16"


def test_quality_budget_rules_out_lossy_candidates():
    strict = AUTO.model_copy(update={"max_quality_loss_pct": 1.0})
    pairs, rejected = candidate_pairs(strict, load_gpu("h100"), QUALITY)
    assert pairs == [("bf16", "bf16"), ("bf16", "fp8"), ("fp8", "fp8")]
    assert [r.candidate for r in rejected] == ["int4/bf16", "int4/fp8"]
    assert "expected quality loss 2%" in rejected[0].reason and "max_quality_loss_pct=1" in rejected[0].reason
    assert "2.5%" in rejected[1].reason  # weights' and KV's losses add
    # Nothing fits the 70B on one A100 within 1%: the first plan is reported, infeasible, with its reason.
    choice = choose("llama-3.1-70b", "a100", strict)
    assert not choice.plan.feasible and choice.plan.reason in choice.reason
    # A table of one's own evals changes the verdict.
    lenient = QUALITY.model_copy(update={"weights": {**QUALITY.weights, "int4": 0.8}})
    pairs, _ = candidate_pairs(strict, load_gpu("h100"), lenient)
    assert ("int4", "bf16") in pairs


def test_gpu_support_by_compute_capability():
    pairs, rejected = candidate_pairs(AUTO, load_gpu("a10"), QUALITY)
    assert pairs == [("bf16", "bf16"), ("int4", "bf16")]
    assert {r.candidate for r in rejected} == {"bf16/fp8", "fp8/fp8", "int4/fp8"}
    t4 = load_gpu("a10").model_copy(update={"name": "t4", "compute_capability": "7.5"})
    pairs, rejected = candidate_pairs(AUTO, t4, QUALITY)
    assert pairs == [("bf16", "bf16")]
    assert any("Marlin" in r.reason and "7.5" in r.reason for r in rejected)
    with pytest.raises(ValueError, match="fp8_tflops"):  # catalogue entries must agree with their arch
        GpuSpec(**{**load_gpu("a10").model_dump(), "fp8_tflops": 100.0})


def test_explicit_weights_and_kv_dtypes():
    h100 = load_gpu("h100")

    def pairs(**kw):
        return candidate_pairs(QuantConfig(name="x", **kw), h100, QUALITY)[0]
    assert pairs(weights="bf16") == [("bf16", "bf16")]
    assert pairs(weights="fp16") == [("fp16", "fp16")]
    assert pairs(weights="fp8", kv_cache="fp8") == [("fp8", "fp8")]
    assert pairs(weights="int4") == [("int4", "bf16")]
    # An explicit pair is planned whatever its expected loss; `auto` candidates obey the budget.
    assert pairs(weights="int4", kv_cache="fp8", max_quality_loss_pct=0) == [("int4", "fp8")]
    assert [kv for _, kv in candidate_pairs(AUTO.model_copy(update={"kv_cache": "fp8"}), h100, QUALITY)[0]] \
        == ["fp8", "fp8", "fp8"]
    # An explicit request that does not fit is still the choice, infeasible, so the pipeline stops.
    choice = choose("llama-3.1-70b", "h100", QuantConfig(name="fp16", weights="bf16"))
    assert choice.weights_dtype == "bf16" and not choice.plan.feasible


def test_engine_flags_follow_the_checkpoint():
    llama, deepseek = load_model("llama-3.1-8b"), load_model("deepseek-v3")
    assert engine_flags("fp8", "fp8", llama)["vllm"] == ["--quantization", "fp8", "--kv-cache-dtype", "fp8"]
    assert engine_flags("fp8", "bf16", deepseek) == {"vllm": [], "sglang": []}  # an FP8 checkpoint says so
    assert engine_flags("int4", "bf16", llama, "gptq")["sglang"] == ["--quantization", "gptq_marlin"]
    assert engine_flags("fp16", "fp16", llama)["vllm"] == ["--dtype", "float16"]


def test_check_quant_fails_fast():
    with pytest.raises(ConfigError) as err:
        check_quant(QuantConfig(name="fp8", weights="fp8", kv_cache="fp8"), load_gpu("a10"), QUALITY)
    assert "quant=fp8" in str(err.value) and "8.6" in str(err.value) and "l20/l40s/h100" in str(err.value)
    with pytest.raises(ConfigError, match="KV"):
        check_quant(QuantConfig(name="x", weights="bf16", kv_cache="fp8"), load_gpu("a10"), QUALITY)
    with pytest.raises(ConfigError, match="no candidate"):
        check_quant(AUTO.model_copy(update={"candidates": ["fp8"]}), load_gpu("a10"), QUALITY)
    check_quant(QuantConfig(name="fp8", weights="fp8", kv_cache="fp8"), load_gpu("l20"), QUALITY)
    check_quant(AUTO, load_gpu("a10"), QUALITY)
    with pytest.raises(ValueError, match="candidate 'int3'"):
        QuantConfig(name="x", weights="auto", candidates=["int3"])


def test_select_quant_needs_a_plan():
    with pytest.raises(ValueError):
        select_quant([], [], AUTO, load_model("llama-3.1-8b"), QUALITY)
