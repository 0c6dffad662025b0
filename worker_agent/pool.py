"""Warm executors: an idle stage's executor (and its worker processes) kept for the next run.

::

    session ends ─► agent not draining? ─ yes ─► park(key) for IDLE_TTL_S (calls of the old
                                          │       session still running end unreported)
                                          └─ no ──► aclose (kills its workers)
    STAGE from any session ─► take(key) ─ hit ─► reuse: no process spawn, no function load
                                        └─ miss ─► new executor from the local backend

An executor reports to the ``SinkProxy`` it was started with; the proxy forwards to
whichever ``StageHost`` owns the executor now (none while parked). The key is the
client's identity (its CURVE key) and everything the executor was built from
(function ids, kinds, fork, timeout, retries, stage name, worker count), so a reused
executor is indistinguishable from a new one, except that its worker processes are
warm, and keep any module-level state the functions built, as a long-lived worker
pool does: that state is never shared between clients.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Hashable
from typing import Any

from pypline.executor import Attempt, Executor, OutcomeSink

__all__ = ["IDLE_TTL_S", "MAX_PARKED", "ExecutorPool", "SinkProxy"]

#: How long an idle executor waits for a new owner. Long enough for back-to-back runs
#: of a script or a test suite; short enough that idle worker processes go away soon.
IDLE_TTL_S = 30.0

#: Most executors parked at once (oldest closed first): bounds idle worker processes.
MAX_PARKED = 16


class SinkProxy(OutcomeSink):
    """Forwards an executor's reports to its current owner; drops them while it has none."""

    __slots__ = ("target",)

    def __init__(self) -> None:
        self.target: OutcomeSink | None = None

    def ok(self, attempt: Attempt, value: Any) -> None:
        t = self.target
        if t is not None:
            t.ok(attempt, value)

    def error(self, attempt: Attempt, exc: BaseException) -> None:
        t = self.target
        if t is not None:
            t.error(attempt, exc)

    def lost(self, attempt: Attempt, where: str) -> None:
        t = self.target
        if t is not None:
            t.lost(attempt, where)

    async def emit(self, attempt: Attempt, value: Any) -> None:
        t = self.target
        if t is not None:
            await t.emit(attempt, value)

    def capacity_changed(self) -> None:
        t = self.target
        if t is not None:
            t.capacity_changed()


class ExecutorPool:
    """Idle executors by key, each with a deadline. Pure bookkeeping: callers close what it returns."""

    def __init__(self, ttl: float = IDLE_TTL_S, max_parked: int = MAX_PARKED) -> None:
        self.ttl = ttl
        self.max_parked = max_parked
        self._parked: OrderedDict[int, tuple[Hashable, Executor, SinkProxy, float]] = OrderedDict()
        self._seq = 0
        self.reused = 0

    def __len__(self) -> int:
        return len(self._parked)

    def take(self, key: Hashable) -> tuple[Executor, SinkProxy] | None:
        for seq, (k, ex, proxy, _) in self._parked.items():
            if k == key:
                del self._parked[seq]
                self.reused += 1
                return ex, proxy
        return None

    def park(self, key: Hashable, ex: Executor, proxy: SinkProxy) -> list[Executor]:
        """Keep ``ex``; returns executors to close (the oldest, beyond ``max_parked``)."""
        proxy.target = None
        self._seq += 1
        self._parked[self._seq] = (key, ex, proxy, time.monotonic() + self.ttl)
        evicted = []
        while len(self._parked) > self.max_parked:
            _, (_, old, _, _) = self._parked.popitem(last=False)
            evicted.append(old)
        return evicted

    def expired(self, now: float) -> list[Executor]:
        gone = [seq for seq, (_, _, _, deadline) in self._parked.items() if deadline <= now]
        return [self._parked.pop(seq)[1] for seq in gone]

    def clear(self) -> list[Executor]:
        out = [ex for (_, ex, _, _) in self._parked.values()]
        self._parked.clear()
        return out
