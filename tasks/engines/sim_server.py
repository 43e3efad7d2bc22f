"""Dolphin's sim engine: a real OpenAI-compatible HTTP server whose token timing is the performance model.

    python -m tasks.engines.sim_server --spec /abs/spec.json

It serves /v1/completions, /v1/chat/completions (streaming and not), /v1/models, /health and /metrics
(vLLM's metric names). Behind the HTTP layer, one scheduler per engine instance runs vLLM-V1-style
continuous batching in *engine time*: each step's duration is `PerfModel.step`, and the loop sleeps to the
step's absolute wall deadline (engine time / time_scale) before emitting that step's tokens.

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
import traceback
from collections import deque
from typing import Any, Literal

import numpy as np
import prometheus_client
import psutil
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from tasks.engines.sim_spec import SimSpec
from tasks.perf_model import PerfModel, causal_context
from tasks.tokenizer import VOCAB, count_tokens, token_text

DEFAULT_MAX_TOKENS = 16
LISTEN_MESSAGE = (
    "Dolphin sim engine (SIMULATED: timings from the performance model) listening on http://{host}:{port}"
)
SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
# The i-th generated token's text as a JSON string body (quotes stripped), precomputed once.
_TOKEN_JSON: list[str] = [json.dumps(token_text(i))[1:-1] for i in range(len(VOCAB))]

Role = Literal["mixed", "prefill", "decode"]


def _log(msg: str) -> None:
    print(msg, flush=True)


# ---------------------------------------------------------------- requests and their byte streams
class _SSE:
    """Pre-rendered pieces of one streamed response: a chunk is then a few string concatenations."""

    __slots__ = ("head_first", "head", "tail", "tail_last", "final")

    def __init__(self, chat: bool, rid: str, created: int, model_json: str, include_usage: bool,
                 prompt_tokens: int, max_tokens: int) -> None:
        obj = "chat.completion.chunk" if chat else "text_completion"
        pre = f'data: {{"id":"{rid}","object":"{obj}","created":{created},"model":{model_json},'
        if chat:
            # The role rides on the first content chunk, so chunks == tokens (OpenAI sends it alone).
            self.head_first = pre + '"choices":[{"index":0,"delta":{"role":"assistant","content":"'
            self.head = pre + '"choices":[{"index":0,"delta":{"content":"'
            close = '"},"logprobs":null,"finish_reason":'
        else:
            self.head_first = self.head = pre + '"choices":[{"index":0,"text":"'
            close = '","logprobs":null,"finish_reason":'
        self.tail = close + "null}]}\n\n"
        self.tail_last = close + '"length"}]}\n\n'
        usage = (
            pre + f'"choices":[],"usage":{{"prompt_tokens":{prompt_tokens},'
            f'"completion_tokens":{max_tokens},"total_tokens":{prompt_tokens + max_tokens}}}}}\n\n'
        )
        self.final = (usage if include_usage else "") + "data: [DONE]\n\n"

    def chunk(self, start: int, count: int, last: bool) -> bytes:
        text = "".join(_TOKEN_JSON[(start + i) % len(_TOKEN_JSON)] for i in range(count))
        head = self.head_first if start == 0 else self.head
        tail = self.tail_last + self.final if last else self.tail
        return (head + text + tail).encode()


class SimRequest:
    """One request's scheduling state (token counts) and its output buffer.

    `target` is how many tokens must have KV before the next token is sampled (the prompt; after a
    preemption, prompt + generated, recomputed). `computed` tokens have KV; `blocks` are held on `instance`.
    """

    __slots__ = ("prompt_tokens", "max_tokens", "target", "computed", "generated", "blocks", "arrival",
                 "last_token_at", "sse", "out", "waiter", "closed", "aborted", "instance")

    def __init__(self, prompt_tokens: int, max_tokens: int, arrival: float, sse: _SSE | None) -> None:
        self.prompt_tokens, self.max_tokens, self.arrival, self.sse = prompt_tokens, max_tokens, arrival, sse
        self.target, self.computed, self.generated, self.blocks = prompt_tokens, 0, 0, 0
        self.last_token_at = arrival
        self.out: list[bytes] = []
        self.waiter: asyncio.Future[None] | None = None
        self.closed = self.aborted = False
        self.instance: Instance | None = None

    def emit(self, count: int) -> None:
        """Append `count` new tokens (one chunk) and wake the handler."""
        start = self.generated
        self.generated += count
        self.closed = self.generated >= self.max_tokens
        if self.sse is not None:
            self.out.append(self.sse.chunk(start, count, self.closed))
        elif not self.closed:
            return
        w = self.waiter
        if w is not None and not w.done():
            w.set_result(None)

    async def wait(self) -> None:
        self.waiter = asyncio.get_running_loop().create_future()
        await self.waiter


# ---------------------------------------------------------------- metrics
class Metrics:
    """vLLM's metric names on a private registry (latencies in engine seconds)."""

    TTFT_BUCKETS = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                    20.0, 40.0, 80.0, 160.0, 640.0, 2560.0]
    ITL_BUCKETS = [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                   40.0, 80.0]
    E2E_BUCKETS = [0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
                   480.0, 960.0, 1920.0, 7680.0]

    def __init__(self, model_name: str, spec_decode: bool) -> None:
        r = self.registry = CollectorRegistry()
        lab = {"model_name": model_name}

        def labelled(cls: Any, name: str, doc: str, **kw: Any) -> Any:
            return cls(name, doc, ["model_name"], registry=r, **kw).labels(**lab)

        self.running = labelled(Gauge, "vllm:num_requests_running", "Requests in a running batch")
        self.waiting = labelled(Gauge, "vllm:num_requests_waiting", "Requests waiting to be scheduled")
        self.kv_usage = labelled(Gauge, "vllm:kv_cache_usage_perc", "KV-cache usage, 1 = 100 %")
        self.prompt_tokens = labelled(Counter, "vllm:prompt_tokens", "Prefilled prompt tokens")
        self.generation_tokens = labelled(Counter, "vllm:generation_tokens", "Generated tokens")
        self.success = Counter("vllm:request_success", "Finished requests", ["model_name", "finished_reason"],
                               registry=r).labels(model_name=model_name, finished_reason="length")
        self.preemptions = labelled(Counter, "vllm:num_preemptions", "Preemptions (recompute)")
        self.ttft = labelled(Histogram, "vllm:time_to_first_token_seconds", "TTFT (engine s)",
                             buckets=self.TTFT_BUCKETS)
        self.itl = labelled(Histogram, "vllm:inter_token_latency_seconds", "ITL (engine s)",
                            buckets=self.ITL_BUCKETS)
        self.e2e = labelled(Histogram, "vllm:e2e_request_latency_seconds", "E2E latency (engine s)",
                            buckets=self.E2E_BUCKETS)
        if spec_decode:
            self.drafts = labelled(Counter, "vllm:spec_decode_num_drafts", "Draft proposals")
            self.draft_tokens = labelled(Counter, "vllm:spec_decode_num_draft_tokens", "Draft tokens")
            self.accepted = labelled(Counter, "vllm:spec_decode_num_accepted_tokens", "Accepted draft tokens")
        labelled(Gauge, "dolphin:simulated", "1: this engine is Dolphin's simulator").set(1)
        # How late (engine s) a step's tokens went out at worst: > a few ms means this process cannot keep up
        # with the chosen time_scale and measured latencies are inflated.
        self.max_lag = labelled(Gauge, "dolphin:sim_max_lag_seconds", "Worst emission lag behind engine time")


# ---------------------------------------------------------------- one engine instance
class Instance:
    """A continuous-batching scheduler on its own engine clock. `role`: mixed (agg/spec), prefill-only
    or decode-only (pd). The server routes requests between instances."""

    def __init__(self, srv: SimServer, perf: PerfModel, role: Role, rng: np.random.Generator) -> None:
        spec = srv.spec
        self.srv, self.perf, self.role, self.rng = srv, perf, role, rng
        self.k = spec.num_speculative_tokens if spec.mode == "spec" else 0
        self.alpha = spec.acceptance_rate
        self.block_size, self.max_seqs = spec.block_size, spec.max_num_seqs
        self.budget = spec.max_num_batched_tokens
        self.total_blocks = self.free_blocks = spec.kv_capacity_tokens // spec.block_size
        self.waiting: deque[SimRequest] = deque()
        self.running: list[SimRequest] = []
        self.wake = asyncio.Event()
        self.clock = 0.0  # engine seconds at the end of the last step
        self._aborted = 0

    @property
    def load(self) -> int:
        return len(self.waiting) + len(self.running)

    def submit(self, req: SimRequest) -> None:
        req.instance = self
        self.waiting.append(req)
        self.wake.set()

    def abort(self, req: SimRequest) -> None:
        req.aborted = True
        if req in self.waiting:
            self.waiting.remove(req)
        else:
            self._aborted += 1  # dropped (blocks freed) at the next schedule, never mid-step

    # -- KV blocks
    def _reserve(self, req: SimRequest, tokens: int) -> bool:
        need = -(-tokens // self.block_size) - req.blocks
        if need > self.free_blocks:
            return False
        if need > 0:
            self.free_blocks -= need
            req.blocks += need
        return True

    def release(self, req: SimRequest) -> None:
        self.free_blocks += req.blocks
        req.blocks = 0

    def _preempt(self, req: SimRequest) -> None:
        """Recompute-style preemption: drop its KV, prefill prompt + generated again later."""
        self.release(req)
        req.computed, req.target = 0, req.prompt_tokens + req.generated
        self.waiting.appendleft(req)
        self.srv.metrics.preemptions.inc()

    def _make_room(self, req: SimRequest, tokens: int) -> bool:
        """Reserve KV for `req`, preempting the newest running requests; False if `req` itself went."""
        while not self._reserve(req, tokens):
            victim = self.running.pop()
            self._preempt(victim)
            if victim is req:
                return False
        return True

    # -- one step
    def schedule(self) -> tuple[list[tuple[SimRequest, int, bool]], tuple[float, ...]]:
        """Pick this step's work: running requests first, then FCFS admission with what budget is left."""
        if self._aborted:
            for r in self.running:
                if r.aborted:
                    self.release(r)
            self.running = [r for r in self.running if not r.aborted]
            self._aborted = 0
        budget, sched = self.budget, []
        p_tok = p_ctx = p_prefix = d_seqs = d_tok = d_ctx = 0.0
        running, preempted, i = self.running, False, 0
        while i < len(running) and budget > 0:
            req = running[i]
            prefill = req.computed < req.target
            if prefill:
                n = min(req.target - req.computed, budget)
            else:  # verify at most k drafts, and none beyond max_tokens (there is nothing to draft for)
                n = min(1 + self.k, budget, req.max_tokens - req.generated)
            before = len(running)
            room = self._make_room(req, req.computed + n)
            preempted = preempted or len(running) < before
            if not room:
                break
            sched.append((req, n, prefill))
            budget -= n
            i += 1
        waiting = self.waiting
        while not preempted and waiting and budget > 0 and len(running) < self.max_seqs:
            req = waiting[0]
            n = min(req.target - req.computed, budget)
            if not self._reserve(req, req.computed + n):
                break
            waiting.popleft()
            running.append(req)
            sched.append((req, n, True))
            budget -= n
        for req, n, prefill in sched:
            if prefill:
                p_tok += n
                p_ctx += causal_context(req.computed, n)
                p_prefix += req.computed
            else:
                d_seqs += 1
                d_tok += n
                d_ctx += req.computed
        return sched, (p_tok, p_ctx, d_seqs, d_ctx, d_tok / d_seqs if d_seqs else 1.0, p_prefix)

    def apply(self, sched: list[tuple[SimRequest, int, bool]]) -> None:
        """The step has ended (engine time `self.clock`): advance requests and emit their tokens."""
        srv, now, k = self.srv, self.clock, self.k
        drafts = self.rng.geometric(1.0 - self.alpha, size=len(sched)) - 1 if k else None
        gen = n_drafts = n_draft_tokens = n_accepted = 0
        leaving = False
        for idx, (req, n, prefill) in enumerate(sched):
            if req.aborted:
                continue
            if prefill:
                req.computed += n
                if req.computed < req.target:
                    continue
                if self.role == "prefill":
                    srv.hand_off(self, req)
                    leaving = True
                    continue
                count = 1
            else:
                count = 1
                if drafts is not None and n > 1:  # each draft accepted with prob alpha up to the first miss
                    accepted = min(int(drafts[idx]), n - 1)
                    n_drafts += 1
                    n_draft_tokens += n - 1
                    n_accepted += accepted
                    count = accepted + 1  # the verified drafts plus the target model's own token
                req.computed += count
            gen += count
            srv.emit(req, count, now)
            if req.closed:
                self.release(req)
                leaving = True
        if leaving:  # finished, or prefilled on a prefill-only instance (now moving to a decoder)
            moved = self.role == "prefill"
            self.running = [r for r in self.running if not r.closed and not (moved and r.computed >= r.target)]
        if gen:
            srv.metrics.generation_tokens.inc(gen)
        if n_drafts:
            m = srv.metrics
            m.drafts.inc(n_drafts)
            m.draft_tokens.inc(n_draft_tokens)
            m.accepted.inc(n_accepted)

    async def run(self) -> None:
        srv = self.srv
        while True:
            sched, cost_args = self.schedule()
            if not sched:
                self.wake.clear()
                await self.wake.wait()
                self.clock = max(self.clock, srv.engine_now())
                continue
            self.clock += float(self.perf.step(*cost_args).seconds)
            await srv.sleep_until(self.clock)
            srv.note_lag(srv.engine_now() - self.clock)
            self.apply(sched)


# ---------------------------------------------------------------- the server
class HttpError(Exception):
    def __init__(self, status: int, message: str, kind: str = "BadRequestError") -> None:
        super().__init__(message)
        self.status, self.kind = status, kind


def _error(status: int, message: str, kind: str) -> web.Response:
    body = {"error": {"message": message, "type": kind, "param": None, "code": status}}
    return web.json_response(body, status=status)


def _text_tokens(content: Any) -> int:
    if isinstance(content, str):
        return count_tokens(content)
    if isinstance(content, list):  # OpenAI content parts
        return sum(count_tokens(p.get("text", "")) for p in content if isinstance(p, dict))
    if content is None:
        return 0
    raise HttpError(400, "message content must be a string or a list of content parts")


def _prompt_tokens(body: dict[str, Any], chat: bool) -> int:
    if chat:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise HttpError(400, "'messages' must be a non-empty list")
        return sum(_text_tokens(m.get("content")) for m in messages if isinstance(m, dict))
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, str):
        return count_tokens(prompt)
    if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
        return len(prompt)  # token ids
    raise HttpError(400, "'prompt' must be a string, a list of one string, or a list of token ids")


def _max_tokens(body: dict[str, Any], chat: bool) -> int:
    value = body.get("max_completion_tokens") if chat else None
    value = body.get("max_tokens") if value is None else value
    if value is None:
        return DEFAULT_MAX_TOKENS
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise HttpError(400, f"max_tokens must be an integer >= 1, got {value!r}")
    return value


class SimServer:
    def __init__(self, spec: SimSpec) -> None:
        self.spec = spec
        self.metrics = Metrics(spec.served_model_name, spec.mode == "spec")
        self._model_json = json.dumps(spec.served_model_name)
        self._ids = itertools.count()
        self.received = 0
        self.stop = asyncio.Event()
        self.loop = asyncio.get_running_loop()
        self.t0 = self.loop.time()
        self.scale = spec.time_scale
        self.max_lag = 0.0

        def pool(n: int, tp: int, role: Role, first: int) -> list[Instance]:
            model = spec.perf_model(tp)
            return [Instance(self, model, role, np.random.default_rng([spec.seed, first + i])) for i in range(n)]

        if spec.mode == "pd":
            self.entry = pool(spec.prefill_instances, spec.prefill_tp, "prefill", 0)
            self.decoders = pool(spec.decode_instances, spec.decode_tp, "decode", spec.prefill_instances)
        else:
            self.entry = self.decoders = pool(1, spec.tp, "mixed", 0)
        self.instances = list(dict.fromkeys(self.entry + self.decoders))
        self.tasks: list[asyncio.Task[None]] = []
        m = self.metrics
        m.running.set_function(lambda: sum(len(i.running) for i in self.instances))
        m.waiting.set_function(lambda: sum(len(i.waiting) for i in self.instances))
        total = sum(i.total_blocks for i in self.instances)
        m.kv_usage.set_function(lambda: sum(i.total_blocks - i.free_blocks for i in self.instances) / total)

    # -- engine clock
    def engine_now(self) -> float:
        return (self.loop.time() - self.t0) * self.scale

    def wall_at(self, engine_t: float) -> float:
        return self.t0 + engine_t / self.scale

    async def sleep_until(self, engine_t: float) -> None:
        delay = self.wall_at(engine_t) - self.loop.time()
        await asyncio.sleep(delay if delay > 0 else 0)

    def note_lag(self, lag: float) -> None:
        if lag > self.max_lag:
            self.max_lag = lag
            self.metrics.max_lag.set(lag)

    # -- routing between instances
    def submit(self, req: SimRequest) -> None:
        min(self.entry, key=lambda i: i.load).submit(req)

    def hand_off(self, src: Instance, req: SimRequest) -> None:
        """Prefill done on `src`: move its KV to a decode instance (its blocks stay held until moved)."""
        done_at = src.clock + src.perf.kv_transfer_s(req.computed)
        self.loop.call_at(self.wall_at(done_at), self._deliver, src, req)

    def _deliver(self, src: Instance, req: SimRequest) -> None:
        src.release(req)
        src.wake.set()
        if req.aborted:
            return
        # The decode instance holds the prompt's KV and computes the last prompt token to sample the first.
        req.computed = req.target - 1
        min(self.decoders, key=lambda i: i.load).submit(req)

    def emit(self, req: SimRequest, count: int, now: float) -> None:
        m = self.metrics
        if req.generated == 0:
            m.ttft.observe(now - req.arrival)
            m.prompt_tokens.inc(req.prompt_tokens)
        else:
            m.itl.observe(now - req.last_token_at)
        req.last_token_at = now
        req.emit(count)
        if req.closed:
            m.e2e.observe(now - req.arrival)
            m.success.inc()

    def start_engine(self) -> None:
        for inst in self.instances:
            task = self.loop.create_task(inst.run())
            task.add_done_callback(self._engine_died)
            self.tasks.append(task)
        if self.spec.parent_pid is not None:
            self.tasks.append(self.loop.create_task(self._watch_parent(self.spec.parent_pid)))

    @staticmethod
    def _engine_died(task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            _log("sim engine loop crashed:\n" + "".join(traceback.format_exception(exc)))
            os._exit(1)

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

    def _parse(self, body: Any, chat: bool) -> tuple[int, int]:
        if not isinstance(body, dict):
            raise HttpError(400, "request body must be a JSON object")
        model = body.get("model")
        if model is not None and model != self.spec.served_model_name:
            raise HttpError(404, f"The model `{model}` does not exist.", "NotFoundError")
        if body.get("n", 1) != 1:
            raise HttpError(400, "the sim engine supports n=1 only")
        prompt, max_tokens = _prompt_tokens(body, chat), _max_tokens(body, chat)
        if prompt < 1:
            raise HttpError(400, "the prompt is empty")
        limit = self.spec.max_model_len
        if prompt + max_tokens > limit:
            raise HttpError(
                400,
                f"This model's maximum context length is {limit} tokens. However, you requested "
                f"{prompt + max_tokens} tokens ({prompt} in the prompt, {max_tokens} in the completion). "
                "Please reduce the length of the prompt or completion.",
            )
        return prompt, max_tokens

    async def _serve(self, request: web.Request, chat: bool) -> web.StreamResponse:
        self._count_request()
        try:
            try:
                body = await request.json()
            except ValueError as exc:
                raise HttpError(400, f"invalid JSON body: {exc}") from None
            prompt, max_tokens = self._parse(body, chat)
        except HttpError as exc:
            return _error(exc.status, str(exc), exc.kind)
        stream = bool(body.get("stream", False))
        include_usage = stream and bool((body.get("stream_options") or {}).get("include_usage", False))
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{next(self._ids)}"
        created = int(time.time())
        sse = _SSE(chat, rid, created, self._model_json, include_usage, prompt, max_tokens) if stream else None
        req = SimRequest(prompt, max_tokens, self.engine_now(), sse)
        self.submit(req)
        try:
            if stream:
                return await self._stream(request, req)
            while not req.closed:
                await req.wait()
        except asyncio.CancelledError:
            self._abort(req)
            raise
        return web.json_response(self._full_response(chat, rid, created, req))

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
        except ConnectionError:  # the client went away: free its slot and KV, as vLLM aborts it
            self._abort(req)
        return resp

    def _abort(self, req: SimRequest) -> None:
        if not req.closed and req.instance is not None:
            req.instance.abort(req)

    def _full_response(self, chat: bool, rid: str, created: int, req: SimRequest) -> dict[str, Any]:
        text = "".join(token_text(i) for i in range(req.max_tokens))
        if chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                      "finish_reason": "length"}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": "length", "stop_reason": None}
        usage = {"prompt_tokens": req.prompt_tokens, "completion_tokens": req.max_tokens,
                 "total_tokens": req.prompt_tokens + req.max_tokens}
        return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": created,
                "model": self.spec.served_model_name, "choices": [choice], "usage": usage}


# ---------------------------------------------------------------- process entry
def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return socket.create_server((host, port), family=family, backlog=1024)


async def serve(spec: SimSpec) -> None:
    srv = SimServer(spec)
    runner = web.AppRunner(srv.app(), access_log=None, shutdown_timeout=0.5)
    await runner.setup()
    try:
        sock = _bind(spec.host, spec.port)
    except OSError as exc:
        _log(f"sim engine cannot bind {spec.host}:{spec.port}: {exc}")
        await runner.cleanup()
        sys.exit(1)
    await web.SockSite(runner, sock).start()
    srv.start_engine()
    for sig in (signal.SIGTERM, signal.SIGINT):
        srv.loop.add_signal_handler(sig, srv.stop.set)
    _log(
        f"sim engine: model={spec.model.name} gpu={spec.gpu.name} mode={spec.mode} weights={spec.weights_dtype} "
        f"kv={spec.kv_dtype} kv_capacity_tokens={spec.kv_capacity_tokens} time_scale={spec.time_scale}"
    )
    _log(LISTEN_MESSAGE.format(host=spec.host, port=sock.getsockname()[1]))
    await srv.stop.wait()
    _log("sim engine shutting down")
    for task in srv.tasks:
        task.cancel()
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
