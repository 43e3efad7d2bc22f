"""Small OpenAI-style streaming servers for the benchmark client's tests, run as a subprocess.

The behaviour is chosen per request by the model name:
  stream    wait --ttft, then max_tokens chunks --itl apart, a usage chunk, [DONE]
  nousage   as stream, without the usage chunk
  error500  HTTP 500
  truncate  two chunks, then a clean end of the body without [DONE]
  abort     two chunks, then the connection is cut mid-body
  hang      headers, then nothing
  queue     one request at a time: hold a lock for --service seconds, then stream everything at once
`bench_server()` starts it on a free port of 127.0.0.1 and stops it by PID.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import socket
import subprocess
import sys
from contextlib import contextmanager
from typing import Iterator

from aiohttp import web


def _chunk(chat: bool, text: str | None = None, usage: dict | None = None, role: bool = False) -> bytes:
    if usage is not None:
        body = {"id": "x", "choices": [], "usage": usage}
    elif chat:
        delta = {"role": "assistant", "content": ""} if role else {"content": text}
        body = {"id": "x", "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": delta}], "usage": None}
    else:
        body = {"id": "x", "object": "text_completion", "choices": [{"index": 0, "text": text}], "usage": None}
    return b"data: " + json.dumps(body).encode() + b"\n\n"


def make_app(ttft: float, itl: float, service: float) -> web.Application:
    lock = asyncio.Lock()

    async def handle(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        chat = request.path.endswith("/chat/completions")
        mode, n = body["model"], int(body["max_tokens"])
        prompt = body["messages"][0]["content"] if chat else body["prompt"]
        usage = {"prompt_tokens": len(prompt.split()), "completion_tokens": n, "total_tokens": 0}
        if mode == "error500":
            return web.json_response({"error": {"message": "boom"}}, status=500)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        try:
            if chat:
                await resp.write(_chunk(chat, role=True))  # a role chunk at once: it is not the first token
            if mode == "queue":
                async with lock:
                    await asyncio.sleep(service)
                await resp.write(b"".join(_chunk(chat, f" t{i}") for i in range(n)))
            elif mode == "hang":
                await asyncio.sleep(3600)
            else:
                await asyncio.sleep(ttft)
                for i in range(2 if mode in ("truncate", "abort") else n):
                    if i:
                        await asyncio.sleep(itl)
                    await resp.write(_chunk(chat, f" t{i}"))
                if mode == "abort":
                    request.transport.close()
                    return resp
                if mode == "truncate":
                    await resp.write_eof()
                    return resp
            if mode != "nousage":
                await resp.write(_chunk(chat, usage=usage))
            await resp.write(b"data: [DONE]\n\n")
            await resp.write_eof()
        except ConnectionResetError:  # the client went away (a request cancelled in flight)
            pass
        return resp

    app = web.Application()
    app.router.add_post("/v1/completions", handle)
    app.router.add_post("/v1/chat/completions", handle)
    return app


async def _serve(args: argparse.Namespace) -> None:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    runner = web.AppRunner(make_app(args.ttft, args.itl, args.service), access_log=None)
    await runner.setup()
    await web.SockSite(runner, sock).start()
    print(sock.getsockname()[1], flush=True)
    await asyncio.Event().wait()


@contextmanager
def bench_server(ttft: float = 0.05, itl: float = 0.01, service: float = 0.02) -> Iterator[str]:
    """Yield the base URL of a server subprocess; it is terminated (by PID) on every path."""
    proc = subprocess.Popen(
        [sys.executable, __file__, "--ttft", str(ttft), "--itl", str(itl), "--service", str(service)],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        port = proc.stdout.readline().strip()  # '' if the server died before binding
        if not port:
            raise RuntimeError(f"bench test server did not start (exit {proc.wait()})")
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        proc.stdout.close()


def fetch(fn, base_url: str, model: str, reqs: list, timeout_s: float = 5.0) -> list:
    """Send reqs concurrently with a request function of `tasks.bench.client`; return the records."""
    from tasks.bench.client import new_session

    async def go():
        async with new_session() as session:
            return await asyncio.gather(
                *(fn(session, base_url, model, r, timeout_s, request_id=i) for i, r in enumerate(reqs)))

    return asyncio.run(go())


def free_closed_port() -> int:
    """A port nothing listens on (for connection errors)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--ttft", type=float, default=0.05)
    p.add_argument("--itl", type=float, default=0.01)
    p.add_argument("--service", type=float, default=0.02)
    asyncio.run(_serve(p.parse_args()))
