"""The sim engine behind the HTTP layer: the instances a spec describes and the routing between them.

agg/spec: one mixed instance. pd: prefill-only instances hand each prefilled request, after the modelled KV
transfer, to the least-loaded decode instance.
"""
from __future__ import annotations

import asyncio
import os
import traceback

import numpy as np

from tasks.engines.sim_clock import EngineClock
from tasks.engines.sim_metrics import Metrics
from tasks.engines.sim_scheduler import Instance, Role, SimRequest
from tasks.engines.sim_spec import SimSpec


class Engine:
    """All instances of one spec on a shared engine clock; must be built inside the running event loop."""

    def __init__(self, spec: SimSpec, metrics: Metrics) -> None:
        self.clock = EngineClock(spec.time_scale)
        self.tasks: list[asyncio.Task[None]] = []

        def pool(n: int, tp: int, role: Role, first: int) -> list[Instance]:
            model = spec.perf_model(tp)
            return [Instance(spec, model, role, np.random.default_rng([spec.seed, first + i]), self.clock,
                             metrics, self.hand_off) for i in range(n)]

        if spec.mode == "pd":
            self.entry = pool(spec.prefill_instances, spec.prefill_tp, "prefill", 0)
            self.decoders = pool(spec.decode_instances, spec.decode_tp, "decode", spec.prefill_instances)
        else:
            self.entry = self.decoders = pool(1, spec.tp, "mixed", 0)
        self.instances = list(dict.fromkeys(self.entry + self.decoders))
        metrics.running.set_function(lambda: sum(len(i.running) for i in self.instances))
        metrics.waiting.set_function(lambda: sum(len(i.waiting) for i in self.instances))
        total = sum(i.total_blocks for i in self.instances)
        metrics.kv_usage.set_function(lambda: sum(i.total_blocks - i.free_blocks for i in self.instances) / total)

    # -- routing between instances
    def submit(self, req: SimRequest) -> None:
        min(self.entry, key=lambda i: i.load).submit(req)

    def abort(self, req: SimRequest) -> None:
        """The client went away: free its slot and KV, as vLLM aborts it."""
        if not req.closed and req.instance is not None:
            req.instance.abort(req)

    def hand_off(self, src: Instance, req: SimRequest) -> None:
        """Prefill done on `src`: move its KV to a decode instance (its blocks stay held until moved)."""
        done_at = src.step_end + src.perf.kv_transfer_s(req.computed)
        self.clock.loop.call_at(self.clock.wall_at(done_at), self._deliver, src, req)

    def _deliver(self, src: Instance, req: SimRequest) -> None:
        src.release(req)
        src.wake.set()
        if req.aborted:
            return
        # The decode instance holds the prompt's KV and computes the last prompt token to sample the first.
        req.computed = req.target - 1
        min(self.decoders, key=lambda i: i.load).submit(req)

    # -- lifecycle
    def start(self) -> None:
        for inst in self.instances:
            task = self.clock.loop.create_task(inst.run())
            task.add_done_callback(self._died)
            self.tasks.append(task)

    def stop(self) -> None:
        for task in self.tasks:
            task.cancel()

    @staticmethod
    def _died(task: asyncio.Task[None]) -> None:
        # A crashed scheduler would leave requests hanging forever: exit so the launcher sees a dead engine.
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            print("sim engine loop crashed:\n" + "".join(traceback.format_exception(exc)), flush=True)
            os._exit(1)
