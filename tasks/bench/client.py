"""Streaming request functions for OpenAI-compatible servers, one per API (as vLLM's
`vllm/benchmarks/lib/endpoint_request_func.py`).

They measure wall-clock seconds with `time.perf_counter` and never raise: a failure is a record with
ok=False and `error` = "<class>: <detail>", class one of ERROR_CLASSES. Engine-time conversion is done
by `tasks.bench.metrics`, not here.

The SSE parser is cheap on purpose (one client process drives thousands of chunks/s): chunks are only
json-decoded until the first token and for the usage chunk; every other `data:` line is counted by a
byte test.
"""
from __future__ import annotations

import asyncio
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable

import aiohttp

from tasks.bench.http import BodyTruncated, LeanSession
from tasks.contracts import BenchRequest

# "cancelled": still in flight when the search ended its level early (its verdict was already decided).
ERROR_CLASSES = ("http", "timeout", "connection", "truncated", "server", "empty", "client", "cancelled")


@dataclass
class RequestRecord:
    """One request as measured. Times in seconds; latencies count from `scheduled_s` + `queue_s` (the
    scheduled send), not the actual send, which is `send_lag_s` later."""

    level: int
    request_id: int
    scheduled_s: float  # offset of the scheduled send from the level start
    send_lag_s: float  # actual send - scheduled send
    prompt_tokens: int
    output_tokens: int = 0
    ttft_s: float | None = None
    e2el_s: float | None = None  # for failures: time until the failure
    itl_s: list[float] = field(default_factory=list)
    ok: bool = False
    error: str | None = None
    requested_tokens: int = 0  # max_tokens asked for (0: unknown, records from before this field)
    usage_reported: bool = False  # output_tokens came from the server's usage, not the chunk count
    queue_s: float = 0.0  # closed loop: time waiting for a concurrency slot, before `scheduled_s` counts
    tpot_s: float | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        # Derived, so `dataclasses.replace` (time scaling) keeps it consistent.
        if self.ok and self.output_tokens > 1 and self.ttft_s is not None and self.e2el_s is not None:
            self.tpot_s = (self.e2el_s - self.ttft_s) / (self.output_tokens - 1)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RequestRecord":
        return cls(**{k: v for k, v in d.items() if k != "tpot_s"})


def load_records(path: str | Path) -> list[RequestRecord]:
    """Read a requests.jsonl written by the SLO search."""
    with open(path) as f:
        return [RequestRecord.from_dict(json.loads(line)) for line in f if line.strip()]


# Which chunks carry a token, as `vllm bench serve` counts them. A completions chunk with choices does,
# even with empty text: vLLM streams one per new token id, and a byte-level tokenizer holds back the text
# of a partial UTF-8 character (waiting for text would move TTFT a token or two late).
def _completion_token(msg: dict) -> bool:
    return bool(msg.get("choices"))


def _chat_token(msg: dict) -> bool:
    """A chat chunk with content, or any delta but the role-only opener (`{"role": "assistant",
    "content": ""}`), which some servers send before the first token."""
    choices = msg.get("choices")
    if not choices:
        return False
    delta = choices[0].get("delta") or {}
    return bool(delta.get("content") or delta.get("reasoning_content") or "role" not in delta)


class _Stream:
    """State of one SSE response: token timestamps, usage, [DONE]."""

    def __init__(self, start: float, is_token: Callable[[dict], bool]):
        self.start = start
        self.is_token = is_token
        self.ttft: float | None = None
        self.last_token = start  # the request's end, as vLLM's: its last token chunk, not the usage chunk
        self.itl: list[float] = []
        self.chunks = 0
        self.usage: dict | None = None
        self.done = False
        self.last_body = b""  # the last token chunk, checked for a finish_reason if [DONE] never comes
        self.error: str | None = None
        self.got_headers = False

    def _token(self, t: float) -> None:
        self.chunks += 1
        if self.ttft is None:
            self.ttft = t - self.start
        else:
            self.itl.append(t - self.last_token)
        self.last_token = t

    def feed(self, line: bytes, t: float) -> None:
        if not line.startswith(b"data:"):
            return  # blank event separators, comments, `event:` lines
        body = line[5:].strip()
        if body == b"[DONE]":
            self.done = True
            return
        # Fast path: after the first token a chunk is a token unless it carries usage or an error.
        # A false match (a token whose text is literally "error") only costs one json.loads.
        if self.ttft is not None and b'"completion_tokens"' not in body and b'"error"' not in body:
            self._token(t)
            self.last_body = body
            return
        msg = json.loads(body)
        if msg.get("error") or msg.get("object") == "error":  # {"error": {...}} or vLLM's older ErrorResponse
            err = msg.get("error") or msg
            self.error = f"server: {err.get('message', err) if isinstance(err, dict) else err}"
            return
        if self.is_token(msg) or (self.ttft is not None and msg.get("choices")):
            self._token(t)
            self.last_body = body
        if msg.get("usage"):
            self.usage = msg["usage"]


class _Lines:
    """Body bytes -> SSE lines fed to a _Stream, one timestamp per read (chunks read together arrived
    together)."""

    def __init__(self, st: _Stream):
        self.st, self.buf = st, b""

    def __call__(self, data: bytes) -> bool:
        t = time.perf_counter()
        *lines, self.buf = (self.buf + data).split(b"\n")
        feed = self.st.feed
        for line in lines:
            if len(line) > 1:  # not an event separator ("" or "\r"): half the lines, skipped cheaply
                feed(line, t)
        return self.st.error is not None  # stop reading

    def flush(self) -> None:
        if self.buf and self.st.error is None:
            self.st.feed(self.buf, time.perf_counter())


async def _lean_post(session: LeanSession, url: str, payload: dict, st: _Stream) -> None:
    lines = _Lines(st)

    def on_headers(status: int) -> None:  # noqa: ARG001 - only called for a 200
        st.got_headers = True

    status, body = await session.post_stream(url, json.dumps(payload).encode(), on_headers, lines)
    if status != 200:
        st.error = f"http: status {status}: {(body or b'').decode(errors='replace')[:200]}"
    else:
        lines.flush()


async def _aiohttp_post(session: aiohttp.ClientSession, url: str, payload: dict, st: _Stream,
                        timeout_s: float) -> None:
    async with session.post(url, json=payload, timeout=aiohttp.ClientTimeout(total=timeout_s)) as resp:
        if resp.status != 200:
            st.error = f"http: status {resp.status}: {(await resp.text())[:200]}"
            return
        st.got_headers = True
        lines = _Lines(st)
        async for data in resp.content.iter_any():
            if lines(data):
                break
        lines.flush()


async def _stream_request(
    session: LeanSession | aiohttp.ClientSession,
    url: str,
    payload: dict,
    is_token: Callable[[dict], bool],
    req: BenchRequest,
    timeout_s: float,
    level: int,
    request_id: int,
    scheduled_s: float,
    start: float | None,
) -> RequestRecord:
    start = time.perf_counter() if start is None else start
    sent = time.perf_counter()
    st = _Stream(start, is_token)
    try:
        if isinstance(session, LeanSession):
            async with asyncio.timeout(timeout_s):
                await _lean_post(session, url, payload, st)
        else:
            await _aiohttp_post(session, url, payload, st, timeout_s)
    except TimeoutError:  # asyncio.TimeoutError is TimeoutError on 3.11; aiohttp's timeouts subclass it
        st.error = f"timeout: no complete response within {timeout_s:.3g}s"
    except (aiohttp.ClientPayloadError, BodyTruncated) as exc:
        st.error = f"truncated: {exc}"
    except (aiohttp.ClientConnectionError, OSError) as exc:  # OSError: refused, reset (ConnectionError)
        st.error = f"{'truncated' if st.got_headers else 'connection'}: {type(exc).__name__}: {exc}"
    except (ValueError, KeyError, IndexError, TypeError, AttributeError) as exc:
        st.error = f"server: unparseable chunk: {type(exc).__name__}: {exc}"
    except Exception as exc:  # noqa: BLE001 - a request never takes the whole level down
        st.error = f"client: {type(exc).__name__}: {exc}"
    if st.error is None and not st.done and not _finished(st.last_body):
        # Some servers omit [DONE]; a stream whose last token chunk names a finish_reason still completed.
        st.error = "truncated: stream ended without [DONE] or a finish_reason"
    if st.error is None and st.ttft is None:
        st.error = "empty: no tokens streamed"
    usage = st.usage or {}
    ok = st.error is None
    return RequestRecord(
        level=level,
        request_id=request_id,
        scheduled_s=scheduled_s,
        send_lag_s=sent - start,
        prompt_tokens=int(usage.get("prompt_tokens") or req.prompt_tokens),
        output_tokens=int(usage.get("completion_tokens") or st.chunks),
        requested_tokens=req.max_tokens,
        usage_reported="completion_tokens" in usage,
        ttft_s=st.ttft,
        e2el_s=(st.last_token if ok else time.perf_counter()) - start,
        itl_s=st.itl,
        ok=ok,
        error=st.error,
    )


def _finished(body: bytes) -> bool:
    """Does this chunk name a finish_reason ("length", "stop", ...), not null?"""
    if b'"finish_reason"' not in body:
        return False
    choices = json.loads(body).get("choices") or [{}]
    return bool(choices[0].get("finish_reason"))


_COMMON = {"stream": True, "stream_options": {"include_usage": True}, "temperature": 0.0}


async def request_completions(
    session: aiohttp.ClientSession, base_url: str, model: str, req: BenchRequest, timeout_s: float,
    *, level: int = 0, request_id: int = 0, scheduled_s: float = 0.0, start: float | None = None,
    ignore_eos: bool = True,
) -> RequestRecord:
    """POST /v1/completions. `start`: the perf_counter time latencies count from (default: now)."""
    payload = {"model": model, "prompt": req.prompt, "max_tokens": req.max_tokens, "ignore_eos": ignore_eos,
               **_COMMON}
    return await _stream_request(session, base_url.rstrip("/") + "/v1/completions", payload, _completion_token,
                                 req, timeout_s, level, request_id, scheduled_s, start)


async def request_chat(
    session: aiohttp.ClientSession, base_url: str, model: str, req: BenchRequest, timeout_s: float,
    *, level: int = 0, request_id: int = 0, scheduled_s: float = 0.0, start: float | None = None,
    ignore_eos: bool = True,
) -> RequestRecord:
    """POST /v1/chat/completions with the prompt as one user message."""
    payload = {"model": model, "messages": [{"role": "user", "content": req.prompt}],
               "max_tokens": req.max_tokens, "ignore_eos": ignore_eos, **_COMMON}
    return await _stream_request(session, base_url.rstrip("/") + "/v1/chat/completions", payload, _chat_token,
                                 req, timeout_s, level, request_id, scheduled_s, start)


RequestFn = Callable[..., Awaitable[RequestRecord]]
REQUEST_FUNCS: dict[str, RequestFn] = {"completions": request_completions, "chat": request_chat}


def new_session(kind: str | None = None) -> LeanSession | aiohttp.ClientSession:
    """One per level: no connection limit, so arrivals are never queued client-side. `kind`: "lean"
    (tasks.bench.http, the default) or "aiohttp"; default from $DOLPHIN_BENCH_HTTP."""
    kind = kind or os.environ.get("DOLPHIN_BENCH_HTTP", "lean")
    if kind == "aiohttp":
        return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
    if kind != "lean":
        raise ValueError(f"DOLPHIN_BENCH_HTTP={kind!r}: use lean or aiohttp")
    return LeanSession()


async def preconnect(session: LeanSession | aiohttp.ClientSession, base_url: str, n: int) -> int:
    """Open up to n keep-alive connections to base_url ahead of the sends (lean sessions only); a
    connection that fails is left to the requests to report. Returns how many opened."""
    if not isinstance(session, LeanSession) or n < 1:
        return 0
    return await session.preconnect(base_url, n)


def error_class(record: RequestRecord) -> str | None:
    return record.error.split(":", 1)[0] if record.error else None
