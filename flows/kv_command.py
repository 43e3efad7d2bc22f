"""`dolphin kv`: KV bytes per token, blocks, token capacity and max concurrency, as vLLM computes and
logs them, for a catalogue model or a local HF config.json."""
from __future__ import annotations

import argparse
import json


def add_parser(sub) -> None:
    kv = sub.add_parser("kv", help="KV cache capacity and max concurrency, as vLLM computes them")
    kv.add_argument("--model", required=True, help="catalogue name (conf/model/) or a dir with an HF config.json")
    kv.add_argument("--tp", type=int, default=1)
    kv.add_argument("--kv-dtype", default="auto", choices=["auto", "bf16", "fp16", "fp8", "fp8_e4m3", "fp8_e5m2"])
    kv.add_argument("--kv-gib", type=float, help="KV memory per GPU in GiB (vLLM's 'Available KV cache memory')")
    kv.add_argument("--gpu", help="catalogue GPU (conf/gpu/): KV memory = utilization x memory - weights - reserve")
    kv.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    kv.add_argument("--weights-dtype", choices=["bf16", "fp16", "fp8", "int4"],
                    help="with --gpu; default: the checkpoint's dtype")
    kv.add_argument("--block-size", type=int, default=16)
    kv.add_argument("--max-model-len", type=int, help="default: the model's max_position_embeddings")
    kv.add_argument("--request-len", type=int, help="also report the concurrency at this request length")
    kv.add_argument("--max-num-batched-tokens", type=int, default=8192, help="sliding-window layers only")
    kv.add_argument("--async-scheduling", action="store_true",
                    help="sliding-window layers reserve two batches in flight (vLLM's CUDA default)")
    kv.add_argument("--json", action="store_true")


def _kv_dtype(arg: str, model) -> str:
    if arg == "auto":  # vLLM: the model's activation dtype (an FP8 checkpoint still computes in bf16)
        return "fp16" if model.dtype == "fp16" else "bf16"
    return "fp8" if arg.startswith("fp8") else arg


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from tasks.catalog import GIB, load_gpu, load_model
    from tasks.config import MemoryConfig
    from tasks.kv_sizing import static_bytes, vllm_kv_capacity

    if (args.kv_gib is None) == (args.gpu is None):
        raise ValueError("give exactly one of --kv-gib X (vLLM's 'Available KV cache memory', or "
                         "VLLM_CPU_KVCACHE_SPACE on CPU) or --gpu G [--gpu-memory-utilization U]")
    for flag in ("tp", "block_size", "max_model_len", "request_len", "max_num_batched_tokens"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise ValueError(f"--{flag.replace('_', '-')} {value} must be >= 1")
    model = load_model(args.model)
    if model.num_attention_heads % args.tp:
        raise ValueError(f"--tp {args.tp} does not divide the {model.num_attention_heads} attention heads "
                         f"of {model.name}")
    kv_dtype = _kv_dtype(args.kv_dtype, model)
    max_len = args.max_model_len or model.max_position_embeddings
    in_flight = args.max_num_batched_tokens * (2 if args.async_scheduling else 1)

    def capacity(kv_bytes: float):
        return vllm_kv_capacity(model, kv_bytes, kv_dtype, args.tp, args.block_size, max_len, in_flight)

    source: dict = {}
    if args.gpu is not None:
        gpu = load_gpu(args.gpu)
        memory = MemoryConfig(gpu_memory_utilization=args.gpu_memory_utilization,
                              max_num_batched_tokens=args.max_num_batched_tokens, block_size=args.block_size)
        weights_dtype = args.weights_dtype or model.dtype
        kv_bytes = gpu.memory_bytes * memory.gpu_memory_utilization - static_bytes(
            model, gpu, args.tp, weights_dtype, memory)
        source = {"gpu": gpu.name, "gpu_memory_utilization": memory.gpu_memory_utilization,
                  "weights_dtype": weights_dtype}
        where = (f"{memory.gpu_memory_utilization:g} x {gpu.memory_gib:.1f} GiB of {gpu.name} minus "
                 f"{weights_dtype} weights and the activation reserve")
    else:
        kv_bytes, where = args.kv_gib * GIB, "given"
    kv = capacity(kv_bytes)
    request_len = args.request_len or max_len
    data = {
        "model": model.name, "tp": args.tp, "kv_dtype": kv_dtype, "block_size": args.block_size,
        "max_model_len": max_len, "kv_gib": kv.kv_bytes / GIB, **source,
        "kv_bytes_per_token": kv.kv_bytes_per_token,
        "num_blocks": kv.num_blocks,
        "kv_capacity_tokens": kv.logged_tokens,
        "max_concurrency": kv.max_concurrency,
        "request_len": request_len,
        "max_concurrency_at_request_len": kv.concurrency_for(request_len),
        "pool_tokens": kv.pool_tokens,
        "kv_groups": [{"attention": kind, "layers": n} for kind, n in kv.groups],
    }
    if args.kv_gib is not None:  # vLLM logs GiB with 2 decimals: what that rounding leaves open
        lo, hi = (capacity((round(args.kv_gib, 2) + d) * GIB).num_blocks for d in (-0.005, 0.005))
        data["num_blocks_if_rounded"] = [lo, hi]
    status = 0 if kv.num_blocks > 0 else 2
    if args.json:
        print(json.dumps(data, indent=2))
        return status
    table = Table(title=f"KV cache of {model.name} (TP {args.tp}, {kv_dtype} KV, block {args.block_size})",
                  show_header=False)
    layout = "MLA latent, whole on every rank" if model.is_mla else "K+V, KV heads split by TP"
    rows = [
        ("KV memory per GPU", f"{kv.kv_bytes / GIB:.3f} GiB ({where})"),
        ("KV bytes per token", f"{kv.kv_bytes_per_token:,.0f} B per GPU ({layout})"),
        ("groups", ", ".join(f"{n} {kind}-attention layers" for kind, n in kv.groups)),
        ("blocks", f"{kv.num_blocks:,} of {args.block_size} tokens"),
        ("KV cache size", f"{kv.logged_tokens:,} tokens (as vLLM logs it)"),
        ("max concurrency", f"{kv.max_concurrency:.2f}x for {max_len:,} tokens per request"),
    ]
    if request_len != max_len:
        rows.append(("at request length", f"{kv.concurrency_for(request_len):.2f}x for {request_len:,} tokens"))
    if "num_blocks_if_rounded" in data:
        lo, hi = data["num_blocks_if_rounded"]
        rows.append(("if rounded", f"vLLM prints GiB to 2 decimals: {args.kv_gib:.2f} +/- 0.005 GiB gives "
                                   f"{lo:,} to {hi:,} blocks"))
    for k, v in rows:
        table.add_row(k, v)
    Console().print(table)
    return status
