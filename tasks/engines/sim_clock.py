"""The sim engine's clock: engine time runs `time_scale` engine seconds per wall second of the event loop."""
from __future__ import annotations

import asyncio


class EngineClock:
    """Engine seconds since construction; must be built inside the running event loop."""

    def __init__(self, scale: float) -> None:
        self.loop = asyncio.get_running_loop()
        self.t0 = self.loop.time()
        self.scale = scale

    def now(self) -> float:
        return (self.loop.time() - self.t0) * self.scale

    def wall_at(self, engine_t: float) -> float:
        """The event-loop time at which engine time reaches `engine_t`."""
        return self.t0 + engine_t / self.scale

    async def sleep_until(self, engine_t: float) -> None:
        delay = self.wall_at(engine_t) - self.loop.time()
        await asyncio.sleep(delay if delay > 0 else 0)
