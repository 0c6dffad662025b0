"""Cancelling a run re-raises ``CancelledError`` at every phase, and shutdown completes anyway.

The phases: while backends open (start), while items are in flight (running), after the
source is exhausted with the last items still in flight (draining), and while the run
shuts down after ``fail_fast`` (the source's own asynchronous clean-up still running).
Each test drives the phase with events, not sleeps, and checks both halves of the rule:
the caller's cancellation is never swallowed, and what the run started is closed.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from typing import Any, AsyncIterator

import pytest

from pypline import Pipeline, work_pool
from pypline.executor import Backend, Executor, StageSpec
from pypline.testing import MockBackend
from pypline.util import is_err, is_ok, unwrap


async def _wait_until_cancelled(seen: list[str]) -> None:
    """Stage code that blocks until the run cancels it, noting that it saw the cancellation."""
    try:
        await asyncio.Event().wait()
    except asyncio.CancelledError:
        seen.append("cancelled")
        raise


def test_cancel_during_start_reraises_and_closes_the_backend(arun: Any) -> None:
    """A backend still opening when the caller is cancelled: CancelledError, and the
    backend's aclose() is still called."""

    class SlowToOpen(Backend):
        name = "slow-to-open"

        def __init__(self) -> None:
            self.opening = asyncio.Event()
            self.closed = False

        async def open(self) -> None:
            self.opening.set()
            await asyncio.Event().wait()  # never opens by itself

        def executor(self, spec: StageSpec) -> Executor:
            raise AssertionError("never reached")

        async def aclose(self) -> None:
            self.closed = True

    async def main() -> None:
        backend = SlowToOpen()
        stage = work_pool(lambda x: x, multi_proc=True)
        task = asyncio.ensure_future((Pipeline(range(3)) >> stage).run(executor=backend))
        await backend.opening.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert backend.closed

    arun(main())


@pytest.mark.parametrize("phase", ["running", "draining"])
def test_cancel_while_items_are_in_flight_reraises(arun: Any, phase: str) -> None:
    """Items in flight (source not finished / source exhausted): the caller's cancellation
    propagates, the stage code sees it, and no pypline task is left behind."""

    async def main() -> None:
        started = asyncio.Event()
        seen: list[str] = []

        @work_pool(num_workers=2)
        async def blocked(x: int) -> int:
            started.set()
            await _wait_until_cancelled(seen)
            return x

        source: Any = range(2) if phase == "draining" else range(1000)
        before = asyncio.all_tasks()
        task = asyncio.ensure_future((Pipeline(source) >> blocked).run())
        await started.wait()
        await asyncio.sleep(0)  # let the second worker start too
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert seen and set(seen) == {"cancelled"}
        leftovers = [t for t in asyncio.all_tasks() - before if not t.done()]
        assert leftovers == []

    arun(main())


def _fail_fast_with_slow_source_cleanup() -> tuple[Pipeline, asyncio.Event, asyncio.Event, list[str]]:
    """fail_fast on item 0; the async source's clean-up waits for ``release``."""
    cleanup_started = asyncio.Event()
    release = asyncio.Event()
    log: list[str] = []

    async def source() -> AsyncIterator[int]:
        try:
            for i in range(1000):
                yield i
                await asyncio.sleep(0)
        finally:
            cleanup_started.set()
            await release.wait()
            log.append("source closed")

    @work_pool
    async def fail_first(x: int) -> int:
        if x == 0:
            raise ValueError("item 0 is bad")
        await asyncio.sleep(0)
        return x

    return Pipeline(source()) >> fail_first, cleanup_started, release, log


def test_cancel_during_shutdown_reraises_after_cleaning_up(arun: Any) -> None:
    """Cancelled while the run shuts down (fail_fast, the source still closing): the caller
    gets CancelledError, not an Err, and only once the clean-up has finished."""

    async def main() -> None:
        pipeline, cleanup_started, release, log = _fail_fast_with_slow_source_cleanup()
        task = asyncio.ensure_future(pipeline.run(fail_fast=True))
        await cleanup_started.wait()
        task.cancel()
        await asyncio.sleep(0.01)
        assert not task.done()  # still cleaning up: the source has not closed yet
        release.set()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert log == ["source closed"]

    arun(main())


@pytest.mark.skipif(sys.version_info < (3, 11), reason="asyncio.timeout() is new in Python 3.11")
def test_timeout_around_run_raises_timeout_error_during_shutdown(arun: Any) -> None:
    """``asyncio.timeout()`` expiring while the run shuts down raises TimeoutError (the
    cancellation is not swallowed into a returned Err)."""

    async def main() -> None:
        pipeline, cleanup_started, release, _ = _fail_fast_with_slow_source_cleanup()

        async def release_later() -> None:
            await cleanup_started.wait()
            await asyncio.sleep(0.3)
            release.set()

        helper = asyncio.ensure_future(release_later())
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.1):  # type: ignore[attr-defined,unused-ignore]
                await pipeline.run(fail_fast=True)
        await helper

    arun(main())


def test_cancel_a_stream_consumer_reraises_and_closes(arun: Any) -> None:
    """A task consuming ``stream()`` is cancelled between results: CancelledError, and the
    stream's run is shut down (its stage code was cancelled)."""

    async def main() -> None:
        got_one = asyncio.Event()
        seen: list[str] = []

        @work_pool(num_workers=2)
        async def slow_after_first(x: int) -> int:
            if x > 0:
                await _wait_until_cancelled(seen)
            return x

        async def consume() -> None:
            async for r in (Pipeline(range(10)) >> slow_after_first).stream():
                assert is_ok(r)
                got_one.set()

        task = asyncio.ensure_future(consume())
        await got_one.wait()
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert seen and set(seen) == {"cancelled"}

    arun(main())


class _FailingClose(MockBackend):
    async def aclose(self) -> None:
        await super().aclose()
        raise OSError("socket already gone")


def test_backend_close_errors_are_logged_and_the_result_kept(arun: Any, caplog: Any) -> None:
    """A backend whose aclose() raises: the run still returns its result, and the error is
    logged on ``pypline.engine`` with the backend named."""
    stage = work_pool(lambda x: x + 1, multi_proc=True)
    with caplog.at_level(logging.ERROR, logger="pypline.engine"):
        result = arun((Pipeline(range(5)) >> stage).run(executor=_FailingClose()))
    assert unwrap(result) == [1, 2, 3, 4, 5]
    records = [r for r in caplog.records if r.name == "pypline.engine" and "backend failed" in r.getMessage()]
    assert len(records) == 1 and isinstance(records[0].exc_info[1], OSError)  # type: ignore[index]


def test_executor_close_errors_are_logged_and_the_result_kept(arun: Any, caplog: Any) -> None:
    """An executor whose aclose() raises: same rule (the items were all delivered)."""

    class Backend_(MockBackend):
        def executor(self, spec: StageSpec) -> Executor:
            ex = super().executor(spec)
            original = ex.aclose

            async def aclose() -> None:
                await original()
                raise RuntimeError("worker refused to stop")

            ex.aclose = aclose  # type: ignore[method-assign]
            return ex

    stage = work_pool(lambda x: x * 2, multi_proc=True)
    with caplog.at_level(logging.ERROR, logger="pypline.engine"):
        result = arun((Pipeline(range(4)) >> stage).run(executor=Backend_()))
    assert unwrap(result) == [0, 2, 4, 6]
    assert any("closing the executor" in r.getMessage() for r in caplog.records if r.name == "pypline.engine")
    assert not is_err(result)
