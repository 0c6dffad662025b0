"""Batch stages: ``@work_pool(batch=64, batch_wait=0.05)``: the function takes a list of up to
64 items and returns a list of as many outputs, while every item keeps its own ``Result``.

::

    StageRunner ── submit(attempt per item) ──► Batched: gathers up to `batch` items,
        (the engine)                              or fewer once `batch_wait` s passed
                                                   │ one call attempt: Attempt(item=[x, y, ...])
                                                   ▼
                                              the backend's executor: fn([x, y, ...])
                                                   │
                 ◄── ok(each item's attempt) ◄──── ok([fx, fy, ...])      (one output per item)
                 ◄── error(that item's attempt) ◄─ error: the batch is split in halves and each
                                                   half called again, down to single items, so
                                                   only an item that fails alone fails
                 ◄── lost(each) ◄──────────────── lost

The batching sits on the engine's side of the executor seam, so it works the same on
every backend, and the engine keeps doing per item what it does everywhere: an item's
attempts, ``retry_on`` and backoff, ``max_lost``, the memory bound (a batch holds items
the stage already counts). A failing batch is split without using anyone's attempt: an
item's attempt is used only when it fails on its own (then the engine decides about
its retry, which joins a later batch). While a service is down, every call fails and
the halves multiply the calls (at most twice as many as calling per item): give such a
stage ``pause_after=``, whose breaker counts calls and stops them during the outage. A function that returns a list of another length
fails every item of that call with a ``TypeError`` saying so.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Sequence
from typing import Any

from ._wrap import ExecutorWrapper
from .executor import Attempt, Executor

__all__ = ["Batched"]


class _Call(Attempt):
    """One call of the batch function: the items' own attempts, and their values as its item."""

    __slots__ = ("members",)

    def __init__(self, members: list[Attempt]) -> None:
        super().__init__([a.item for a in members], None, 1)
        self.members = members


class Batched(ExecutorWrapper):
    """An executor's stand-in that calls the stage's function with lists of items."""

    def __init__(self, inner: Executor, batch: int, wait: float) -> None:
        super().__init__(inner)
        self.batch = batch
        self.wait = wait
        self.gathering: list[Attempt] = []  # items waiting for their batch to fill
        self.splits: deque[_Call] = deque()  # halves of failed batches, to call again
        self.calls = 0
        self.split_calls = 0

    # --- Executor ----------------------------------------------------------------------------

    def capacity(self) -> int:
        """Items the engine may hand over: what fills the calls the executor can take now."""
        calls = self.inner.capacity() - len(self.splits)
        return max(0, calls * self.batch - len(self.gathering))

    def submit(self, attempts: Sequence[Attempt]) -> None:
        self.gathering.extend(attempts)
        while len(self.gathering) >= self.batch:
            full, self.gathering = self.gathering[: self.batch], self.gathering[self.batch :]
            self._call(_Call(full))
        if self.gathering and self.timer is None:
            self.timer = asyncio.get_running_loop().call_later(self.wait, self._waited)

    def _waited(self) -> None:
        """``batch_wait`` passed: call with what has gathered."""
        self.timer = None
        if self.gathering and self.inner.capacity() > 0:
            part, self.gathering = self.gathering, []
            self._call(_Call(part))
        elif self.gathering:
            self.timer = asyncio.get_running_loop().call_later(self.wait, self._waited)

    def _call(self, call: _Call) -> None:
        self.calls += 1
        self.inner.submit((call,))
        self.inner.flush()

    def _pump_splits(self) -> None:
        while self.splits and self.inner.capacity() > 0:
            self._call(self.splits.popleft())

    def extra_details(self) -> dict[str, Any]:
        return {"batch": self.batch, "batch_calls": self.calls, "batch_split_calls": self.split_calls}

    # --- OutcomeSink: one call's outcome, reported per item ----------------------------------

    def ok(self, attempt: Attempt, value: Any) -> None:
        call: _Call = attempt  # type: ignore[assignment]
        sink = self.sink
        members = call.members
        if sink is None:
            return
        if not isinstance(value, (list, tuple)) or len(value) != len(members):
            got = f"{len(value)} outputs" if isinstance(value, (list, tuple)) else f"a {type(value).__name__}"
            exc = TypeError(f"a batch function must return a list of one output per item: {len(members)} items, {got}")
            for a in members:
                sink.error(a, exc)
        elif len(members) == 1:
            sink.ok(members[0], value[0])
        else:
            sink.ok_many(members, list(value))
        self._after_call()

    def ok_many(self, attempts: Sequence[Attempt], values: Sequence[Any]) -> None:
        for a, v in zip(attempts, values):
            self.ok(a, v)

    def error(self, attempt: Attempt, exc: BaseException) -> None:
        call: _Call = attempt  # type: ignore[assignment]
        members = call.members
        if len(members) == 1:
            if self.sink is not None:
                self.sink.error(members[0], exc)
        else:  # which item failed? Halve and call each half again (no attempt is used)
            half = len(members) // 2
            self.split_calls += 2
            self.splits.appendleft(_Call(members[half:]))
            self.splits.appendleft(_Call(members[:half]))
        self._after_call()

    def lost(self, attempt: Attempt, where: str) -> None:
        call: _Call = attempt  # type: ignore[assignment]
        if self.sink is not None:
            for a in call.members:
                self.sink.lost(a, where)
        self._after_call()

    async def emit(self, attempt: Attempt, value: Any) -> None:  # pragma: no cover - batch functions return lists
        raise TypeError("a batch function returns a list; it cannot be a generator")

    def capacity_changed(self) -> None:
        self._pump_splits()
        super().capacity_changed()

    def _after_call(self) -> None:
        self._pump_splits()
        if self.gathering and len(self.gathering) >= self.batch and self.inner.capacity() > 0:
            full, self.gathering = self.gathering[: self.batch], self.gathering[self.batch :]
            self._call(_Call(full))
