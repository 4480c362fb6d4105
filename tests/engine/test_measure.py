"""The one percentile and the one stage timer every measurement of the project uses."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from wanstream.engine.measure import StageTimer, percentile


def test_percentile_interpolates_between_closest_ranks() -> None:
    values = [4.0, 1.0, 3.0, 2.0]  # any order
    assert percentile(values, 0.5) == 2.5
    assert percentile(values, 0.9) == pytest.approx(3.7)
    assert percentile(values, 0.0) == 1.0 and percentile(values, 1.0) == 4.0
    assert percentile([7.0], 0.9) == 7.0
    assert percentile(range(11), 0.9) == 9.0  # an exact rank: no interpolation


def test_percentile_is_numpys_default() -> None:
    rng = np.random.default_rng(0)
    for n in (1, 2, 5, 30, 101):
        values = rng.exponential(size=n).tolist()
        for q in (0.1, 0.5, 0.9, 0.99):
            assert percentile(values, q) == pytest.approx(float(np.quantile(values, q)), rel=1e-12)


def test_percentile_refuses_no_values_and_q_in_percent() -> None:
    with pytest.raises(ValueError, match="no values"):
        percentile([], 0.5)
    with pytest.raises(ValueError, match="fraction"):
        percentile([1.0, 2.0], 90)


def test_stage_timer_on_the_host_clock() -> None:
    timer = StageTimer(torch.device("cpu"))
    with timer("a"):
        time.sleep(0.01)
    with timer("a"):
        pass
    with timer("b"):
        pass
    taken = timer.take_ms()
    assert set(taken) == {"a", "b"} and len(taken["a"]) == 2 and len(taken["b"]) == 1
    assert taken["a"][0] >= 10.0 and all(ms >= 0.0 for ms in taken["a"] + taken["b"])
    assert timer.take_ms() == {}  # taken once
