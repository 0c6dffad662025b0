"""An in-memory executor for tests: script any sequence of outcomes, deterministically.

``MockBackend`` runs ``multi_proc=True`` stages on the event loop (no processes)
and lets a test decide, per attempt, what the "remote" side does: return normally,
raise, die, get lost, get lost and *then* answer late (a duplicate), or be held
until the test releases it. It also records what the engine did, so tests can
check the contract from the engine's side (capacity never exceeded, every attempt
answered once)::

    import asyncio
    from pypline import Pipeline, work_pool
    from pypline.testing import Lose, MockBackend
    from pypline.util import unwrap

    def fate(attempt):
        if attempt.item == 3 and attempt.lost == 0:
            return Lose("agent-a", late_value=-1, late=True)  # lost, then a stale late answer
        return None                                          # run the function normally

    backend = MockBackend(fate=fate, capacity=2)
    pipeline = Pipeline(range(5)) >> work_pool(lambda x: 2 * x, multi_proc=True)
    result = asyncio.run(pipeline.run(executor=backend))
    assert unwrap(result) == [0, 2, 4, 6, 8]   # re-dispatched, the stale answer dropped
    assert backend.max_in_flight <= 2

A lost attempt is re-dispatched with the same ``number`` (losing it is not the item's
fault) and ``lost`` one higher, so ``fate`` tells a re-dispatch by ``attempt.lost``.

Errors in the test's own code never hang a run: if ``fate`` raises, that attempt fails
with the exception (an item error, retried per ``retry_on``, so the run returns ``Err``
naming it); if the sink raises while taking a report (a bug in the code under test),
every attempt the executor holds, and every later one, fails with that exception.

Outcomes are reported from a task, in batches, shuffled when ``shuffle_seed`` is
given: results arrive out of order, as they do from real workers.
"""

from __future__ import annotations

import asyncio
import random
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from ._context import WorkerInfo, set_worker_info
from ._errors import WorkerDied
from ._lifecycle import arun_setup, arun_teardown, setup_failed
from ._stage import FnKind, StageSpec
from .executor import Attempt, Backend, Executor, ExecutorStatistics, OutcomeSink

__all__ = ["MockBackend", "MockExecutor", "Proceed", "Raise", "Die", "Lose", "Hold", "Fate"]


@dataclass(frozen=True)
class Proceed:
    """Proceed the stage's function normally (the default)."""


@dataclass(frozen=True)
class Raise:
    """Report ``error`` instead of running the function."""

    error: BaseException


@dataclass(frozen=True)
class Die:
    """Report that the worker process died mid-item (``WorkerDied``)."""

    exitcode: int = -9


@dataclass(frozen=True)
class Lose:
    """Report the attempt lost with ``where``; optionally answer ``late_value`` afterwards."""

    where: str = "mock-agent"
    late_value: Any = None
    late: bool = False


@dataclass
class Hold:
    """Keep the attempt in flight until ``release`` is set, then run it normally."""

    release: asyncio.Event = field(default_factory=asyncio.Event)


Fate = Callable[[Attempt], "Proceed | Raise | Die | Lose | Hold | None"]


class MockExecutor(Executor):
    """Runs attempts on the loop; outcomes scripted by ``fate``. See the module docstring."""

    def __init__(self, fate: Fate | None = None, capacity: int | None = None, shuffle_seed: int | None = None) -> None:
        self._fate = fate
        self._cap_override = capacity
        self._rng = random.Random(shuffle_seed) if shuffle_seed is not None else None
        self._queue: deque[Attempt] = deque()
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._held: set[asyncio.Task[None]] = set()
        self.in_flight = 0
        self.max_in_flight = 0
        self.ok_batches = 0  # ok_many calls made
        self.submitted: list[Attempt] = []
        self.reports: list[tuple[str, Attempt]] = []
        self.closed = False
        self.capacity_violations = 0
        self.crashed: Exception | None = None  # what the sink raised, if it did (see _broken)
        self.states: list[Any] = []  # per worker: what the stage's setup returned
        self.set_up = 0  # workers set up (in index order) and not yet torn down

    async def start(self, spec: StageSpec, sink: OutcomeSink) -> None:
        self.spec = spec
        self.sink = sink
        self.limit = self._cap_override if self._cap_override is not None else spec.num_workers
        self.states = [None] * spec.num_workers
        if spec.setup is not None:
            for i in range(spec.num_workers):
                try:
                    self.states[i] = await arun_setup(spec.setup, spec.name, i)
                except Exception as exc:
                    await self.aclose()
                    raise setup_failed(spec.name, f"worker {i}", exc) from exc
                self.set_up = i + 1
        self._wake = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._serve(), name=f"pypline-mock-{spec.name}")

    def capacity(self) -> int:
        return self.limit - self.in_flight

    def submit(self, attempts: Sequence[Attempt]) -> None:
        if len(attempts) > self.capacity():
            self.capacity_violations += 1
        self.in_flight += len(attempts)
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        self.submitted.extend(attempts)
        self._queue.extend(attempts)
        assert self._wake is not None
        self._wake.set()

    async def _serve(self) -> None:
        assert self._wake is not None
        while True:
            await self._wake.wait()
            self._wake.clear()
            batch = list(self._queue)
            self._queue.clear()
            if self._rng is not None:
                self._rng.shuffle(batch)
            try:
                await self._serve_batch(batch)
            except Exception as exc:  # the sink raised: surface it, never hang the run
                self._broken(exc, batch)

    def _broken(self, exc: Exception, batch: list[Attempt]) -> None:
        """The sink raised while taking a report: a bug in the code under test (the engine,
        a custom sink, or a callback it runs). Every attempt still held fails with that
        exception, and so does every later one, so the run ends and shows it."""
        self.crashed = exc
        answered = {id(a) for _, a in self.reports}
        held, self._queue = [*batch, *self._queue], deque()
        for a in held:  # the engine ignores a second report for an attempt it already has
            if id(a) not in answered:
                self._done(a, "error")
            self.sink.error(a, exc)

    def _fate_of(self, a: Attempt) -> Any:
        """The test's ``fate`` for ``a``; if ``fate`` itself raises, the attempt fails with that."""
        if self._fate is None:
            return None
        try:
            return self._fate(a)
        except Exception as exc:  # a bug in the test's own fate: the item fails with it, visibly
            return Raise(exc)

    async def _serve_batch(self, batch: list[Attempt]) -> None:
        if self.crashed is not None:
            for a in batch:
                self._done(a, "error")
                self.sink.error(a, self.crashed)
            return
        oks: list[Attempt] = []  # plain results, reported together with ok_many
        values: list[Any] = []
        for a in batch:
            fate = self._fate_of(a)
            if fate is None and self.spec.workers[a.worker or 0].kind is FnKind.SYNC:
                try:
                    value = await self._call(a)
                except BaseException as exc:
                    if isinstance(exc, asyncio.CancelledError) and self.closed:
                        raise
                    if oks:
                        self._report_oks(oks, values)
                        oks, values = [], []
                    self._done(a, "error")
                    self.sink.error(a, exc)
                else:
                    self._done(a, "ok")
                    oks.append(a)
                    values.append(value)
                continue
            if oks:
                self._report_oks(oks, values)
                oks, values = [], []
            if isinstance(fate, Hold):
                task = asyncio.get_running_loop().create_task(self._held_run(a, fate))
                self._held.add(task)
                task.add_done_callback(self._held.discard)
                continue
            await self._settle(a, fate)
        if oks:
            self._report_oks(oks, values)

    def _report_oks(self, oks: list[Attempt], values: list[Any]) -> None:
        self.sink.ok_many(oks, values)
        self.ok_batches += 1

    async def _held_run(self, a: Attempt, hold: Hold) -> None:
        await hold.release.wait()
        try:
            await self._settle(a, None)
        except Exception as exc:  # the sink raised: surface it, never hang the run
            self._broken(exc, [a])

    async def _settle(self, a: Attempt, fate: Any) -> None:
        sink = self.sink
        if isinstance(fate, Raise):
            self._done(a, "error")
            sink.error(a, fate.error)
        elif isinstance(fate, Die):
            self._done(a, "error")
            sink.error(a, WorkerDied(f"mock worker died with exit code {fate.exitcode}", exitcode=fate.exitcode))
        elif isinstance(fate, Lose):
            self._done(a, "lost")
            sink.lost(a, fate.where)
            if fate.late:  # the "dead" agent answers after all: the engine must drop it
                self.reports.append(("late-ok", a))
                sink.ok(a, fate.late_value)
        else:
            try:
                value = await self._call(a)
            except BaseException as exc:  # the stage's own CancelledError too (contract rule 7)
                if isinstance(exc, asyncio.CancelledError) and self.closed:
                    raise
                self._done(a, "error")
                sink.error(a, exc)
            else:
                self._done(a, "ok")
                sink.ok(a, value)

    def _done(self, a: Attempt, how: str) -> None:
        self.in_flight -= 1
        self.reports.append((how, a))

    async def _call(self, a: Attempt) -> Any:
        index = a.worker if a.worker is not None else 0
        wf = self.spec.workers[index]
        set_worker_info(WorkerInfo(self.spec.name, index, a.number, self.states[index]))
        if wf.kind is FnKind.ASYNC:
            return await wf.fn(a.item)
        if wf.kind is FnKind.SYNC:
            return wf.fn(a.item)
        if wf.kind is FnKind.GEN:
            for v in wf.fn(a.item):
                await self.sink.emit(a, v)
            return None
        async for v in wf.fn(a.item):
            await self.sink.emit(a, v)
        return None

    async def aclose(self) -> None:
        if self.closed:
            return
        self.closed = True
        tasks = [t for t in (self._task, *self._held) if t is not None]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        n, self.set_up = self.set_up, 0
        if n and self.spec.teardown is not None:
            for i in range(n):
                await arun_teardown(self.spec.teardown, self.states[i], self.spec.name, i)

    def statistics(self) -> ExecutorStatistics:
        return ExecutorStatistics(
            backend="mock",
            workers=self.spec.num_workers,
            capacity=self.capacity(),
            submitted=len(self.submitted),
            completed=len(self.reports),
        )


class MockBackend(Backend):
    """Makes ``MockExecutor``s; ``executors`` keeps every one made, for assertions."""

    name = "mock"

    def __init__(self, fate: Fate | None = None, capacity: int | None = None, shuffle_seed: int | None = None) -> None:
        self.fate = fate
        self.capacity = capacity
        self.shuffle_seed = shuffle_seed
        self.executors: list[MockExecutor] = []
        self.opened = 0
        self.closed = 0

    async def open(self) -> None:
        self.opened += 1

    def executor(self, spec: StageSpec) -> Executor:
        ex = MockExecutor(self.fate, self.capacity, self.shuffle_seed)
        self.executors.append(ex)
        return ex

    async def aclose(self) -> None:
        self.closed += 1

    @property
    def max_in_flight(self) -> int:
        return max((e.max_in_flight for e in self.executors), default=0)
