"""What a deployment costs: dollars per million output tokens, and GPUs needed for a target load."""
from __future__ import annotations

import math


def cost_per_mtok_usd(usd_per_gpu_hour: float, num_gpus: int, output_tok_per_s: float) -> float | None:
    """Dollars per 1M output tokens at a sustained output throughput.

    cost per 1M output tokens = num_gpus * $/GPU-h / (output tok/s * 3600) * 1e6

    `output_tok_per_s` is the whole deployment's throughput (all `num_gpus`). None when it is 0 (or less):
    a deployment that produced nothing has no finite unit cost.
    """
    if output_tok_per_s <= 0:
        return None
    return num_gpus * usd_per_gpu_hour / (output_tok_per_s * 3600.0) * 1e6


def gpus_for_qps(target_qps: float, max_qps_per_replica: float, gpus_per_replica: int) -> int | None:
    """GPUs to serve `target_qps` with replicas that each hold the SLO up to `max_qps_per_replica`.

    GPUs = ceil(target QPS / max QPS per replica) * GPUs per replica. None when a replica holds no load
    (max QPS 0): no number of replicas meets the target.
    """
    if max_qps_per_replica <= 0:
        return None
    # The tolerance keeps float noise (2.1 / 0.3 = 7.000000000000001) from adding a replica.
    return math.ceil(target_qps / max_qps_per_replica - 1e-9) * gpus_per_replica
