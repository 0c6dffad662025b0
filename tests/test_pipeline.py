"""Pipelines and running them.

Concurrency is forced with ``asyncio.Event`` / ``threading.Event`` and counters,
never with sleeps: "item 0 finishes after item 4" is made true by making item 0
wait for an event that item 4's worker sets. ``settle()`` only yields control to
the loop (``asyncio.sleep(0)``) so that every ready callback and task runs; with
``async def`` stages that is deterministic.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import re
import threading
from typing import Any, AsyncIterator, Iterator, Sequence

import pytest

from pypline import (
    Flow,
    ItemFailure,
    Pipeline,
    PipelineError,
    PipelineStream,
    Stage,
    StageStartError,
    work_pool,
)
from pypline.executor import Attempt, Backend, Executor, OutcomeSink, StageSpec
from pypline.util import Ok, is_err, is_ok, unwrap, unwrap_err


# --- helpers --------------------------------------------------------------------------------


async def settle(rounds: int = 100) -> None:
    """Yield control to the event loop ``rounds`` times (never waits for time to pass)."""
    for _ in range(rounds):
        await asyncio.sleep(0)


def extra_tasks(before: set[asyncio.Task[Any]]) -> set[asyncio.Task[Any]]:
    """Tasks alive now that were not alive at ``before`` (e.g. leaked pipeline tasks)."""
    return {t for t in asyncio.all_tasks() if t not in before and not t.done()}


def failure_fields(f: ItemFailure) -> tuple[Any, ...]:
    return (f.index, f.stage, f.item, type(f.error), str(f.error), f.attempts)


@work_pool
async def double(x: int) -> int:
    return x * 2


@work_pool
async def inc(x: int) -> int:
    return x + 1


def agen(items: Sequence[Any]) -> AsyncIterator[Any]:
    async def gen() -> AsyncIterator[Any]:
        for x in items:
            yield x

    return gen()


# --- sources -----------------------------------------------------------------------------


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    "make_source",
    [
        pytest.param(lambda: [0, 1, 2, 3, 4], id="list"),
        pytest.param(lambda: range(5), id="range"),
        pytest.param(lambda: (x for x in range(5)), id="generator"),
        pytest.param(lambda: agen(range(5)), id="async-generator"),
        pytest.param(lambda: iter((0, 1, 2, 3, 4)), id="iterator"),
    ],
)
def test_any_iterable_or_async_iterable_is_a_source(arun: Any, make_source: Any) -> None:
    """A list, range, generator, iterator or async generator source feeds every item, in order."""
    result = arun((Pipeline(make_source()) >> double).run())
    assert result == Ok([0, 2, 4, 6, 8])


@pytest.mark.timeout(30)
def test_source_is_pulled_lazily_and_never_beyond_the_bound(arun: Any) -> None:
    """Nothing is pulled before run(); while a stage is blocked, pulls stop within the memory bound."""
    pulls: list[int] = []

    def source() -> Iterator[int]:
        for i in range(1000):
            pulls.append(i)
            yield i

    async def main() -> None:
        gate = asyncio.Event()

        @work_pool(buffer=4, num_workers=2)
        async def held(x: int) -> int:
            await gate.wait()
            return x

        pipeline = Pipeline(source()) >> held >> inc
        bound = (4 + 2) + (16 + 1) + 2 + 1
        await settle()
        assert pulls == [], "the source was pulled before run()"
        task = asyncio.create_task(pipeline.run())
        await settle()
        stalled = len(pulls)
        assert 0 < stalled <= bound
        await settle()
        assert len(pulls) == stalled, "intake did not stall while the stage was blocked"
        gate.set()
        result = await task
        assert result == Ok([x + 1 for x in range(1000)])
        assert pulls == list(range(1000))

    arun(main())


@pytest.mark.timeout(30)
def test_sync_source_is_iterated_on_the_loop_thread(arun: Any) -> None:
    """A plain (sync) source iterable is iterated on the event loop's thread (documented decision)."""
    idents: list[int] = []

    def source() -> Iterator[int]:
        for i in range(10):
            idents.append(threading.get_ident())
            yield i

    async def main() -> None:
        loop_thread = threading.get_ident()
        result = await (Pipeline(source()) >> work_pool(lambda x: x, num_workers=2)).run()
        assert result == Ok(list(range(10)))
        assert set(idents) == {loop_thread}

    arun(main())


@pytest.mark.parametrize("source", [5, None, object(), 3.5])
def test_non_iterable_source_is_a_type_error_at_construction(source: Any) -> None:
    """Pipeline(x) with a non-iterable x raises TypeError immediately."""
    with pytest.raises(TypeError):
        Pipeline(source)


# --- composition ---------------------------------------------------------------------------


def test_rshift_and_stage_return_new_pipelines_and_leave_the_original_unchanged() -> None:
    """`p >> x` and `p.stage(x)` build new pipelines; p's stages tuple is untouched."""
    p = Pipeline([1, 2, 3])
    before = p.stages
    q = p >> double
    r = p.stage(double)
    assert q is not p and r is not p and q is not r
    assert p.stages is before and p.stages == ()
    assert q.stages == (double,) and r.stages == (double,)
    q_before = q.stages
    s = q >> inc
    t = q.stage(inc)
    assert q.stages is q_before and q.stages == (double,)
    assert s.stages == (double, inc) and t.stages == (double, inc)
    assert p.run_sync() == Ok([1, 2, 3])
    assert q.run_sync() == Ok([2, 4, 6])
    assert s.run_sync() == Ok([3, 5, 7])


@pytest.mark.timeout(30)
def test_plain_callables_are_wrapped_as_stages(arun: Any, no_thread_leaks: None) -> None:
    """A sync lambda or an `async def` added with >> / .stage() becomes a work_pool Stage that runs."""

    async def triple(x: int) -> int:
        return x * 3

    p = Pipeline([1, 2, 3]) >> (lambda x: x + 1)
    p = p.stage(triple)
    assert len(p.stages) == 2 and all(isinstance(s, Stage) for s in p.stages)
    assert arun(p.run()) == Ok([6, 9, 12])


def test_stage_rshift_stage_is_a_reusable_flow() -> None:
    """`a >> b` is a Flow; Pipeline(src) >> flow runs it; Flow >> Flow concatenates."""
    flow = inc >> double
    assert isinstance(flow, Flow)
    assert flow.stages == (inc, double)
    other = double >> inc
    both = flow >> other
    assert isinstance(both, Flow)
    assert both.stages == (inc, double, double, inc)
    assert flow.stages == (inc, double) and other.stages == (double, inc)
    assert (Pipeline([1, 2]) >> flow).run_sync() == Ok([4, 6])
    # The same flow is reusable in another pipeline, and after another stage.
    assert (Pipeline([0, 5]) >> double >> flow).run_sync() == Ok([2, 22])
    assert (Pipeline([1]) >> both).run_sync() == Ok([9])
    assert (Pipeline([1]).stage(flow)).stages == (inc, double)


@pytest.mark.parametrize("bad", [3, "x", None, 2.5, [inc]])
def test_adding_a_non_callable_is_a_type_error_at_composition(bad: Any) -> None:
    """Pipeline/Flow/Stage >> a non-callable (or .stage(it)) raises TypeError right away."""
    p = Pipeline([1])
    with pytest.raises(TypeError):
        p >> bad
    with pytest.raises(TypeError):
        p.stage(bad)
    with pytest.raises(TypeError):
        inc >> bad
    with pytest.raises(TypeError):
        (inc >> double) >> bad
    assert p.stages == ()


# --- ordering ------------------------------------------------------------------------------


@pytest.mark.timeout(30)
@pytest.mark.parametrize("kind", ["async", "sync"])
def test_ordered_run_follows_source_order_when_later_items_finish_first(
    arun: Any, no_thread_leaks: None, kind: str
) -> None:
    """run(ordered=True) returns source order even though item 4 provably finishes before item 0."""
    finished: list[int] = []

    async def main() -> None:
        if kind == "async":
            release = asyncio.Event()

            async def fn(x: int) -> int:
                if x == 0:
                    await release.wait()
                if x == 4:
                    release.set()
                finished.append(x)
                return x * 10

        else:
            trelease = threading.Event()

            def fn(x: int) -> int:  # type: ignore[misc]
                if x == 0:
                    assert trelease.wait(10)
                if x == 4:
                    finished.append(x)
                    trelease.set()
                    return x * 10
                finished.append(x)
                return x * 10

        stage = work_pool(fn, num_workers=5)
        result = await (Pipeline(range(10)) >> stage >> inc).run()
        assert finished.index(4) < finished.index(0), finished
        assert result == Ok([x * 10 + 1 for x in range(10)])

    arun(main())


@pytest.mark.timeout(30)
def test_unordered_run_gives_the_same_multiset(arun: Any) -> None:
    """run(ordered=False) returns exactly the outputs of ordered=True, in any order."""

    async def main() -> None:
        release = asyncio.Event()

        @work_pool(num_workers=5)
        async def fn(x: int) -> int:
            if x == 0:
                await release.wait()
            if x == 4:
                release.set()
            return x * 10

        result = await (Pipeline(range(50)) >> fn >> inc).run(ordered=False)
        assert is_ok(result)
        assert sorted(unwrap(result)) == [x * 10 + 1 for x in range(50)]

    arun(main())


@pytest.mark.timeout(30)
@pytest.mark.parametrize("kind", ["async-gen", "sync-gen"])
def test_flat_map_keeps_yield_order_within_an_input(arun: Any, no_thread_leaks: None, kind: str) -> None:
    """With ordered=True a flat-map stage's outputs follow source order, then yield order per input."""

    async def main() -> None:
        if kind == "async-gen":
            release = asyncio.Event()

            async def explode(x: int) -> AsyncIterator[tuple[int, str]]:
                if x == 1:  # filtered out: yields nothing
                    return
                yield (x, "a")
                if x == 0:
                    await release.wait()
                if x == 2:
                    release.set()
                yield (x, "b")
                yield (x, "c")

        else:
            trelease = threading.Event()

            def explode(x: int) -> Iterator[tuple[int, str]]:  # type: ignore[misc]
                if x == 1:
                    return
                yield (x, "a")
                if x == 0:
                    assert trelease.wait(10)
                if x == 2:
                    trelease.set()
                yield (x, "b")
                yield (x, "c")

        stage = work_pool(explode, num_workers=3)
        result = await (Pipeline(range(6)) >> stage).run()
        assert result == Ok([(x, c) for x in range(6) if x != 1 for c in "abc"])

    arun(main())


# --- failures --------------------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_failures_report_the_value_the_failing_stage_received(arun: Any) -> None:
    """Err(PipelineError): each ItemFailure has source index, stage, that stage's input, last error, attempts."""

    @work_pool(name="scale")
    async def scale(x: int) -> int:
        if x == 1:
            raise KeyError("first-stage")
        return x * 10

    calls: dict[int, int] = {}

    @work_pool(name="check", retries=2)
    async def check(x: int) -> int:
        calls[x] = calls.get(x, 0) + 1
        if x in (30, 70):
            raise ValueError(f"bad {x} try {calls[x]}")
        return x + 1

    result = arun((Pipeline(range(10)) >> scale >> check).run())
    assert is_err(result)
    err = unwrap_err(result)
    assert isinstance(err, PipelineError)
    assert [failure_fields(f) for f in err.failures] == [
        (1, "scale", 1, KeyError, str(KeyError("first-stage")), 1),
        (3, "check", 30, ValueError, "bad 30 try 2", 2),
        (7, "check", 70, ValueError, "bad 70 try 2", 2),
    ]
    assert err.outputs == [x * 10 + 1 for x in range(10) if x not in (1, 3, 7)]
    assert err.cause is None


@pytest.mark.timeout(30)
def test_pipeline_error_str_summarises_counts_and_first_failure(arun: Any) -> None:
    """str(PipelineError) names the failure count, the success count and the first failure."""

    @work_pool(name="picky_stage")
    async def picky(x: int) -> int:
        if x in (4, 9, 14):
            raise ValueError(f"boom-{x}")
        return x

    err = unwrap_err(arun((Pipeline(range(20)) >> picky).run()))
    text = str(err)
    assert re.search(r"\b3\b", text), text  # failures
    assert re.search(r"\b17\b", text), text  # successes
    assert "picky_stage" in text and "boom-4" in text
    assert re.search(r"\b4\b", text), text  # the first failure's index


@pytest.mark.timeout(30)
def test_failures_degrade_gracefully(arun: Any) -> None:
    """Without fail_fast every other item is still processed by every stage and its output kept."""
    first: list[int] = []
    second: list[int] = []

    @work_pool(num_workers=3)
    async def a(x: int) -> int:
        first.append(x)
        if x % 5 == 0:
            raise RuntimeError(f"no {x}")
        return x

    @work_pool(num_workers=2)
    async def b(x: int) -> int:
        second.append(x)
        return -x

    err = unwrap_err(arun((Pipeline(range(20)) >> a >> b).run()))
    assert sorted(first) == list(range(20))
    assert sorted(second) == [x for x in range(20) if x % 5]
    assert err.outputs == [-x for x in range(20) if x % 5]
    assert [f.index for f in err.failures] == [0, 5, 10, 15]


@pytest.mark.timeout(30)
def test_failures_are_listed_in_source_order(arun: Any) -> None:
    """PipelineError.failures is in source order even when a later item fails first (README decision)."""

    async def main() -> None:
        release = asyncio.Event()

        @work_pool(num_workers=3)
        async def fn(x: int) -> int:
            if x == 0:
                await release.wait()
                raise ValueError("late")
            if x == 2:
                release.set()
                raise ValueError("early")
            return x

        err = unwrap_err(await (Pipeline(range(3)) >> fn).run())
        assert [(f.index, str(f.error)) for f in err.failures] == [(0, "late"), (2, "early")]
        assert err.outputs == [1]

    arun(main())


@pytest.mark.timeout(30)
def test_fail_fast_stops_promptly(arun: Any) -> None:
    """fail_fast=True: after item 3 fails in a 1-worker stage, far fewer than 1000 items are processed."""
    calls: list[int] = []

    async def main() -> None:
        before = asyncio.all_tasks()

        @work_pool(num_workers=1, buffer=4)
        async def fn(x: int) -> int:
            calls.append(x)
            if x == 3:
                raise ValueError("stop here")
            return x

        result = await (Pipeline(range(1000)) >> fn).run(fail_fast=True)
        err = unwrap_err(result)
        assert isinstance(err, PipelineError)
        assert [failure_fields(f) for f in err.failures] == [(3, "fn", 3, ValueError, "stop here", 1)]
        assert err.outputs[:3] == [0, 1, 2] and 3 not in err.outputs
        assert len(calls) < 50, f"{len(calls)} items processed after fail_fast"
        assert extra_tasks(before) == set()

    arun(main())


@pytest.mark.timeout(30)
def test_fail_fast_leaves_nothing_running(arun: Any, no_thread_leaks: None) -> None:
    """fail_fast cancels blocked async workers and abandons blocked threads; no task outlives run()."""
    unblock = threading.Event()
    cancelled: list[int] = []

    async def main() -> None:
        before = asyncio.all_tasks()
        never = asyncio.Event()
        loop = asyncio.get_running_loop()
        blocked = asyncio.Event()
        calls = itertools.count(1)

        @work_pool(num_workers=3)
        async def hangs(x: int) -> int:
            if x in (1, 2):
                try:
                    await never.wait()
                except asyncio.CancelledError:
                    cancelled.append(x)
                    raise
            return x

        def stuck(x: int) -> int:
            if next(calls) == 2:  # the second call blocks (itertools.count is thread-safe)
                loop.call_soon_threadsafe(blocked.set)
                unblock.wait(10)
            return x

        @work_pool(num_workers=1)
        async def fails(x: int) -> int:
            await blocked.wait()  # the thread stage is now stuck in a call
            raise ValueError("fail fast")

        p = Pipeline(range(100)) >> hangs >> work_pool(stuck, num_workers=2) >> fails
        result = await p.run(fail_fast=True)
        assert not unblock.is_set()
        err = unwrap_err(result)
        assert err.failures and err.failures[0].stage == "fails"
        assert sorted(cancelled) == [1, 2]
        assert extra_tasks(before) == set()

    try:
        arun(main())
    finally:
        unblock.set()  # the abandoned thread may now finish; no_thread_leaks checks that it does


# --- misc. run behaviour -----------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_a_pipeline_without_stages_returns_the_source_items(arun: Any) -> None:
    """Pipeline(src).run() is Ok(list(src)) for sync and async sources, ordered or not."""
    assert arun(Pipeline([3, 1, 2]).run()) == Ok([3, 1, 2])
    assert arun(Pipeline(range(0)).run()) == Ok([])
    assert arun(Pipeline(agen("abc")).run()) == Ok(["a", "b", "c"])
    result = arun(Pipeline(range(100)).run(ordered=False))
    assert sorted(unwrap(result)) == list(range(100))


def test_run_sync_works_from_sync_code() -> None:
    """run_sync() runs the pipeline in its own event loop and returns the same Result as run()."""
    assert (Pipeline(range(5)) >> double >> inc).run_sync() == Ok([1, 3, 5, 7, 9])
    result = (Pipeline(range(5)) >> double).run_sync(ordered=False)
    assert sorted(unwrap(result)) == [0, 2, 4, 6, 8]


class _CountedRepr:
    reprs = 0

    def __repr__(self) -> str:
        type(self).reprs += 1
        return "_CountedRepr()"


@pytest.mark.timeout(30)
def test_run_sync_never_formats_the_outputs() -> None:
    """run_sync() hands the result back without repr()-ing it: asyncio.run() (3.11+)
    formats its main task's repr, which would cost a repr of every output."""
    items = [_CountedRepr() for _ in range(3)]
    _CountedRepr.reprs = 0
    result = (Pipeline(items) >> work_pool(lambda x: x)).run_sync()
    assert unwrap(result) == items
    assert _CountedRepr.reprs == 0


@pytest.mark.timeout(30)
def test_run_sync_inside_a_running_loop_runs_on_a_private_thread(arun: Any) -> None:
    """run_sync() inside a running loop (a notebook cell) runs the pipeline on a private
    event-loop thread and returns its result; that thread is gone afterwards."""

    async def main() -> Any:
        return (Pipeline([1, 2, 3]) >> double).run_sync()

    assert arun(main()) == Ok([2, 4, 6])
    assert not [t for t in threading.enumerate() if t.name == "pypline-sync"]


@pytest.mark.timeout(30)
def test_a_pipeline_can_be_run_twice(arun: Any) -> None:
    """Running again re-iterates the source: a list gives the same result, a one-shot generator []."""
    p = Pipeline([1, 2, 3]) >> double
    assert arun(p.run()) == Ok([2, 4, 6])
    assert arun(p.run()) == Ok([2, 4, 6])
    g = Pipeline(x for x in [1, 2, 3]) >> double
    assert arun(g.run()) == Ok([2, 4, 6])
    assert arun(g.run()) == Ok([])


@pytest.mark.timeout(30)
@pytest.mark.parametrize("asynchronous", [False, True], ids=["sync-source", "async-source"])
def test_source_raising_midway_gives_err_with_cause_and_earlier_outputs(arun: Any, asynchronous: bool) -> None:
    """A source exception: run() returns Err(PipelineError) with it as cause and every earlier output."""
    boom = OSError("disk gone")

    def source() -> Iterator[int]:
        yield from range(5)
        raise boom

    async def asource() -> AsyncIterator[int]:
        for x in range(5):
            yield x
        raise boom

    result = arun((Pipeline(asource() if asynchronous else source()) >> double >> inc).run())
    assert is_err(result)
    err = unwrap_err(result)
    assert isinstance(err, PipelineError)
    assert err.cause is boom
    assert err.outputs == [1, 3, 5, 7, 9]


# --- stream() -----------------------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_stream_is_an_async_context_manager(arun: Any) -> None:
    """stream() returns a PipelineStream usable with `async with`, yielding Ok per output."""

    async def main() -> None:
        s = (Pipeline(range(4)) >> double).stream(ordered=True)
        assert isinstance(s, PipelineStream)
        async with s as entered:
            got = [r async for r in entered]
        assert got == [Ok(0), Ok(2), Ok(4), Ok(6)]

    arun(main())


@pytest.mark.timeout(30)
def test_ordered_stream_yields_ok_and_err_in_source_order(arun: Any) -> None:
    """stream(ordered=True): one Result per output in source order, an Err(ItemFailure) for a failed item."""

    async def main() -> None:
        release = asyncio.Event()

        @work_pool(num_workers=4, name="worky")
        async def fn(x: int) -> int:
            if x == 0:
                await release.wait()
            if x == 3:
                release.set()
                raise ValueError("three")
            return x * 10

        got = [r async for r in (Pipeline(range(8)) >> fn).stream(ordered=True)]
        assert len(got) == 8
        assert got[:3] == [Ok(0), Ok(10), Ok(20)] and got[4:] == [Ok(x * 10) for x in range(4, 8)]
        failure = unwrap_err(got[3])
        assert isinstance(failure, ItemFailure)
        assert failure_fields(failure) == (3, "worky", 3, ValueError, "three", 1)

    arun(main())


@pytest.mark.timeout(30)
def test_unordered_stream_yields_everything(arun: Any) -> None:
    """stream() (unordered) yields exactly one Result per output: every Ok value and every failure."""

    async def main() -> None:
        @work_pool(num_workers=3)
        async def fn(x: int) -> int:
            if x % 7 == 3:
                raise ValueError(str(x))
            return x

        got = [r async for r in (Pipeline(range(40)) >> fn >> inc).stream()]
        assert sorted(unwrap(r) for r in got if is_ok(r)) == [x + 1 for x in range(40) if x % 7 != 3]
        assert sorted(unwrap_err(r).index for r in got if is_err(r)) == [x for x in range(40) if x % 7 == 3]
        assert len(got) == 40

    arun(main())


@pytest.mark.timeout(30)
@pytest.mark.parametrize("ordered", [False, True])
def test_stream_reports_a_source_failure_last(arun: Any, ordered: bool) -> None:
    """A source exception in stream() is a final Err(ItemFailure) with stage '<source>' and its position."""
    boom = OSError("source broke")

    def source() -> Iterator[int]:
        yield from range(5)
        raise boom

    async def main() -> None:
        @work_pool(num_workers=3)
        async def fn(x: int) -> int:
            await asyncio.sleep(0)
            return x * 2

        got = [r async for r in (Pipeline(source()) >> fn).stream(ordered=ordered)]
        assert len(got) == 6
        values = [unwrap(r) for r in got[:-1]]
        assert (values if ordered else sorted(values)) == [0, 2, 4, 6, 8]
        failure = unwrap_err(got[-1])
        assert isinstance(failure, ItemFailure)
        assert failure.stage == "<source>" and failure.index == 5 and failure.error is boom

    arun(main())


class _BrokenExecutor(Executor):
    async def start(self, spec: StageSpec, sink: OutcomeSink) -> None:
        raise StageStartError(spec.name, "this stage cannot run here")

    def capacity(self) -> int:
        return 0

    def submit(self, attempts: Sequence[Attempt]) -> None:  # pragma: no cover - never started
        raise AssertionError("submit() on an executor that failed to start")

    async def aclose(self) -> None:
        pass


class _BrokenBackend(Backend):
    name = "broken"

    def executor(self, spec: StageSpec) -> Executor:
        return _BrokenExecutor()


@pytest.mark.timeout(30)
def test_stage_start_failure(arun: Any) -> None:
    """A stage that cannot start: run() gives Err(PipelineError) naming it; stream() raises it on first next."""

    @work_pool(multi_proc=True, name="unstartable")
    def fn(x: int) -> int:
        return x

    p = Pipeline(range(5)) >> double >> fn

    async def main() -> None:
        before = asyncio.all_tasks()
        err = unwrap_err(await p.run(executor=_BrokenBackend()))
        assert isinstance(err, PipelineError)
        assert isinstance(err.cause, StageStartError) and "unstartable" in str(err)
        assert extra_tasks(before) == set()
        s = p.stream(executor=_BrokenBackend())
        with pytest.raises(PipelineError) as info:
            await s.__anext__()
        assert "unstartable" in str(info.value)
        await s.aclose()
        assert extra_tasks(before) == set()

    arun(main())


def _sync_double(x: int) -> int:
    return x * 2


def _sync_inc(x: int) -> int:
    return x + 1


@pytest.mark.timeout(30)
@pytest.mark.parametrize("how", ["aclose", "async-with", "aclosing"])
def test_leaving_a_stream_early_stops_every_task_and_thread(arun: Any, no_thread_leaks: None, how: str) -> None:
    """After `break` plus aclose() / leaving `async with`, no pipeline task or pypline thread is left."""
    pulled: list[int] = []

    def source() -> Iterator[int]:
        for i in itertools.count():
            pulled.append(i)
            yield i

    async def main() -> None:
        before = asyncio.all_tasks()
        p = Pipeline(source()) >> work_pool(_sync_double, num_workers=3) >> work_pool(_sync_inc, num_workers=2)
        got: list[int] = []
        if how == "aclose":
            s = p.stream()
            async for r in s:
                got.append(unwrap(r))
                if len(got) == 5:
                    break
            await s.aclose()
        elif how == "async-with":
            async with p.stream() as s:
                async for r in s:
                    got.append(unwrap(r))
                    if len(got) == 5:
                        break
        else:
            async with contextlib.aclosing(p.stream()) as s:
                async for r in s:
                    got.append(unwrap(r))
                    if len(got) == 5:
                        break
        assert len(got) == 5 and all(v % 2 == 1 for v in got)
        assert extra_tasks(before) == set()
        n = len(pulled)
        await settle()
        assert len(pulled) == n, "the source is still being pulled after the stream was closed"

    arun(main())


@pytest.mark.timeout(30)
def test_cancelling_run_reraises_and_abandons_a_blocked_thread(arun: Any, no_thread_leaks: None) -> None:
    """Cancelling the task awaiting run() re-raises CancelledError without waiting for a blocked sync call."""
    unblock = threading.Event()
    call_returned = threading.Event()

    async def main() -> None:
        loop = asyncio.get_running_loop()
        started = asyncio.Event()
        before = asyncio.all_tasks()

        def blocking(x: int) -> int:
            if x == 0:
                loop.call_soon_threadsafe(started.set)
                unblock.wait(10)
                call_returned.set()
            return x

        p = Pipeline(range(100)) >> work_pool(blocking, num_workers=2, name="blocking") >> inc
        task = asyncio.create_task(p.run())
        await started.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert task.cancelled()
        assert not call_returned.is_set(), "cancellation waited for the blocked call"
        assert extra_tasks(before) == set()
        stuck = [t for t in threading.enumerate() if t.name.startswith("pypline-blocking")]
        assert stuck and any(t.is_alive() for t in stuck)  # abandoned, still inside the call

    try:
        arun(main())
    finally:
        unblock.set()  # the abandoned thread returns; its result is discarded; no_thread_leaks checks it exits


@pytest.mark.timeout(30)
def test_cancelling_run_cancels_async_stage_code(arun: Any) -> None:
    """Cancelling run() mid-run: async stage code sees CancelledError, run() re-raises it, no task is left."""
    seen: list[str] = []

    async def main() -> None:
        started = asyncio.Event()
        never = asyncio.Event()
        before = asyncio.all_tasks()

        @work_pool(num_workers=2)
        async def waits(x: int) -> int:
            if x == 1:
                started.set()
                try:
                    await never.wait()
                except asyncio.CancelledError:
                    seen.append("cancelled")
                    raise
            return x

        task = asyncio.create_task((Pipeline(range(100)) >> waits).run())
        await started.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert seen == ["cancelled"]
        assert extra_tasks(before) == set()

    arun(main())


async def until(predicate: Any, rounds: int = 100_000) -> bool:
    """Yield control until ``predicate()`` holds (for a state reached by another thread); bounded."""
    for _ in range(rounds):
        if predicate():
            return True
        await asyncio.sleep(0)
    return bool(predicate())


# Regression: before 3ad6473 the emit task stayed pending after the run stopped.
@pytest.mark.timeout(30)
@pytest.mark.parametrize("how", ["aclose", "cancel", "fail_fast"])
def test_no_task_outlives_a_run_stopped_while_a_sync_generator_waits_for_room(
    arun: Any, no_thread_leaks: None, how: str
) -> None:
    """Stopping a run while a `def` generator stage is blocked emitting into a full stage leaves no task behind."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        before = asyncio.all_tasks()
        at_seven = asyncio.Event()
        proceed = asyncio.Event()
        never = asyncio.Event()
        snapshot: set[asyncio.Task[Any]] = set()

        def mark(taken: threading.Event) -> None:
            snapshot.update(asyncio.all_tasks())
            at_seven.set()
            taken.set()

        def explode(x: int) -> Iterator[int]:  # runs in a thread
            for k in range(100):
                if k == 7:  # the loop notes its tasks BEFORE this thread hands value 7 to it
                    taken = threading.Event()
                    loop.call_soon_threadsafe(mark, taken)
                    assert taken.wait(10)
                yield k

        @work_pool(buffer=1)
        async def slow(x: int) -> int:
            if x == 5:  # 5 holds the worker and 6 the buffer: emitting 7 has to wait for room
                await proceed.wait()
                if how == "fail_fast":
                    raise ValueError("stop")
                await never.wait()
            return x

        async def blocked_in_emit() -> None:
            await at_seven.wait()
            # The thread hands value 7 to the loop (a new task) right after the snapshot.
            assert await until(lambda: bool(extra_tasks(snapshot)))

        p = Pipeline(range(3)) >> work_pool(explode) >> slow
        try:
            if how == "aclose":
                s = p.stream()
                async for _ in s:
                    await blocked_in_emit()
                    break
                await s.aclose()
            elif how == "cancel":
                task = asyncio.create_task(p.run())
                await blocked_in_emit()
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task
            else:
                task = asyncio.create_task(p.run(fail_fast=True))
                await blocked_in_emit()
                proceed.set()
                assert unwrap_err(await task).failures[0].stage == "slow"
            assert extra_tasks(before) == set()
        finally:  # do not let a leaked task be destroyed pending (and warn) in a later test
            leaked = extra_tasks(before)
            for t in leaked:
                t.cancel()
            await asyncio.gather(*leaked, return_exceptions=True)

    arun(main())


def test_run_collect_false_counts_and_keeps_nothing() -> None:
    """collect=False: Ok(number of outputs); on failures, the Err has them and delivered, no outputs."""
    import gc
    import weakref

    kept: list[Any] = []

    class Big:
        pass

    def make(x: int) -> Any:
        b = Big()
        kept.append(weakref.ref(b))
        return b

    p = Pipeline(range(50)) >> work_pool(make) >> work_pool(lambda x: [x, x])
    assert p.run_sync(collect=False) == Ok(50)
    gc.collect()
    assert all(r() is None for r in kept)  # no output was held on to

    def check(x: int) -> int:
        if x % 10 == 3:
            raise ValueError(x)
        return x

    error = (Pipeline(range(30)) >> work_pool(check)).run_sync(collect=False).unwrap_err()
    assert error.outputs == [] and error.delivered == 27
    assert [f.item for f in error.failures] == [3, 13, 23]
    assert "27 output(s) succeeded" in str(error)
    with pytest.raises(TypeError, match="collect must be a bool"):
        (Pipeline(range(3)) >> work_pool(check)).run_sync(collect="no")  # type: ignore[call-overload]
