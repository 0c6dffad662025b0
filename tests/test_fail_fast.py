"""``fail_fast`` blames only the item that failed.

Items in flight when the run stops are interrupted, not failed: an error that would have
been retried, arriving after the stop, is not reported as a failure; such items are
counted in ``PipelineError.cancelled``; the failure that stopped the run comes first.
"""

from __future__ import annotations

import asyncio
import logging
import pickle
import time
from typing import Any

import pytest

from pypline import ItemFailure, Pipeline, PipelineError, work_pool
from pypline.util import unwrap_err

pytestmark = pytest.mark.timeout(30)


def test_a_retryable_error_after_the_stop_is_not_a_failure(arun: Any) -> None:
    """Item 3 answers 404 (not retried); item 1's retryable TimeoutError arrives just after
    the stop: only item 3 is a failure, it is first, and the interrupted items are counted."""

    async def main() -> PipelineError:
        failed = asyncio.Event()

        @work_pool(num_workers=4, retries=4, retry_on=(TimeoutError,))
        async def fetch(x: int) -> int:
            if x == 3:
                failed.set()  # item 1 wakes up right after this failure stopped the run
                raise ValueError("404 for item 3")
            if x == 1:
                await failed.wait()
                raise TimeoutError("slow page (would be retried)")
            await asyncio.Event().wait()  # the others are still in flight at the stop
            return x

        return unwrap_err(await (Pipeline(range(4)) >> fetch).run(fail_fast=True))

    err = arun(main())
    assert [(f.index, type(f.error)) for f in err.failures] == [(3, ValueError)]
    assert err.cancelled == 3  # items 0, 1 and 2 were interrupted
    assert "3 item(s) in flight were cancelled" in str(err)


def test_the_failure_that_stopped_the_run_comes_first(arun: Any) -> None:
    """Two items fail for good; the second one's failure arrives while stopping. The first
    to fail is failures[0], whatever its position in the source."""

    async def main() -> PipelineError:
        gate = asyncio.Event()

        @work_pool(num_workers=3)
        async def check(x: int) -> int:
            if x == 2:
                gate.set()
                raise ValueError("first to fail")
            if x == 0:
                await gate.wait()
                raise KeyError("fails too, but after the stop")
            await asyncio.Event().wait()
            return x

        return unwrap_err(await (Pipeline(range(3)) >> check).run(fail_fast=True))

    err = arun(main())
    assert [f.index for f in err.failures] == [2, 0]  # the trigger first, then source order
    assert isinstance(err.failures[0].error, ValueError)
    assert err.cancelled == 1


def test_no_thread_replacement_logged_at_shutdown(arun: Any, caplog: Any) -> None:
    """Threads still running a call when fail_fast stops the run are abandoned without a
    "starting a new one" warning (nothing is started any more)."""

    @work_pool(num_workers=2)
    def work(x: int) -> int:
        if x == 0:
            raise ValueError("bad")
        time.sleep(0.3)
        return x

    with caplog.at_level(logging.INFO, logger="pypline.backends.local"):
        err = unwrap_err(arun((Pipeline(range(4)) >> work).run(fail_fast=True)))
    assert err.failures[0].index == 0
    messages = [r.getMessage() for r in caplog.records]
    assert not [m for m in messages if "starting a new one" in m]


def test_pipeline_error_repr_is_bounded_and_pickles() -> None:
    """repr() of a PipelineError counts its outputs instead of printing them; ``cancelled``
    survives pickling."""
    failure = ItemFailure(7, "stage", "x" * 10_000, ValueError("v" * 10_000), 1, 1)
    err = PipelineError(failures=[failure], outputs=list(range(100_000)), cancelled=5)
    text = repr(err)
    assert len(text) < 600 and "outputs=100000" in text and "cancelled=5" in text
    again = pickle.loads(pickle.dumps(err))
    assert again.cancelled == 5 and len(again.outputs) == 100_000 and again.failures[0].index == 7
