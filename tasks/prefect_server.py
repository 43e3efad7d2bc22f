"""The Prefect API `dolphin run` reports to when none is configured.

Prefect's ephemeral mode starts `uvicorn prefect.server.api.server:create_app` as a child in *our* process
group, so a terminal's Ctrl-C killed that server first, and dolphin then spent minutes retrying its flow
and task events against a dead API before it could exit. Here the same server runs in its own session:
Ctrl-C reaches only dolphin, which unwinds (engines stopped, measurements tracked), lets Prefect drain its
events to a live API, and stops the server by PID last (an `atexit` hook, which runs after Prefect's own
drain). The server also exits if dolphin vanishes (SIGKILL), so it is never orphaned.

A configured API (PREFECT_API_URL in the environment or the active Prefect profile) is used as it is.
"""
from __future__ import annotations

import atexit
import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

_ACTIVE: list = []  # the entered settings context
STARTUP_TIMEOUT_S = 90.0  # a cold start on a 2-core host takes ~20 s; Prefect's own default (20 s) is too short


def use_local_api_unless_configured() -> str | None:
    """Start the local server and point this process and its children at it, unless an API is configured.
    Returns the URL it started, or None when a configured API is used."""
    from prefect.settings import PREFECT_API_URL, get_current_settings, temporary_settings

    settings = get_current_settings()
    if settings.api.url:
        return None
    port = _free_port()
    url = f"http://127.0.0.1:{port}/api"
    log = Path(tempfile.mkstemp(prefix="dolphin-prefect-server-", suffix=".log")[1])
    env = {**os.environ, **settings.to_environment_variables(exclude_unset=True),
           "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}
    argv = [sys.executable, "-m", "tasks.prefect_server", str(os.getpid()), "--factory",
            "prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port", str(port),
            "--log-level", "error", "--lifespan", "on"]
    with open(log, "ab") as out:
        proc = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    atexit.register(_stop, proc, log)
    print(f"Prefect: no API configured (PREFECT_API_URL); starting a local server on {url}", flush=True)
    deadline = time.monotonic() + max(STARTUP_TIMEOUT_S, settings.server.ephemeral.startup_timeout_seconds)
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"the local Prefect server exited with {proc.returncode}; its log {log}:\n"
                               + log.read_text(errors="replace")[-3000:])
        if time.monotonic() > deadline:
            raise RuntimeError(f"the local Prefect server did not answer {url}/health in time; log {log}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                break
        time.sleep(0.2)
    os.environ["PREFECT_API_URL"] = url  # Hydra launchers' job processes report to the same server
    # For this process until it exits; the reference keeps the settings context from being collected.
    _ACTIVE.append(temporary_settings(updates={PREFECT_API_URL: url}))
    _ACTIVE[-1].__enter__()
    return url


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _stop(proc: subprocess.Popen, log: Path) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    if proc.returncode in (0, -signal.SIGTERM):
        log.unlink(missing_ok=True)  # kept only when the server failed


def _exit_when_parent_is_gone(parent_pid: int) -> None:
    while True:
        time.sleep(1.0)
        try:
            os.kill(parent_pid, 0)
        except ProcessLookupError:
            os._exit(0)
        if os.getppid() != parent_pid:  # re-parented: dolphin is gone
            os._exit(0)


if __name__ == "__main__":  # python -m tasks.prefect_server PARENT_PID <uvicorn args>
    import runpy

    threading.Thread(target=_exit_when_parent_is_gone, args=(int(sys.argv[1]),), daemon=True).start()
    sys.argv = ["uvicorn", *sys.argv[2:]]
    runpy.run_module("uvicorn", run_name="__main__")
