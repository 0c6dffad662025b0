"""Rate limits: ``@work_pool(rate=(n, seconds))`` starts at most ``n`` attempts in any
``seconds``-long window, for the stage as a whole, on every backend.

::

    StageRunner ── capacity() / submit ──► RateLimited ── submit ──► the backend's executor
        (the engine)                        │ capacity = min(the executor's,          │
                                            │   free starts in the window,            │
                                            │   workers not busy)                     │
                 ◄── ok / error / lost ─────┴── (counts the attempt as ended) ◄───────┘
                 ◄── capacity_changed ── a timer, when the next start is due

The limiter sits on the engine's side of the executor seam, so it is one mechanism
whatever runs the stage (threads, processes, agents, Dask, Ray). An attempt counts
when it is handed to the executor, retries included; its worker starts it after that
backend's dispatch latency (well under a millisecond for threads, a few for processes
and agents), so measured at the workers a window can be that much shorter. At most ``num_workers`` attempts
are out at once, so an attempt handed over is an attempt started (none waits in an
executor's queue, where several could later start together and exceed the rate).
Starts follow an even schedule, one every ``seconds / n``, never a burst (the workers'
dispatch jitter would turn a burst followed by the next one into an excess); a start
that came late (a busy loop) is caught up on, so the rate achieved is the rate asked.
A log of the last ``n`` starts makes the rule exact: no window of ``seconds`` holds more
than ``n`` of them, caught-up starts included. ``waited`` adds
up the time the stage had a free worker but waited for its next start.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from ._wrap import ExecutorWrapper
from .executor import Attempt, Executor, OutcomeSink, StageSpec

__all__ = ["RateLimited"]


class RateLimited(ExecutorWrapper):
    """An executor's stand-in that admits attempts at most ``n`` per ``per`` seconds."""

    def __init__(self, inner: Executor, n: int, per: float, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(inner)
        self.n = n
        self.per = per
        self.interval = per / n
        self.clock = clock
        self.next_at: float | None = None  # when the next attempt may start (the schedule)
        self.starts: deque[float] = deque(maxlen=n)  # the last n starts
        self.out: set[int] = set()  # ids of the attempts handed over and not ended
        self.workers = 1
        self.blocked_since: float | None = None
        self.waited = 0.0

    # --- the spacing -------------------------------------------------------------------------

    def _wake_later(self, now: float, due: float) -> None:
        if self.timer is None:
            self.timer = asyncio.get_running_loop().call_later(max(0.0, due - now), self._due)

    def _due(self) -> None:
        self.timer = None
        if self.blocked_since is not None:
            self.waited += self.clock() - self.blocked_since
            self.blocked_since = None
        if self.sink is not None:
            self.sink.capacity_changed()

    # --- Executor ----------------------------------------------------------------------------

    async def start(self, spec: StageSpec, sink: OutcomeSink) -> None:
        self.workers = spec.num_workers
        await super().start(spec, sink)

    def capacity(self) -> int:
        if min(self.inner.capacity(), self.workers - len(self.out)) <= 0:
            return 0
        now = self.clock()
        due = self.next_at
        if len(self.starts) == self.n:  # the window rule: the n-th last start must be `per` ago
            due = max(due or 0.0, self.starts[0] + self.per)
        if due is not None and now < due:
            if self.blocked_since is None:
                self.blocked_since = now
            self._wake_later(now, due)
            return 0
        return 1

    def submit(self, attempts: Sequence[Attempt]) -> None:
        now = self.clock()
        if self.next_at is None or now - self.next_at >= self.per:
            start = now  # the first start, or idle for a while: a new schedule
        else:
            start = self.next_at  # on schedule, or catching up on a start that came late
        self.next_at = start + self.interval * len(attempts)
        self.starts.extend([now] * len(attempts))
        self.out.update(map(id, attempts))
        self.inner.submit(attempts)

    def extra_details(self) -> dict[str, Any]:
        waited = self.waited + (self.clock() - self.blocked_since if self.blocked_since is not None else 0.0)
        return {"rate": f"{self.n} per {self.per:g} s", "rate_waited_s": round(waited, 3)}

    # --- OutcomeSink: the executor's reports, passed on --------------------------------------

    def ok(self, attempt: Attempt, value: Any) -> None:
        self.out.discard(id(attempt))
        super().ok(attempt, value)

    def ok_many(self, attempts: Sequence[Attempt], values: Sequence[Any]) -> None:
        self.out.difference_update(map(id, attempts))
        super().ok_many(attempts, values)

    def error(self, attempt: Attempt, exc: BaseException) -> None:
        self.out.discard(id(attempt))
        super().error(attempt, exc)

    def lost(self, attempt: Attempt, where: str) -> None:
        self.out.discard(id(attempt))
        super().lost(attempt, where)
