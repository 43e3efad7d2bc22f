"""Small OpenAI-style streaming servers for the benchmark client's tests, run as a subprocess.

The behaviour is chosen per request by the model name:
  stream    wait --ttft, then max_tokens chunks --itl apart, a usage chunk, [DONE]
  nousage   as stream, without the usage chunk
  error500  HTTP 500
  truncate  two chunks, then a clean end of the body without [DONE]
  nodone    as stream, the last token naming finish_reason "length", but no [DONE] (some servers omit it)
  abort     two chunks, then the connection is cut mid-body
  hang      headers, then nothing
  queue     one request at a time: hold a lock for --service seconds, then stream everything at once
  zero      no delay: every chunk, the usage and [DONE] in one write (the client-capacity endpoint)
  split     as zero, in 7-byte HTTP chunks (SSE lines cut anywhere)
  short     as stream, but one token fewer than max_tokens, and usage says so (an early EOS)
  heldback  as stream, but the first token's text is empty (a byte-level tokenizer holding back part of
            a UTF-8 character, as vLLM streams it) and the usage chunk comes 0.3 s after the last token
GET /stats: {"requests", "in_flight", "max_in_flight"} since the start or the last POST /stats/reset.
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


def _chunk(chat: bool, text: str | None = None, usage: dict | None = None, role: bool = False,
           finish: str | None = None) -> bytes:
    if usage is not None:
        body = {"id": "x", "choices": [], "usage": usage}
    elif chat:
        delta = {"role": "assistant", "content": ""} if role else {"content": text}
        body = {"id": "x", "object": "chat.completion.chunk",
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], "usage": None}
    else:
        body = {"id": "x", "object": "text_completion", "choices": [{"index": 0, "text": text, "finish_reason": finish}],
                "usage": None}
    return b"data: " + json.dumps(body).encode() + b"\n\n"


def make_app(ttft: float, itl: float, service: float) -> web.Application:
    lock = asyncio.Lock()
    stats = {"requests": 0, "in_flight": 0, "max_in_flight": 0}

    async def handle(request: web.Request) -> web.StreamResponse:
        stats["requests"] += 1
        stats["in_flight"] += 1
        stats["max_in_flight"] = max(stats["max_in_flight"], stats["in_flight"])
        try:
            return await respond(request)
        finally:
            stats["in_flight"] -= 1

    async def respond(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        chat = request.path.endswith("/chat/completions")
        mode, n = body["model"], int(body["max_tokens"])
        prompt = body["messages"][0]["content"] if chat else body["prompt"]
        if mode == "short":
            n = max(1, n - 1)
        usage = {"prompt_tokens": len(prompt.split()), "completion_tokens": n, "total_tokens": 0}
        if mode == "error500":
            return web.json_response({"error": {"message": "boom"}}, status=500)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        if mode in ("zero", "split"):
            sse = b"".join([*(_chunk(chat, f" t{i}") for i in range(n)), _chunk(chat, usage=usage),
                            b"data: [DONE]\n\n"])
            for k in range(0, len(sse), 7 if mode == "split" else len(sse)):
                await resp.write(sse[k:k + 7] if mode == "split" else sse)
            await resp.write_eof()
            return resp
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
                    finish = "length" if mode == "nodone" and i == n - 1 else None
                    await resp.write(_chunk(chat, "" if mode == "heldback" and not i else f" t{i}", finish=finish))
                if mode == "abort":
                    request.transport.close()
                    return resp
                if mode == "truncate":
                    await resp.write_eof()
                    return resp
            if mode == "heldback":
                await asyncio.sleep(0.3)  # not part of the request's latency: no token comes with it
            if mode != "nousage":
                await resp.write(_chunk(chat, usage=usage))
            if mode != "nodone":
                await resp.write(b"data: [DONE]\n\n")
            await resp.write_eof()
        except ConnectionResetError:  # the client went away (a request cancelled in flight)
            pass
        return resp

    async def get_stats(request: web.Request) -> web.Response:  # noqa: ARG001
        return web.json_response(stats)

    async def reset_stats(request: web.Request) -> web.Response:  # noqa: ARG001
        stats.update(requests=0, max_in_flight=stats["in_flight"])
        return web.json_response(stats)

    app = web.Application()
    app.router.add_get("/stats", get_stats)
    app.router.add_post("/stats/reset", reset_stats)
    app.router.add_post("/v1/completions", handle)
    app.router.add_post("/v1/chat/completions", handle)
    return app


class _ZeroProtocol(asyncio.Protocol):
    """--raw: a zero-delay completions endpoint without a web framework, so that a client-capacity
    benchmark measures the client, not the server. Every POST gets max_tokens chunks, usage and [DONE]
    in one chunked write on a kept-alive connection."""

    def __init__(self) -> None:
        self.buf = b""

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while (end := self.buf.find(b"\r\n\r\n")) >= 0:
            head = self.buf[:end].lower()
            i = head.find(b"content-length:")
            length = int(head[i + 15:].split(b"\r\n", 1)[0]) if i >= 0 else 0
            if len(self.buf) < end + 4 + length:
                return
            body = json.loads(self.buf[end + 4:end + 4 + length] or b"{}") if length else {}
            self.buf = self.buf[end + 4 + length:]
            method, path = head.split(b" ", 2)[:2]
            if method != b"post":  # e.g. a client polling /metrics
                self.transport.write(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
                continue
            self.transport.write(_zero_response(int(body.get("max_tokens", 16)), b"chat" in path))


def _zero_response(n: int, chat: bool) -> bytes:
    usage = {"prompt_tokens": 1, "completion_tokens": n, "total_tokens": n + 1}
    sse = b"".join([*(_chunk(chat, f" t{i}") for i in range(n)), _chunk(chat, usage=usage), b"data: [DONE]\n\n"])
    return (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
            + f"{len(sse):x}\r\n".encode() + sse + b"\r\n0\r\n\r\n")


async def _serve_raw() -> None:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = await asyncio.get_running_loop().create_server(_ZeroProtocol, sock=sock)
    print(sock.getsockname()[1], flush=True)
    async with server:
        await asyncio.Event().wait()


async def _serve(args: argparse.Namespace) -> None:
    if args.raw:
        return await _serve_raw()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    runner = web.AppRunner(make_app(args.ttft, args.itl, args.service), access_log=None)
    await runner.setup()
    await web.SockSite(runner, sock).start()
    print(sock.getsockname()[1], flush=True)
    await asyncio.Event().wait()


@contextmanager
def bench_server(ttft: float = 0.05, itl: float = 0.01, service: float = 0.02, raw: bool = False) -> Iterator[str]:
    """Yield the base URL of a server subprocess; it is terminated (by PID) on every path. `raw`: the
    framework-free zero-delay endpoint (every model name behaves as "zero")."""
    proc = subprocess.Popen(
        [sys.executable, __file__, "--ttft", str(ttft), "--itl", str(itl), "--service", str(service),
         *(["--raw"] if raw else [])],
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
    p.add_argument("--raw", action="store_true")
    asyncio.run(_serve(p.parse_args()))
