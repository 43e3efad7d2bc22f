"""Discrete-event simulation of one continuous-batching engine (vLLM's scheduler) over a request trace.

Every step schedules the running decodes first (one token each), then continues partial prefills and
admits waiting requests within max_num_batched_tokens (chunked prefill), max_num_seqs and the KV cache;
when the cache overflows, the newest request is preempted and recomputed later (vLLM V1 recompute). A
step lasts `PerfModel.step`'s seconds. Decodes advance in lockstep, so they are kept as a heap of finish
steps and a running sum of contexts: a step costs O(log n) Python, not O(running requests).
"""
from __future__ import annotations

import heapq
import math
from collections import deque
from dataclasses import dataclass

import numpy as np

from tasks.perf_model import PerfModel, causal_context


@dataclass(frozen=True)
class SimResult:
    ttft_s: np.ndarray  # per request, NaN if it never got a first token before the horizon
    tpot_s: np.ndarray
    e2e_s: np.ndarray
    steps: int
    preemptions: int
    end_s: float
    output_tokens: np.ndarray
    recomputed_tokens: int = 0  # prompt + generated tokens prefilled again after preemptions

    def summary(self) -> dict[str, float]:
        done = np.isfinite(self.e2e_s)
        return {"requests": int(len(self.e2e_s)), "completed": int(done.sum()),
                "ttft_mean_ms": float(np.nanmean(self.ttft_s) * 1e3),
                "ttft_p99_ms": float(np.nanpercentile(self.ttft_s, 99) * 1e3),
                "tpot_mean_ms": float(np.nanmean(self.tpot_s) * 1e3), "steps": self.steps,
                "preemptions": self.preemptions, "recomputed_tokens": self.recomputed_tokens,
                "output_tok_s": float(self.output_tokens[done].sum() / self.end_s) if self.end_s > 0 else 0.0}


def poisson_trace(qps: float, duration_s: float, mean_input: int, mean_output: int, seed: int = 0,
                  spread: float = 0.5) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Arrival times and (uniform +-spread) input/output lengths of a Poisson workload."""
    rng = np.random.default_rng(seed)
    n = rng.poisson(qps * duration_s)
    arrivals = np.sort(rng.uniform(0, duration_s, n))

    def lengths(mean: int) -> np.ndarray:
        return np.maximum(1, rng.integers(int(mean * (1 - spread)), int(mean * (1 + spread)) + 1, n))

    return arrivals, lengths(mean_input), lengths(mean_output)


def simulate(pm: PerfModel, arrivals, input_tokens, output_tokens, *, max_num_batched_tokens: int = 8192,
             max_num_seqs: int = 256, kv_capacity_tokens: int = 1_000_000, closed_loop: int = 0) -> SimResult:
    """Run the trace to completion. Lengths are tokens; arrivals seconds (sorted). `closed_loop` = C > 0
    ignores `arrivals`: C clients each send the next request when their last one finishes (a benchmark's
    fixed concurrency), so request i > C arrives when some earlier one completes."""
    arr = np.asarray(arrivals, float)
    if closed_loop:
        arr = np.where(np.arange(len(input_tokens)) < closed_loop, 0.0, np.inf)
    released = min(closed_loop, len(arr))

    def complete(rid: int) -> None:
        nonlocal released
        finish[rid] = now
        if closed_loop and released < n:
            arr[released] = now
            released += 1
    inp = np.asarray(input_tokens, int).tolist()
    out = np.asarray(output_tokens, int).tolist()
    n = len(inp)
    first, finish = np.full(n, np.nan), np.full(n, np.nan)
    cost = pm.step  # element-wise; called on plain floats below
    prompt = list(inp)  # grows by the generated tokens when a request is preempted (recompute)
    start_gen = [0] * n  # tokens generated before the current residency
    waiting: deque[int] = deque()
    prefilling: list[list[int]] = []  # [rid, computed]
    heap: list[tuple[int, int]] = []  # (finish step, rid) of decoding requests
    dec_start: dict[int, int] = {}  # rid -> step its decoding began (for its context)
    sum_ctx = 0  # KV tokens held by decoding requests
    nxt, step, now, preempt, recomputed = 0, 0, 0.0, 0, 0
    while nxt < n or waiting or prefilling or dec_start:
        while nxt < n and arr[nxt] <= now:
            waiting.append(nxt)
            nxt += 1
        if not (waiting or prefilling or dec_start):
            now = float(arr[nxt])
            continue
        n_dec = len(dec_start)
        budget = max_num_batched_tokens - n_dec
        kv_used = sum_ctx + sum(c for _, c in prefilling)
        p_tokens = p_ctx = p_prefix = 0.0
        done_prefill: list[int] = []
        for item in prefilling:  # continue partial prefills first (FIFO)
            rid, computed = item
            take = min(prompt[rid] - computed, budget, kv_capacity_tokens - kv_used)
            if take <= 0:
                continue
            p_tokens += take
            p_ctx += causal_context(computed, take)
            p_prefix += computed
            kv_used += take
            budget -= take
            item[1] += take
            if item[1] >= prompt[rid]:
                done_prefill.append(rid)
        while waiting and budget > 0 and n_dec + len(prefilling) < max_num_seqs and kv_used < kv_capacity_tokens:
            rid = waiting.popleft()
            take = min(prompt[rid], budget, kv_capacity_tokens - kv_used)
            p_tokens += take
            p_ctx += causal_context(0, take)
            kv_used += take
            budget -= take
            prefilling.append([rid, take])
            if take >= prompt[rid]:
                done_prefill.append(rid)
        now += float(cost(prefill_tokens=p_tokens, prefill_attn_context=p_ctx, decode_seqs=n_dec,
                          decode_context_tokens=sum_ctx, prefill_prefix_tokens=p_prefix).seconds)
        step += 1
        sum_ctx += n_dec  # every decode wrote one token
        while heap and heap[0][0] <= step:  # decodes that produced their last token
            _, rid = heapq.heappop(heap)
            if dec_start.get(rid) is None:
                continue  # preempted earlier (lazy deletion)
            sum_ctx -= prompt[rid] + step - dec_start.pop(rid)
            complete(rid)
        if done_prefill:
            finished = set(done_prefill)
            prefilling = [it for it in prefilling if it[0] not in finished]
            for rid in done_prefill:
                if math.isnan(first[rid]):
                    first[rid] = now
                left = out[rid] - start_gen[rid] - 1  # the prefill step produced one token
                if left <= 0:
                    complete(rid)
                    continue
                dec_start[rid] = step
                sum_ctx += prompt[rid]
                heapq.heappush(heap, (step + left, rid))
        while sum_ctx > kv_capacity_tokens and len(dec_start) > 1:  # preempt the newest (recompute later)
            rid = max(dec_start, key=dec_start.get)
            gen = step - dec_start.pop(rid)
            sum_ctx -= prompt[rid] + gen
            start_gen[rid] += gen + 1
            prompt[rid] += gen + 1
            recomputed += prompt[rid]
            waiting.appendleft(rid)
            preempt += 1
    arrive = arr
    ttft = first - arrive
    tpot = np.where(np.asarray(out) > 1, (finish - first) / np.maximum(np.asarray(out) - 1, 1), np.nan)
    return SimResult(ttft, tpot, finish - arrive, step, preempt, now, np.asarray(out), recomputed)
