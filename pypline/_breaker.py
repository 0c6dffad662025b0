"""A stage-wide circuit breaker: ``@work_pool(pause_after=5)`` stops sending work to a
dependency that is down, as a careful hand-written client would.

::

    closed ── pause_after retryable failures in a row ──► open: nothing is dispatched
      ▲                                                    │ for the pause (the first is
      │                                                    │ the stage's backoff, or 1 s;
      │ the probe succeeded                                │ doubling, at most max_backoff)
      │                                                    ▼
      └──────────────────────────────────────────── half-open: one probe item goes out
                                                      └ it failed too: open again, longer

The breaker sits on the engine's side of the executor seam (one mechanism on every
backend) and only holds dispatch back: items wait in the stage's queue, the memory bound
holds, nothing fails because of it. A failure counts when the stage would retry it
(``retry_on``); any success closes the breaker. ``trips`` and ``paused_s`` are in the
stage's statistics.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from typing import Any

from ._wrap import ExecutorWrapper
from .executor import Attempt, Executor

__all__ = ["Breaker"]

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half-open"


class Breaker(ExecutorWrapper):
    """An executor's stand-in that pauses dispatch after ``pause_after`` failures in a row."""

    def __init__(
        self,
        inner: Executor,
        pause_after: int,
        first_pause: float,
        max_pause: float,
        retryable: Callable[[BaseException], bool],
    ) -> None:
        super().__init__(inner)
        self.pause_after = pause_after
        self.first_pause = first_pause
        self.max_pause = max_pause
        self.retryable = retryable
        self.state = CLOSED
        self.failures_in_a_row = 0
        self.pause = first_pause
        self.probe: Attempt | None = None
        self.opened_at = 0.0
        self.paused_s = 0.0
        self.trips = 0

    # --- Executor ----------------------------------------------------------------------------

    def capacity(self) -> int:
        if self.state == OPEN:
            return 0
        if self.state == HALF_OPEN:
            return 0 if self.probe is not None else min(1, self.inner.capacity())
        return self.inner.capacity()

    def submit(self, attempts: Sequence[Attempt]) -> None:
        if self.state == HALF_OPEN and self.probe is None:
            self.probe = attempts[0]
        self.inner.submit(attempts)

    def extra_details(self) -> dict[str, Any]:
        paused = self.paused_s + (time.monotonic() - self.opened_at if self.state == OPEN else 0.0)
        return {"breaker": self.state, "breaker_trips": self.trips, "paused_s": round(paused, 3)}

    # --- the breaker -------------------------------------------------------------------------

    def _trip(self) -> None:
        if self.state == HALF_OPEN:  # the probe failed: wait longer
            self.pause = min(self.pause * 2, self.max_pause)
        self.state = OPEN
        self.probe = None
        self.trips += 1
        self.opened_at = time.monotonic()
        self.timer = asyncio.get_running_loop().call_later(self.pause, self._half_open)

    def _half_open(self) -> None:
        self.timer = None
        self.paused_s += time.monotonic() - self.opened_at
        self.state = HALF_OPEN
        if self.sink is not None:
            self.sink.capacity_changed()

    def _succeeded(self) -> None:
        self.failures_in_a_row = 0
        if self.state != CLOSED:
            self.state = CLOSED
            self.probe = None
            self.pause = self.first_pause
            if self.timer is not None:
                self.timer.cancel()
                self.timer = None
                self.paused_s += time.monotonic() - self.opened_at

    def _failed(self, attempt: Attempt, exc: BaseException) -> None:
        if not self.retryable(exc):
            return
        self.failures_in_a_row += 1
        if self.state == HALF_OPEN and attempt is self.probe:
            self._trip()
        elif self.state == CLOSED and self.failures_in_a_row >= self.pause_after:
            self._trip()

    # --- OutcomeSink: reports passed on -------------------------------------------------------

    def ok(self, attempt: Attempt, value: Any) -> None:
        self._succeeded()
        super().ok(attempt, value)

    def ok_many(self, attempts: Sequence[Attempt], values: Sequence[Any]) -> None:
        self._succeeded()
        super().ok_many(attempts, values)

    def error(self, attempt: Attempt, exc: BaseException) -> None:
        self._failed(attempt, exc)
        super().error(attempt, exc)

    def lost(self, attempt: Attempt, where: str) -> None:
        if attempt is self.probe:
            self.probe = None  # not the dependency's fault: probe again
        super().lost(attempt, where)
