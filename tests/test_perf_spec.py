"""Speculative decoding and decode-batch caps in the closed-loop model and `dolphin predict`."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from tasks.perf_model import load_perf_params
from tasks.perf_predict import instance_model, predict_frame
from tasks.perf_rows import resolve_row
from tasks.perf_spec import SpecDecode, acceptance_from_length, decode_step, expected_accepted
from tasks.perf_steady import agg_steady, disagg_steady


def _row(**kw) -> dict:
    base = dict(model_path="deepseek-ai/DeepSeek-R1", system="b200_sxm", backend="trtllm", precision="fp8",
                mode="agg", isl=1024, osl=1024, batch_size=16, tp_size=8, moe_ep_size=8)
    return {**base, **kw}


def _pd(**kw) -> dict:
    pools = dict(mode="disagg", batch_size=64, tp_size=None, moe_ep_size=None, silicon_data_source=None,
                 prefill_num_workers=1, prefill_tp_size=8, prefill_moe_ep_size=8, decode_num_workers=2,
                 decode_tp_size=8, decode_moe_ep_size=8)
    return _row(**{**pools, **kw})


def test_acceptance_length_inverts_expected_tokens() -> None:
    assert expected_accepted(3, 0.5) == pytest.approx(1 + 0.5 + 0.25 + 0.125)
    a = acceptance_from_length(7, 3.2)  # DeepSeek's MTP module chained 7 deep
    assert expected_accepted(7, a) == pytest.approx(3.2, abs=1e-6) and 0.69 < a < 0.73
    with pytest.raises(ValueError, match="between 1 and"):
        acceptance_from_length(3, 4.5)


def test_an_mtp_draft_costs_a_layer_not_a_model() -> None:
    r = resolve_row(_row())
    pm = instance_model(r, r.tp, load_perf_params("b200"), ep=r.ep)
    plain = decode_step(pm, 16, 16 * 1536)
    mtp = decode_step(pm, 16, 16 * 1536, SpecDecode(3, 0.7, "mtp"))
    ngram = decode_step(pm, 16, 16 * 1536, SpecDecode(3, 0.7, "ngram"))
    assert plain.seconds < ngram.seconds < mtp.seconds  # verifying 4 tokens, then 3 draft passes on top
    one_pass = pm.draft_layer_step(16, 16 * 1536).seconds
    assert mtp.seconds - ngram.seconds == pytest.approx(3 * one_pass)
    assert one_pass < 0.2 * plain.seconds  # one of DeepSeek's 61 layers and the LM head


def test_speculation_speeds_decode_only_with_acceptance() -> None:
    r = resolve_row(_row())
    pm = instance_model(r, r.tp, load_perf_params("b200"), ep=r.ep)
    args = (pm, "trtllm", np.array([1024.0]), np.array([1024.0]), np.array([16.0]))
    plain = agg_steady(*args)
    good = agg_steady(*args, spec=SpecDecode(3, 0.7, "mtp"))
    bad = agg_steady(*args, spec=SpecDecode(3, 0.0, "mtp"))
    assert good["tpot_s"][0] < 0.7 * plain["tpot_s"][0]
    assert bad["tpot_s"][0] > plain["tpot_s"][0]  # drafts never accepted: pure cost
    assert good["output_tok_s"][0] > plain["output_tok_s"][0]
    # The TPOT breakdown still adds up to the TPOT.
    parts = sum(good[f"tpot_{k}_s"][0] for k in ("compute", "memory", "comm", "overhead", "queue"))
    assert parts == pytest.approx(good["tpot_s"][0])


def test_predict_reads_speculative_columns() -> None:
    rows = [_row(), _row(spec_method="mtp", num_speculative_tokens=3, acceptance_rate=0.7),
            _row(spec_decoding="mtp", num_speculative_tokens=3, acceptance_length=expected_accepted(3, 0.7)),
            _pd(), _pd(spec_method="mtp", num_speculative_tokens=3, acceptance_rate=0.7),
            _row(spec_method="mtp", num_speculative_tokens=3),  # no acceptance
            _row(spec_method="medusa", num_speculative_tokens=3, acceptance_rate=0.7),
            _row(spec_method="mtp", acceptance_rate=0.7)]  # no draft count
    out = predict_frame(pd.DataFrame(rows))
    assert (out.loc[:4, "pred_reason"] == "").all()
    assert out.loc[1, "pred_tpot_ms"] < 0.7 * out.loc[0, "pred_tpot_ms"]
    assert out.loc[2, "pred_tpot_ms"] == pytest.approx(out.loc[1, "pred_tpot_ms"], rel=1e-6)
    assert out.loc[4, "pred_tpot_ms"] < 0.7 * out.loc[3, "pred_tpot_ms"]
    assert out.loc[5:, "pred_ttft_ms"].isna().all()
    assert "acceptance_rate" in out.loc[5, "pred_reason"]
    assert "medusa" in out.loc[6, "pred_reason"]
    assert "num_speculative_tokens" in out.loc[7, "pred_reason"]
    # "none" is no speculation at all.
    assert resolve_row(_row(spec_decoding="none")).spec_k == 0


def test_a_capped_decode_pool_makes_the_loop_wait_for_slots() -> None:
    # 180 users on two decode workers capped at 32 sequences each: 64 decode, the rest wait for a slot.
    r = resolve_row(_pd())
    p = load_perf_params("b200")
    pm_p = instance_model(r, r.prefill_tp, p, ep=r.prefill_ep)
    pm_d = instance_model(r, r.decode_tp, p, ep=r.ep)
    args = (pm_p, pm_d, "trtllm", np.array([1024.0]), np.array([1024.0]), np.array([180.0]), 1, 2)
    free = disagg_steady(*args)
    capped = disagg_steady(*args, decode_max_batch=np.array([32.0]))
    assert capped["decode_batch"][0] <= 32.0 + 1e-6 < free["decode_batch"][0]
    assert capped["tpot_s"][0] < free["tpot_s"][0]
    # Little's law: 180 users, 64 in decode; the other 116 wait in TTFT.
    cycle = capped["ttft_s"][0] + 1023 * capped["tpot_s"][0]
    assert capped["output_tok_s"][0] * cycle / 1024 == pytest.approx(180, rel=0.02)
    assert capped["ttft_s"][0] > (116 / 64) * 1023 * capped["tpot_s"][0] * 0.9
    # The predictor applies it where a row states it.
    out = predict_frame(pd.DataFrame([_pd(silicon_data_source="silicon_concurrency=180"),
                                      _pd(silicon_data_source="silicon_concurrency=180", decode_max_batch_size=32)]))
    assert out.loc[1, "pred_ttft_ms"] > 3 * out.loc[0, "pred_ttft_ms"]


def _bulk_queue_sim(k: int, rho: float, n: int = 40_000, seed: int = 0) -> float:
    """Mean wait (in steps) of Poisson arrivals at a server taking up to k waiting jobs per unit step."""
    rng = np.random.default_rng(seed)
    arrivals = np.cumsum(rng.exponential(1 / (rho * k), n))
    t, i, waits = 0.0, 0, np.empty(n)
    while i < n:
        t = max(t, arrivals[i])
        j = min(int(np.searchsorted(arrivals, t, side="right")), i + k)
        waits[i:j] = t - arrivals[i:j]
        t, i = t + 1.0, j
    return float(waits[n // 10:].mean())


@pytest.mark.parametrize("k, rho", [(1, 0.5), (1, 0.9), (2, 0.8), (4, 0.9), (8, 0.95), (16, 0.9), (8, 0.3)])
def test_a_batch_capped_prefill_rank_queues_like_a_bulk_server(k: int, rho: float) -> None:
    from tasks.perf_steady import bulk_queue_wait

    # A server with jobs for every step (busy ~ 1) whose steps take one unit whatever they hold.
    assert bulk_queue_wait(1.0, 0.999, 1.0, rho, k) == pytest.approx(_bulk_queue_sim(k, rho), rel=0.15)


def test_the_predict_command_takes_speculative_rows(tmp_path) -> None:
    from flows.cli import main

    src, dst = tmp_path / "rows.csv", tmp_path / "out.csv"
    pd.DataFrame([_row(), _row(spec_method="mtp", num_speculative_tokens=3, acceptance_length=2.5),
                  _row(spec_method="mtp", num_speculative_tokens=3)]).to_csv(src, index=False)
    assert main(["predict", "--rows", str(src), "--out", str(dst)]) == 0
    out = pd.read_csv(dst, keep_default_na=False)
    plain, mtp, unknown = (out.loc[i] for i in range(3))
    assert float(mtp["pred_tpot_ms"]) < float(plain["pred_tpot_ms"])
    assert unknown["pred_tpot_ms"] == "" and "acceptance" in unknown["pred_reason"]


def test_silicon_recipes_completes_a_row_from_the_recipe_that_ran_it() -> None:
    """benchmarks/silicon_recipes.py reads InferenceX's recipes: drafts and generation batch from the config
    file name, pools and attention DP from the entry, and completes only rows one recipe explains."""
    import importlib.util

    from tasks.paths import REPO_ROOT

    spec = importlib.util.spec_from_file_location("silicon_recipes", REPO_ROOT / "benchmarks" / "silicon_recipes.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    rec = mod.recipes()
    # dsr1-fp8-b200-dynamo-trt 1k1k, concurrency 1600: ctx1_gen2_dep8_batch..._mtp.. (an MTP entry only).
    hit = rec[(rec["system"] == "b200_sxm") & (rec["precision"] == "fp8") & (rec["conc"] == 1600)
              & (rec["isl"] == 1024) & (rec["backend"] == "trtllm")]
    assert len(hit) == 1 and hit["spec_k"].iloc[0] >= 1 and hit["decode_dp"].iloc[0]
    assert hit["decode_max_batch_size"].iloc[0] > 0 and hit["decode_num_workers"].iloc[0] == 2
    row = pd.DataFrame([dict(model_path="deepseek-ai/DeepSeek-R1", system="b200_sxm", backend="trtllm",
                             precision="fp8", mode="disagg", isl=1024, osl=1024,
                             silicon_data_source="source_file=2026-03-25.csv; silicon_concurrency=1600",
                             prefill_tp_size=8, prefill_attention_dp_size=1, prefill_moe_ep_size=8,
                             decode_tp_size=8, decode_attention_dp_size=1, decode_moe_ep_size=8),
                        dict(model_path="deepseek-ai/DeepSeek-R1", system="b200_sxm", backend="trtllm",
                             precision="fp8", mode="disagg", isl=1024, osl=1024,
                             silicon_data_source="source_file=2026-03-25.csv; silicon_concurrency=1601",
                             prefill_tp_size=8, decode_tp_size=8)])
    filled, done, kind = mod.completed(row, 0.7)
    assert done.tolist() == [True, False] and kind.iloc[0] == "mtp"
    assert filled.loc[0, "decode_attention_dp_size"] == 8 and filled.loc[0, "decode_tp_size"] == 1
    assert filled.loc[0, "decode_num_workers"] == 2 and filled.loc[0, "spec_method"] == "mtp"
    out = predict_frame(filled)
    assert out.loc[0, "pred_reason"] == "" and out.loc[0, "pred_tpot_ms"] > 0


def test_the_sim_engine_costs_drafts_as_the_model_does(tmp_path) -> None:
    from tasks.catalog import load_gpu, load_model
    from tasks.engines.sim_spec import SimSpec
    from tasks.perf_spec import drafts

    base = dict(model=load_model("llama-3.1-8b"), gpu=load_gpu("h100"), kv_capacity_tokens=200_000,
                max_model_len=4096, served_model_name="sim", mode="spec", num_speculative_tokens=3,
                acceptance_rate=0.7)
    specs = {m: SimSpec(**base, spec_method=m) for m in ("ngram", "eagle3")}
    specs["draft_model"] = SimSpec(**base, spec_method="draft_model", draft=load_model("llama-3.2-1b"))
    pm = specs["ngram"].perf_model()
    cost = {m: drafts(pm, 8, 8 * 1500, s.spec_decode(pm)) for m, s in specs.items()}
    assert cost["ngram"] is None
    assert 0 < cost["eagle3"].seconds < cost["draft_model"].seconds  # a layer per draft < a 1B model's step
    # The spec (draft architecture included) survives the JSON file the server reads.
    again = SimSpec.model_validate_json(specs["draft_model"].write(tmp_path / "spec.json").read_text())
    assert again.spec_decode(pm).draft.model.name == "llama-3.2-1b"
    assert SimSpec(**{**base, "mode": "agg"}).spec_decode(pm).k == 0


def test_speculation_builds_what_a_deployment_describes() -> None:
    from tasks.catalog import load_gpu, load_model
    from tasks.perf_model import PerfModel
    from tasks.perf_spec import speculation

    target = PerfModel(load_model("llama-3.1-8b"), load_gpu("h100"), "bf16", "bf16", tp=2)
    assert speculation(None, 3, 0.7, target)[0].k == 0 and speculation("eagle3", 0, 0.7, target)[0].k == 0
    head, note = speculation("eagle3", 3, 0.7, target, verify_tokens=16)
    assert (head.method, head.verify_tokens, note) == ("eagle3", 16, "")
    small, note = speculation("draft_model", 3, 0.7, target, load_model("llama-3.2-1b"), 0.002, backend="vllm")
    assert note == "" and small.draft.tp == 2 and small.draft.model.name == "llama-3.2-1b"
    unknown, note = speculation("draft_model", 3, 0.7, target, None)
    assert unknown.method == "ngram" and "not in the catalogue" in note
