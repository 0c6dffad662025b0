"""The engine's batch paths: ``OutcomeSink.ok_many`` and the pump's runs of pulls.

A scripted executor answers every submitted attempt in one ``ok_many`` call per loop
tick (optionally repeating some attempts, as a backend with late duplicates would);
the tests check exactly-once, ordered delivery, the memory bound and parking when the
next stage has less room than the batch.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import pytest

from pypline import Pipeline, work_pool
from pypline._run import admission_bound
from pypline.executor import Attempt, Backend, Executor, OutcomeSink, StageSpec
from pypline.util import Err, unwrap

pytestmark = pytest.mark.timeout(30)


class BatchExecutor(Executor):
    """Answers all it holds with one ``ok_many`` per tick; ``dup`` repeats the first of each batch."""

    def __init__(self, capacity: int, dup: bool) -> None:
        self.cap = capacity
        self.dup = dup
        self.held: list[Attempt] = []
        self.scheduled = False
        self.batches: list[int] = []
        self.max_held = 0

    async def start(self, spec: StageSpec, sink: OutcomeSink) -> None:
        self.spec, self.sink = spec, sink
        self.loop = asyncio.get_running_loop()

    def capacity(self) -> int:
        return self.cap - len(self.held)

    def submit(self, attempts: Sequence[Attempt]) -> None:
        assert len(attempts) <= self.capacity()
        self.held.extend(attempts)
        self.max_held = max(self.max_held, len(self.held))
        if not self.scheduled:
            self.scheduled = True
            self.loop.call_soon(self.answer)

    def answer(self) -> None:
        self.scheduled = False
        batch, self.held = self.held, []
        fn = self.spec.workers[0].fn
        values = [fn(a.item) for a in batch]
        if self.dup and batch:  # a late duplicate of an attempt answered in the same batch
            batch, values = [*batch, batch[0]], [*values, "duplicate"]
        self.batches.append(len(batch))
        self.sink.ok_many(batch, values)

    async def aclose(self) -> None:
        pass


class BatchBackend(Backend):
    name = "batch-test"

    def __init__(self, capacity: int = 64, dup: bool = False) -> None:
        self.capacity, self.dup = capacity, dup
        self.executors: list[BatchExecutor] = []

    def executor(self, spec: StageSpec) -> Executor:
        ex = BatchExecutor(self.capacity, self.dup)
        self.executors.append(ex)
        return ex


def inc(x: int) -> int:
    return x + 1


def test_ok_many_delivers_each_item_once_and_in_order() -> None:
    backend = BatchBackend(dup=True)
    stage = work_pool(inc, num_workers=2, buffer=30, multi_proc=True)
    out = unwrap((Pipeline(range(500)) >> stage).run_sync(executor=backend))
    assert out == [x + 1 for x in range(500)]
    assert "duplicate" not in out
    assert max(backend.executors[0].batches) > 1  # it really reported in batches


def test_a_batch_bigger_than_the_next_stage_waits_parked_within_the_bound() -> None:
    """Stage 1 answers 40 at once into a stage 2 with room for 5: the rest park, none is lost."""
    pulled = delivered = 0
    most_ahead = 0

    def source() -> Any:
        nonlocal pulled, most_ahead
        for i in range(2000):
            pulled += 1
            most_ahead = max(most_ahead, pulled - delivered)
            yield i

    backend = BatchBackend(capacity=1000)
    wide = work_pool(inc, num_workers=2, buffer=38, multi_proc=True)
    narrow = work_pool(inc, num_workers=1, buffer=4, multi_proc=True)
    bound = admission_bound([wide.spec, narrow.spec])

    async def main() -> list[int]:
        nonlocal delivered
        got = []
        async with (Pipeline(source()) >> wide >> narrow).stream(executor=backend) as results:
            async for r in results:
                got.append(unwrap(r))
                delivered += 1
        return got

    assert asyncio.run(main()) == [x + 2 for x in range(2000)]
    assert most_ahead <= bound
    first, _ = backend.executors
    assert first.max_held <= wide.spec.buffer + wide.spec.num_workers
    assert max(first.batches) > narrow.spec.buffer + narrow.spec.num_workers  # more than stage 2 had room for


def test_pump_pulls_runs_but_never_past_the_first_stage_room() -> None:
    """A fast sync source is pulled in runs; still never more than the stage holds plus what left."""
    pulled = 0
    backend = BatchBackend(capacity=1000)
    stage = work_pool(inc, num_workers=2, buffer=100, multi_proc=True)

    def source() -> Any:
        nonlocal pulled
        for i in range(5000):
            pulled += 1
            yield i

    out = unwrap((Pipeline(source()) >> stage).run_sync(executor=backend))
    assert out == [x + 1 for x in range(5000)]
    ex = backend.executors[0]
    assert ex.max_held <= stage.spec.buffer + stage.spec.num_workers
    assert max(ex.batches) > 10  # runs of pulls reached the executor as batches


@pytest.mark.parametrize("mode", ["run-ordered", "run-unordered", "stream"])
def test_finished_items_are_freed_without_the_cycle_collector(mode: str) -> None:
    """Envelopes are freed by reference counting once delivered: no garbage cycle per item.

    With the collector off during the run, the envelopes left in cycles are what a
    collection afterwards finds (kept in ``gc.garbage`` by DEBUG_SAVEALL, so other
    threads' garbage does not count); a cycle per item would be thousands.
    """
    import gc

    from pypline._stage_runner import Envelope

    backend = BatchBackend(capacity=64)
    stages = Pipeline(range(3000)) >> work_pool(inc, num_workers=2, buffer=30, multi_proc=True) >> work_pool(inc)

    async def streamed() -> list[int]:
        async with stages.stream(executor=backend) as results:
            return [unwrap(r) async for r in results]

    gc.collect()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        if mode == "stream":
            out = asyncio.run(streamed())
        else:
            out = unwrap(stages.run_sync(executor=backend, ordered=mode == "run-ordered"))
        assert sorted(out) == [x + 2 for x in range(3000)]
        del out
        gc.collect()
        envelopes = sum(1 for o in gc.garbage if type(o) is Envelope)
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
    assert envelopes == 0, f"{envelopes} envelopes were only collectable as cycles"


class _Tracking(BatchBackend):
    """Knows whether the engine is inside one of its executors' ``ok_many`` reports."""

    def __init__(self, capacity: int) -> None:
        super().__init__(capacity)
        self.answering = False

    def executor(self, spec: StageSpec) -> Executor:
        ex = super().executor(spec)
        assert isinstance(ex, BatchExecutor)
        answer = ex.answer

        def tracked() -> None:
            self.answering = True
            try:
                answer()
            finally:
                self.answering = False

        ex.answer = tracked  # type: ignore[method-assign]
        return ex


def test_a_batch_report_refills_the_first_stage_inline() -> None:
    """After the first fill, every pull from a sync source happens inside the report
    whose results returned the permits (no pump wake-up in between), and the memory
    bound still holds."""
    backend = _Tracking(capacity=1000)
    stage = work_pool(inc, num_workers=2, buffer=16, multi_proc=True)
    bound = admission_bound([stage.spec])
    inside = outside = delivered_ahead = 0

    def source() -> Any:
        nonlocal inside, outside, delivered_ahead
        for i in range(3000):
            if backend.answering:
                inside += 1
            else:
                outside += 1
            yield i

    out = unwrap((Pipeline(source()) >> stage).run_sync(executor=backend))
    assert out == [x + 1 for x in range(3000)]
    first_fill = stage.spec.buffer + stage.spec.num_workers
    assert outside <= first_fill
    assert inside == 3000 - outside
    assert backend.executors[0].max_held <= min(bound, first_fill)


@pytest.mark.parametrize("buffer", [500, 10], ids=["in-the-pumps-first-run", "in-an-inline-refill"])
def test_a_source_failing_keeps_what_came_before(buffer: int) -> None:
    """The source fails after 300 items, while the pump pulls its first run (buffer 500)
    or inside a report's inline refill (buffer 10): the outputs before it are kept, and
    stream() ends with the source's failure at its exact position."""

    def source() -> Any:
        yield from range(300)
        raise ValueError("source broke at 300")

    stage = work_pool(inc, num_workers=2, buffer=buffer, multi_proc=True)
    res = (Pipeline(source()) >> stage).run_sync(executor=_Tracking(capacity=1000))
    assert isinstance(res, Err)
    assert list(res.error.outputs) == [x + 1 for x in range(300)]
    assert isinstance(res.error.cause, ValueError)

    async def streamed() -> list[Any]:
        async with (Pipeline(source()) >> stage).stream(executor=_Tracking(capacity=1000), ordered=True) as results:
            return [r async for r in results]

    got = asyncio.run(streamed())
    assert [unwrap(r) for r in got[:-1]] == [x + 1 for x in range(300)]
    last = got[-1]
    assert isinstance(last, Err)
    assert last.error.stage == "<source>" and last.error.index == 300
    assert isinstance(last.error.error, ValueError)
