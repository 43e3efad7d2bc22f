"""`dolphin predict`: predicted TTFT, TPOT and output throughput for rows of a measured-runs CSV.

IN has the columns of aiconfigurator's silicon_sample.csv (model_path, system, backend, precision, mode,
isl, osl, batch_size = closed-loop concurrency, tp_size, prefill_*/decode_* for disagg rows), and may add
what those leave out: speculative decoding (spec_method, num_speculative_tokens, acceptance_rate or
acceptance_length) and a PD decode worker's batch cap (decode_max_batch_size). OUT is IN plus pred_ttft_ms,
pred_tpot_ms, pred_output_tok_per_s (whole deployment) and pred_reason (why a row could not be modelled, or
how a predicted row's layout was read where its columns were not taken literally).
"""
from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub) -> None:
    p = sub.add_parser("predict", help="predict TTFT/TPOT/throughput for each row of a runs CSV",
                       description=__doc__.split("\n\n")[1].replace("\n", " "))
    p.add_argument("--rows", required=True, type=Path, help="input CSV (aiconfigurator silicon_sample columns, "
                   "optionally spec_method, num_speculative_tokens, acceptance_rate|acceptance_length, "
                   "decode_max_batch_size)")
    p.add_argument("--out", required=True, type=Path, help="output CSV: input + pred_* columns")


def run(args: argparse.Namespace) -> int:
    import pandas as pd

    from tasks.perf_predict import predict_frame

    if not args.rows.is_file():
        raise ValueError(f"--rows {args.rows}: no such file")
    try:
        df = pd.read_csv(args.rows)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise ValueError(f"--rows {args.rows}: not a CSV ({exc})") from None
    out = predict_frame(df)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    out.to_csv(args.out, index=False)
    done = int(out["pred_ttft_ms"].notna().sum())
    noted = int((out["pred_ttft_ms"].notna() & out["pred_reason"].ne("")).sum())
    print(f"predicted {done} of {len(out)} rows -> {args.out}"
          + (f" ({noted} with a note in pred_reason on how their layout was read)" if noted else ""))
    return 0
