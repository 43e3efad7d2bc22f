"""One sim engine instance: vLLM-V1-style continuous batching in *engine time*.

Each step's duration is `PerfModel.step` of the scheduled work; the loop sleeps to the step's absolute wall
deadline before emitting that step's tokens. KV is held in blocks; when they run out, the newest running
requests are preempted (recompute). Knows nothing about HTTP: requests carry an optional `Chunker` that
renders their output, and routing between instances (pd hand-off) is a callback.
"""
from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from typing import Literal, Protocol

import numpy as np

from tasks.engines.sim_clock import EngineClock
from tasks.engines.sim_metrics import Metrics
from tasks.engines.sim_spec import SimSpec
from tasks.perf_spec import drafts
from tasks.perf_model import PerfModel, causal_context

Role = Literal["mixed", "prefill", "decode"]


class Chunker(Protocol):
    """Renders output tokens start..start+count as bytes for the client (`last`: the request is done)."""

    def chunk(self, start: int, count: int, last: bool) -> bytes: ...


class SimRequest:
    """One request's scheduling state (token counts) and its output buffer.

    `target` is how many tokens must have KV before the next token is sampled (the prompt; after a
    preemption, prompt + generated, recomputed). `computed` tokens have KV; `blocks` are held on `instance`.
    Without a chunker (non-streamed), `out` stays empty and the waiter wakes only when the request closes.
    """

    __slots__ = ("prompt_tokens", "max_tokens", "target", "computed", "generated", "blocks", "arrival",
                 "last_token_at", "sse", "out", "waiter", "closed", "aborted", "instance")

    def __init__(self, prompt_tokens: int, max_tokens: int, arrival: float, sse: Chunker | None) -> None:
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


# Called when a prefill-only instance has prefilled a request; its KV blocks stay held on `src` until the
# callee calls `src.release(req)`.
HandOff = Callable[["Instance", SimRequest], None]


class Instance:
    """A continuous-batching scheduler with its own engine timeline (`step_end`). `role`: mixed (agg/spec),
    prefill-only or decode-only (pd); a prefill-only instance passes each prefilled request to `hand_off`."""

    def __init__(self, spec: SimSpec, perf: PerfModel, role: Role, rng: np.random.Generator,
                 clock: EngineClock, metrics: Metrics, hand_off: HandOff) -> None:
        self.perf, self.role, self.rng = perf, role, rng
        self.clock, self.metrics, self.hand_off = clock, metrics, hand_off
        self.k = spec.num_speculative_tokens if spec.mode == "spec" else 0
        self.alpha = spec.acceptance_rate
        self.spec = spec.spec_decode(perf)  # what proposing the drafts costs a step
        self.block_size, self.max_seqs = spec.block_size, spec.max_num_seqs
        self.budget = spec.max_num_batched_tokens
        self.total_blocks = self.free_blocks = spec.kv_capacity_tokens // spec.block_size
        self.waiting: deque[SimRequest] = deque()
        self.running: list[SimRequest] = []
        self.wake = asyncio.Event()
        self.step_end = 0.0  # engine seconds at the end of the last step
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
        self.metrics.preemptions.inc()

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
        """The step has ended (engine time `self.step_end`): advance requests and emit their tokens."""
        now, k = self.step_end, self.k
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
                    self.hand_off(self, req)
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
            self._emit(req, count, now)
            if req.closed:
                self.release(req)
                leaving = True
        if leaving:  # finished, or prefilled on a prefill-only instance (now moving to a decoder)
            moved = self.role == "prefill"
            self.running = [r for r in self.running if not r.closed and not (moved and r.computed >= r.target)]
        m = self.metrics
        if gen:
            m.generation_tokens.inc(gen)
        if n_drafts:
            m.drafts.inc(n_drafts)
            m.draft_tokens.inc(n_draft_tokens)
            m.accepted.inc(n_accepted)

    def _emit(self, req: SimRequest, count: int, now: float) -> None:
        """Hand `count` tokens to `req` at engine time `now`, observing vLLM's latency metrics."""
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

    def _drafting_s(self, cost_args) -> float:
        """Seconds the step's decoding sequences spend proposing their drafts (0 without speculation)."""
        _, _, d_seqs, d_ctx, _, _ = cost_args
        cost = drafts(self.perf, d_seqs, d_ctx, self.spec) if d_seqs else None
        return 0.0 if cost is None else float(cost.seconds)

    async def run(self) -> None:
        clock = self.clock
        while True:
            sched, cost_args = self.schedule()
            if not sched:
                self.wake.clear()
                await self.wake.wait()
                self.step_end = max(self.step_end, clock.now())
                continue
            self.step_end += float(self.perf.step(*cost_args).seconds) + self._drafting_s(cost_args)
            await clock.sleep_until(self.step_end)
            self.metrics.note_lag(clock.now() - self.step_end)
            self.apply(sched)
