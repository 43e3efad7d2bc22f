"""Predict NVIDIA's published silicon measurements the model was never fitted to (`dolphin predict`'s path).

    .venv/bin/python benchmarks/silicon_check.py [--csv PATH] [--by system,backend,mode] [--show N]

aiconfigurator ships the runs it checks itself against as `systems/silicon_sample.csv` in the
`aiconfigurator-core` wheel (Apache-2.0): 5,221 measured closed-loop runs, same columns as
../shared/calibration (which is 354 of them), on H100, H200, B200, B300, GB200 and GB300 with vLLM,
SGLang and TensorRT-LLM, aggregated and disaggregated. Without --csv the wheel (0.12.0, ~80 MB) is
fetched once with pip into benchmarks/data/.cache. Rows of the calibration file are left out, so
every figure is out of sample; nothing here is fitted. Prints median / p90 |% error| and the median
signed error (bias: negative = predicted too fast) of TTFT and TPOT, overall and per group.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tasks.perf_predict import predict_frame  # noqa: E402

CALIBRATION = ROOT.parent / "shared" / "calibration" / "measured_agg_h100.csv"
CACHE = Path(__file__).resolve().parent / "data" / ".cache"
WHEEL = "aiconfigurator-core==0.12.0"
MEMBER = "aiconfigurator_core/systems/silicon_sample.csv"


def fetch() -> Path:
    out = CACHE / "silicon_sample.csv"
    if not out.is_file():
        CACHE.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", WHEEL, "--no-deps", "--only-binary=:all:",
                        "-d", str(CACHE), "-q"], check=True)
        wheel = next(CACHE.glob("aiconfigurator_core-*.whl"))
        with zipfile.ZipFile(wheel) as z:
            out.write_bytes(z.read(MEMBER))
        wheel.unlink()
    return out


def with_derived_columns(out: pd.DataFrame) -> pd.DataFrame:
    """Columns to group by besides the CSV's: `source` (the export a row came from; the calibration's own
    harness, aic-auto-gap-analysis, named as such) and `pd_pools` (whether a PD row states its worker counts)."""
    first = out["silicon_data_source"].fillna("").str.split(";").str[0]
    out["source"] = np.where(first.str.contains("aic-auto-gap-analysis"), "aic-auto-gap-analysis", first)
    stated = out.get("prefill_num_workers", pd.Series(np.nan, index=out.index)).notna()
    out["pd_pools"] = np.where(out["mode"].eq("disagg"), np.where(stated, "stated", "unstated"), "")
    return out


def summary(g: pd.DataFrame) -> pd.Series:
    signed_t = 100 * (g["pred_ttft_ms"] / g["silicon_ttft_ms"] - 1)
    signed_p = 100 * (g["pred_tpot_ms"] / g["silicon_tpot_ms"] - 1)
    at, ap = signed_t.abs().fillna(np.inf), signed_p.abs().fillna(np.inf)  # unpredicted = infinite error
    return pd.Series({"n": len(g), "pred": int(g["pred_ttft_ms"].notna().sum()),
                      "TTFT med": np.median(at), "TTFT p90": np.percentile(at, 90), "TTFT bias": signed_t.median(),
                      "TPOT med": np.median(ap), "TPOT p90": np.percentile(ap, 90), "TPOT bias": signed_p.median()})


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--csv", type=Path, help="a silicon_sample.csv (default: fetched from the wheel)")
    ap.add_argument("--by", default="mode;system,backend,mode;model_path",
                    help="groupings to print, ';'-separated, each a ','-separated column list (also: source, "
                         "pd_pools)")
    ap.add_argument("--show", type=int, default=0, help="print the N worst-predicted TTFT rows")
    args = ap.parse_args(argv)
    df = pd.read_csv(args.csv or fetch())
    if CALIBRATION.is_file():
        df = df[~df["id"].isin(pd.read_csv(CALIBRATION, usecols=["id"])["id"])].reset_index(drop=True)
    out = with_derived_columns(predict_frame(df))
    pd.set_option("display.width", 200)
    print(f"{len(out)} measured runs not in ../shared/calibration; |% error| and median signed % error")
    print(summary(out).to_frame("all").T.round(1).to_string())
    for keys in filter(None, args.by.split(";")):
        print()
        print(out.groupby(keys.split(","), dropna=False).apply(summary).round(1).to_string())
    if args.show:
        out["ttft_err"] = 100 * (out["pred_ttft_ms"] / out["silicon_ttft_ms"] - 1)
        cols = ["model_path", "system", "backend", "mode", "isl", "osl", "batch_size", "tp_size", "silicon_ttft_ms",
                "pred_ttft_ms", "silicon_tpot_ms", "pred_tpot_ms", "pred_reason"]
        print(out.reindex(out["ttft_err"].abs().sort_values(ascending=False).index)[cols].head(args.show).to_string())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
