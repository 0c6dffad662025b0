"""Engine-side executor wrappers: one base for the stand-ins the engine puts in front of a
backend's executor (``_rate.RateLimited``, ``_breaker.Breaker``, ``_batch.Batched``).

::

    StageRunner ──► Batched ──► Breaker ──► RateLimited ──► the backend's executor
                ◄──         ◄──          ◄──             ◄── (each is the sink of the next)

A wrapper is an ``Executor`` to the engine and the ``OutcomeSink`` of the executor it
wraps. This base passes everything through; a wrapper overrides what it changes, and
adds its figures to the statistics' ``details`` through ``extra_details()``.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Sequence
from typing import Any

from .executor import Attempt, Executor, ExecutorStatistics, OutcomeSink, StageSpec

__all__ = ["ExecutorWrapper"]


class ExecutorWrapper(Executor, OutcomeSink):
    """Passes the engine's calls to ``inner`` and ``inner``'s reports to the engine."""

    def __init__(self, inner: Executor) -> None:
        self.inner = inner
        self.sink: OutcomeSink | None = None
        self.timer: asyncio.TimerHandle | None = None  # the wrapper's one timer, if it needs one

    # --- Executor ----------------------------------------------------------------------------

    async def start(self, spec: StageSpec, sink: OutcomeSink) -> None:
        self.sink = sink
        await self.inner.start(spec, self)

    def capacity(self) -> int:
        return self.inner.capacity()

    def submit(self, attempts: Sequence[Attempt]) -> None:
        self.inner.submit(attempts)

    def submit_one(self, attempt: Attempt) -> None:
        self.submit((attempt,))

    def flush(self) -> None:
        self.inner.flush()

    def stop_timers(self) -> None:
        """Cancel the wrapper's timer (called first by ``aclose``)."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    async def aclose(self) -> None:
        self.stop_timers()
        self.sink = None
        await self.inner.aclose()

    def extra_details(self) -> dict[str, Any]:
        return {}

    def statistics(self) -> ExecutorStatistics:
        s = self.inner.statistics()
        return dataclasses.replace(s, capacity=self.capacity(), details={**s.details, **self.extra_details()})

    # --- OutcomeSink -------------------------------------------------------------------------

    def ok(self, attempt: Attempt, value: Any) -> None:
        if self.sink is not None:
            self.sink.ok(attempt, value)

    def ok_many(self, attempts: Sequence[Attempt], values: Sequence[Any]) -> None:
        if self.sink is not None:
            self.sink.ok_many(attempts, values)

    def error(self, attempt: Attempt, exc: BaseException) -> None:
        if self.sink is not None:
            self.sink.error(attempt, exc)

    def lost(self, attempt: Attempt, where: str) -> None:
        if self.sink is not None:
            self.sink.lost(attempt, where)

    async def emit(self, attempt: Attempt, value: Any) -> None:
        if self.sink is not None:
            await self.sink.emit(attempt, value)

    def capacity_changed(self) -> None:
        if self.sink is not None:
            self.sink.capacity_changed()
