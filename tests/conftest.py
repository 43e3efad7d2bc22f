"""Shared fixtures: a real Prefect server for the session, and a way to run the `dolphin` CLI the way a
user does, in an isolated DOLPHIN_HOME."""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest

from tasks.paths import REPO_ROOT

BIN = Path(sys.executable).parent
DOLPHIN = str(BIN / "dolphin")
# Small, fast benchmark settings for tests; the search logic is the same as the default's.
FAST = ["bench=quick", "engine.time_scale=10"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def base_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    env.update(
        DOLPHIN_HOME=str(home),
        PREFECT_HOME=str(home / "prefect-home"),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="90",
        PYTHONUNBUFFERED="1",
    )
    return env


def ctrl_c_reaches_it() -> None:
    """Popen preexec_fn for a process a test will Ctrl-C: SIGINT back to its default. A shell without job
    control starts background jobs with SIGINT ignored (POSIX), and the ignored disposition survives
    exec, so under `make test &` dolphin would never see the KeyboardInterrupt a terminal delivers."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM the process group we started, SIGKILL it if it lingers."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@contextlib.contextmanager
def healthy_server(argv: list[str], env: dict[str, str], log_path: Path, health_url: str):
    """Start a server in its own process group, wait for `health_url` to answer 200, stop it on exit."""
    log = open(log_path, "wb")
    proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert proc.poll() is None, log_path.read_text()[-3000:]
            try:
                if httpx.get(health_url, timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        else:
            pytest.fail(f"{argv[0]} did not start:\n" + log_path.read_text()[-3000:])
        yield proc
    finally:
        stop_group(proc)
        log.close()


@pytest.fixture(scope="session")
def prefect_api(tmp_path_factory) -> str:
    """A real `prefect server` on 127.0.0.1 for the whole session; stopped by PID at the end."""
    home = tmp_path_factory.mktemp("prefect-server")
    port = free_port()
    env = base_env(home) | {"PREFECT_UI_ENABLED": "false"}
    url = f"http://127.0.0.1:{port}/api"
    with healthy_server([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                        env, home / "server.log", f"{url}/health"):
        yield url


def run_dolphin(args: list[str], home: Path, api_url: str | None = None, timeout: float = 400,
                **popen_kwargs) -> subprocess.CompletedProcess:
    env = base_env(home)
    if api_url:
        env["PREFECT_API_URL"] = api_url
    return subprocess.run([DOLPHIN, *args], env=env, cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=timeout, **popen_kwargs)


def engine_processes(home: Path) -> list[psutil.Process]:
    """Live engine processes whose command line points into this test's DOLPHIN_HOME."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmd = " ".join(proc.info["cmdline"] or [])
        if "tasks.engines.sim_server" in cmd and str(home) in cmd:
            found.append(proc)
    return found
