"""Retry backoff policies (pure functions)."""

from __future__ import annotations

import random

import pytest

from pgsched import Backoff, ValidationError

pytestmark = pytest.mark.unit


def test_exponential_grows_to_the_cap() -> None:
    policy = Backoff.exponential(base=2, cap=60, jitter=0)
    assert [policy.delay(n) for n in (1, 2, 3, 5, 6, 100, 10_000)] == [2, 4, 8, 32, 60, 60, 60]


def test_fixed_and_linear() -> None:
    assert Backoff.fixed(5, jitter=0).delay(7) == 5
    assert [Backoff.linear(3, cap=10, jitter=0).delay(n) for n in (1, 2, 3, 4)] == [3, 6, 9, 10]


def test_jitter_stays_within_its_fraction() -> None:
    policy = Backoff.fixed(100, jitter=0.1)
    rng = random.Random(7)
    delays = [policy.delay(1, rng) for _ in range(500)]
    assert all(90 <= d <= 110 for d in delays)
    assert len({round(d, 3) for d in delays}) > 100


@pytest.mark.parametrize(
    ("build", "field"),
    [
        (lambda: Backoff.exponential(base=0), "backoff.base"),
        (lambda: Backoff.exponential(base=10, cap=5), "backoff.cap"),
        (lambda: Backoff.fixed(5, jitter=2), "backoff.jitter"),
        (lambda: Backoff.fixed(float("nan")), "backoff.base"),
    ],
)
def test_bad_policies_are_refused(build, field) -> None:
    with pytest.raises(ValidationError) as caught:
        build()
    assert caught.value.field == field
