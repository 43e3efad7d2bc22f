"""What the PD rows of aiconfigurator's silicon sample leave out, put back from the recipes that ran them.

    .venv/bin/python benchmarks/silicon_recipes.py [--csv PATH] [--acceptance-length 3.2 --at-k 7]

1,328 disaggregated rows of `silicon_sample.csv` (InferenceMAX exports, see benchmarks/silicon_check.py) state
neither their worker counts nor attention DP nor speculative decoding. InferenceX publishes the recipes
behind them: `benchmarks/data/inferencex_disagg_recipes.csv` transcribes every disaggregated search-space
entry of `.github/configs/nvidia-master.yaml` (SemiAnalysisAI/InferenceX @ 0004cf5f, Apache-2.0): model,
precision, runner, ISL/OSL, concurrencies, each pool's workers, TP, EP and dp-attn, and spec decoding (MTP).

A row is matched to the entries with its model, GPU, engine, precision, ISL/OSL, concurrency and both pools'
TP; it is completed only when every match agrees (a row that an MTP and a non-MTP entry both fit is left
out: the export cannot tell which ran). Each completed row is predicted as exported and as completed, so the
error splits into what the missing columns cost and what the model itself misses. MTP runs need an
acceptance the rows do not carry: by default that of DeepSeek's original MTP module chained as these
engines run it, a mean acceptance length of 3.2 tokens at 7 drafts (nebius/MTP-DeepSeek-V3-0324's model
card), i.e. about 0.71 per draft token. TensorRT-LLM entries name their drafts (`..._mtp3.yaml`); SGLang's
are taken as its usual DeepSeek setting, 3 steps with top-1 (4 draft tokens verified).

This is an evaluation aid: `dolphin predict` never reads the recipes. Nothing is fitted.
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.silicon_check import CALIBRATION, fetch, summary  # noqa: E402
from tasks.perf_predict import predict_frame  # noqa: E402
from tasks.perf_rows import resolve_model  # noqa: E402
from tasks.perf_spec import acceptance_from_length  # noqa: E402

RECIPES = Path(__file__).resolve().parent / "data" / "inferencex_disagg_recipes.csv"
RUNNERS = {"b200-multinode": "b200_sxm", "h200-multinode": "h200_sxm", "h100-multinode": "h100_sxm",
           "b300": "b300_sxm", "gb200": "gb200", "gb300": "gb300"}
FRAMEWORKS = {"dynamo-trt": "trtllm", "dynamo-sglang": "sglang"}
SGLANG_MTP_STEPS = 3  # --speculative-num-steps 3 --speculative-eagle-topk 1 --speculative-num-draft-tokens 4
KEY = ["model", "system", "backend", "precision", "isl", "osl", "conc", "prefill_gpus", "decode_gpus"]
FILLED = ["prefill_num_workers", "decode_num_workers", "prefill_tp", "prefill_dp", "prefill_ep", "decode_tp",
          "decode_dp", "decode_ep", "decode_max_batch_size", "spec_k"]


def recipes() -> pd.DataFrame:
    """One row per (entry, concurrency), in silicon_sample's vocabulary."""
    r = pd.read_csv(RECIPES)
    r["conc"] = r["conc_list"].astype(str).str.split()
    r = r.explode("conc")
    mtp = r["prefill_extra"].fillna("").str.extract(r"mtp(\d)")[0].astype(float)
    # TensorRT-LLM recipe files name the generation servers' max batch size per rank (`..._dep8_batch64_...`).
    gen_batch = r["prefill_extra"].fillna("").str.extract(r"_batch(\d+)_")[0].astype(float)
    return pd.DataFrame({
        "model": np.where(r["model"].str.contains("gpt-oss"), "gpt-oss-120b", "deepseek-v3"),
        "system": r["runner"].map(RUNNERS), "backend": r["framework"].map(FRAMEWORKS), "precision": r["precision"],
        "isl": r["isl"], "osl": r["osl"], "conc": r["conc"].astype(int),
        "prefill_gpus": r["prefill_tp"], "decode_gpus": r["decode_tp"],  # per worker
        "prefill_num_workers": r["prefill_num_worker"], "decode_num_workers": r["decode_num_worker"],
        "prefill_tp": r["prefill_tp"], "prefill_dp": r["prefill_dp_attn"].astype(bool), "prefill_ep": r["prefill_ep"],
        "decode_tp": r["decode_tp"], "decode_dp": r["decode_dp_attn"].astype(bool), "decode_ep": r["decode_ep"],
        "decode_max_batch_size": gen_batch.where(r["framework"].eq("dynamo-trt")),
        "spec_k": np.where(r["spec_decoding"].eq("mtp"),
                           mtp.fillna(SGLANG_MTP_STEPS).where(r["framework"].eq("dynamo-trt"), SGLANG_MTP_STEPS), 0),
    }).drop_duplicates()


def _keyed(rows: pd.DataFrame) -> pd.DataFrame:
    """The rows' match keys: the catalogue model (DeepSeek-R1 and -V3 share theirs), the concurrency the
    client ran, and each worker's GPUs (TP x attention DP, whatever the export kept of the split)."""
    k = rows.copy()
    k["model"] = [resolve_model(m).name for m in k["model_path"]]
    k["conc"] = k["silicon_data_source"].str.extract(r"silicon_concurrency=(\d+)")[0].astype(float)
    for pool in ("prefill", "decode"):
        k[f"{pool}_gpus"] = k[f"{pool}_tp_size"] * k[f"{pool}_attention_dp_size"].fillna(1)
    return k


def completed(rows: pd.DataFrame, acceptance: float, cap: bool = True, mtp: bool = True, stated: bool = False
              ) -> tuple[pd.DataFrame, pd.Series, pd.Series]:
    """(rows with the recipe's pools and layouts, and its decode max batch (`cap`) and MTP (`mtp`), which
    rows were completed, whether each ran MTP) for the rows matched unambiguously. `stated`: the rows state
    their pools and layouts; they are matched on their worker counts too and keep them."""
    rows = rows.copy()
    key = KEY + (["prefill_num_workers", "decode_num_workers"] if stated else [])
    m = _keyed(rows).reset_index()[["index", *key]].merge(recipes(), on=key, how="inner")
    agree = m.groupby("index")[FILLED].nunique().le(1).all(axis=1)
    first = m.groupby("index")[FILLED].first()[agree]
    idx = first.index
    for pool in () if stated else ("prefill", "decode"):
        dp = first[f"{pool}_dp"].to_numpy()
        tp = first[f"{pool}_tp"].to_numpy()
        rows.loc[idx, f"{pool}_num_workers"] = first[f"{pool}_num_workers"].to_numpy()
        rows.loc[idx, f"{pool}_attention_dp_size"] = np.where(dp, tp, 1)  # aiconfigurator counts TP per DP rank
        rows.loc[idx, f"{pool}_tp_size"] = np.where(dp, 1, tp)
        rows.loc[idx, f"{pool}_moe_ep_size"] = first[f"{pool}_ep"].to_numpy()
        rows.loc[idx, f"{pool}_moe_tp_size"] = 1
    if cap:
        rows.loc[idx, "decode_max_batch_size"] = first["decode_max_batch_size"].to_numpy()
    spec = first["spec_k"]
    ran_mtp = idx[spec.to_numpy() > 0]
    rows["spec_method"] = ""
    if mtp:
        rows.loc[ran_mtp, "spec_method"] = "mtp"
        rows.loc[ran_mtp, "num_speculative_tokens"] = spec[spec > 0].to_numpy()
        rows.loc[ran_mtp, "acceptance_rate"] = acceptance
    done = pd.Series(rows.index.isin(idx), index=rows.index)
    kind = pd.Series("", index=rows.index)
    kind[idx] = np.where(spec.to_numpy() > 0, "mtp", "none")
    return rows, done, kind


def report(rows: pd.DataFrame, acceptance: float, stated: bool) -> pd.DataFrame:
    """Errors of `rows` as exported and with each recipe column put back in turn."""
    _, done, kind = completed(rows, acceptance, stated=stated)
    steps = {"as exported": rows}
    if not stated:
        steps["+ recipe pools and attention DP"] = completed(rows, acceptance, cap=False, mtp=False)[0]
    steps["+ decode max batch"] = completed(rows, acceptance, mtp=False, stated=stated)[0]
    steps["+ MTP"] = completed(rows, acceptance, stated=stated)[0]
    print(f"{len(rows)} PD rows {'with' if stated else 'without'} worker counts; {int(done.sum())} matched one "
          f"InferenceX recipe unambiguously ({int(kind.eq('mtp').sum())} of them MTP runs)")
    table = {}
    for name, completed_rows in steps.items():
        out = predict_frame(completed_rows)
        for group, sel in (("completed: not MTP", kind.eq("none")), ("completed: MTP", kind.eq("mtp")),
                           ("completed: all", done), ("not completed", ~done)):
            if name == "as exported" or group != "not completed":
                table[(name, group)] = summary(out[sel.to_numpy()])
    return pd.DataFrame(table).T.round(1)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--csv", type=Path, help="a silicon_sample.csv (default: fetched from the wheel)")
    ap.add_argument("--acceptance-length", type=float, default=3.2, help="MTP tokens per verify step ...")
    ap.add_argument("--at-k", type=int, default=7, help="... measured at this many drafts")
    args = ap.parse_args(argv)
    acceptance = acceptance_from_length(args.at_k, args.acceptance_length)
    df = pd.read_csv(args.csv or fetch())
    if CALIBRATION.is_file():
        df = df[~df["id"].isin(pd.read_csv(CALIBRATION, usecols=["id"])["id"])]
    pd.set_option("display.width", 200)
    print(f"MTP acceptance {acceptance:.3f} per draft token; |% error| and median signed % error\n")
    pd_rows = df[df["mode"].eq("disagg")]
    for stated in (False, True):
        rows = pd_rows[pd_rows["prefill_num_workers"].notna() == stated].reset_index(drop=True)
        print(report(rows, acceptance, stated).to_string(), end="\n\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
