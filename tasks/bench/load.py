"""Arrival schedules for one benchmark level: offsets in seconds from the level start.

Each load shape is one small function of (rate, n, rng); they share `_offsets`, so adding a shape is
drawing its interarrival gaps. The first request is always sent at offset 0, so a level of n requests
spans n - 1 gaps (about (n - 1) / rate seconds).
"""
from __future__ import annotations

from typing import Callable

import numpy as np

ArrivalFn = Callable[[float, int, np.random.Generator], np.ndarray]


def _offsets(gaps: np.ndarray) -> np.ndarray:
    return np.concatenate(([0.0], np.cumsum(gaps)))


def poisson_arrivals(rate_qps: float, n: int, rng: np.random.Generator) -> np.ndarray:
    """Poisson process: exponential gaps with mean 1 / rate."""
    if rate_qps <= 0 or n < 1:
        raise ValueError(f"need rate_qps > 0 and n >= 1, got {rate_qps}, {n}")
    return _offsets(rng.exponential(1.0 / rate_qps, size=n - 1))


def gamma_arrivals(rate_qps: float, n: int, rng: np.random.Generator, shape: float = 1.0) -> np.ndarray:
    """Gamma gaps with mean 1 / rate; shape < 1 is burstier than Poisson (CV = 1 / sqrt(shape))."""
    if rate_qps <= 0 or n < 1 or shape <= 0:
        raise ValueError(f"need rate_qps > 0, n >= 1, shape > 0, got {rate_qps}, {n}, {shape}")
    return _offsets(rng.gamma(shape, 1.0 / (rate_qps * shape), size=n - 1))


def constant_arrivals(rate_qps: float, n: int, rng: np.random.Generator) -> np.ndarray:  # noqa: ARG001
    """Evenly spaced arrivals (rng unused; kept so every shape has one signature)."""
    if rate_qps <= 0 or n < 1:
        raise ValueError(f"need rate_qps > 0 and n >= 1, got {rate_qps}, {n}")
    return np.arange(n, dtype=float) / rate_qps


ARRIVALS: dict[str, ArrivalFn] = {
    "poisson": poisson_arrivals,
    "gamma": gamma_arrivals,
    "constant": constant_arrivals,
}
