"""The one backoff (iortd.kernel.backoff): doubling, cap, jitter bounds, reset, hold."""

from __future__ import annotations

import random

import pytest

from iortd.kernel.backoff import Backoff


def test_steps_double_up_to_the_cap_without_jitter() -> None:
    b = Backoff(0.05, 0.3, jitter=False)
    assert [b.next_delay() for _ in range(5)] == [0.05, 0.1, 0.2, 0.3, 0.3]
    b.reset()
    assert b.next_delay() == 0.05


def test_jittered_delays_lie_in_the_upper_half_of_each_step() -> None:
    b = Backoff(0.5, 10.0, rng=random.Random(1))  # noqa: S311 - seeded jitter under test
    steps = [0.5, 1.0, 2.0, 4.0, 8.0, 10.0, 10.0]
    delays = [b.next_delay() for _ in steps]
    for step, delay in zip(steps, delays, strict=True):
        assert step / 2 <= delay <= step
    assert len(set(delays)) == len(delays), "jitter draws differ"


def test_hold_lengthens_the_next_step_beyond_the_cap() -> None:
    b = Backoff(0.5, 10.0, jitter=False)
    b.hold(40.0)
    assert b.next_delay() == 40.0
    assert b.next_delay() == 10.0  # then back under the cap
    b.reset()
    assert b.next_delay() == 0.5


def test_bad_bounds_are_refused() -> None:
    with pytest.raises(ValueError, match="initial"):
        Backoff(0, 1)
    with pytest.raises(ValueError, match="initial"):
        Backoff(2, 1)
