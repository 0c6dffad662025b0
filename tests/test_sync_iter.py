"""``Pipeline.iter()``: the synchronous twin of ``stream()``.

One ``Result`` per output from plain code; the same backpressure (the memory bound holds
with a slow consumer); and a clean stop on ``break``, ``close()``, a ``with`` block's end
and an exception in the loop body: no thread, task or process outlives it.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Iterator

import psutil
import pytest

from pypline import Pipeline, work_pool
from pypline.lowlevel import admission_bound
from pypline.util import Err, Ok, is_err, is_ok

pytestmark = pytest.mark.timeout(60)


def _sync_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("pypline-") and t.is_alive()]


def _no_threads_left() -> bool:
    """The private loop thread is joined by close(); a stage's worker thread that was mid-call
    is abandoned (a running call cannot be stopped) and ends once that call returns."""
    if any(t.name == "pypline-sync" for t in _sync_threads()):
        return False
    deadline = time.monotonic() + 10
    while _sync_threads() and time.monotonic() < deadline:
        time.sleep(0.01)
    return _sync_threads() == []


def _children() -> set[int]:
    return {p.pid for p in psutil.Process().children(recursive=True) if p.status() != psutil.STATUS_ZOMBIE}


@work_pool(num_workers=2)
def double(x: int) -> int:
    if x == 3:
        raise ValueError("three")
    return 2 * x


def test_iter_yields_one_result_per_output_in_order_when_asked() -> None:
    """Ok for each output, Err(ItemFailure) for the failed item; ordered=True keeps source order."""
    results = list((Pipeline(range(6)) >> double).iter(ordered=True))
    assert [r.value if is_ok(r) else None for r in results] == [0, 2, 4, None, 8, 10]
    [bad] = [r for r in results if is_err(r)]
    assert isinstance(bad, Err) and bad.error.index == 3
    assert _no_threads_left()


def test_break_stops_every_stage_and_process() -> None:
    """Leaving a for loop early over a multi_proc stage: the worker processes and the private
    thread are gone once the iterator is dropped."""
    before = _children()
    stage = work_pool(lambda x: x + 1, multi_proc=True, num_workers=2)
    for r in (Pipeline(range(100_000)) >> stage).iter():
        assert isinstance(r, Ok)
        break
    deadline = time.monotonic() + 10
    while (_children() - before or _sync_threads()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _children() - before == set() and _sync_threads() == []


def test_with_block_and_exception_in_the_body_close_it() -> None:
    """The end of a with block closes the iterator; so does an exception in the loop body."""
    with (Pipeline(range(1000)) >> double).iter() as results:
        first = next(results)
        assert is_ok(first)
    assert _no_threads_left()
    with pytest.raises(RuntimeError, match="consumer broke"):
        with (Pipeline(range(1000)) >> double).iter() as results:
            for _ in results:
                raise RuntimeError("consumer broke")
    assert _no_threads_left()
    it = (Pipeline(range(10)) >> double).iter()
    next(it)
    it.close()
    it.close()  # idempotent
    assert list(it) == [] and _no_threads_left()


def test_a_slow_consumer_slows_the_source_within_the_bound() -> None:
    """Pulled-but-not-yet-delivered items never exceed the memory bound while the loop body
    takes its time. (Counted here, in the consumer's thread, one result can be on its way
    from the engine's thread: handed over, its permit back, not yet counted. So the count
    may read one above the bound, never more.)"""
    pulled = [0]
    delivered = [0]
    worst = [0]

    def source() -> Iterator[int]:
        for i in range(300):
            pulled[0] += 1
            worst[0] = max(worst[0], pulled[0] - delivered[0])
            yield i

    stage = work_pool(lambda x: x, buffer=4, num_workers=2)
    bound = admission_bound([stage.spec])
    for r in (Pipeline(source()) >> stage).iter():
        assert is_ok(r)
        delivered[0] += 1
        if delivered[0] % 50 == 0:
            time.sleep(0.02)  # a slow consumer now and then
    assert delivered[0] == 300 and 0 < worst[0] <= bound + 1


def test_iter_from_a_thread_and_inside_a_running_loop(arun: Any) -> None:
    """iter() works from any thread, including inside a running event loop (a notebook)."""
    out: list[Any] = []

    def consume() -> None:
        out.extend(r.value for r in (Pipeline(range(5)) >> double).iter(ordered=True) if is_ok(r))

    t = threading.Thread(target=consume)
    t.start()
    t.join(30)
    assert out == [0, 2, 4, 8]

    async def main() -> list[Any]:
        return [r.value for r in (Pipeline(range(3)) >> double).iter(ordered=True) if is_ok(r)]

    assert arun(main()) == [0, 2, 4]
    assert _no_threads_left()
