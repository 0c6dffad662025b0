"""retries (total attempts), retry_on, backoff and per-attempt timeouts.

Time appears here only as a lower bound on a measured workload (backoff must wait
at least its documented delay); no test asserts an upper bound on time, and
ordering claims ("the worker is not held during backoff") are checked with an
ordered event log, not with the clock.
"""

from __future__ import annotations

import asyncio
import collections
import gc
import threading
import warnings
import time
from typing import Any, Callable

import pytest

from pypline import ItemFailure, Pipeline, PipelineError, current_worker, work_pool
from pypline.util import Err, Ok

# Deadline for any single wait inside a test: only reached when something is broken.
WAIT = 5.0
# asyncio may run a timer up to one clock tick early; on Linux that is a nanosecond.
TICK = time.get_clock_info("monotonic").resolution


async def run_ok(pipeline: Pipeline, **kw: Any) -> list[Any]:
    result = await pipeline.run(**kw)
    assert isinstance(result, Ok), f"expected Ok, got {result!r}"
    return result.value


async def run_err(pipeline: Pipeline, **kw: Any) -> PipelineError:
    result = await pipeline.run(**kw)
    assert isinstance(result, Err), f"expected Err, got {result!r}"
    assert isinstance(result.error, PipelineError)
    return result.error


def _as_kind(kind: str, fn: Callable[[int], Any]) -> Callable[[int], Any]:
    """``fn`` as a plain def (runs in a thread) or wrapped in an ``async def`` (runs on the loop)."""
    if kind == "thread":
        return fn

    async def afn(x: int) -> Any:
        return fn(x)

    afn.__name__ = fn.__name__
    return afn


KINDS = ["async", "thread"]


# --- retries -----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("retries", [1, 2, 5])
def test_retries_is_the_total_number_of_attempts(arun: Any, kind: str, retries: int) -> None:
    """After `retries` failures the item fails with attempts == retries and the LAST exception."""
    calls: list[int] = []

    def always_fails(x: int) -> Any:
        n = len(calls) + 1
        calls.append(current_worker().attempt)
        raise ValueError(f"attempt {n}")

    stage = work_pool(retries=retries, name="flaky")(_as_kind(kind, always_fails))
    err = arun(run_err(Pipeline(["item"]) >> stage))
    [failure] = err.failures
    assert isinstance(failure, ItemFailure)
    assert (failure.index, failure.stage, failure.item, failure.attempts) == (0, "flaky", "item", retries)
    assert isinstance(failure.error, ValueError)
    assert str(failure.error) == f"attempt {retries}"
    assert calls == list(range(1, retries + 1))
    assert err.outputs == []


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("k", [1, 2, 4])
def test_success_before_the_last_attempt_gives_ok(arun: Any, kind: str, k: int) -> None:
    """An item that succeeds on attempt k < retries is an Ok output; no further attempts are made."""
    calls: list[int] = []

    def succeeds_on_k(x: int) -> tuple[int, int]:
        attempt = current_worker().attempt
        calls.append(attempt)
        if attempt < k:
            raise ValueError(f"attempt {attempt}")
        return (x, attempt)

    stage = work_pool(retries=5)(_as_kind(kind, succeeds_on_k))
    assert arun(run_ok(Pipeline([42]) >> stage)) == [(42, k)]
    assert calls == list(range(1, k + 1))


def test_each_item_has_its_own_attempts(arun: Any) -> None:
    """Retries are counted per item: every failing item gets all its attempts; the others succeed."""
    calls: collections.Counter[int] = collections.Counter()

    @work_pool(retries=3, num_workers=2)
    async def odd_fails(x: int) -> int:
        calls[x] += 1
        if x % 2:
            raise ValueError(f"odd {x}")
        return x

    err = arun(run_err(Pipeline(range(10)) >> odd_fails))
    assert [(f.index, f.item, f.attempts, str(f.error)) for f in err.failures] == [
        (x, x, 3, f"odd {x}") for x in (1, 3, 5, 7, 9)
    ]
    assert err.outputs == [0, 2, 4, 6, 8]
    assert calls == collections.Counter({x: 3 if x % 2 else 1 for x in range(10)})


@pytest.mark.parametrize("kind", KINDS)
def test_exception_not_in_retry_on_fails_at_once(arun: Any, kind: str) -> None:
    """With retry_on=(KeyError,), a ValueError is not retried: attempts == 1 and one call."""
    calls: list[int] = []

    def value_error(x: int) -> Any:
        calls.append(current_worker().attempt)
        raise ValueError("not retryable")

    stage = work_pool(retries=4, retry_on=(KeyError,))(_as_kind(kind, value_error))
    err = arun(run_err(Pipeline([0]) >> stage))
    [failure] = err.failures
    assert failure.attempts == 1
    assert isinstance(failure.error, ValueError) and str(failure.error) == "not retryable"
    assert calls == [1]


def test_exception_in_retry_on_is_retried(arun: Any) -> None:
    """With retry_on=(KeyError,), a KeyError (or a subclass of a listed class) is retried up to `retries`."""
    calls: list[int] = []

    class MissingRecord(KeyError):
        pass

    @work_pool(retries=3, retry_on=LookupError)
    async def missing(x: int) -> Any:
        calls.append(current_worker().attempt)
        raise MissingRecord(f"attempt {len(calls)}")

    err = arun(run_err(Pipeline([0]) >> missing))
    [failure] = err.failures
    assert failure.attempts == 3 and isinstance(failure.error, MissingRecord)
    assert calls == [1, 2, 3]


def test_non_retryable_error_after_retryable_ones_stops_retrying(arun: Any) -> None:
    """A non-matching exception on attempt 2 ends the item there: attempts == 2, error is that exception."""
    calls: list[int] = []

    @work_pool(retries=5, retry_on=(KeyError,))
    async def changes_its_mind(x: int) -> Any:
        attempt = current_worker().attempt
        calls.append(attempt)
        if attempt == 1:
            raise KeyError("retry me")
        raise ValueError("give up")

    err = arun(run_err(Pipeline([0]) >> changes_its_mind))
    [failure] = err.failures
    assert failure.attempts == 2
    assert isinstance(failure.error, ValueError) and str(failure.error) == "give up"
    assert calls == [1, 2]


# --- backoff -------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_backoff_waits_at_least_the_documented_delay(arun: Any, kind: str) -> None:
    """backoff=b sleeps at least b * 2**(attempt-1) between attempts (lower bound only)."""
    starts: list[float] = []

    def always_fails(x: int) -> Any:
        starts.append(time.monotonic())
        raise ValueError(f"attempt {len(starts)}")

    stage = work_pool(retries=3, backoff=0.05)(_as_kind(kind, always_fails))
    t0 = time.monotonic()
    err = arun(run_err(Pipeline([0]) >> stage))
    elapsed = time.monotonic() - t0
    assert err.failures[0].attempts == 3
    assert len(starts) == 3
    assert elapsed >= 0.05 + 0.1 - 2 * TICK
    assert starts[1] - starts[0] >= 0.05 - TICK
    assert starts[2] - starts[1] >= 0.1 - TICK


@pytest.mark.timeout(30)
def test_worker_is_not_held_during_backoff(arun: Any) -> None:
    """While an item waits out its backoff, the (only) worker processes the other items."""
    log: list[tuple[str, int, int]] = []

    @work_pool(num_workers=1, retries=2, backoff=0.3)
    async def first_fails_once(x: int) -> int:
        attempt = current_worker().attempt
        log.append(("start", x, attempt))
        if x == 0 and attempt == 1:
            raise ValueError("once")
        log.append(("done", x, attempt))
        return x

    assert arun(run_ok(Pipeline(range(6)) >> first_fails_once)) == list(range(6))
    retry_start = log.index(("start", 0, 2))
    for x in range(1, 6):
        assert log.index(("done", x, 1)) < retry_start, f"item {x} waited for item 0's backoff: {log}"


# --- timeouts ------------------------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_async_attempt_that_times_out_raises_timeout_error(arun: Any) -> None:
    """An async attempt stuck past `timeout` fails with TimeoutError, each attempt counts, others go on."""
    calls = 0
    cancelled = 0

    @work_pool(timeout=0.05, retries=2, num_workers=2)
    async def stuck_on_one(x: int) -> int:
        nonlocal calls, cancelled
        if x != 1:
            return x
        calls += 1
        try:
            await asyncio.Event().wait()  # never set
        except asyncio.CancelledError:
            cancelled += 1
            raise
        return x  # pragma: no cover - unreachable

    err = arun(run_err(Pipeline(range(3)) >> stuck_on_one))
    [failure] = err.failures
    assert failure.index == 1
    assert isinstance(failure.error, TimeoutError)
    assert failure.attempts == 2
    assert calls == 2
    assert cancelled == 2  # the stuck coroutine was cancelled, not left running
    assert err.outputs == [0, 2]


@pytest.mark.timeout(30)
def test_stuck_thread_is_abandoned_and_the_pipeline_continues(arun: Any, no_thread_leaks: None) -> None:
    """A def stuck past `timeout` is abandoned: the item fails with TimeoutError, later items still run."""
    release = threading.Event()
    blocked: list[int] = []

    @work_pool(timeout=0.1, retries=2, num_workers=1)
    def stuck_on_first(x: int) -> Any:
        if x == 0:
            blocked.append(current_worker().attempt)
            release.wait(WAIT)
            return "late result"
        return x

    try:
        err = arun(run_err(Pipeline(range(4)) >> stuck_on_first), timeout=10)
    finally:
        release.set()  # let the abandoned threads finish (no_thread_leaks waits for them)
    [failure] = err.failures
    assert failure.index == 0 and failure.item == 0
    assert isinstance(failure.error, TimeoutError)
    assert failure.attempts == 2
    assert blocked == [1, 2]
    assert err.outputs == [1, 2, 3]  # the abandoned calls' results are discarded


@pytest.mark.timeout(30)
def test_async_timed_out_attempt_that_succeeds_on_retry_gives_ok(arun: Any) -> None:
    """An async attempt that times out and then succeeds on its retry yields an Ok output."""
    attempts: list[int] = []

    @work_pool(timeout=0.05, retries=3)
    async def slow_first(x: int) -> tuple[int, int]:
        attempt = current_worker().attempt
        attempts.append(attempt)
        if attempt == 1:
            await asyncio.Event().wait()  # never set
        return (x, attempt)

    assert arun(run_ok(Pipeline([5]) >> slow_first)) == [(5, 2)]
    assert attempts == [1, 2]


@pytest.mark.timeout(30)
def test_thread_timed_out_attempt_that_succeeds_on_retry_gives_ok(arun: Any, no_thread_leaks: None) -> None:
    """A def attempt that times out (abandoned thread) and then succeeds on its retry yields an Ok output."""
    release = threading.Event()
    attempts: list[tuple[int, int]] = []

    @work_pool(timeout=0.25, retries=3)
    def slow_first(x: int) -> tuple[int, int]:
        attempt = current_worker().attempt
        attempts.append((x, attempt))
        if x == 5 and attempt == 1:
            release.wait(WAIT)
            return (x, -1)  # the abandoned attempt's late result must be discarded
        return (x, attempt)

    try:
        out = arun(run_ok(Pipeline([5, 6]) >> slow_first), timeout=10)
    finally:
        release.set()
    assert out == [(5, 2), (6, 1)]
    assert sorted(attempts) == [(5, 1), (5, 2), (6, 1)]


@pytest.mark.timeout(30)
def test_stuck_async_generator_attempt_times_out(arun: Any) -> None:
    """`timeout` bounds an async-generator attempt: TimeoutError after `retries` attempts, other items go on."""

    @work_pool(timeout=0.05, retries=2)
    async def async_gen(x: int) -> Any:
        if x == 0:
            await asyncio.Event().wait()  # never set
        yield x

    err = arun(run_err(Pipeline(range(3)) >> async_gen), timeout=10)
    [failure] = err.failures
    assert (failure.index, failure.stage, failure.attempts) == (0, "async_gen", 2)
    assert isinstance(failure.error, TimeoutError)
    assert err.outputs == [1, 2]


@pytest.mark.timeout(30)
def test_stuck_generator_attempt_times_out(arun: Any, no_thread_leaks: None) -> None:
    """`timeout` bounds a generator attempt in a thread: TimeoutError after `retries`, other items go on."""
    release = threading.Event()
    stuck: list[threading.Thread] = []

    @work_pool(timeout=0.1, retries=2)
    def sync_gen(x: int) -> Any:
        if x == 0:
            stuck.append(threading.current_thread())
            release.wait(WAIT)
        yield x

    async def main() -> PipelineError:
        try:
            return await run_err(Pipeline(range(3)) >> sync_gen)
        finally:
            # Let the abandoned generators finish while the loop is still running (the
            # after-the-loop case is test_abandoned_generator_thread_...).
            release.set()
            for t in stuck:
                await asyncio.to_thread(t.join, WAIT)

    try:
        err = arun(main(), timeout=10)
    finally:
        release.set()
    [failure] = err.failures
    assert (failure.index, failure.stage, failure.attempts) == (0, "sync_gen", 2)
    assert isinstance(failure.error, TimeoutError)
    assert err.outputs == [1, 2]
    assert len(stuck) == 2 and not any(t.is_alive() for t in stuck)


@pytest.mark.timeout(30)
def test_abandoned_generator_thread_finishing_after_the_run_warns_nothing(arun: Any) -> None:
    """A timed-out generator thread that resumes after run() returned is discarded without any warning."""
    release = threading.Event()
    stuck: list[threading.Thread] = []

    @work_pool(timeout=0.05)
    def sync_gen(x: int) -> Any:
        stuck.append(threading.current_thread())
        release.wait(WAIT)
        yield x

    try:
        err = arun(run_err(Pipeline([0]) >> sync_gen), timeout=10)
    finally:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            release.set()
            for t in stuck:
                t.join(WAIT)
            gc.collect()
    assert isinstance(err.failures[0].error, TimeoutError)
    assert len(stuck) == 1 and not stuck[0].is_alive()
    assert [str(w.message) for w in caught] == []


@pytest.mark.timeout(30)
def test_fork_worker_timeout_is_retried_on_that_worker(arun: Any) -> None:
    """In fork mode a worker's timed-out attempt is retried (attempt 2) and the item still merges."""

    @work_pool(num_workers=2, timeout=0.05, retries=2, fork_merge=list)
    async def part(x: int) -> tuple[int, int]:
        info = current_worker()
        if info.index == 1 and info.attempt == 1:
            await asyncio.Event().wait()  # never set
        return (info.index, info.attempt)

    assert arun(run_ok(Pipeline(range(2)) >> part)) == [[(0, 1), (1, 2)]] * 2


def test_a_failure_keeps_the_history_of_its_attempts_and_stats_count_retries_by_type() -> None:
    """ItemFailure.history: (type, message) of each earlier attempt, oldest first; the last
    error is the one kept whole. StageStatistics.retries_by_error counts retries per type."""
    from pypline import Pipeline, work_pool

    errors = [ConnectionError("refused"), TimeoutError("slow"), ValueError("bad data")]
    tries: dict[int, int] = {}

    def flaky(x: int) -> int:
        n = tries[x] = tries.get(x, 0) + 1
        if x == 1:
            raise errors[n - 1]
        if x == 2 and n == 1:
            raise ConnectionError("refused")
        return x

    p = Pipeline(range(3)) >> work_pool(flaky, retries=3)
    error = p.run_sync().unwrap_err()
    [failure] = error.failures
    assert failure.history == (("ConnectionError", "refused"), ("TimeoutError", "slow"))
    assert isinstance(failure.error, ValueError) and failure.attempts == 3
    assert error.outputs == [0, 2]
    assert p.last_stats is not None
    assert dict(p.last_stats.stages[0].retries_by_error) == {"ConnectionError": 2, "TimeoutError": 1}
    import pickle

    assert pickle.loads(pickle.dumps(failure)).history == failure.history
