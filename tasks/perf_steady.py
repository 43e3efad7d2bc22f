"""Closed-form steady state of a closed-loop benchmark (concurrency C, fixed input/output lengths).

Aggregated: one instance runs R = min(C, KV capacity, max-num-seqs) requests; the others queue. Prompts
reach the engine in groups of `sync * R^a * (isl/1024)^b * (osl/256)^c` (a closed loop starts them
together; how far the scheduler keeps them together, how much more a long prefill step or a large batch
gathers, and how far long decodes drift apart, are per-backend parameters: SGLang's waves fit a = 1 and
c ~ -0.3; vLLM's staggered arrivals a ~ 0.65, b ~ 0.5). Pipeline stages run micro-batches as virtual
engines (see `agg_steady`). A
group's prompts are prefilled in chunks of max-num-batched-tokens; a mixed scheduler (vLLM, TensorRT-LLM)
carries every running decode in those chunks, SGLang's prefill-first scheduler stalls decodes while it
prefills. Over one request lifetime the engine runs every group's chunks once and O-1 decode steps; TTFT
and TPOT follow by accounting time.

Disaggregated: a prefill pool (M/D/1 queue per worker), KV transfer over the link, a decode pool whose
per-worker batch is the closed loop's population in decode; solved for that population by bisection.

Every function works element-wise on numpy arrays of rows that share one PerfModel.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from tasks.catalog import GIB, GpuSpec
from tasks.perf_model import PerfModel, StepCost, causal_context
from tasks.perf_spec import NO_SPEC, SpecDecode, decode_step


@dataclass(frozen=True)
class Scheduler:
    """What a backend's scheduler does by default (documented engine defaults, not fitted)."""

    mixed: bool  # decodes ride along prefill chunks
    chunk_tokens: int  # max-num-batched-tokens / chunked-prefill-size
    max_seqs: int
    mem_frac: float  # gpu-memory-utilization / mem-fraction-static / free-memory fraction
    frac_of_free: bool  # TensorRT-LLM takes its fraction of the memory left after weights
    reserve_full_context: bool  # admission reserves the whole output (SGLang, TRT-LLM); vLLM grows


SCHEDULERS = {
    "vllm": Scheduler(True, 8192, 1024, 0.90, False, False),
    "sglang": Scheduler(False, 8192, 1024, 0.88, False, True),
    "trtllm": Scheduler(True, 8192, 2048, 0.90, True, True),
}


def scheduler(backend: str, gpu: GpuSpec) -> Scheduler:
    """`backend`'s defaults on `gpu`: both engines size their batches by the GPU's memory. vLLM's
    EngineArgs give its API server 8192 tokens / 1024 sequences on GPUs of >= 70 GiB other than A100, else
    2048 / 256; SGLang's ServerArgs chunk prompts by 2048 / 4096 / 8192 / 16384 tokens below 35 / 60 / 160
    GB and above."""
    s = SCHEDULERS[backend]
    mem = gpu.memory_gib
    if backend == "vllm" and (mem < 70 or gpu.name.startswith("a100")):
        return replace(s, chunk_tokens=2048, max_seqs=256)
    if backend == "sglang":
        mb = mem * 1024
        return replace(s, chunk_tokens=2048 if mb < 35 * 1024 else 4096 if mb < 60 * 1024
                       else 8192 if mb < 160 * 1024 else 16384)
    return s


PARTS = ("compute", "memory", "comm", "overhead", "queue")
SYNC_ISL_REF = 1024.0  # prompt length at which sync_isl_exp leaves the group unchanged
SYNC_OSL_REF = 256.0  # output length at which sync_osl_exp leaves it unchanged
RECOMPUTE_PER_OUTPUT_TOKEN = 1.3  # vLLM-style preemption when the KV cache binds (see agg_steady)
FRONTEND_BLEND = 4.0  # exponent of the smooth maximum of engine and frontend cycle times
SIZED_PREFILL_LOAD = 0.8  # prefill-pool utilisation a PD row without worker counts is taken to run at
# A PD request reaching a running decode instance waits out the step in flight (half a step on average),
# then takes its first step with the others: its first token costs 1.5 of that instance's loaded steps.
DECODE_JOIN_STEPS = 1.5
# Memory settings of a deployment that runs although the engine's defaults leave its KV cache less than one
# request (weights near the GPU's memory): the fraction raised near its practical top, activations squeezed.
RAISED_MEM_FRAC = 0.95
RAISED_RESERVE_GIB = 2.0


def _parts(cost: StepCost) -> dict[str, np.ndarray]:
    """A step's seconds split into the binding resource (compute or memory), communication and overhead."""
    c, m = np.asarray(cost.compute_s, float), np.asarray(cost.memory_s, float)
    bound = np.asarray(cost.seconds, float) - cost.comm_s - cost.overhead_s
    return {"compute": np.where(c >= m, bound, 0.0), "memory": np.where(c < m, bound, 0.0),
            "comm": np.asarray(cost.comm_s, float) + 0 * bound, "overhead": cost.overhead_s + 0 * bound}


def _mix(*terms: tuple[np.ndarray, dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """sum of weight * parts over (weight, parts) terms."""
    out = {k: 0.0 for k in PARTS}
    for w, parts in terms:
        for k, v in parts.items():
            out[k] = out[k] + w * v
    return out


def kv_capacity_tokens(pm: PerfModel, backend: str, reserve_gib: float, one_request=None):
    """Tokens of every layer the KV cache holds; a request of context c takes `pm.footprint(c)` of them.

    `one_request` (a request's full context, tokens) says the deployment ran: where the engine's default
    budget holds less than that, its operator raised the memory fraction towards the most the GPU can hold
    (RAISED_MEM_FRAC of its memory less the weights and RAISED_RESERVE_GIB): all of it when the defaults
    leave nothing, less as they approach one request (continuous, so a fit sees no jump); at least one."""
    s = scheduler(backend, pm.gpu)
    weights = pm.resident_weight_bytes
    mem = pm.gpu.memory_bytes
    free = (s.mem_frac * (mem - weights - reserve_gib * GIB) if s.frac_of_free
            else s.mem_frac * mem - weights - reserve_gib * GIB)
    tokens = max(0.0, free) / pm.resident_kv_bytes_per_token
    if one_request is None:
        return tokens
    need = pm.footprint(np.asarray(one_request, dtype=float))
    raised = max(0.0, RAISED_MEM_FRAC * mem - weights - RAISED_RESERVE_GIB * GIB) / pm.resident_kv_bytes_per_token
    short = np.clip(1.0 - tokens / need, 0.0, 1.0)  # how far the defaults fall short of one request
    return np.maximum(np.maximum(tokens, raised * short), np.minimum(need, raised))


def fits(*pms: PerfModel) -> bool:
    """Whether every instance's weights fit its GPUs' memory."""
    return all(pm.resident_weight_bytes < pm.gpu.memory_bytes for pm in pms)


def frontend_wait(cycle, conc, osl, frontend_s: tuple[float, float]):
    """Extra TTFT when the serving frontend, not the engine, bounds a closed loop whose requests take
    `cycle` seconds from arrival to last token. A frontend that serialises host work serves at most one
    request per a + b * osl seconds, so the loop's `conc` requests take at least conc (a + b osl) to
    cycle; the difference waits in front of the engine. Near saturation the two bottlenecks blend (a
    smooth maximum, as queues do)."""
    front = conc * (frontend_s[0] + frontend_s[1] * osl)
    return cycle * ((1 + (front / cycle) ** FRONTEND_BLEND) ** (1 / FRONTEND_BLEND) - 1)


def adp_balance_wait(ranks, rate, timeout_s):
    """Mean time a prompt is held by attention-DP context balancing (TensorRT-LLM's `attention_dp_config`
    with `enable_balance`, as its published DeepSeek recipes run it): while generation runs on every rank,
    a rank's new context request waits until every rank has one, or `timeout_s` (timeout_iters steps). The
    router spreads arrivals over the ranks without one, so a batch forms after `ranks` arrivals at `rate`
    per second: its members wait (ranks - 1) / (2 rate) on average; a lone request waits out the timeout."""
    return np.minimum((ranks - 1) / (2 * np.maximum(rate, 1e-9)), timeout_s)


def bulk_queue_wait(step_s, busy, full_step_s, rho, k):
    """Mean wait of a Poisson arrival at a server that takes up to `k` waiting jobs per step (a prefill
    worker's attention-DP rank with its batch cap): part of the step in flight, (1 - 1/k) / 2 of it once
    steps run full (`busy` is the share of time the server steps, `step_s` its current step), plus
    rho / (2 k (1 - rho)) full steps of queue at utilisation `rho` of its full-step capacity. Exact M/D/1
    at k = 1; within ~10 % of a simulated bulk queue for k = 2-16 at rho 0.3-0.95."""
    r = np.minimum(rho, 0.999)
    return step_s * np.minimum(busy / (2 * (1 - busy)), 0.5) * (1 - 1 / k) + full_step_s * r / (2 * k * (1 - r))


def agg_steady(pm: PerfModel, backend: str, isl, osl, conc, *, request_overhead_s: float = 0.0,
               sync: float = 0.1, sync_exps: tuple[float, ...] = (1.0, 0.0, 0.0),
               reserve_gib: float = 4.0, max_batched_tokens: int | None = None, max_num_seqs: int | None = None,
               kv_tokens: float | None = None, frontend_s: tuple[float, float] = (0.0, 0.0),
               prompts_per_client: float = 0.0, adp_balance_iters: float = 0.0,
               spec: SpecDecode = NO_SPEC) -> dict[str, np.ndarray]:
    """TTFT/TPOT seconds, output tokens/s and their breakdowns for closed-loop concurrency `conc`.

    `spec`: speculative decoding; every decode step (a prefill chunk's riders' too) drafts and verifies,
    and yields `spec.tokens_per_step` tokens per sequence, so a request decodes in (osl - 1) / that steps.

    `adp_balance_iters` > 0: attention-DP ranks hold new prompts until every rank has one, for at most that
    many steps (`adp_balance_wait`).

    `frontend_s`: the serving frontend's serial host time per request and per streamed token; when the
    closed loop asks for more than it serves, requests queue in front of the engine (TTFT grows).

    Rows whose weights do not fit the GPUs come back as NaN; a KV cache the defaults leave below one request
    is taken as raised (`kv_capacity_tokens`: the deployment was measured, so it ran). Pipeline parallelism
    (`pm.pp` > 1) runs `pp` micro-batches at once, each a pass over all the layers: `pp` virtual engines
    sharing the KV cache, the sequence budget and the closed loop's requests.
    """
    s = scheduler(backend, pm.gpu)
    I, O, C_all = (np.asarray(x, dtype=float) for x in (isl, osl, conc))
    # Each attention-DP rank runs its own scheduler: token and sequence budgets are per rank.
    dp = pm.attention_dp
    B = float(max_batched_tokens or s.chunk_tokens) * dp
    # Weights that do not fit at all cannot run; a deployment that exists holds at least one request.
    kv = kv_capacity_tokens(pm, backend, reserve_gib, I + O) if kv_tokens is None else kv_tokens
    ok = fits(pm) & (I + O > 0)
    engines = np.clip(C_all, 1.0, pm.pp)  # fewer requests than stages leave stages idle
    C, kv = C_all / engines, np.maximum(kv / engines, I + O)  # one virtual engine's share
    need = I + O if s.reserve_full_context else I + O / 2
    # Continuous (no floor/ceil below) so the calibration's gradients see every parameter.
    R = np.maximum(np.minimum(np.minimum(C, (max_num_seqs or s.max_seqs) * dp / engines), kv / pm.footprint(need)), 1.0)
    ctx = I + O / 2
    dec = decode_step(pm, R, R * ctx, spec)
    per_step = spec.tokens_per_step  # output tokens per sequence per decode step
    conc_exp, isl_exp, *osl_exp = sync_exps
    group = np.clip(sync * R ** conc_exp * (I / SYNC_ISL_REF) ** isl_exp
                    * (O / SYNC_OSL_REF) ** (osl_exp[0] if osl_exp else 0.0), 1.0, R)
    P = group * I  # prompt tokens arriving together
    chunk = np.minimum(B, P)
    n_chunks = np.maximum(P / B, 1.0)
    riders = (R - group) if s.mixed else 0.0
    pf = decode_step(pm, riders, riders * ctx, spec, prefill_tokens=chunk,
                     prefill_attn_context=chunk / I * causal_context(0, I), prefill_seqs=np.maximum(chunk / I, 1.0))
    t0, tc = np.asarray(dec.seconds, float), np.asarray(pf.seconds, float)
    p0, pc = _parts(dec), _parts(pf)
    own = (n_chunks + 1) / 2  # chunks until a group member's prompt is done, on average
    # An engine that grows KV on demand (vLLM) admits prompts into every free block; once the loop's
    # requests at full length outgrow the cache, the decodes' growth is bought by evicting the newest
    # requests and prefilling them again (benchmarks/preemption_recompute.py: ~1.3 tokens per output token
    # once demand passes the cache at mean length, none below its capacity at full length).
    recompute = 0.0
    if not s.reserve_full_context:
        at_full, at_mean = kv / pm.footprint(I + O), kv / pm.footprint(I + O / 2)
        binding = np.clip((C - at_full) / np.maximum(1.1 * at_mean - at_full, 1e-9), 0.0, 1.0)
        recompute = RECOMPUTE_PER_OUTPUT_TOKEN * binding * O
    chunk_steps = R / group * n_chunks * (1 + recompute / I)  # prefill steps per request lifetime
    dsteps = np.maximum(O - 1, 1.0) / per_step  # decode steps of one request
    if s.mixed:
        lifetime_steps = dsteps + own
        backlog = np.maximum(0.0, chunk_steps - lifetime_steps)  # prefill-bound: prompts wait for budget
        decode_only = np.maximum(0.0, lifetime_steps - chunk_steps)
        cycle = chunk_steps * tc + decode_only * t0
        t_avg = cycle / np.maximum(lifetime_steps, chunk_steps)
        # A decode step of this request is a prefill step of another group or a decode-only step.
        tpot_terms = ((chunk_steps - np.minimum(own, chunk_steps)) / dsteps, pc), (decode_only / dsteps, p0)
        wait_s = 0.5 * t_avg + backlog * tc
    else:
        cycle = chunk_steps * tc + dsteps * t0
        t_avg = cycle / (chunk_steps + dsteps)
        tpot_terms = ((chunk_steps - own) / dsteps, pc), (1.0, p0)
        wait_s = 0.5 * t_avg * (group < R)  # a full wave arrives at an idle engine
    tpot_parts = {k: v / per_step for k, v in _mix(*tpot_terms).items()}  # a step's time per token it yields
    tpot = sum(tpot_parts[k] for k in PARTS)
    ttft_parts = _mix((own, pc))
    ttft_parts["overhead"] = ttft_parts["overhead"] + request_overhead_s
    service_ttft = sum(ttft_parts[k] for k in PARTS) + wait_s
    lifetime = service_ttft + (O - 1) * tpot
    # Closed loop beyond what runs at once: each request first waits (C/R - 1) lifetimes for a slot.
    running = R * engines
    queue = wait_s + (C / R - 1) * lifetime
    if adp_balance_iters > 0 and dp > 1:  # it holds prompts only while every rank has decodes to run
        held = adp_balance_wait(dp, C_all / (lifetime + queue), adp_balance_iters * t_avg)
        queue = queue + np.where(C_all >= dp, held, 0.0)
    if prompts_per_client > 0:
        # A finite benchmark starts its clients at once: the first wave's prompts (as many as run) share
        # the token budget, on average half of them ahead; one request in `prompts_per_client` pays it.
        # Where arrivals already come in whole waves (group = R: SGLang's), it is one wave more like them.
        full = pm.step(prefill_tokens=B, prefill_attn_context=B / I * causal_context(0, I), prefill_seqs=B / I)
        first_wave = 0.5 * R * I / B * np.asarray(full.seconds, float) * (1 - group / R)
        queue = queue + first_wave / prompts_per_client
    queue = queue + frontend_wait(lifetime + queue, C_all, O, frontend_s)
    ttft_parts["queue"] = queue + 0 * tpot
    ttft = sum(ttft_parts[k] for k in PARTS)
    tok_s = C_all * O / (ttft + (O - 1) * tpot)
    nan = np.where(ok, 1.0, np.nan)
    return {"ttft_s": ttft * nan, "tpot_s": tpot * nan, "output_tok_s": tok_s * nan, "running": running * nan,
            "kv_tokens": kv + 0 * R, **{f"ttft_{k}_s": ttft_parts[k] * nan for k in PARTS},
            **{f"tpot_{k}_s": (tpot_parts[k] + 0 * R) * nan for k in PARTS}}


def disagg_steady(pm_p: PerfModel, pm_d: PerfModel, backend: str, isl, osl, conc, prefill_workers,
                  decode_workers, *, request_overhead_s: float = 0.0, reserve_gib: float = 4.0,
                  kv_link_gbps: float | None = None, frontend_s: tuple[float, float] = (0.0, 0.0),
                  prompts_per_client: float = 0.0, prefill_max_batch=None, decode_max_batch=None,
                  spec: SpecDecode = NO_SPEC) -> dict[str, np.ndarray]:
    """Prefill pool -> KV transfer -> decode pool under closed-loop concurrency `conc` (`frontend_s` and
    `spec`, the decode pool's speculative decoding, as in `agg_steady`). `prompts_per_client` > 0 prices a
    finite benchmark run (every client starts at once); 0 is the steady state. Worker counts of 0 size that
    pool to the load (SIZED_PREFILL_LOAD).
    `prefill_max_batch`: prompts one prefill step takes per attention-DP rank where the deployment caps it
    (a context server's max batch size); else its scheduler's token budget alone decides. `decode_max_batch`:
    sequences a decode worker runs per attention-DP rank where the deployment caps it (its max batch size,
    SGLang's --max-running-requests); else its scheduler's default and its KV cache decide."""
    I, O, C, Wp, Wd = (np.asarray(x, dtype=float) for x in (isl, osl, conc, prefill_workers, decode_workers))
    ctx = I + O / 2
    # A prefill worker batches the prompts waiting for it, up to its scheduler's token budget on each
    # attention-DP rank: under load it runs fewer, larger (more efficient) steps.
    b_max = pm_p.attention_dp * np.maximum(1.0, scheduler(backend, pm_p.gpu).chunk_tokens / np.maximum(I, 1.0))
    if prefill_max_batch is not None:  # a stated cap of prompts per step binds below the token budget
        b_max = np.minimum(b_max, pm_p.attention_dp * np.maximum(np.asarray(prefill_max_batch, dtype=float), 1.0))

    def prefill_step(b):
        return pm_p.step(prefill_tokens=b * I, prefill_attn_context=b * causal_context(0, I), prefill_seqs=b)

    step_full = np.asarray(prefill_step(b_max).seconds, float)
    tau_full = step_full / b_max  # seconds per prompt, full batches
    per_rank = b_max / pm_p.attention_dp  # prompts one attention-DP rank takes per step
    if kv_link_gbps is None:
        transfer = pm_p.kv_transfer_s(I)
    else:
        link = np.asarray(kv_link_gbps, dtype=float) * 1e9 * pm_p.params.link_eff
        transfer = pm_p.kv_transfer_s(0) + pm_p.kv_bytes_held(I) / link
    # A PD request is admitted twice: the prefill engine's request path, then the decode engine's (its
    # scheduler, KV allocation and pull, output path), each what one aggregated engine charges a request.
    admission = 2 * request_overhead_s
    kv_d = kv_capacity_tokens(pm_d, backend, reserve_gib, I + O)
    max_seqs = scheduler(backend, pm_d.gpu).max_seqs
    if decode_max_batch is not None:
        max_seqs = np.minimum(max_seqs, np.maximum(np.asarray(decode_max_batch, dtype=float), 1.0))
    per_worker_cap = np.minimum(max_seqs * pm_d.attention_dp,
                                np.maximum(kv_d / pm_d.footprint(I + O), 1.0))
    # A pool whose size the row leaves out (0 workers) is taken as sized to the load: enough decode workers
    # to hold the loop's requests, enough prefill workers to keep up with them at SIZED_PREFILL_LOAD.
    Wd = np.where(Wd > 0, Wd, np.maximum(1.0, np.ceil(C / per_worker_cap)))
    cap = Wd * per_worker_cap
    ok = fits(pm_p, pm_d) & (I > 0)
    # Pipeline parallelism: a prompt still passes every stage in turn (one prefill step), but `pp` prompts, or
    # decode micro-batches, are in flight per worker.
    pp_p, pp_d = pm_p.pp, pm_d.pp

    def micro_batch(n_d):  # sequences per decode micro-batch (fewer than pp_d per worker: one each)
        per_worker = n_d / Wd
        return np.maximum(per_worker / np.clip(per_worker, 1.0, pp_d), 1e-9)

    def step_at(n_d):  # one decode step (a verify cycle with speculative decoding)
        per = micro_batch(n_d)
        return np.asarray(decode_step(pm_d, per, per * ctx, spec).seconds, float)

    def tpot_at(n_d):
        return step_at(n_d) / spec.tokens_per_step

    held = np.minimum(C, cap)  # the decode pool holding the whole loop
    Wp = np.where(Wp > 0, Wp, np.maximum(1.0, np.ceil(
        held / (np.maximum(O - 1, 1.0) * tpot_at(held)) * tau_full / (pp_p * SIZED_PREFILL_LOAD))))

    warm = {"b": np.ones_like(C * I)}  # the bisection's rates converge: start each fixed point at the last

    def prefill_batch(x):
        """Prompts per prefill step at request rate x: those arriving during one step, 1 to b_max."""
        lam, b = x / (Wp * pp_p), warm["b"]
        for _ in range(2):
            b = np.clip(lam * np.asarray(prefill_step(b).seconds, float), 1.0, b_max)
        warm["b"] = b
        return b

    def ttft_at(x, n):
        b = prefill_batch(x)
        step_s = np.asarray(prefill_step(b).seconds, float)
        # The pool's capacity is its full batches' rate (rho >= 1: the closed loop queues in front of it).
        u = np.minimum(x * step_s / (b * Wp * pp_p), 0.999)
        rho = x * tau_full / (Wp * pp_p)
        wait = bulk_queue_wait(step_s, u, step_full, rho, per_rank)  # each attention-DP rank queues its own
        # The request then joins a decode instance running n sequences (`DECODE_JOIN_STEPS`).
        return admission + step_s + wait + transfer + DECODE_JOIN_STEPS * step_at(n), rho

    lo, hi = np.zeros_like(C), np.minimum(C, np.maximum(cap, 1.0))
    for _ in range(48):  # population in decode: n_d + X(n_d) * TTFT(X) = C, left side increasing in n_d
        mid = (lo + hi) / 2
        x = mid / (np.maximum(O - 1, 1.0) * tpot_at(mid))
        t, rho = ttft_at(x, mid)
        over = (mid + x * t > C) | (rho >= 0.999)
        hi, lo = np.where(over, mid, hi), np.where(over, lo, mid)
    n_d = np.maximum(lo, 1e-6)
    per = micro_batch(n_d)
    decode = decode_step(pm_d, per, per * ctx, spec)  # the loop's decode step
    tpot = np.asarray(decode.seconds, float) / spec.tokens_per_step
    x = n_d / (np.maximum(O - 1, 1.0) * tpot)
    service, _ = ttft_at(x, n_d)
    ttft = np.maximum(service, C / x - (O - 1) * tpot)  # decode pool full: the rest wait for a slot
    ttft = ttft + frontend_wait(ttft + (O - 1) * tpot, C, O, frontend_s)
    if prompts_per_client > 0:
        # A benchmark starts its C clients at once: that first wave's prompts queue for the prefill pool
        # together (on average half of them ahead), one in `prompts_per_client` of the requests measured.
        first_wave = 0.5 * np.minimum(C, cap) * tau_full / (Wp * pp_p)
        ttft = ttft + first_wave / prompts_per_client
    tok_s = C * O / (ttft + (O - 1) * tpot)
    nan = np.where(ok, 1.0, np.nan)
    prefill = prefill_step(prefill_batch(x))
    ttft_parts = _mix((1.0, _parts(prefill)), (DECODE_JOIN_STEPS, _parts(decode)))
    ttft_parts["comm"] = ttft_parts["comm"] + transfer  # the KV transfer
    ttft_parts["overhead"] = ttft_parts["overhead"] + admission
    ttft_parts["queue"] = ttft - sum(ttft_parts[k] for k in PARTS)
    tpot_parts = _mix((1.0 / spec.tokens_per_step, _parts(decode)))
    return {"ttft_s": ttft * nan, "tpot_s": tpot * nan, "output_tok_s": tok_s * nan,
            "decode_batch": n_d / Wd * nan, "transfer_s": transfer + 0 * ttft,
            **{f"ttft_{k}_s": (ttft_parts[k] + 0 * ttft) * nan for k in PARTS},
            **{f"tpot_{k}_s": (tpot_parts[k] + 0 * ttft) * nan for k in PARTS}}
