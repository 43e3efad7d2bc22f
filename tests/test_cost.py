import pytest

from tasks.cost import cost_per_mtok_usd, gpus_for_qps


def test_cost_per_mtok_matches_hourly_spend_over_hourly_tokens():
    # 2 GPUs at $3/h spend $6/h; 1000 tok/s is 3.6M tokens/h, so 1M tokens cost 6 / 3.6 dollars.
    assert cost_per_mtok_usd(3.0, 2, 1000.0) == pytest.approx(6 / 3.6)
    # Twice the throughput halves the unit cost; twice the GPUs doubles it.
    assert cost_per_mtok_usd(3.0, 2, 2000.0) == pytest.approx(cost_per_mtok_usd(3.0, 2, 1000.0) / 2)
    assert cost_per_mtok_usd(3.0, 4, 1000.0) == pytest.approx(cost_per_mtok_usd(3.0, 2, 1000.0) * 2)


def test_cost_undefined_without_throughput():
    assert cost_per_mtok_usd(3.0, 2, 0.0) is None


def test_gpus_for_qps_rounds_replicas_up():
    assert gpus_for_qps(10.0, 3.0, 2) == 8  # 3.33 replicas -> 4, of 2 GPUs each
    assert gpus_for_qps(9.0, 3.0, 2) == 6  # exact fit needs no extra replica
    assert gpus_for_qps(2.1, 0.3, 1) == 7  # float noise (7.000000000000001) must not add one


def test_gpus_for_qps_undefined_when_a_replica_holds_no_load():
    assert gpus_for_qps(5.0, 0.0, 1) is None
