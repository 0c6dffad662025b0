"""``work_pool`` / ``mix_pool`` stages and their processing modes.

Covers the decorator forms, direct calls, validation at decoration time, where each
kind of worker function runs (loop, thread, flat map), pool and fork modes, and
``current_worker()``. Concurrency is made deterministic with events and counters:
nothing here sleeps to wait for something to happen; every wait that could hang has
a deadline (``asyncio.wait_for`` / ``Event.wait(timeout)``) so a bug fails the test.
"""

from __future__ import annotations

import asyncio
import collections
import re
import threading
from typing import Any, Callable, Sequence

import pytest

from pypline import (
    ItemFailure,
    Pipeline,
    PipelineError,
    Stage,
    WorkerInfo,
    current_worker,
    mix_pool,
    work_pool,
)
from pypline.util import Err, Ok

# Deadline for any single wait inside a test: generous, only reached when something is broken.
WAIT = 5.0


async def run_ok(pipeline: Pipeline, **kw: Any) -> list[Any]:
    """Run ``pipeline`` and return its outputs, failing the test on ``Err``."""
    result = await pipeline.run(**kw)
    assert isinstance(result, Ok), f"expected Ok, got {result!r}"
    return result.value


async def run_err(pipeline: Pipeline, **kw: Any) -> PipelineError:
    """Run ``pipeline`` and return its ``PipelineError``, failing the test on ``Ok``."""
    result = await pipeline.run(**kw)
    assert isinstance(result, Err), f"expected Err, got {result!r}"
    assert isinstance(result.error, PipelineError)
    return result.error


# --- decorator forms and direct calls ---------------------------------------------------------


def test_bare_work_pool_makes_a_stage_with_defaults(arun: Any) -> None:
    """`@work_pool` (no parentheses) gives a Stage with the documented defaults that runs."""

    @work_pool
    async def double(x: int) -> int:
        return x * 2

    assert isinstance(double, Stage)
    spec = double.spec
    assert (spec.buffer, spec.retries, spec.num_workers, spec.multi_proc) == (16, 1, 1, False)
    assert (spec.fork_merge, spec.timeout, spec.backoff, spec.retry_on) == (None, None, 0.0, (Exception,))
    assert arun(run_ok(Pipeline(range(5)) >> double)) == [0, 2, 4, 6, 8]


def test_work_pool_with_arguments_makes_a_stage(arun: Any) -> None:
    """`@work_pool(...)` applies its arguments and gives a runnable Stage."""

    @work_pool(num_workers=4, buffer=3, retries=2, timeout=5, backoff=0.5, retry_on=KeyError)
    def inc(x: int) -> int:
        return x + 1

    assert isinstance(inc, Stage)
    spec = inc.spec
    assert (spec.num_workers, spec.buffer, spec.retries) == (4, 3, 2)
    assert (spec.timeout, spec.backoff, spec.retry_on) == (5, 0.5, (KeyError,))
    assert arun(run_ok(Pipeline(range(10)) >> inc)) == list(range(1, 11))


def test_bare_and_called_mix_pool_make_stages(arun: Any) -> None:
    """`@mix_pool` and `@mix_pool(...)` both give a Stage with one worker per factory callable."""

    @mix_pool
    def bare() -> list[Callable[[int], int]]:
        return [lambda x: x + 1, lambda x: x + 1]

    @mix_pool(buffer=2, retries=3)
    def called() -> list[Callable[[int], int]]:
        return [lambda x: x * 10]

    assert isinstance(bare, Stage) and isinstance(called, Stage)
    assert bare.spec.num_workers == 2
    assert (called.spec.num_workers, called.spec.buffer, called.spec.retries) == (1, 2, 3)
    assert arun(run_ok(Pipeline(range(4)) >> bare >> called)) == [10, 20, 30, 40]


def test_async_stage_stays_directly_callable(arun: Any) -> None:
    """Calling an async stage directly calls the function: `await process_data(3) == 6`."""

    @work_pool(num_workers=3)
    async def process_data(x: int) -> int:
        return x * 2

    assert arun(process_data(3)) == 6
    assert process_data.__name__ == "process_data"


def test_sync_stage_call_returns_the_value() -> None:
    """Calling a plain-def stage directly returns its value synchronously (no coroutine, no thread)."""
    here = threading.get_ident()

    @work_pool
    def triple(x: int) -> tuple[int, bool]:
        return x * 3, threading.get_ident() == here

    assert triple(3) == (9, True)


def test_mix_pool_stage_call_calls_the_factory() -> None:
    """Calling a mix_pool stage directly calls its factory and returns the factory's list."""
    calls = 0

    def w(x: int) -> int:
        return x

    @mix_pool
    def workers() -> list[Callable[[int], int]]:
        nonlocal calls
        calls += 1
        return [w, w]

    assert calls == 1
    assert workers() == [w, w]
    assert calls == 2


# --- validation at decoration time ---------------------------------------------------------------

# (parameter, bad value, expected exception), valid for both work_pool and mix_pool.
COMMON_INVALID = [
    ("buffer", 0, ValueError),
    ("buffer", -1, ValueError),
    ("buffer", 1.5, TypeError),
    ("buffer", True, TypeError),
    ("buffer", "16", TypeError),
    ("buffer", None, TypeError),
    ("retries", 0, ValueError),
    ("retries", -1, ValueError),
    ("retries", 2.0, TypeError),
    ("retries", True, TypeError),
    ("fork_merge", 3, TypeError),
    ("fork_merge", "sum", TypeError),
    ("timeout", 0, ValueError),
    ("timeout", -1, ValueError),
    ("timeout", "1", TypeError),
    ("timeout", float("nan"), ValueError),
    ("timeout", True, TypeError),
    ("backoff", -1, ValueError),
    ("backoff", -0.5, ValueError),
    ("backoff", "0.1", TypeError),
    ("retry_on", 3, TypeError),
    ("retry_on", (ValueError, 3), TypeError),
    ("retry_on", "ValueError", TypeError),
    ("retry_on", int, TypeError),
    ("name", "", ValueError),
    ("name", 3, TypeError),
    ("multi_proc", "yes", TypeError),
    ("multi_proc", 1, TypeError),
]
WORK_POOL_INVALID = [
    ("num_workers", 0, ValueError),
    ("num_workers", -1, ValueError),
    ("num_workers", "2", TypeError),
    ("num_workers", 2.0, TypeError),
    ("num_workers", True, TypeError),
]


def _ids(cases: Sequence[tuple[str, Any, type]]) -> list[str]:
    return [f"{p}={v!r}" for p, v, _ in cases]


def _assert_names_param_and_value(exc: BaseException, param: str, value: Any) -> None:
    msg = str(exc)
    assert param in msg, f"message does not name the parameter {param!r}: {msg!r}"
    # The value's repr, not glued to other digits/letters (so "0" is not found inside ">= 10").
    pattern = r"(?<![\w.])" + re.escape(repr(value)) + r"(?![\w.])"
    assert re.search(pattern, msg), f"message does not show the value {value!r}: {msg!r}"


def _fn(x: int) -> int:
    return x


@pytest.mark.parametrize(("param", "value", "exc"), COMMON_INVALID + WORK_POOL_INVALID,
                         ids=_ids(COMMON_INVALID + WORK_POOL_INVALID))
def test_work_pool_rejects_invalid_configuration(param: str, value: Any, exc: type[Exception]) -> None:
    """A bad work_pool argument raises TypeError/ValueError when decorating, naming parameter and value."""
    with pytest.raises(exc) as info:
        work_pool(**{param: value})  # raises here, before any function is decorated
    _assert_names_param_and_value(info.value, param, value)


@pytest.mark.parametrize(("param", "value", "exc"), COMMON_INVALID, ids=_ids(COMMON_INVALID))
def test_mix_pool_rejects_invalid_configuration(param: str, value: Any, exc: type[Exception]) -> None:
    """A bad mix_pool argument raises TypeError/ValueError when decorating, naming parameter and value."""
    with pytest.raises(exc) as info:
        mix_pool(**{param: value})  # raises here, before any factory is decorated
    _assert_names_param_and_value(info.value, param, value)


def test_boundary_values_are_accepted() -> None:
    """The smallest valid values (buffer=1, retries=1, num_workers=1, backoff=0, tiny timeout) are accepted."""
    stage = work_pool(
        buffer=1, retries=1, num_workers=1, backoff=0, timeout=1e-3,
        retry_on=(KeyError, ValueError), fork_merge=sum, name="x", multi_proc=False,
   )(_fn)
    spec = stage.spec
    assert (spec.buffer, spec.retries, spec.num_workers, spec.backoff, spec.timeout) == (1, 1, 1, 0, 1e-3)
    assert spec.retry_on == (KeyError, ValueError) and spec.fork_merge is sum and spec.name == "x"


def test_work_pool_rejects_a_non_callable() -> None:
    """work_pool given something that is not callable raises TypeError at once."""
    with pytest.raises(TypeError):
        work_pool(3)  # type: ignore[call-overload]
    with pytest.raises(TypeError):
        work_pool(num_workers=2)("not a function")  # type: ignore[arg-type]


# --- mix_pool factories ---------------------------------------------------------------------------


def test_mix_pool_factory_is_called_exactly_once_at_definition(arun: Any) -> None:
    """The factory runs once when the stage is defined and never again when pipelines run."""
    calls = 0

    @mix_pool
    def workers() -> list[Callable[[int], int]]:
        nonlocal calls
        calls += 1
        return [lambda x: x + 1, lambda x: x + 1]

    assert calls == 1
    pipeline = Pipeline(range(5)) >> workers
    assert arun(run_ok(pipeline)) == [1, 2, 3, 4, 5]
    assert arun(run_ok(pipeline)) == [1, 2, 3, 4, 5]
    assert calls == 1


def test_mix_pool_factory_returning_empty_list_is_value_error() -> None:
    """A factory returning [] raises ValueError at definition (a stage needs a worker)."""
    with pytest.raises(ValueError):

        @mix_pool
        def none_at_all() -> list[Callable[[int], int]]:
            return []


@pytest.mark.parametrize(
    "returned",
    [_fn, None, 3, "ab", {"a": _fn}, iter([_fn])],
    ids=["a-function", "None", "int", "str", "dict", "iterator"],
)
def test_mix_pool_factory_returning_non_list_is_type_error(returned: Any) -> None:
    """A factory returning something other than a list of callables raises TypeError at definition."""
    with pytest.raises(TypeError):

        @mix_pool
        def bad() -> Any:
            return returned


def test_mix_pool_factory_with_non_callable_element_is_type_error() -> None:
    """A factory whose list holds a non-callable raises TypeError at definition."""
    with pytest.raises(TypeError):

        @mix_pool(retries=2)
        def bad() -> list[Any]:
            return [_fn, 42]


# --- names ----------------------------------------------------------------------------------------


def test_default_name_is_the_function_name_and_name_overrides(arun: Any) -> None:
    """A stage is named after its function (or factory) unless `name=` says otherwise; failures carry it."""

    @work_pool
    def parse(x: int) -> int:
        return x

    @work_pool(name="validate-records")
    def validate(x: int) -> int:
        raise ValueError("bad record")

    @mix_pool
    def enrich() -> list[Callable[[int], int]]:
        return [_fn]

    @mix_pool(name="custom-mix")
    def other() -> list[Callable[[int], int]]:
        return [_fn]

    assert parse.name == parse.spec.name == "parse"
    assert validate.name == "validate-records"
    assert enrich.name == "enrich"
    assert other.name == "custom-mix"
    err = arun(run_err(Pipeline([1]) >> parse >> validate))
    assert [f.stage for f in err.failures] == ["validate-records"]


# --- where worker functions run -------------------------------------------------------------------


def test_async_def_is_awaited_on_the_pipeline_loop(arun: Any) -> None:
    """An `async def` worker runs on the loop that runs the pipeline (the caller's thread and loop)."""
    main_thread = threading.get_ident()
    seen: list[tuple[int, asyncio.AbstractEventLoop]] = []

    async def main() -> list[int]:
        @work_pool(num_workers=3)
        async def where(x: int) -> int:
            seen.append((threading.get_ident(), asyncio.get_running_loop()))
            return x

        out = await run_ok(Pipeline(range(6)) >> where)
        assert {loop for _, loop in seen} == {asyncio.get_running_loop()}
        return out

    assert arun(main()) == list(range(6))
    assert {tid for tid, _ in seen} == {main_thread}


def test_plain_def_runs_in_a_worker_thread(arun: Any, no_thread_leaks: None) -> None:
    """A plain `def` worker runs in a thread other than the loop's, with no running event loop."""
    main_thread = threading.get_ident()
    seen: list[tuple[int, bool]] = []

    def has_loop() -> bool:
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return False
        return True

    @work_pool(num_workers=2)
    def where(x: int) -> int:
        seen.append((threading.get_ident(), has_loop()))
        return x

    assert arun(run_ok(Pipeline(range(6)) >> where)) == list(range(6))
    assert len(seen) == 6
    assert main_thread not in {tid for tid, _ in seen}
    assert not any(loop for _, loop in seen)


@pytest.mark.timeout(30)
def test_plain_def_does_not_block_the_loop_task(arun: Any, no_thread_leaks: None) -> None:
    """While a def worker blocks, the loop keeps running: a task on it can release the def."""
    release = threading.Event()

    async def main() -> list[bool]:
        loop = asyncio.get_running_loop()
        started = asyncio.Event()

        @work_pool
        def blocker(x: int) -> bool:
            loop.call_soon_threadsafe(started.set)
            return release.wait(WAIT)  # False only if the loop never got to release it

        async def releaser() -> None:
            await started.wait()
            release.set()

        task = asyncio.create_task(releaser())
        try:
            return await run_ok(Pipeline([0]) >> blocker)
        finally:
            await task

    try:
        assert arun(main(), timeout=10) == [True]
    finally:
        release.set()


@pytest.mark.timeout(30)
def test_plain_def_does_not_block_the_loop_stage(arun: Any, no_thread_leaks: None) -> None:
    """In a fork-mode mix_pool, an async worker can release a def worker blocked on the same item."""
    release = threading.Event()

    async def main() -> list[Any]:
        loop = asyncio.get_running_loop()
        started = asyncio.Event()

        def blocker(x: int) -> bool:
            loop.call_soon_threadsafe(started.set)
            return release.wait(WAIT)

        async def releaser(x: int) -> str:
            await asyncio.wait_for(started.wait(), WAIT)
            release.set()
            return "released"

        @mix_pool(fork_merge=list)
        def pair() -> list[Callable[..., Any]]:
            return [blocker, releaser]

        return await run_ok(Pipeline([0]) >> pair)

    try:
        assert arun(main(), timeout=10) == [[True, "released"]]
    finally:
        release.set()


# --- flat maps --------------------------------------------------------------------------------------


def _sync_explode(x: int) -> Any:
    for i in range(x):
        yield (x, i)


async def _async_explode(x: int) -> Any:
    for i in range(x):
        yield (x, i)


@pytest.mark.parametrize("fn", [_sync_explode, _async_explode], ids=["generator", "async-generator"])
def test_generators_are_flat_maps(arun: Any, fn: Callable[..., Any]) -> None:
    """Each yielded value is one output; an input that yields nothing is filtered out."""
    stage = work_pool(num_workers=2)(fn)

    @work_pool
    def tag(pair: tuple[int, int]) -> str:
        return f"{pair[0]}.{pair[1]}"

    out = arun(run_ok(Pipeline([2, 0, 3, 1]) >> stage))
    assert out == [(2, 0), (2, 1), (3, 0), (3, 1), (3, 2), (1, 0)]
    # The outputs travel on to the next stage one by one.
    assert arun(run_ok(Pipeline([2, 0, 1]) >> stage >> tag)) == ["2.0", "2.1", "1.0"]


def _sync_evens(x: int) -> Any:
    if x % 2 == 0:
        yield x


async def _async_evens(x: int) -> Any:
    if x % 2 == 0:
        yield x


@pytest.mark.parametrize("fn", [_sync_evens, _async_evens], ids=["generator", "async-generator"])
def test_generator_yielding_nothing_filters(arun: Any, fn: Callable[..., Any]) -> None:
    """A generator stage that yields nothing for an input drops that input, and only that input."""
    assert arun(run_ok(Pipeline(range(10)) >> work_pool(fn))) == [0, 2, 4, 6, 8]
    assert arun(run_ok(Pipeline([1, 3, 5]) >> work_pool(fn))) == []


@pytest.mark.timeout(30)
def test_async_generator_ordered_keeps_yield_order_within_an_input(arun: Any) -> None:
    """With ordered=True outputs follow source order, then yield order, even when yields interleave."""
    log: list[str] = []

    async def main() -> list[str]:
        one_done = asyncio.Event()

        @work_pool(num_workers=2)
        async def split(x: int) -> Any:
            if x == 0:
                log.append("0a")
                yield "0a"
                await asyncio.wait_for(one_done.wait(), WAIT)  # item 1 finishes in between
                log.append("0b")
                yield "0b"
            else:
                for s in ("1a", "1b", "1c"):
                    log.append(s)
                    yield s
                one_done.set()

        return await run_ok(Pipeline([0, 1]) >> split, ordered=True)

    assert arun(main()) == ["0a", "0b", "1a", "1b", "1c"]
    assert log.index("0b") > log.index("1c"), f"yields did not interleave: {log}"


@pytest.mark.timeout(30)
def test_sync_generator_ordered_keeps_yield_order_within_an_input(arun: Any, no_thread_leaks: None) -> None:
    """Generator workers in threads: ordered=True gives source order, then yield order, despite interleaving."""
    log: list[str] = []
    lock = threading.Lock()
    one_done = threading.Event()
    waited: list[bool] = []

    def record(s: str) -> str:
        with lock:
            log.append(s)
        return s

    @work_pool(num_workers=2)
    def split(x: int) -> Any:
        if x == 0:
            yield record("0a")
            waited.append(one_done.wait(WAIT))
            yield record("0b")
        else:
            yield record("1a")
            yield record("1b")
            one_done.set()

    try:
        assert arun(run_ok(Pipeline([0, 1]) >> split, ordered=True)) == ["0a", "0b", "1a", "1b"]
    finally:
        one_done.set()
    assert waited == [True]
    assert log.index("0b") > log.index("1b"), f"yields did not interleave: {log}"


# --- pool mode ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["async", "thread"])
def test_pool_mode_processes_each_item_exactly_once(arun: Any, kind: str) -> None:
    """In pool mode every item is processed by exactly one worker, exactly once."""
    calls: collections.Counter[int] = collections.Counter()
    lock = threading.Lock()

    def count(x: int) -> int:
        with lock:
            calls[x] += 1
        return x * 2

    async def acount(x: int) -> int:
        return count(x)

    stage = work_pool(num_workers=4, buffer=3)(acount if kind == "async" else count)
    out = arun(run_ok(Pipeline(range(200)) >> stage))
    assert out == [x * 2 for x in range(200)]
    assert calls == collections.Counter({x: 1 for x in range(200)})


@pytest.mark.timeout(30)
def test_pool_workers_run_concurrently_with_distinct_indices(arun: Any) -> None:
    """A pool of 3 runs 3 items at once, one per worker index 0, 1, 2 (a 3-way barrier passes)."""
    seen: list[int] = []

    async def main() -> list[int]:
        arrived = 0
        all_here = asyncio.Event()

        @work_pool(num_workers=3)
        async def meet(x: int) -> int:
            nonlocal arrived
            seen.append(current_worker().index)
            arrived += 1
            if arrived == 3:
                all_here.set()
            await asyncio.wait_for(all_here.wait(), WAIT)
            return x

        return await run_ok(Pipeline(range(3)) >> meet)

    assert arun(main()) == [0, 1, 2]
    assert sorted(seen) == [0, 1, 2]


@pytest.mark.timeout(30)
def test_mix_pool_pool_mode_uses_its_different_functions(arun: Any) -> None:
    """A pool-mode mix_pool runs each item once, on its different functions (both take items)."""
    calls: collections.Counter[int] = collections.Counter()

    async def main() -> list[tuple[str, int]]:
        seen: set[str] = set()
        both = asyncio.Event()

        async def arrive(tag: str, x: int) -> tuple[str, int]:
            calls[x] += 1
            seen.add(tag)
            if len(seen) == 2:
                both.set()
            await asyncio.wait_for(both.wait(), WAIT)  # times out if one function never runs
            return (tag, x)

        @mix_pool
        def workers() -> list[Callable[[int], Any]]:
            async def upper(x: int) -> tuple[str, int]:
                return await arrive("upper", x)

            async def lower(x: int) -> tuple[str, int]:
                return await arrive("lower", x)

            return [upper, lower]

        return await run_ok(Pipeline(range(8)) >> workers)

    out = arun(main())
    assert [x for _, x in out] == list(range(8))
    assert {tag for tag, _ in out} == {"upper", "lower"}
    assert calls == collections.Counter({x: 1 for x in range(8)})


# --- fork mode --------------------------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_fork_merge_receives_results_ordered_by_worker_index(arun: Any) -> None:
    """Every worker processes every item; fork_merge gets worker i's result at position i, not completion order."""
    finish_order: dict[int, list[int]] = collections.defaultdict(list)
    merged: list[list[int]] = []

    def merge(results: list[int]) -> list[int]:
        merged.append(list(results))
        return list(results)

    async def main() -> list[list[int]]:
        done: dict[tuple[int, int], asyncio.Event] = {}

        def event(item: int, worker: int) -> asyncio.Event:
            return done.setdefault((item, worker), asyncio.Event())

        @work_pool(num_workers=3, fork_merge=merge)
        async def aspect(x: int) -> int:
            i = current_worker().index
            if i < 2:  # worker i finishes only after worker i+1: completion order is 2, 1, 0
                await asyncio.wait_for(event(x, i + 1).wait(), WAIT)
            finish_order[x].append(i)
            event(x, i).set()
            return i

        return await run_ok(Pipeline(range(3)) >> aspect)

    assert arun(main()) == [[0, 1, 2]] * 3
    assert dict(finish_order) == {0: [2, 1, 0], 1: [2, 1, 0], 2: [2, 1, 0]}
    assert merged == [[0, 1, 2]] * 3


def test_fork_worker_failing_after_its_attempts_fails_the_item_without_merge(arun: Any) -> None:
    """A fork worker that still fails after `retries` attempts fails the item; fork_merge is not called for it."""
    calls: collections.Counter[tuple[int, int]] = collections.Counter()
    merged_items: list[int] = []
    lock = threading.Lock()

    def merge(results: list[tuple[int, int]]) -> tuple[int, ...]:
        merged_items.append(results[0][0])
        return tuple(i for _, i in results)

    @work_pool(num_workers=3, retries=2, fork_merge=merge)
    def part(x: int) -> tuple[int, int]:
        info = current_worker()
        with lock:
            calls[(x, info.index)] += 1
        if x == 1 and info.index == 1:
            raise ValueError(f"worker 1 attempt {info.attempt}")
        return (x, info.index)

    err = arun(run_err(Pipeline(range(3)) >> part))
    [failure] = err.failures
    assert isinstance(failure, ItemFailure)
    assert (failure.index, failure.stage, failure.item, failure.attempts) == (1, "part", 1, 2)
    assert isinstance(failure.error, ValueError) and str(failure.error) == "worker 1 attempt 2"
    assert sorted(merged_items) == [0, 2]
    assert err.outputs == [(0, 1, 2), (0, 1, 2)]
    assert calls[(1, 1)] == 2


def test_fork_merge_raising_fails_the_item_without_retry(arun: Any) -> None:
    """An exception from fork_merge fails that item once: no worker re-runs, merge is not retried."""
    calls: collections.Counter[tuple[int, int]] = collections.Counter()
    merge_calls: collections.Counter[int] = collections.Counter()

    def merge(results: list[tuple[int, int]]) -> int:
        x = results[0][0]
        merge_calls[x] += 1
        if x == 1:
            raise RuntimeError("merge failed")
        return x

    @work_pool(num_workers=3, retries=3, fork_merge=merge)
    async def part(x: int) -> tuple[int, int]:
        calls[(x, current_worker().index)] += 1
        return (x, current_worker().index)

    err = arun(run_err(Pipeline(range(3)) >> part))
    [failure] = err.failures
    assert (failure.index, failure.stage, failure.item, failure.attempts) == (1, "part", 1, 1)
    assert isinstance(failure.error, RuntimeError) and str(failure.error) == "merge failed"
    assert err.outputs == [0, 2]
    assert merge_calls == collections.Counter({0: 1, 1: 1, 2: 1})
    assert calls == collections.Counter({(x, i): 1 for x in range(3) for i in range(3)})


def test_fork_worker_retry_reruns_only_that_worker(arun: Any) -> None:
    """In fork mode a failed worker call is retried on that worker alone; the merge still gets index order."""
    calls: collections.Counter[tuple[int, int]] = collections.Counter()

    @work_pool(num_workers=3, retries=2, fork_merge=list)
    async def part(x: int) -> tuple[int, int]:
        info = current_worker()
        calls[(x, info.index)] += 1
        if info.index == 1 and info.attempt == 1:
            raise ValueError("worker 1 fails once")
        return (info.index, info.attempt)

    out = arun(run_ok(Pipeline(range(2)) >> part))
    assert out == [[(0, 1), (1, 2), (2, 1)]] * 2
    assert calls == collections.Counter({(x, i): 2 if i == 1 else 1 for x in range(2) for i in range(3)})


def test_mix_pool_fork_mode_runs_every_function_on_every_item(arun: Any, no_thread_leaks: None) -> None:
    """A fork-mode mix_pool gives each item to every function (async on the loop, def in a thread), merged by index."""
    main_thread = threading.get_ident()

    @mix_pool(fork_merge=tuple)
    def views() -> list[Callable[[int], Any]]:
        async def on_loop(x: int) -> tuple[str, int, bool, WorkerInfo]:
            return ("loop", x * 10, threading.get_ident() == main_thread, current_worker())

        def in_thread(x: int) -> tuple[str, int, bool, WorkerInfo]:
            return ("thread", x + 1, threading.get_ident() == main_thread, current_worker())

        def negate(x: int) -> tuple[str, int, bool, WorkerInfo]:
            return ("neg", -x, threading.get_ident() == main_thread, current_worker())

        return [on_loop, in_thread, negate]

    out = arun(run_ok(Pipeline(range(4)) >> views))
    assert out == [
        (
            ("loop", x * 10, True, WorkerInfo("views", 0, 1)),
            ("thread", x + 1, False, WorkerInfo("views", 1, 1)),
            ("neg", -x, False, WorkerInfo("views", 2, 1)),
       )
        for x in range(4)
    ]


# --- current_worker() --------------------------------------------------------------------------------


def _make_worker(kind: str, infos: list[WorkerInfo]) -> Callable[..., Any]:
    """A worker of ``kind`` that records current_worker() and fails its first two attempts."""
    if kind == "async":

        async def fn(x: int) -> WorkerInfo:
            info = current_worker()
            infos.append(info)
            if info.attempt < 3:
                raise ValueError(f"attempt {info.attempt}")
            return info

    elif kind == "thread":

        def fn(x: int) -> WorkerInfo:  # type: ignore[misc]
            info = current_worker()
            infos.append(info)
            if info.attempt < 3:
                raise ValueError(f"attempt {info.attempt}")
            return info

    elif kind == "generator":

        def fn(x: int) -> Any:  # type: ignore[misc]
            info = current_worker()
            infos.append(info)
            if info.attempt < 3:
                raise ValueError(f"attempt {info.attempt}")
            yield info

    else:

        async def fn(x: int) -> Any:  # type: ignore[misc]
            info = current_worker()
            infos.append(info)
            if info.attempt < 3:
                raise ValueError(f"attempt {info.attempt}")
            yield info

    return fn


@pytest.mark.parametrize("kind", ["async", "thread", "generator", "async-generator"])
def test_current_worker_reports_stage_index_and_attempt(arun: Any, kind: str) -> None:
    """current_worker() is WorkerInfo(stage name, worker index, attempt) in every kind of worker; attempt counts retries."""
    infos: list[WorkerInfo] = []
    stage = work_pool(retries=3, name="custom")(_make_worker(kind, infos))
    out = arun(run_ok(Pipeline([7]) >> stage))
    assert out == [WorkerInfo("custom", 0, 3)]
    assert infos == [WorkerInfo("custom", 0, 1), WorkerInfo("custom", 0, 2), WorkerInfo("custom", 0, 3)]
    assert all(isinstance(i, WorkerInfo) for i in infos)


@pytest.mark.parametrize("kind", ["async", "thread"])
def test_current_worker_stage_defaults_to_function_name(arun: Any, kind: str) -> None:
    """Without name=, current_worker().stage is the function's name and attempt starts at 1."""

    async def fetch_async(x: int) -> WorkerInfo:
        return current_worker()

    def fetch_sync(x: int) -> WorkerInfo:
        return current_worker()

    fn = fetch_async if kind == "async" else fetch_sync
    out = arun(run_ok(Pipeline([1, 2]) >> work_pool(fn)))
    assert out == [WorkerInfo(fn.__name__, 0, 1)] * 2


def test_current_worker_attempt_resets_for_each_item(arun: Any) -> None:
    """A retried item does not leak its attempt number into the next item the worker takes."""
    failed: set[int] = set()

    @work_pool(retries=2)
    async def flaky_first(x: int) -> tuple[int, int]:
        info = current_worker()
        if x == 0 and x not in failed:
            failed.add(x)
            raise ValueError("once")
        return (x, info.attempt)

    assert arun(run_ok(Pipeline(range(3)) >> flaky_first)) == [(0, 2), (1, 1), (2, 1)]


def test_current_worker_outside_a_worker_raises(arun: Any) -> None:
    """current_worker() outside a worker call raises RuntimeError: at top level, in a direct call, after a run."""
    with pytest.raises(RuntimeError):
        current_worker()

    @work_pool
    async def who(x: int) -> WorkerInfo:
        return current_worker()

    with pytest.raises(RuntimeError):
        arun(who(1))

    async def after_run() -> None:
        assert await run_ok(Pipeline([1]) >> who) == [WorkerInfo("who", 0, 1)]
        with pytest.raises(RuntimeError):
            current_worker()

    arun(after_run())
