"""Dolphin's sim engine: a real OpenAI-compatible HTTP server whose token timing is the performance model.

    python -m tasks.engines.sim_server --spec /abs/spec.json

It serves /v1/completions, /v1/chat/completions (streaming and not), /v1/models, /health and /metrics
(vLLM's metric names). Behind this HTTP layer, `sim_engine.Engine` runs one `sim_scheduler.Instance` per
engine instance: vLLM-V1-style continuous batching in *engine time* (wall time x time_scale), each step as
long as `PerfModel.step` says.

Simplifications, on purpose: the sim ignores EOS and stop strings and always generates exactly `max_tokens`
tokens (default 16), like `ignore_eos=true`; sampling parameters are accepted and ignored; generated text
is `tasks.tokenizer.token_text(i)` for the i-th output token. Every response carries
`X-Dolphin-Simulated: true` and /metrics exports `dolphin:simulated 1`.
"""
from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import signal
import socket
import sys
import time

import prometheus_client
import psutil
from aiohttp import web

from tasks.engines.sim_engine import Engine
from tasks.engines.sim_metrics import Metrics
from tasks.engines.sim_openai import SSE_HEADERS, HttpError, SseChunks, error_body, full_response, parse_request
from tasks.engines.sim_scheduler import SimRequest
from tasks.engines.sim_spec import SimSpec

__all__ = ["LISTEN_MESSAGE", "SimServer", "SimSpec", "main", "serve"]

# tasks/launch.py waits for this line and reads the bound port from it.
LISTEN_MESSAGE = (
    "Dolphin sim engine (SIMULATED: timings from the performance model) listening on http://{host}:{port}"
)


def _log(msg: str) -> None:
    print(msg, flush=True)


class SimServer:
    """The aiohttp handlers in front of one `Engine`, plus the process's fault injection and parent watch."""

    def __init__(self, spec: SimSpec) -> None:
        self.spec = spec
        self.metrics = Metrics(spec.served_model_name, spec.mode == "spec")
        self.engine = Engine(spec, self.metrics)
        self._model_json = json.dumps(spec.served_model_name)
        self._ids = itertools.count()
        self.received = 0
        self.stop = asyncio.Event()
        self.tasks: list[asyncio.Task[None]] = []

    def start_engine(self) -> None:
        self.engine.start()
        if self.spec.parent_pid is not None:
            self.tasks.append(asyncio.get_running_loop().create_task(self._watch_parent(self.spec.parent_pid)))

    def cancel_tasks(self) -> None:
        self.engine.stop()
        for task in self.tasks:
            task.cancel()

    async def _watch_parent(self, pid: int) -> None:
        try:
            parent = psutil.Process(pid)
            while parent.is_running() and parent.status() != psutil.STATUS_ZOMBIE:
                await asyncio.sleep(1.0)
        except psutil.NoSuchProcess:
            pass
        _log(f"parent process {pid} is gone; shutting down")
        self.stop.set()

    # -- HTTP
    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024**2)
        app.on_response_prepare.append(self._label_response)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/chat/completions", self.chat_completions)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/health", self.health)
        app.router.add_get("/metrics", self.metrics_page)
        return app

    @staticmethod
    async def _label_response(_: web.Request, resp: web.StreamResponse) -> None:
        resp.headers["X-Dolphin-Simulated"] = "true"

    async def health(self, _: web.Request) -> web.Response:
        return web.Response()

    async def models(self, _: web.Request) -> web.Response:
        name = self.spec.served_model_name
        card = {"id": name, "object": "model", "created": int(time.time()), "owned_by": "dolphin-sim",
                "root": name, "parent": None, "max_model_len": self.spec.max_model_len}
        return web.json_response({"object": "list", "data": [card]})

    async def metrics_page(self, _: web.Request) -> web.Response:
        body = prometheus_client.generate_latest(self.metrics.registry)
        return web.Response(body=body, headers={"Content-Type": prometheus_client.CONTENT_TYPE_LATEST})

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, chat=False)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, chat=True)

    def _count_request(self) -> None:
        self.received += 1
        limit = self.spec.crash_after_requests
        if limit is not None and self.received >= limit:
            _log(f"crash_after_requests={limit} reached: exiting with status 1 (fault injection)")
            os._exit(1)

    async def _serve(self, request: web.Request, chat: bool) -> web.StreamResponse:
        self._count_request()
        spec = self.spec
        try:
            try:
                body = await request.json()
            except ValueError as exc:
                raise HttpError(400, f"invalid JSON body: {exc}") from None
            prompt, max_tokens = parse_request(body, chat, spec.served_model_name, spec.max_model_len)
        except HttpError as exc:
            return web.json_response(error_body(exc), status=exc.status)
        stream = bool(body.get("stream", False))
        include_usage = stream and bool((body.get("stream_options") or {}).get("include_usage", False))
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{next(self._ids)}"
        created = int(time.time())
        sse = SseChunks(chat, rid, created, self._model_json, include_usage, prompt, max_tokens) if stream else None
        req = SimRequest(prompt, max_tokens, self.engine.clock.now(), sse)
        self.engine.submit(req)
        try:
            if stream:
                return await self._stream(request, req)
            while not req.closed:
                await req.wait()
        except asyncio.CancelledError:
            self.engine.abort(req)
            raise
        return web.json_response(full_response(chat, rid, created, spec.served_model_name, prompt, max_tokens))

    async def _stream(self, request: web.Request, req: SimRequest) -> web.StreamResponse:
        resp = web.StreamResponse(headers=SSE_HEADERS)
        await resp.prepare(request)
        out = req.out
        try:
            while True:
                if out:
                    data = b"".join(out)
                    out.clear()
                    await resp.write(data)
                elif req.closed:
                    break
                else:
                    await req.wait()
            await resp.write_eof()
        except ConnectionError:  # the client went away
            self.engine.abort(req)
        return resp


# ---------------------------------------------------------------- process entry
def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return socket.create_server((host, port), family=family, backlog=1024)


async def serve(spec: SimSpec) -> None:
    srv = SimServer(spec)
    # handler_cancellation: a client that disconnects before its first token is aborted, as vLLM does,
    # instead of staying queued as a ghost that slows down whoever comes next.
    runner = web.AppRunner(srv.app(), access_log=None, shutdown_timeout=0.5, handler_cancellation=True)
    await runner.setup()
    try:
        sock = _bind(spec.host, spec.port)
    except OSError as exc:
        _log(f"sim engine cannot bind {spec.host}:{spec.port}: {exc}")
        await runner.cleanup()
        sys.exit(1)
    await web.SockSite(runner, sock).start()
    srv.start_engine()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, srv.stop.set)
    _log(
        f"sim engine: model={spec.model.name} gpu={spec.gpu.name} mode={spec.mode} weights={spec.weights_dtype} "
        f"kv={spec.kv_dtype} kv_capacity_tokens={spec.kv_capacity_tokens} time_scale={spec.time_scale}"
    )
    _log(LISTEN_MESSAGE.format(host=spec.host, port=sock.getsockname()[1]))
    await srv.stop.wait()
    _log("sim engine shutting down")
    srv.cancel_tasks()
    await runner.cleanup()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", required=True, help="path of a SimSpec JSON file")
    args = parser.parse_args(argv)
    spec = SimSpec.read(args.spec)
    prometheus_client.disable_created_metrics()  # vLLM's exposition has no *_created samples
    asyncio.run(serve(spec))


if __name__ == "__main__":
    main()
