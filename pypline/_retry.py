"""The retry policy: after a failed attempt, retry (after how long) or fail. Pure: no clock.

::

    attempt n of an item failed with exc
        RetryPolicy.decide(n, exc) ──► None            the item fails now (ItemFailure, n attempts)
                                  └──► delay seconds   attempt n+1 is queued after ``delay``
                                                       (the stage runner sets the timer)

Rules: ``retries`` is the TOTAL number of attempts; only exceptions matching ``retry_on``
are retried (instances of its classes, or those its predicate returns True for; a
predicate that raises means "do not retry"); the nominal delay is capped at ``max_backoff``; with ``backoff=b`` attempt n+1 waits ``b * 2**(n-1)`` seconds plus up to
``JITTER`` of that more (random, so the retries of items that failed together spread
out, never sooner than the documented delay). The random source is injected, so the
schedule is tested without waiting.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from dataclasses import dataclass, field

__all__ = ["JITTER", "RetryPolicy"]

log = logging.getLogger("pypline.engine")

#: Backoff jitter: each sleep is the nominal delay plus up to this fraction more.
JITTER = 0.1


@dataclass(frozen=True)
class RetryPolicy:
    """A stage's ``retries``, ``retry_on`` and ``backoff``, as one decision."""

    retries: int
    retry_on: tuple[type[BaseException], ...] | Callable[[BaseException], bool]
    backoff: float = 0.0
    max_backoff: float = float("inf")
    random: Callable[[], float] = field(default=random.random, compare=False)

    def matches(self, exc: BaseException) -> bool:
        """Whether ``exc`` is worth another attempt."""
        rule = self.retry_on
        if isinstance(rule, tuple):
            return isinstance(exc, rule)
        try:
            return bool(rule(exc))
        except Exception:  # noqa: BLE001 - a broken predicate must not break the run
            log.warning("retry_on predicate %r raised for %r; not retrying", rule, exc, exc_info=True)
            return False

    def decide(self, number: int, exc: BaseException) -> float | None:
        """After attempt ``number`` (from 1) failed with ``exc``: seconds to wait before the
        next attempt, or None when the item fails now."""
        if number >= self.retries or not self.matches(exc):
            return None
        if self.backoff <= 0:
            return 0.0
        delay: float = min(self.backoff * 2 ** (number - 1), self.max_backoff) * (1 + JITTER * self.random())
        return delay
