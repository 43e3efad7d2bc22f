"""Calibrate the performance model on ../shared/calibration and print how well it predicts.

    .venv/bin/python benchmarks/predict_accuracy.py [--csv PATH] [--no-write]

Fits the few physical parameters (tasks/perf_calibration.py) on the measured rows (all but the few
`EXCLUDED_IDS`, whose errors are still printed), writes them to
conf/perf/hopper.yaml (the H100 family), and prints median / p90 |% error| of TTFT and TPOT: in-sample,
then leave-one-group-out (fit without a group, test on it) to show generalisation rather than fit.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tasks.perf_calibration import abs_pct_errors, fit, fitted_rows, summarize, write_params  # noqa: E402
from tasks.perf_model import perf_params_path  # noqa: E402

DEFAULT_CSV = ROOT.parent / "shared" / "calibration" / "measured_agg_h100.csv"


def _holdouts(df: pd.DataFrame) -> list[tuple[str, np.ndarray]]:
    """(label, test mask) of each leave-one-group-out split."""
    out = [(f"backend={b}", (df["backend"] == b).to_numpy()) for b in sorted(df["backend"].unique())]
    out += [(f"model={m.split('/')[-1]}", (df["model_path"] == m).to_numpy())
            for m in sorted(df["model_path"].unique())]
    out += [("isl>=4000", (df["isl"] >= 4000).to_numpy()), ("tp=8", (df["tp_size"] == 8).to_numpy()),
            ("concurrency>=64", (df["batch_size"] >= 64).to_numpy()), ("osl>=512", (df["osl"] >= 512).to_numpy())]
    return out


def _line(label: str, s: dict) -> str:
    return (f"{label:<28} {s['n']:>5} {s['predicted']:>5} {s['ttft_med']:>9.1f} {s['ttft_p90']:>9.1f} "
            f"{s['tpot_med']:>9.1f} {s['tpot_p90']:>9.1f}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--csv", type=Path, default=DEFAULT_CSV)
    ap.add_argument("--no-write", action="store_true", help="do not overwrite conf/perf/hopper.yaml")
    args = ap.parse_args(argv)
    df = pd.read_csv(args.csv)
    params = fit(df)
    if not args.no_write:
        path = perf_params_path("h100")
        write_params(params, path, f"Fitted by benchmarks/predict_accuracy.py on {args.csv.name} ({len(df)} runs, "
                     "H100 SXM).\nEfficiencies are fractions of each GPU's own peaks (conf/gpu); GPU families "
                     "without a file use this one.")
        print(f"wrote {path.relative_to(ROOT)}")
    header = f"{'rows':<28} {'n':>5} {'pred':>5} {'TTFT med':>9} {'TTFT p90':>9} {'TPOT med':>9} {'TPOT p90':>9}"
    print("|% error|, fit on all rows (in-sample)")
    print(header)
    errors = abs_pct_errors(df, params)
    print(_line("all", summarize(errors)))
    for b in sorted(df["backend"].unique()):
        mask = (df["backend"] == b).to_numpy()
        print(_line(f"  {b}", summarize(errors[mask])))
    excluded = ~fitted_rows(df)
    if excluded.any():
        print(_line("  not fitted (EXCLUDED_IDS)", summarize(errors[excluded])))
    print("\nleave-one-group-out: fit without the group, test on it (unseen)")
    print(header)
    for label, mask in _holdouts(df):
        held = fit(df[~mask].reset_index(drop=True))  # from the priors: nothing of the group leaks
        print(_line(label, summarize(abs_pct_errors(df[mask].reset_index(drop=True), held))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
