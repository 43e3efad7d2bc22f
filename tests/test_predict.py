"""`dolphin predict`, row resolution, the steady-state model, the scheduler simulation and calibration."""
from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest

from flows.cli import main
from tasks.catalog import load_gpu, load_model
from tasks.paths import REPO_ROOT
from tasks.perf_calibration import abs_pct_errors, fit, summarize
from tasks.perf_model import PerfModel, PerfParams, causal_context, load_perf_params
from tasks.perf_plan import spec_decode_step
from tasks.perf_predict import PRED_COLUMNS, instance_model, predict_frame
from tasks.perf_rows import resolve_backend, resolve_gpu, resolve_model, resolve_precision, resolve_row
from tasks.perf_sim import poisson_trace, simulate
from tasks.perf_spec import SpecDecode, expected_accepted

CALIBRATION = REPO_ROOT.parent / "shared" / "calibration" / "measured_agg_h100.csv"
needs_data = pytest.mark.skipif(not CALIBRATION.is_file(), reason="shared calibration data not present")


def _row(**kw) -> dict:
    base = dict(model_path="Qwen/Qwen3-32B", system="h100_sxm", backend="vllm", precision="", mode="agg",
                isl=1024, osl=128, gemm_quant_mode="", batch_size=16, tp_size=2)
    return {**base, **kw}


def _predict(*rows: dict) -> pd.DataFrame:
    return predict_frame(pd.DataFrame(list(rows)))


# ------------------------------------------------------------ resolution
@pytest.mark.parametrize("hf_id, name", [
    ("Qwen/Qwen3-32B", "qwen3-32b"), ("meta-llama/Llama-3.1-8B-Instruct", "llama-3.1-8b"),
    ("meta-llama/Meta-Llama-3.1-70B-Instruct", "llama-3.1-70b"), ("nvidia/Llama-3.3-70B-Instruct-FP8", "llama-3.1-70b"),
    ("QWEN/qwen3-30b-a3b-fp8", "qwen3-30b-a3b"), ("deepseek-ai/DeepSeek-R1", "deepseek-v3"),
    ("Qwen/Qwen3-235B-A22B-FP8", "qwen3-235b-a22b"), ("llama-3.1-8b", "llama-3.1-8b"),
    ("nvidia/DeepSeek-V3.1-NVFP4", "deepseek-v3"), ("moonshotai/Kimi-K2.6", "kimi-k2.5"),
    ("nvidia/MiniMax-M2.7-NVFP4", "minimax-m2.5"), ("XiaomiMiMo/MiMo-7B-Base", "mimo-7b"),
    ("zai-org/GLM-4.6-FP8", "glm-4.5"), ("zai-org/GLM-4.5-Air", "glm-4.5-air"),
    ("moonshotai/Kimi-K2-Instruct-0905", "kimi-k2"), ("moonshotai/Kimi-K2-Thinking", "kimi-k2.5"),
    ("MiniMaxAI/MiniMax-M2", "minimax-m2.5"), ("Qwen/Qwen3-Coder-30B-A3B-Instruct", "qwen3-30b-a3b"),
    ("deepseek-ai/DeepSeek-R1-Distill-Llama-70B", "llama-3.1-70b"), ("nvidia/DeepSeek-R1-0528-FP4-v2", "deepseek-v3"),
    ("Qwen/Qwen3-235B-A22B-Thinking-2507", "qwen3-235b-a22b"), ("Qwen/QwQ-32B", "qwen2.5-32b"),
    # Hybrid (linear-attention / Mamba2) and NAS models, and a vision-language release's text model.
    ("Qwen/Qwen3-Next-80B-A3B-Instruct", "qwen3-next-80b-a3b"), ("Qwen/Qwen3.5-27B-FP8", "qwen3.5-27b"),
    ("nvidia/Qwen3.5-397B-A17B-NVFP4", "qwen3.5-397b-a17b"), ("nvidia/Nemotron-H-56B-Base-8K", "nemotron-h-56b"),
    ("nvidia/NVIDIA-Nemotron-3-Nano-30B-A3B-BF16", "nemotron-3-nano-30b-a3b"),
    ("nvidia/NVIDIA-Nemotron-3-Super-120B-A12B-NVFP4", "nemotron-3-super-120b-a12b"),
    ("nvidia/Llama-3_3-Nemotron-Super-49B-v1", "llama-3.3-nemotron-super-49b"), ("zai-org/GLM-4.7-Flash", "glm-4.7-flash"),
    ("Qwen/Qwen3-VL-235B-A22B-Thinking", "qwen3-235b-a22b"),
    # Dense families beyond Llama/Qwen, and fine-tunes named after their use rather than their base.
    ("mistralai/Mistral-7B-Instruct-v0.3", "mistral-7b"), ("mistralai/Mistral-Small-3.1-24B-Instruct-2503",
     "mistral-small-24b"), ("mistralai/Mistral-Large-Instruct-2407", "mistral-large-2411"),
    ("google/gemma-3-27b-it", "gemma-3-27b"), ("microsoft/phi-4", "phi-4"),
    ("ibm-granite/granite-3.3-8b-instruct", "granite-3.3-8b"), ("Qwen/Qwen2.5-Coder-32B-Instruct", "qwen2.5-32b"),
    ("nvidia/Llama-3.1-Nemotron-70B-Instruct-HF", "llama-3.1-70b"),
    ("nvidia/Llama-3_3-Nemotron-Super-49B-v1_5", "llama-3.3-nemotron-super-49b"),
])
def test_hf_ids_resolve_to_catalogue(hf_id: str, name: str) -> None:
    assert resolve_model(hf_id).name == name


def test_systems_and_precisions_resolve() -> None:
    systems = ("h100_sxm", "H200_SXM", "b200_sxm", "a100_sxm", "l40s", "gb200_sxm", "gb200_nvl72", "b300_sxm", "gb300",
               "h800_sxm", "h20_3e", "rtx_pro_6000_server")
    assert [resolve_gpu(s).name for s in systems] == ["h100", "h200", "b200", "a100", "l40s", "gb200", "gb200", "b300",
                                                     "gb300", "h800", "h20-3e", "rtx-pro-6000"]
    # Dynamo's framework names run the same engines.
    assert [resolve_backend(b) for b in ("dynamo-trt", "dynamo-sglang", "vllm-disagg", "TensorRT-LLM")] == [
        "trtllm", "sglang", "vllm", "trtllm"]
    with pytest.raises(ValueError, match="backend"):
        resolve_backend("atom")
    llama = load_model("llama-3.1-8b")
    assert resolve_precision("fp8", "", llama) == ("fp8", None)
    assert resolve_precision(float("nan"), "fp8_block", llama) == ("fp8", None)
    assert resolve_precision("", "int4_wo", llama) == ("int4", "bf16")
    assert resolve_precision(None, None, load_model("deepseek-v3")) == ("fp8", None)  # the checkpoint's own
    with pytest.raises(ValueError, match="precision"):
        resolve_precision("fp3", "", llama)
    with pytest.raises(ValueError, match="catalogue"):
        resolve_model("acme/NotAModel-7B")


@pytest.mark.parametrize("system, precision, kv_column, kv", [
    ("h100_sxm", "fp8", "", "fp8"), ("h100_sxm", "bf16", "", "bf16"), ("h100_sxm", "bf16", "fp8", "fp8"),
    ("h100_sxm", "fp8", "float16", "bf16"), ("a100_sxm", "bf16", "int8", "int8"), ("a100_sxm", "fp8", "", "bf16"),
    ("b200_sxm", "nvfp4", "nvfp4", "int4"), ("h100_sxm", "bf16", "nvfp4", "bf16"),
    # NVIDIA's NVFP4 checkpoints name an FP8 KV cache (kv_cache_quant_algo FP8), on FP4 cores or not.
    ("b200_sxm", "nvfp4", "", "fp8"), ("h200_sxm", "nvfp4", "", "fp8"), ("h100_sxm", "w4afp8", "", "bf16"),
])
def test_kv_cache_dtype_follows_the_row(system: str, precision: str, kv_column: str, kv: str) -> None:

    row = _row(system=system, precision=precision, kvcache_quant_mode=kv_column)
    assert resolve_row(row).kv_dtype == kv


# ------------------------------------------------------------ predictions
def test_bad_rows_get_a_reason_and_good_rows_a_prediction() -> None:
    out = _predict(_row(), _row(model_path="acme/Unknown-1B"), _row(system="tpu_v5"), _row(backend="tgi"),
                   _row(mode="weird"), _row(isl=0), _row(model_path="deepseek-ai/DeepSeek-V3", tp_size=1))
    assert list(out.columns[-4:]) == list(PRED_COLUMNS)
    assert out.loc[0, "pred_reason"] == "" and np.isfinite(out.loc[0, ["pred_ttft_ms", "pred_tpot_ms"]]).all()
    assert (out.loc[1:, "pred_reason"] != "").all()
    assert out.loc[1:5, "pred_ttft_ms"].isna().all()
    # A measured run whose weights cannot fit its stated GPUs misstates its layout: it is costed on the
    # fewest GPUs that hold them (DeepSeek-V3 FP8, 671 GB: 16 H100s), and the reason says so.
    assert "tp 1 -> 16" in out.loc[6, "pred_reason"]
    widened = _predict(_row(model_path="deepseek-ai/DeepSeek-V3", tp_size=16))
    assert out.loc[6, "pred_ttft_ms"] == widened.loc[0, "pred_ttft_ms"] and widened.loc[0, "pred_reason"] == ""
    # Concurrency: the silicon_concurrency the export recorded wins; else batch_size per attention-DP rank.
    src = "source_file=/data/h100_sxm/vllm/0.12.0/Qwen_Qwen3-32B.csv; silicon_concurrency=16"
    recorded = _predict(_row(), _row(batch_size=None, silicon_data_source=src), _row(batch_size=None),
                        _row(batch_size=4, silicon_data_source=src))
    assert recorded.loc[1, "pred_ttft_ms"] == recorded.loc[0, "pred_ttft_ms"] == recorded.loc[3, "pred_ttft_ms"]
    assert "batch_size" in recorded.loc[2, "pred_reason"]
    assert resolve_row(_row(batch_size=128, attention_dp_size=4, tp_size=1)).concurrency == 512
    spelled = _predict(_row(mode="aggregated"), _disagg(batch_size=16), {**_disagg(batch_size=16), "mode": "Disaggregated"})
    assert spelled.loc[0, "pred_ttft_ms"] == out.loc[0, "pred_ttft_ms"]
    assert spelled.loc[2, "pred_ttft_ms"] == spelled.loc[1, "pred_ttft_ms"]


def test_agg_predictions_follow_physics() -> None:
    conc = _predict(*[_row(batch_size=c) for c in (1, 8, 32, 128)])
    assert np.all(np.diff(conc["pred_tpot_ms"]) > 0)  # bigger batches, slower steps
    assert np.all(np.diff(conc["pred_output_tok_per_s"]) > 0)  # ... but more throughput
    assert np.all(np.diff(_predict(*[_row(isl=i) for i in (512, 2048, 8192)])["pred_ttft_ms"]) > 0)
    tp = _predict(*[_row(tp_size=t) for t in (2, 4, 8)])
    assert np.all(np.diff(tp["pred_tpot_ms"]) < 0)
    # Memory-bound decode: more bandwidth (H200, B200) and fewer weight bytes (fp8) are faster.
    gpus = _predict(*[_row(system=s, batch_size=4) for s in ("h100_sxm", "h200_sxm", "b200_sxm")])
    assert np.all(np.diff(gpus["pred_tpot_ms"]) < 0)
    fp8 = _predict(_row(batch_size=4), _row(batch_size=4, gemm_quant_mode="fp8"))
    assert fp8.loc[1, "pred_tpot_ms"] < 0.8 * fp8.loc[0, "pred_tpot_ms"]
    # 3B active parameters decode faster than 32B dense on the same GPUs.
    moe = _predict(_row(model_path="Qwen/Qwen3-30B-A3B", batch_size=4), _row(batch_size=4))
    assert moe.loc[0, "pred_tpot_ms"] < moe.loc[1, "pred_tpot_ms"]
    # Output throughput is Little's law over the predicted latencies.
    r = conc.iloc[2]
    assert r["pred_output_tok_per_s"] == pytest.approx(
        32 * 128 / ((r["pred_ttft_ms"] + 127 * r["pred_tpot_ms"]) / 1e3), rel=1e-6)


def test_nvfp4_runs_on_fp4_tensor_cores_where_the_gpu_has_them() -> None:
    ds = load_model("deepseek-v3")
    assert resolve_precision("nvfp4", "", ds) == ("int4", "fp4")
    rows = [_row(model_path="nvidia/DeepSeek-R1-FP4", system=s, tp_size=8, isl=8192, batch_size=8, gemm_quant_mode=q,
                 kv_cache_dtype="fp8") for s in ("b200_sxm", "h200_sxm") for q in ("nvfp4", "w4afp8")]
    out = _predict(*rows)
    assert (out["pred_reason"] == "").all()
    # B200: W4A4 on FP4 cores prefills faster than the same weights with FP8 activations (attention stays
    # bf16, so less than 2x); H200 has no FP4 cores, so NVFP4 takes its FP8 path: the W4A8 figures exactly.
    assert out.loc[0, "pred_ttft_ms"] < 0.95 * out.loc[1, "pred_ttft_ms"]
    assert out.loc[2, "pred_ttft_ms"] == pytest.approx(out.loc[3, "pred_ttft_ms"])
    b200 = load_gpu("b200")
    gemm_s = [PerfModel(ds, b200, "int4", "fp8", tp=8, compute_dtype=c).step(prefill_tokens=8192).compute_s
              for c in ("fp4", "fp8")]
    assert gemm_s[0] / gemm_s[1] == pytest.approx(b200.fp8_tflops / b200.fp4_tflops)
    with pytest.raises(ValueError, match="FP4"):
        load_gpu("h100").peak_flops("fp4")


def test_every_catalogue_gpu_and_backend_is_predicted() -> None:
    rows = [_row(system=s, backend=b, tp_size=4) for s in ("h100_sxm", "h200_sxm", "b200_sxm", "a100_sxm", "l40s")
            for b in ("vllm", "sglang", "trtllm")]
    out = _predict(*rows)
    assert (out["pred_reason"] == "").all()
    # PCIe L40S: slower than every NVLink/HBM GPU at the same TP.
    by_gpu = out.groupby("system")["pred_tpot_ms"].mean()
    assert by_gpu.idxmax() == "l40s"


def test_moe_experts_take_their_own_dtype() -> None:
    """gpt-oss ships MXFP4 experts beside bf16 attention: unstated, or as aiconfigurator's moe_quant_mode,
    the experts are 4-bit; 16-bit experts stream ~4x the bytes in memory-bound decode."""
    gpt = dict(model_path="openai/gpt-oss-120b", batch_size=64, tp_size=4)  # most experts touched per step
    out = _predict(_row(**gpt), _row(**gpt, gemm_quant_mode="bfloat16", moe_quant_mode="w4a16_mxfp4"),
                   _row(**gpt, precision="mxfp4"), _row(**gpt, gemm_quant_mode="bfloat16", moe_quant_mode="bfloat16"),
                   _row(**gpt, moe_quant_mode="fp2"))
    assert (out.loc[:3, "pred_reason"] == "").all()
    assert out.loc[0, "pred_tpot_ms"] == pytest.approx(out.loc[1, "pred_tpot_ms"], rel=1e-9)
    assert out.loc[2, "pred_tpot_ms"] == pytest.approx(out.loc[0, "pred_tpot_ms"], rel=1e-9)
    assert out.loc[3, "pred_tpot_ms"] > 1.5 * out.loc[0, "pred_tpot_ms"]
    assert "moe_quant_mode" in out.loc[4, "pred_reason"]
    # Memory planning sees the release's size too: gpt-oss-120b's checkpoint is ~65 GB, not 234 GB of bf16.
    model = load_model("gpt-oss-120b")
    assert 55e9 < model.weight_bytes("bf16") < 70e9 < 200e9 < model.weight_bytes("bf16", expert_dtype="bf16")
    # A dense model ignores the MoE column; SmoothQuant and TRT's FP8 spell W8A8.
    llama = load_model("llama-3.1-8b")
    assert resolve_precision("", "sq", llama) == ("int8", "int8")
    assert resolve_precision("", "fp8_ootb", llama) == ("fp8", None)
    dense = _predict(_row(), _row(moe_quant_mode="w4a16_mxfp4"))
    assert dense.loc[0, "pred_tpot_ms"] == dense.loc[1, "pred_tpot_ms"]


def test_pipeline_stages_stream_their_layers_in_turn() -> None:
    """PP splits the layers, not each layer: one sequence passes every stage, so its memory-bound decode
    step costs what one GPU streaming all the weights costs, where TP splits that stream; at high
    concurrency the `pp` micro-batches in flight win the throughput back."""
    llama = dict(model_path="meta-llama/Llama-3.1-70B-Instruct", gemm_quant_mode="fp8", isl=1024, osl=512)
    out = _predict(*[_row(**llama, batch_size=c, tp_size=tp, pp_size=pp)
                     for c in (1, 128) for tp, pp in ((2, 1), (1, 2), (1, 1))])
    assert (out["pred_reason"] == "").all()
    tp2, pp2, tp1 = out.loc[0], out.loc[1], out.loc[2]
    assert pp2["pred_tpot_ms"] > 1.5 * tp2["pred_tpot_ms"]
    assert pp2["pred_tpot_ms"] == pytest.approx(tp1["pred_tpot_ms"], rel=1e-9)  # alone, as on one GPU
    hot_tp2, hot_pp2 = out.loc[3], out.loc[4]
    assert hot_pp2["pred_output_tok_per_s"] > 0.6 * hot_tp2["pred_output_tok_per_s"]
    assert hot_pp2["pred_output_tok_per_s"] > 4 * pp2["pred_output_tok_per_s"]


def test_attention_dp_keeps_whole_attention_weights_and_splits_the_kv() -> None:
    """DeepSeek-R1 on 8 H200: TP8 shards everything and replicates the MLA latent on every rank; DEP8
    keeps each rank's attention weights whole (slower small-batch decode) but holds 8x the KV per GPU,
    which carries long prompts at high concurrency. SGLang's `--tp 8 --dp 8` spelling is the same layout."""
    ds = dict(model_path="deepseek-ai/DeepSeek-R1", system="h200_sxm", backend="sglang", precision="fp8",
              isl=8192, osl=1024)
    tp8, dep8, sgl = dict(tp_size=8), dict(tp_size=1, attention_dp_size=8, moe_ep_size=8), dict(
        tp_size=8, attention_dp_size=8, moe_ep_size=8)
    out = _predict(*[_row(**ds, **lay, batch_size=c) for c in (1, 256) for lay in (tp8, dep8, sgl)])
    assert (out["pred_reason"] == "").all()
    assert out.loc[1, "pred_tpot_ms"] > 1.1 * out.loc[0, "pred_tpot_ms"]
    assert out.loc[4, "pred_output_tok_per_s"] > 1.2 * out.loc[3, "pred_output_tok_per_s"]
    assert out.loc[[1, 4], "pred_tpot_ms"].tolist() == out.loc[[2, 5], "pred_tpot_ms"].tolist()
    h200 = load_gpu("h200")
    model = load_model("deepseek-v3")
    attn = model.param_counts()["attention"]  # FP8: one byte each
    whole, sharded = (PerfModel(model, h200, "fp8", "fp8", tp=8, attention_dp=dp) for dp in (8, 1))
    assert whole.resident_weight_bytes - sharded.resident_weight_bytes == pytest.approx(attn * 7 / 8)
    assert sharded.kv_bytes_per_token == 8 * whole.kv_bytes_per_token
    # moe_ep_size spreads whole experts over 8 ranks (the step waits for the busiest); TP8 slices them.
    from tasks.perf_rows import resolve_row

    assert [resolve_row(_row(**ds, **lay)).ep for lay in (tp8, dep8, sgl)] == [1, 8, 8]
    # A MoE row claiming TP beyond a node (InferenceMAX's GB200 exports: "tp 72", 128 heads) is wide EP
    # with DP attention on every rank; a dense model keeps its stated TP.
    wide = resolve_row(_row(**{**ds, "system": "gb200"}, tp_size=72, batch_size=4096))
    assert (wide.tp, wide.attn_dp, wide.ep) == (72, 72, 72)
    dense = resolve_row(_row(model_path="meta-llama/Llama-3.1-405B", tp_size=16))
    assert (dense.tp, dense.attn_dp, dense.ep) == (16, 1, 1)
    # InferenceMAX's 2026-04 exports square the layout (tp x ep into tp_size, tp into moe_tp_size); the
    # same runs, measured identically, read tp 8 / moe_ep 8 in the earlier export: 8 GPUs, not 64.
    squared = resolve_row(_row(**ds, tp_size=64, moe_tp_size=8, moe_ep_size=8))
    assert (squared.tp, squared.attn_dp, squared.ep) == (8, 1, 8)
    assert "read as 8 GPUs (TP 8, EP 8)" in _predict(_row(**ds, tp_size=64, moe_tp_size=8, moe_ep_size=8)).loc[0, "pred_reason"]
    squared_dep = resolve_row(_row(**ds, tp_size=1, attention_dp_size=64, moe_tp_size=8, moe_ep_size=8))
    assert (squared_dep.tp, squared_dep.attn_dp, squared_dep.ep) == (8, 8, 8)
    # vLLM's TP4 with expert parallelism exported as TP4 x DP4 with EP 16: 4 GPUs, EP4.
    vllm_tep = resolve_row(_row(**{**ds, "backend": "vllm"}, tp_size=4, attention_dp_size=4, moe_tp_size=1,
                                moe_ep_size=16))
    assert (vllm_tep.tp, vllm_tep.attn_dp, vllm_tep.ep) == (4, 1, 4)
    # Inside an NVL72 rack the same numbers are a real wide layout (64 GPUs), as the GB200 recipes run.
    rack = resolve_row(_row(**{**ds, "system": "gb200"}, tp_size=64, moe_tp_size=8, moe_ep_size=8))
    assert (rack.tp, rack.attn_dp, rack.ep) == (64, 64, 64)


def test_mla_decodes_absorbed_over_the_latent() -> None:
    """MLA prefills as 128 heads of 192/128 dims but decodes every head over the 576-dim latent (the
    absorbed form): decode attention costs (2 * 512 + 64) / (192 + 128) times prefill's per query token."""
    pm = PerfModel(load_model("deepseek-v3"), load_gpu("h200"), "fp8", "fp8", tp=8)
    ctx = 1e6
    decode = pm.step(decode_seqs=1, decode_context_tokens=ctx).compute_s - pm.step(decode_seqs=1).compute_s
    prefill = (pm.step(prefill_tokens=1, prefill_attn_context=ctx).compute_s
               - pm.step(prefill_tokens=1).compute_s)
    assert decode / prefill == pytest.approx((2 * 512 + 64) / (192 + 128), rel=1e-6)
    gqa = PerfModel(load_model("qwen3-32b"), load_gpu("h200"), "bf16", "bf16", tp=2)
    assert gqa._decode_attn_s_per_ctx == gqa._attn_s_per_ctx
    # Its kernel floor: MLA blocks launch about twice a GQA block's kernels, MoE blocks add one unit more.
    floor = pm.params.layer_latency_s
    assert pm.step_overhead_s - 0.002 == pytest.approx(floor * (61 * 2 + 58))  # 0.002: the default engine cost
    assert gqa.step_overhead_s - 0.002 == pytest.approx(floor * 64)


def _disagg(**kw) -> dict:
    pools = dict(prefill_num_workers=2, prefill_tp_size=1, prefill_batch_size=1, decode_num_workers=1, decode_tp_size=2)
    return _row(mode="disagg", tp_size=None, **{**pools, **kw})


def test_engine_batch_defaults_follow_the_gpus_memory() -> None:
    from tasks.perf_steady import scheduler

    chunks = {(b, g): scheduler(b, load_gpu(g)).chunk_tokens for b in ("vllm", "sglang", "trtllm")
              for g in ("a10", "l40s", "a100", "h100", "h200", "b200")}
    # vLLM's API server: 8192 tokens / 1024 sequences from 70 GiB up except on A100, else 2048 / 256.
    assert [chunks["vllm", g] for g in ("a10", "l40s", "a100", "h100", "h200", "b200")] == [2048] * 3 + [8192] * 3
    assert scheduler("vllm", load_gpu("a100")).max_seqs == 256 and scheduler("vllm", load_gpu("h100")).max_seqs == 1024
    # SGLang's chunked prefill by memory tier: B200's 180 GB chunk 16k.
    assert [chunks["sglang", g] for g in ("a10", "l40s", "a100", "h100", "h200", "b200")] == [
        2048, 4096, 8192, 8192, 8192, 16384]
    assert {chunks["trtllm", g] for g in ("a10", "b200")} == {8192}


def test_disagg_rows_are_predicted_and_respond_to_pools() -> None:
    out = _predict(_disagg(batch_size=16), _disagg(batch_size=64), _disagg(batch_size=64, prefill_num_workers=4),
                   _disagg(batch_size=64, decode_tp_size=4))
    assert (out["pred_reason"] == "").all()
    assert out.loc[1, "pred_ttft_ms"] > out.loc[0, "pred_ttft_ms"]  # more users queue for the prefill pool
    assert out.loc[2, "pred_ttft_ms"] < out.loc[1, "pred_ttft_ms"]  # ... unless it grows
    assert out.loc[3, "pred_tpot_ms"] < out.loc[1, "pred_tpot_ms"]  # wider decode TP, faster steps


def test_a_loaded_prefill_worker_batches_its_prompts() -> None:
    # One prefill worker under a closed loop far beyond it: it runs full token budgets (8192 tokens = 64
    # prompts of 128), so the loop's throughput is the batched rate, not one (weight-bound) prompt a step.
    from tasks.perf_steady import disagg_steady

    r = resolve_row(_disagg(batch_size=512, prefill_num_workers=1))
    pm_p = instance_model(r, r.prefill_tp, load_perf_params("h100"))
    pm_d = instance_model(r, 8, load_perf_params("h100"))  # a decode pool with room to spare
    args = (pm_p, pm_d, "vllm", np.array([128.0]), np.array([128.0]), np.array([512.0]), 1, 1)
    out = disagg_steady(*args)
    one = pm_p.prefill_s(128)
    full = pm_p.step(prefill_tokens=8192, prefill_attn_context=64 * causal_context(0, 128), prefill_seqs=64).seconds
    served = out["output_tok_s"][0] / 128  # requests per second through the loop
    assert served > 1.5 / one and served == pytest.approx(64 / full, rel=0.05)
    # A finite benchmark's first wave (every client at once) adds its queue to one request in k.
    waves = disagg_steady(*args, prompts_per_client=10)
    assert waves["ttft_s"][0] - out["ttft_s"][0] == pytest.approx(0.5 * 512 * full / 64 / 10, rel=0.05)
    # A context server capped at 4 prompts a step (a stated prefill_batch_size) serves its cap's rate instead.
    capped = disagg_steady(*args, prefill_max_batch=np.array([4.0]))
    four = pm_p.step(prefill_tokens=512, prefill_attn_context=4 * causal_context(0, 128), prefill_seqs=4).seconds
    assert capped["output_tok_s"][0] / 128 == pytest.approx(4 / four, rel=0.05)
    assert 4 / four < served
    # ... and the predictor applies the cap only where a row states it.
    stated, unstated = (resolve_row(_disagg(batch_size=512, prefill_batch_size=b)) for b in (4, None))
    assert (stated.prefill_batch, unstated.prefill_batch) == (4, 0)


def test_trtllm_attention_dp_holds_prompts_for_context_balancing() -> None:
    # TensorRT-LLM's attention-DP recipes balance context work: a rank's new prompt waits until all 8 ranks
    # have one (about 7 / (2 x arrival rate)) or for 60 steps, whichever is shorter; TPOT is unchanged.
    from tasks.perf_steady import adp_balance_wait, agg_steady

    assert adp_balance_wait(8, 4.0, 10.0) == pytest.approx(7 / 8)
    assert adp_balance_wait(8, 0.01, 0.5) == 0.5  # a lone request waits out the timeout
    pm = PerfModel(load_model("deepseek-v3"), load_gpu("b200"), "fp8", "fp8", tp=8, attention_dp=8, ep=8)
    plain, held = (agg_steady(pm, "trtllm", 1024.0, 1024.0, 128.0, adp_balance_iters=k) for k in (0.0, 60.0))
    assert held["tpot_s"] == pytest.approx(plain["tpot_s"])
    rate = float(128 / (plain["ttft_s"] + 1023 * plain["tpot_s"]))
    extra = float(held["ttft_s"] - plain["ttft_s"])
    assert extra == pytest.approx(7 / (2 * rate), rel=0.05)
    # Fewer requests than ranks: some rank has nothing to decode, and the balancer lets prompts through.
    few = [agg_steady(pm, "trtllm", 1024.0, 1024.0, 4.0, adp_balance_iters=k)["ttft_s"] for k in (0.0, 60.0)]
    assert few[0] == pytest.approx(few[1])
    # The predictor charges it to TensorRT-LLM rows that state attention DP, not to other engines' and not
    # where attention DP is only inferred (a MoE TP beyond a node read as wide EP).
    dep8 = dict(model_path="deepseek-ai/DeepSeek-R1", system="b200_sxm", precision="fp8", isl=1024, osl=1024,
                batch_size=128, tp_size=1, attention_dp_size=8, moe_ep_size=8)
    out = _predict(_row(**dep8, backend="trtllm"), _row(**dep8, backend="sglang"))
    engine = agg_steady(instance_model(resolve_row(_row(**dep8, backend="trtllm")), 8, load_perf_params("b200"), 8,
                                       1, 8), "trtllm", 1024.0, 1024.0, 128.0)
    assert out.loc[0, "pred_ttft_ms"] > 1e3 * float(engine["ttft_s"]) + 100
    wide = resolve_row(_row(**{**dep8, "system": "gb200", "tp_size": 36, "attention_dp_size": 1, "moe_ep_size": 1},
                            backend="trtllm"))
    assert wide.wide_ep and not resolve_row(_row(**dep8, backend="trtllm")).wide_ep


def test_a_finite_benchmarks_first_wave_queues_once_per_client() -> None:
    # 256 clients start together on one H100: 256 prompts of 1024 tokens share 8192-token steps, so the
    # first wave waits on average half of 32 full steps; one request in 10 is in that wave. TPOT is the same.
    from tasks.perf_steady import agg_steady

    pm = PerfModel(load_model("qwen3-32b"), load_gpu("h100"), "bf16", "bf16", tp=2)
    steady, finite = (agg_steady(pm, "vllm", 1024.0, 128.0, 256.0, prompts_per_client=k) for k in (0, 10))
    full = pm.step(prefill_tokens=8192, prefill_attn_context=8 * causal_context(0, 1024), prefill_seqs=8).seconds
    extra = finite["ttft_s"] - steady["ttft_s"]
    running = float(steady["running"])
    assert extra > 0 and finite["tpot_s"] == pytest.approx(steady["tpot_s"])
    wave = 0.5 * running * 1024 / 8192 * full / 10  # less what its own steady service already counts
    assert 0.7 * wave < extra < wave


def test_pd_rows_without_worker_counts_are_sized_to_the_load() -> None:
    # Exports that drop the worker counts: enough decode workers to hold the loop, enough prefill workers
    # to keep up with it, so a high-concurrency row is not priced as one prefill worker's queue.
    bare = {**_disagg(batch_size=None), "prefill_num_workers": None, "decode_num_workers": None,
            "silicon_data_source": "x; silicon_concurrency=512"}
    out = _predict(bare, {**bare, "prefill_num_workers": 1, "decode_num_workers": 1})
    assert (out["pred_reason"] == "").all() and out.loc[0, "pred_ttft_ms"] < out.loc[1, "pred_ttft_ms"] / 5
    assert out.loc[0, "pred_output_tok_per_s"] > 3 * out.loc[1, "pred_output_tok_per_s"]


def test_attention_dp_ranks_schedule_in_parallel() -> None:
    # Per-sequence host work and the token/sequence budgets belong to each attention-DP rank.
    model, gpu = load_model("deepseek-v3"), load_gpu("h200")
    one = PerfModel(model, gpu, "fp8", "fp8", tp=8, attention_dp=1, backend="trtllm")
    dp8 = PerfModel(model, gpu, "fp8", "fp8", tp=8, attention_dp=8, backend="trtllm")
    assert dp8.step(decode_seqs=512, decode_context_tokens=512 * 2000).overhead_s == pytest.approx(
        one.step_overhead_s + one.seq_overhead_s * 512 / 8)
    from tasks.perf_steady import agg_steady

    # vLLM runs 1,024 sequences per scheduler: one scheduler caps a loop of 4,096 there, eight do not.
    running = [agg_steady(pm, "vllm", 128, 128, 4096)["running"] for pm in (one, dp8)]
    assert running[0] == pytest.approx(1024) and running[1] == pytest.approx(4096)


SEED = dict(model_path="meta-llama/Llama-3.1-70B-Instruct", system="h100_sxm", backend="vllm", precision="fp8",
            gemm_quant_mode="fp8", isl=3000, osl=150, batch_size=32)


def test_seed_scenario_disagg_vs_agg_on_8_h100(capsys: pytest.CaptureFixture) -> None:
    """Published: 4 prefill TP1 + 1 decode TP4, TTFT ~1.4 s, ~38 tok/s/user, ~1023 tok/s, 1.6x aggregated.
    We compare with one aggregated TP8 instance on the same 8 GPUs; only physical relations are asserted."""
    out = _predict(dict(SEED, mode="disagg", prefill_num_workers=4, prefill_tp_size=1, prefill_batch_size=1,
                        decode_num_workers=1, decode_tp_size=4), dict(SEED, mode="agg", tp_size=8))
    assert (out["pred_reason"] == "").all()
    d, a = out.iloc[0], out.iloc[1]
    with capsys.disabled():
        print("\nseed (published): disagg TTFT ~1400 ms, ~38 tok/s/user, ~1023 tok/s total, 1.6x agg")
        for label, r in (("disagg 4xTP1 + 1xTP4", d), ("agg TP8", a)):
            print(f"  ours {label:<21} TTFT {r.pred_ttft_ms:7.0f} ms, {1e3 / r.pred_tpot_ms:5.1f} tok/s/user, "
                  f"{r.pred_output_tok_per_s:6.0f} tok/s total")
        print(f"  ours disagg / agg throughput: {d.pred_output_tok_per_s / a.pred_output_tok_per_s:.2f}x")
    # Decode never waits behind 3000-token prefills in the disaggregated deployment.
    assert d.pred_tpot_ms < a.pred_tpot_ms
    # A TP1 prefill of 3000 tokens of a 70B model cannot beat the compute peak of one H100.
    one_prefill_s = 2 * load_model("llama-3.1-70b").num_params * 3000 / (load_gpu("h100").fp8_tflops * 1e12)
    assert d.pred_ttft_ms / 1e3 > one_prefill_s


# ------------------------------------------------------------ CLI
def test_predict_cli_writes_input_plus_predictions(tmp_path, capsys: pytest.CaptureFixture) -> None:
    src = tmp_path / "in.csv"
    squared = _row(model_path="deepseek-ai/DeepSeek-R1", system="h200_sxm", precision="fp8", tp_size=64,
                   moe_tp_size=8, moe_ep_size=8)
    pd.DataFrame([_row(), _row(model_path="acme/Unknown-1B"), squared]).to_csv(src, index=False)
    dst = tmp_path / "sub" / "out.csv"
    assert main(["predict", "--rows", str(src), "--out", str(dst)]) == 0
    # A row predicted with a note on how its layout was read counts as predicted.
    assert "predicted 2 of 3 rows" in capsys.readouterr().out
    out = pd.read_csv(dst, keep_default_na=False)
    assert list(out.columns) == list(pd.read_csv(src).columns) + list(PRED_COLUMNS)
    assert float(out.loc[0, "pred_ttft_ms"]) > 0 and out.loc[0, "pred_reason"] == ""
    assert out.loc[1, "pred_ttft_ms"] == "" and "catalogue" in out.loc[1, "pred_reason"]
    assert main(["predict", "--rows", str(tmp_path / "missing.csv"), "--out", str(dst)]) == 2


# ------------------------------------------------------------ simulation, speculative decoding
@pytest.fixture(scope="module")
def llama_pm() -> PerfModel:
    return PerfModel(load_model("llama-3.1-8b"), load_gpu("h100"), "bf16", "bf16", tp=1)


def test_closed_loop_simulation_keeps_c_requests_in_flight(llama_pm: PerfModel) -> None:
    """C clients, each sending its next request when the last finishes: C requests are in flight until the
    last is sent, so the summed request times (the area under in-flight) lie between C x (end - one
    request) and C x end; an open loop sending all at once would not be bounded below like that."""
    n, conc = 60, 4
    res = simulate(llama_pm, None, np.full(n, 500), np.full(n, 50), closed_loop=conc)
    assert np.isfinite(res.e2e_s).all()
    area = res.e2e_s.sum()
    assert conc * (res.end_s - res.e2e_s.max()) <= area <= conc * res.end_s * (1 + 1e-9)
    burst = simulate(llama_pm, np.zeros(n), np.full(n, 500), np.full(n, 50))  # every request at t=0
    assert burst.e2e_s.sum() > 2 * area  # queued behind each other instead of C at a time


def test_on_demand_kv_pays_for_growth_with_recompute_once_the_cache_binds(monkeypatch) -> None:
    """A closed loop asking for twice the KV cache at mean length: vLLM's scheduler (the simulation) keeps
    evicting the newest requests to let the others grow and prefills them again; the closed form charges
    RECOMPUTE_PER_OUTPUT_TOKEN for it and lands on the simulation's TPOT, where it would be 9 % short."""
    import tasks.perf_steady as steady

    pm = PerfModel(load_model("qwen3-32b"), load_gpu("h100"), "bf16", "bf16", tp=2, backend="vllm")
    isl, osl, conc, n = 4096, 1024, 128, 1024
    kv = 64 * (isl + osl // 2)
    res = simulate(pm, None, np.full(n, isl), np.full(n, osl), max_num_batched_tokens=8192, max_num_seqs=1024,
                   kv_capacity_tokens=kv, closed_loop=conc)
    assert res.preemptions > 0.2 * n and res.recomputed_tokens > 0.5 * res.output_tokens.sum()
    sim_tpot = float(np.nanmean(res.tpot_s[n // 4:]))
    closed_form = float(steady.agg_steady(pm, "vllm", isl, osl, conc, kv_tokens=kv)["tpot_s"])
    assert closed_form == pytest.approx(sim_tpot, rel=0.05)
    monkeypatch.setattr(steady, "RECOMPUTE_PER_OUTPUT_TOKEN", 0.0)
    assert float(steady.agg_steady(pm, "vllm", isl, osl, conc, kv_tokens=kv)["tpot_s"]) < 0.93 * sim_tpot
    # Below the cache's capacity at full length nothing is evicted, in either.
    small = simulate(pm, None, np.full(256, isl), np.full(256, osl), max_num_batched_tokens=8192,
                     max_num_seqs=1024, kv_capacity_tokens=kv, closed_loop=48)
    assert small.preemptions == 0


def test_simulation_completes_every_request_and_queues_under_load(llama_pm: PerfModel) -> None:
    light = simulate(llama_pm, *poisson_trace(2, 30, 1000, 100, seed=1), kv_capacity_tokens=400_000)
    heavy = simulate(llama_pm, *poisson_trace(40, 30, 1000, 100, seed=1), kv_capacity_tokens=400_000)
    for res in (light, heavy):
        assert np.isfinite(res.e2e_s).all()
        assert np.all(res.ttft_s >= llama_pm.prefill_s(500) - 1e-9)  # no prompt (>= 500 tokens) is free
    assert heavy.summary()["ttft_mean_ms"] > light.summary()["ttft_mean_ms"]
    assert heavy.summary()["tpot_mean_ms"] > light.summary()["tpot_mean_ms"]


def test_simulation_preempts_when_kv_is_short(llama_pm: PerfModel) -> None:
    trace = poisson_trace(20, 20, 1000, 300, seed=2)
    tight = simulate(llama_pm, *trace, kv_capacity_tokens=6_000)
    assert tight.preemptions > 0 and np.isfinite(tight.e2e_s).all()
    roomy = simulate(llama_pm, *trace, kv_capacity_tokens=1_000_000)
    assert roomy.preemptions == 0
    assert np.nanmean(tight.e2e_s) > np.nanmean(roomy.e2e_s)


def test_speculative_decoding_pays_off_only_with_acceptance(llama_pm: PerfModel) -> None:
    assert expected_accepted(0, 0.9) == 1.0 and expected_accepted(4, 0.0) == pytest.approx(1.0)
    assert expected_accepted(4, 0.8) == pytest.approx(sum(0.8 ** i for i in range(5)))
    plain = float(llama_pm.step(decode_seqs=8, decode_context_tokens=8 * 1500).seconds)
    good, cycle = spec_decode_step(llama_pm, 8, 1500, SpecDecode(4, 0.8))
    assert good < plain < cycle  # a verify step costs more than a decode step, but yields 3.4 tokens
    draft = PerfModel(load_model("llama-3.1-8b"), load_gpu("h100"), "bf16", "bf16", tp=1)
    bad, _ = spec_decode_step(llama_pm, 8, 1500, SpecDecode(4, 0.1, "draft_model", draft))
    assert bad > plain  # a costly draft rarely accepted is a loss


# ------------------------------------------------------------ calibration
@needs_data
def test_calibration_fit_improves_on_its_start_and_predicts_every_row() -> None:
    df = pd.read_csv(CALIBRATION)
    train = df.sample(60, random_state=0).reset_index(drop=True)
    start = summarize(abs_pct_errors(df, PerfParams()))
    fitted = fit(train)
    after = summarize(abs_pct_errors(df, fitted))
    assert after["predicted"] == len(df)
    assert after["tpot_med"] < start["tpot_med"] and after["ttft_med"] < start["ttft_med"]
    assert math.isfinite(after["tpot_p90"])


@needs_data
def test_a_parameter_no_row_identifies_rests_at_its_physical_prior() -> None:
    from tasks.perf_calibration import PRIORS

    df = pd.read_csv(CALIBRATION)
    bf16_sglang = df[(df["backend"] == "sglang") & (df["isl"] == 1024)].reset_index(drop=True)
    p = fit(bf16_sglang)
    # No FP8 row: the FP8 GEMM share is the prior's, not the start value (1.0) or a bound.
    assert p.fp8_gemm_scale == pytest.approx(PRIORS["fp8_gemm_scale"][0], rel=0.01)
    # What the rows do identify still moves: SGLang's own step and per-sequence host costs.
    assert p.overhead("sglang") != pytest.approx(0.003) and p.seq_overhead("sglang") != pytest.approx(3e-5)
    # One output length: nothing says how arrivals drift with it, so that exponent stays at its prior, 0
    # (a prior on the value itself, the exponent being free to change sign).
    # Below 512 output tokens vLLM has only 128-token rows (without the prior, the fit drifts to -0.3).
    short = df[df["osl"] < 512].reset_index(drop=True)
    assert PRIORS["sync_osl_exp.vllm"][0] == 0.0
    assert abs(fit(short).sync_exps("vllm")[2]) < 0.1


@needs_data
def test_excluded_runs_are_scored_but_not_fitted() -> None:
    from tasks.perf_calibration import EXCLUDED_IDS, fitted_rows

    df = pd.read_csv(CALIBRATION)
    mask = fitted_rows(df)
    assert (~mask).sum() == len(EXCLUDED_IDS) == 3  # every listed id is in the data
    sample = df[mask & (df["backend"] == "vllm").to_numpy() & (df["isl"] == 4096).to_numpy()]
    # They are the only FP8 rows: with them in, fp8_gemm_scale would be theirs; out, the prior holds.
    with_them = pd.concat([sample, df[~mask]]).reset_index(drop=True)
    fitted = fit(with_them)
    assert fitted == fit(sample.reset_index(drop=True))
    assert summarize(abs_pct_errors(df[~mask].reset_index(drop=True), fitted))["predicted"] == 3


def test_plan_prediction_splits_add_up_and_queueing_grows_with_rate(llama_pm: PerfModel) -> None:
    from tasks.perf_plan import predict_agg, predict_disagg

    knobs = dict(max_num_batched_tokens=8192, max_num_seqs=256, kv_capacity_tokens=400_000)
    light, heavy = (predict_agg(llama_pm, "vllm", q, 1000, 200, **knobs) for q in (1.0, 30.0))
    for p in (light, heavy):
        assert set(p.ttft_parts_ms) == {"compute", "memory", "comm", "overhead", "queue"}
        assert sum(p.ttft_parts_ms.values()) == pytest.approx(p.ttft_ms, rel=1e-6)
        assert sum(p.tpot_parts_ms.values()) == pytest.approx(p.tpot_ms, rel=1e-6)
    assert heavy.ttft_parts_ms["queue"] > light.ttft_parts_ms["queue"]
    assert heavy.output_tok_s > 20 * light.output_tok_s  # 30x the rate, not saturated
    pd_pred = predict_disagg(llama_pm, llama_pm, "vllm", 5.0, 1000, 200, 1, 1)
    assert pd_pred.ttft_parts_ms["comm"] > 0  # the KV transfer
    assert sum(pd_pred.ttft_parts_ms.values()) == pytest.approx(pd_pred.ttft_ms, rel=1e-6)
    assert pd_pred.output_tok_s == pytest.approx(5.0 * 200, rel=0.02)


def test_a_new_request_does_not_wait_for_a_completion_at_low_concurrency() -> None:
    """The calibration's Llama-8B rows on trtllm-serve 1.0.0rc3 show TTFT growing with output length at
    concurrency 8 (as if a slot freed a completion late), but Qwen3-32B and Qwen3-235B on the same version
    and harness (benchmarks/silicon_check.py) keep it flat: no such wait is modelled, for any version."""
    trt = dict(model_path="meta-llama/Llama-3.1-8B-Instruct", backend="trtllm", isl=1024, batch_size=8, tp_size=1)
    pred = _predict(*(_row(**trt, osl=o, backend_version="1.0.0rc3") for o in (128, 512)))
    short, long_ = pred["pred_ttft_ms"]
    assert long_ < 1.5 * short  # a completion gap (~lifetime / 8) would add 220 ms at osl 512, 55 at 128


def test_plan_waits_for_a_busy_serving_frontend() -> None:
    """The frontend's serial work per request (10 ms + 50 us x 200 tokens = 20 ms) serves 50 requests/s: at 25
    the M/D/1 wait is half a service time; above 50 the plan says the frontend, not the engine, is the limit."""
    from tasks.perf_plan import predict_agg

    knobs = dict(max_num_batched_tokens=8192, max_num_seqs=256, kv_capacity_tokens=400_000)
    model, gpu = load_model("llama-3.1-8b"), load_gpu("h100")
    fitted = PerfModel(model, gpu, "bf16", "bf16", tp=1).params
    plain, front = (PerfModel(model, gpu, "bf16", "bf16", tp=1, params=replace(
        fitted, frontend_request_s={"vllm": a}, frontend_token_s={"vllm": b})) for a, b in ((0.0, 0.0), (0.01, 5e-5)))
    base, busy = (predict_agg(pm, "vllm", 25.0, 1000, 200, **knobs) for pm in (plain, front))
    assert busy.ttft_ms - base.ttft_ms == pytest.approx(10.0, rel=0.01)
    assert busy.ttft_parts_ms["queue"] - base.ttft_parts_ms["queue"] == pytest.approx(10.0, rel=0.01)
    assert busy.tpot_ms == pytest.approx(base.tpot_ms)  # the engine's steps are the same
    over = predict_agg(front, "vllm", 60.0, 1000, 200, **knobs)
    assert "frontend" in over.note and over.ttft_ms == float("inf")
    assert "frontend" not in busy.note


def test_a_backend_without_rows_borrows_the_fitted_backends_overheads_but_not_their_arrival_law() -> None:
    from tasks.perf_calibration import SPEC, _typical_for_absent, from_params, to_params

    fitted = PerfParams(step_overhead_s={"vllm": 0.002, "sglang": 0.001}, request_overhead_s={"vllm": 0.06,
                        "sglang": 0.10}, sync_frac={"vllm": 0.3, "sglang": 1.0})
    p = to_params(_typical_for_absent(from_params(fitted), {"vllm", "sglang"}), fitted)
    assert p.overhead("trtllm") == pytest.approx(0.0015)
    assert p.request_overhead("trtllm") == pytest.approx(0.08)
    assert p.sync("trtllm") == pytest.approx(dict((n, v) for n, v, *_ in SPEC)["sync_frac.trtllm"])
    assert p.overhead("vllm") == pytest.approx(0.002)  # fitted backends keep their own


def test_the_frontend_ceiling_is_charged_only_to_the_engine_builds_it_was_measured_on() -> None:
    # Llama-8B on 8 H100s at concurrency 128 is frontend-bound on trtllm-serve 1.0.0rc3 (the calibrated build);
    # a row of another (or no) version has an unmeasured frontend and is costed as its engine alone.
    p = load_perf_params("h100")
    assert "1.0.0rc3" in p.frontend_versions["trtllm"] and p.frontend("trtllm", "1.0.0rc3")[1] > 0
    assert p.frontend("trtllm", "1.2.0") == (0.0, 0.0) and p.frontend("trtllm") == p.frontend("trtllm", "1.0.0rc3")
    rows = [_row(model_path="meta-llama/Llama-3.1-8B-Instruct", backend="trtllm", tp_size=8, batch_size=128, osl=512,
                 backend_version=v) for v in ("1.0.0rc3", "1.2.0", "")]
    out = _predict(*rows)
    assert out.loc[0, "pred_ttft_ms"] > 1.5 * out.loc[1, "pred_ttft_ms"]
    assert out.loc[1, "pred_ttft_ms"] == pytest.approx(out.loc[2, "pred_ttft_ms"])
    assert out["pred_tpot_ms"].nunique() == 1  # the engine's steps are the same build-independent physics


def test_a_pd_request_pays_each_engines_admission() -> None:
    # Disaggregated, a request passes the prefill engine's request path and then the decode engine's: its TTFT
    # carries two of what an aggregated engine charges one request (the `overhead` part of its breakdown).
    from tasks.perf_steady import disagg_steady

    r = resolve_row(_disagg(batch_size=4))
    params = load_perf_params("h100")
    pm_p, pm_d = instance_model(r, r.prefill_tp, params), instance_model(r, r.decode_tp, params)
    args = (pm_p, pm_d, "vllm", np.array([1024.0]), np.array([128.0]), np.array([4.0]), 2, 1)
    none, some = (disagg_steady(*args, request_overhead_s=a) for a in (0.0, 0.05))
    assert some["ttft_s"][0] - none["ttft_s"][0] == pytest.approx(0.1, rel=0.02)
    # (The first decode step's own host work moves a hair with the decode batch the longer TTFT leaves.)
    assert some["ttft_overhead_s"][0] - none["ttft_overhead_s"][0] == pytest.approx(0.1, rel=1e-3)


def test_a_pd_request_joins_a_loaded_decode_instance() -> None:
    # Its first token waits out the decode step in flight and then takes one with the others: 1.5 loaded
    # steps, so TTFT grows with the decode batch even where the prefill pool is idle.
    from tasks.perf_steady import DECODE_JOIN_STEPS, disagg_steady

    r = resolve_row(_disagg(batch_size=64))
    params = load_perf_params("h100")
    pm_p, pm_d = instance_model(r, r.prefill_tp, params), instance_model(r, r.decode_tp, params)
    out = disagg_steady(pm_p, pm_d, "vllm", np.array([128.0]), np.array([1024.0]), np.array([64.0]), 8, 1)
    per = out["decode_batch"][0]
    loaded = pm_d.step(decode_seqs=per, decode_context_tokens=per * (128 + 512)).seconds
    lone = pm_d.step(decode_seqs=1, decode_context_tokens=128 + 512).seconds
    assert out["tpot_s"][0] == pytest.approx(loaded, rel=1e-6) and loaded > 1.3 * lone
    parts = sum(out[f"ttft_{k}_s"][0] for k in ("compute", "memory", "comm", "overhead"))
    assert out["ttft_s"][0] >= DECODE_JOIN_STEPS * loaded + out["transfer_s"][0]
    assert parts == pytest.approx(out["ttft_s"][0] - out["ttft_queue_s"][0])


def test_a_deployment_that_ran_has_the_kv_cache_its_operator_made_room_for() -> None:
    # DeepSeek-V3 FP8 on 4 B200s under SGLang: the weights take ~88 % of each GPU, so SGLang's default memory
    # fraction leaves no KV cache at all; the measured run held several requests, as the GPUs can once the
    # fraction is raised (95 % less 2 GiB). Without knowing the run, the defaults stand.
    from tasks.perf_steady import RAISED_MEM_FRAC, RAISED_RESERVE_GIB, kv_capacity_tokens

    pm = PerfModel(load_model("deepseek-v3"), load_gpu("b200"), "fp8", "bf16", tp=4, backend="sglang")
    assert kv_capacity_tokens(pm, "sglang", 7.0) == 0.0
    raised = float(kv_capacity_tokens(pm, "sglang", 7.0, 9216.0))
    room = RAISED_MEM_FRAC * pm.gpu.memory_bytes - pm.resident_weight_bytes - RAISED_RESERVE_GIB * 2**30
    assert raised == pytest.approx(room / pm.resident_kv_bytes_per_token) and raised > 4 * pm.footprint(9216.0)
    out = _predict(*[_row(model_path="deepseek-ai/DeepSeek-V3", system="b200_sxm", backend="sglang", precision="fp8",
                          tp_size=4, isl=8192, osl=1024, batch_size=c) for c in (4, 32)])
    assert out.loc[0, "pred_ttft_ms"] < 2000 and out.loc[1, "pred_tpot_ms"] > out.loc[0, "pred_tpot_ms"]


def test_silicon_check_groups_rows_by_export_and_by_stated_pd_pools() -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("silicon_check", REPO_ROOT / "benchmarks" / "silicon_check.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    rows = pd.DataFrame({
        "silicon_data_source": ["source_file=/u/p/aic-auto-gap-analysis/data/h200_sxm/vllm/0.12.0/m.csv; x=1",
                                "db-dump/2026-04-27; config_id=1", "db-dump/2026-04-27; config_id=2"],
        "mode": ["agg", "disagg", "disagg"], "prefill_num_workers": [np.nan, 2.0, np.nan]})
    out = mod.with_derived_columns(rows)
    assert out["source"].tolist() == ["aic-auto-gap-analysis", "db-dump/2026-04-27", "db-dump/2026-04-27"]
    assert out["pd_pools"].tolist() == ["", "stated", "unstated"]
