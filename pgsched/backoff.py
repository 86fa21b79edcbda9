"""Retry backoff policies: how long a failed job waits before its next attempt."""

from __future__ import annotations

import math
import random
from typing import Literal

import msgspec

from .errors import ValidationError


class Backoff(msgspec.Struct, frozen=True, kw_only=True):
    """A retry delay policy. Build one with ``Backoff.exponential``, ``Backoff.fixed`` or ``Backoff.linear``.

    ``jitter`` is the fraction of the delay that is randomised (0.1: the delay
    varies by up to 10% either way), so jobs that failed together do not all
    retry at the same instant.
    """

    kind: Literal["exponential", "fixed", "linear"]
    base: float
    cap: float
    jitter: float = 0.1

    def __post_init__(self) -> None:
        for field, value in (("base", self.base), ("cap", self.cap), ("jitter", self.jitter)):
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
                raise ValidationError(f"backoff.{field}", "must be a finite number")
        if self.base <= 0:
            raise ValidationError("backoff.base", "must be greater than 0")
        if self.cap < self.base:
            raise ValidationError("backoff.cap", "must be at least base")
        if not 0 <= self.jitter <= 1:
            raise ValidationError("backoff.jitter", "must be between 0 and 1")

    @classmethod
    def exponential(cls, base: float = 2, cap: float = 600, jitter: float = 0.1) -> Backoff:
        """Wait ``base ** attempt`` seconds, at most ``cap``."""
        return cls(kind="exponential", base=base, cap=cap, jitter=jitter)

    @classmethod
    def fixed(cls, seconds: float, jitter: float = 0.1) -> Backoff:
        """Wait the same ``seconds`` after every failure."""
        return cls(kind="fixed", base=seconds, cap=seconds, jitter=jitter)

    @classmethod
    def linear(cls, step: float, cap: float = 600, jitter: float = 0.1) -> Backoff:
        """Wait ``step * attempt`` seconds, at most ``cap``."""
        return cls(kind="linear", base=step, cap=cap, jitter=jitter)

    def delay(self, attempt: int, rng: random.Random | None = None) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (1 for the first)."""
        attempt = max(1, attempt)
        if self.kind == "fixed":
            raw = self.base
        elif self.kind == "linear":
            raw = self.base * attempt
        else:
            # Compare exponents before computing, so a large attempt cannot overflow.
            raw = self.cap if attempt * math.log(self.base) >= math.log(self.cap) else self.base**attempt
        raw = min(raw, self.cap)
        spread = raw * self.jitter
        return max(0.0, raw + (rng or random).uniform(-spread, spread))


DEFAULT_BACKOFF = Backoff.exponential()
