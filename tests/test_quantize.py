"""Quantization: candidates by accuracy policy and GPU, the first plan that fits, fail-fast checks."""
from __future__ import annotations

import pytest

from tasks.config import ConfigError, DeployConfig, QuantConfig, SLOConfig
from tasks.kv import kv_task
from tasks.profile import synthetic_profile
from tasks.quantize import check_quant, quant_task, select_quant, weight_candidates
from tests.test_kv import gpu, model

AUTO = QuantConfig(name="auto", weights="auto")
SLO = SLOConfig(targets={"e2el_ms_p99": 2000})
PROFILE = synthetic_profile(3000, 150, qps=2.0, n=100)


def choose(model_name: str, gpu_name: str, quant: QuantConfig = AUTO, tp: int = 1):
    m, g = model(model_name), gpu(gpu_name)
    plans = kv_task.fn(m, g, DeployConfig(mode="agg", tp=tp), quant, PROFILE, SLO)
    return quant_task.fn(plans, g, quant)


def test_auto_picks_bf16_when_it_fits():
    choice = choose("llama-3.1-8b", "h100")
    assert (choice.weights_dtype, choice.kv_dtype) == ("bf16", "bf16")
    assert choice.plan.feasible and choice.rejected == []
    assert f"{choice.plan.kv_capacity_gib:.1f} GiB" in choice.reason


def test_auto_falls_back_to_smaller_dtypes_in_order():
    # 70B on one H100: bf16 (131 GiB) does not fit; fp8 (~68 GiB of 71 usable) leaves too little KV; int4 fits.
    choice = choose("llama-3.1-70b", "h100")
    assert (choice.weights_dtype, choice.kv_dtype) == ("int4", "bf16") and choice.plan.feasible
    assert [r.candidate for r in choice.rejected] == ["bf16", "fp8"]
    assert all("short by" in r.reason for r in choice.rejected)
    # On an H200 fp8 fits, with its FP8 KV cache; bf16 still does not.
    choice = choose("llama-3.1-70b", "h200")
    assert (choice.weights_dtype, choice.kv_dtype) == ("fp8", "fp8")
    assert [r.candidate for r in choice.rejected] == ["bf16"]
    # With TP 4 on H100s, bf16 fits.
    assert choose("llama-3.1-70b", "h100", tp=4).weights_dtype == "bf16"


def test_fp8_rejected_on_a10_with_the_reason():
    pairs, rejected = weight_candidates(AUTO, gpu("a10"))
    assert pairs == [("bf16", "bf16"), ("int4", "bf16")]
    assert [r.candidate for r in rejected] == ["fp8"]
    assert "a10" in rejected[0].reason and "8.6" in rejected[0].reason and "8.9" in rejected[0].reason
    choice = choose("llama-3.1-8b", "a10")  # bf16 fits; the GPU's rejection is still reported
    assert choice.weights_dtype == "bf16" and choice.rejected == rejected


def test_accuracy_policy_and_nothing_feasible():
    strict = QuantConfig(name="auto", weights="auto", min_weights_bits=8)
    pairs, rejected = weight_candidates(strict, gpu("h100"))
    assert pairs == [("bf16", "bf16"), ("fp8", "fp8")]
    assert rejected[0].candidate == "int4" and "min_weights_bits=8" in rejected[0].reason
    choice = choose("llama-3.1-70b", "h100", strict)
    assert not choice.plan.feasible and choice.weights_dtype == "bf16"  # the first plan, with its reason
    assert choice.plan.reason in choice.reason
    assert [r.candidate for r in choice.rejected] == ["fp8", "int4"]


def test_explicit_weights_and_kv_dtypes():
    h100 = gpu("h100")
    assert weight_candidates(QuantConfig(name="fp16", weights="bf16"), h100)[0] == [("bf16", "bf16")]
    assert weight_candidates(QuantConfig(name="x", weights="fp16"), h100)[0] == [("fp16", "fp16")]
    assert weight_candidates(QuantConfig(name="fp8", weights="fp8", kv_cache="fp8"), h100)[0] == [("fp8", "fp8")]
    assert weight_candidates(QuantConfig(name="int4", weights="int4"), h100)[0] == [("int4", "bf16")]
    kv8 = QuantConfig(name="auto", weights="auto", kv_cache="fp8")
    assert [kv for _, kv in weight_candidates(kv8, h100)[0]] == ["fp8"] * 3
    # An explicit request that does not fit is still the choice, infeasible, so the pipeline stops.
    choice = choose("llama-3.1-70b", "h100", QuantConfig(name="fp16", weights="bf16"))
    assert choice.weights_dtype == "bf16" and not choice.plan.feasible


def test_check_quant_fails_fast():
    with pytest.raises(ConfigError) as err:
        check_quant(QuantConfig(name="fp8", weights="fp8", kv_cache="fp8"), gpu("a10"))
    assert str(err.value) == ("quant=fp8 needs FP8 tensor cores (compute capability >= 8.9); gpu=a10 has 8.6. "
                              "Use quant=fp16 or quant=int4, or a GPU such as l20/h100.")
    with pytest.raises(ConfigError, match="kv_cache"):
        check_quant(QuantConfig(name="auto", weights="auto", kv_cache="fp8"), gpu("a10"))
    with pytest.raises(ConfigError, match="no candidate"):
        check_quant(QuantConfig(name="auto", weights="auto", candidates=["fp8"]), gpu("a10"))
    check_quant(QuantConfig(name="fp8", weights="fp8", kv_cache="fp8"), gpu("l20"))
    check_quant(AUTO, gpu("a10"))
    check_quant(QuantConfig(name="int4", weights="int4"), gpu("a10"))


def test_select_quant_needs_a_plan():
    with pytest.raises(ValueError):
        select_quant([], [], AUTO)
