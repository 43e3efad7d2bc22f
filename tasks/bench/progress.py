"""Live progress on stderr (rich): requests done, the current completion rate and running p99s.

Refreshing is time-gated: `done` only appends, and the percentiles are recomputed at most every
REFRESH_S, so a client finishing thousands of requests a second spends nothing on its own progress bar.
"""
from __future__ import annotations

import time

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from tasks.bench.client import RequestRecord
from tasks.bench.metrics import to_engine_s

REFRESH_S = 0.25
RATE_WINDOW_S = 2.0  # the "current QPS" is completions over the last this many wall seconds


def make_progress(quiet: bool = False) -> Progress:
    """A progress display on stderr; disabled when quiet or when stderr is not a terminal."""
    console = Console(stderr=True)
    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[stats]}"),
        TimeElapsedColumn(), console=console, disable=quiet or not console.is_terminal,
    )


class LiveStats:
    """One progress row: done/total, current QPS and running p99 TTFT/E2EL (engine time, ms)."""

    def __init__(self, progress: Progress | None, description: str, total: int, time_scale: float = 1.0):
        self.progress, self.time_scale = progress, time_scale
        self.ttft: list[float] = []
        self.e2el: list[float] = []
        self.finished_at: list[float] = []
        self.failed = 0
        self.pending = 0
        self.last = 0.0
        self.task = progress.add_task(description, total=total, stats="-") if progress is not None else None

    def done(self, rec: RequestRecord) -> None:
        if self.progress is None:
            return
        now = time.perf_counter()
        self.finished_at.append(now)
        self.pending += 1
        if rec.ok and rec.ttft_s is not None and rec.e2el_s is not None:
            self.ttft.append(rec.ttft_s)
            self.e2el.append(rec.e2el_s)
        else:
            self.failed += 1
        if now - self.last >= REFRESH_S:
            self.refresh(now)

    def stats(self, now: float) -> str:
        t = np.asarray(self.finished_at)
        recent = np.count_nonzero(t >= now - RATE_WINDOW_S)
        span = min(RATE_WINDOW_S, now - t[0]) if t.size else 0.0
        qps = recent / span / self.time_scale if span > 0 else 0.0  # per engine second
        parts = [f"{qps:.3g} qps"]
        if self.ttft:
            p99 = to_engine_s(np.percentile([self.ttft, self.e2el], 99, axis=1), self.time_scale) * 1e3
            parts.append(f"p99 ttft {p99[0]:.0f} ms, e2el {p99[1]:.0f} ms")
        if self.failed:
            parts.append(f"{self.failed} failed")
        return " | ".join(parts)

    def refresh(self, now: float | None = None) -> None:
        if self.progress is None:
            return
        now = time.perf_counter() if now is None else now
        self.progress.update(self.task, advance=self.pending, stats=self.stats(now))
        self.pending, self.last = 0, now
