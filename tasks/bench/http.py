"""A lean HTTP/1.1 client for streaming POSTs: keep-alive connections on asyncio streams, a pre-encoded
request head, and a chunked-transfer decoder that hands body bytes straight to the SSE parser.

Why not aiohttp: a benchmark client's ceiling is its CPU per request. aiohttp builds request and response
objects, header multidicts, timers and trace hooks for every request, several times the cost of this
path; the client would measure its own limits before the server's. Only what an OpenAI-compatible
server sends is supported: plain HTTP, Content-Length, chunked or close-delimited bodies.
"""
from __future__ import annotations

import asyncio
from typing import Callable
from urllib.parse import SplitResult, urlsplit


class ServerDisconnected(ConnectionError):
    """The connection closed before a response began."""


class BodyTruncated(ConnectionError):
    """The connection closed, or the framing broke, in the middle of a response body."""


Conn = tuple[asyncio.StreamReader, asyncio.StreamWriter]


def _host_port(u: SplitResult) -> tuple[str, int]:
    return u.hostname or "127.0.0.1", u.port or 80


class LeanSession:
    """Idle keep-alive connections per (host, port); no connection limit (arrivals are never queued
    client-side). Use `async with`."""

    def __init__(self) -> None:
        self.idle: dict[tuple[str, int], list[Conn]] = {}
        self.open: set[asyncio.StreamWriter] = set()

    async def __aenter__(self) -> LeanSession:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        for w in list(self.open):
            w.close()
        self.open.clear()
        self.idle.clear()

    async def _connect(self, host: str, port: int) -> tuple[Conn, bool]:
        pool = self.idle.get((host, port))
        while pool:
            reader, writer = pool.pop()
            if not writer.is_closing() and not reader.at_eof():
                return (reader, writer), True
            self._drop(writer)
        return await self._open(host, port), False

    async def _open(self, host: str, port: int) -> Conn:
        reader, writer = await asyncio.open_connection(host, port, limit=1 << 20)
        self.open.add(writer)
        return reader, writer

    async def preconnect(self, url: str, n: int, timeout_s: float = 2.0) -> int:
        """Put up to n fresh connections to url's host in the idle pool; failures are ignored (the
        requests will meet and report them). Returns how many opened."""
        host, port = _host_port(urlsplit(url))
        attempts = [asyncio.ensure_future(self._open(host, port)) for _ in range(n)]
        done, slow = await asyncio.wait(attempts, timeout=timeout_s)
        for t in slow:
            t.cancel()
        opened = [t.result() for t in done if t.exception() is None]
        self.idle.setdefault((host, port), []).extend(opened)
        return len(opened)

    def _drop(self, writer: asyncio.StreamWriter) -> None:
        self.open.discard(writer)
        writer.close()

    async def post_stream(self, url: str, body: bytes, on_headers: Callable[[int], None],
                          on_data: Callable[[bytes], bool]) -> tuple[int, bytes | None]:
        """POST `body` (JSON) to `url`. On a 200, `on_headers(200)` and then `on_data(bytes)` for each
        piece of the decoded body as it arrives (return True to stop reading: the connection is then
        dropped). Returns (status, None) after a 200, else (status, its body). Raises
        ServerDisconnected, BodyTruncated or OSError."""
        u = urlsplit(url)
        host, port = _host_port(u)
        head = (f"POST {u.path or '/'} HTTP/1.1\r\nHost: {u.netloc}\r\nContent-Type: application/json\r\n"
                f"Accept: text/event-stream\r\nContent-Length: {len(body)}\r\n\r\n").encode()
        for attempt in (0, 1):
            (reader, writer), reused = await self._connect(host, port)
            try:
                writer.write(head + body)
                status_line = await reader.readline()
                if not status_line:
                    raise ServerDisconnected("server closed the connection before responding")
            except (ServerDisconnected, ConnectionResetError, BrokenPipeError):
                self._drop(writer)
                if reused and attempt == 0:  # a kept-alive connection the server had already closed
                    continue
                raise
            except BaseException:
                self._drop(writer)
                raise
            break
        try:
            status, err_body, reusable = await self._read_response(reader, status_line, on_headers, on_data)
        except BaseException:
            self._drop(writer)
            raise
        if reusable:
            self.idle.setdefault((host, port), []).append((reader, writer))
        else:
            self._drop(writer)
        return status, err_body

    async def _read_response(self, reader: asyncio.StreamReader, status_line: bytes,
                             on_headers: Callable[[int], None],
                             on_data: Callable[[bytes], bool]) -> tuple[int, bytes | None, bool]:
        """(status, the body of a non-200 or None, whether the connection can be reused)."""
        try:
            status = int(status_line.split(None, 2)[1])
        except (IndexError, ValueError):
            raise BodyTruncated(f"bad status line {status_line[:60]!r}") from None
        length, chunked, close = None, False, False
        while True:
            line = await reader.readline()
            if not line.endswith(b"\n"):
                raise BodyTruncated("connection closed in the response headers")
            if line in (b"\r\n", b"\n"):
                break
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            value = value.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"transfer-encoding" and b"chunked" in value:
                chunked = True
            elif name == b"connection" and value == b"close":
                close = True
        framed = chunked or length is not None
        if status != 200:
            parts: list[bytes] = []
            await _read_body(reader, length, chunked, lambda b: parts.append(b) is not None)
            return status, b"".join(parts), framed and not close
        on_headers(status)
        done = await _read_body(reader, length, chunked, on_data)
        return status, None, done and framed and not close


async def _read_body(reader: asyncio.StreamReader, length: int | None, chunked: bool,
                     on_data: Callable[[bytes], bool]) -> bool:
    """Feed the body to on_data; False when on_data asked to stop. Raises BodyTruncated."""
    if chunked:
        while True:
            size_line = await reader.readline()
            if not size_line.endswith(b"\n"):
                raise BodyTruncated("connection closed in the middle of the chunked body")
            try:
                size = int(size_line.split(b";", 1)[0], 16)
            except ValueError:
                raise BodyTruncated(f"bad chunk size line {size_line[:40]!r}") from None
            if size == 0:
                while (await reader.readline()) not in (b"\r\n", b"\n", b""):
                    pass  # trailers
                return True
            try:
                data = await reader.readexactly(size + 2)
            except asyncio.IncompleteReadError:
                raise BodyTruncated("connection closed in the middle of a chunk") from None
            if on_data(data[:-2]):
                return False
    if length is not None:
        left = length
        while left > 0:
            data = await reader.read(min(left, 1 << 16))
            if not data:
                raise BodyTruncated(f"connection closed {left} bytes before the body's end")
            left -= len(data)
            if on_data(data):
                return False
        return True
    while data := await reader.read(1 << 16):  # close-delimited
        if on_data(data):
            return False
    return True
