"""rate=(n, seconds): at most n attempts start in any window of that many seconds, for the
stage as a whole (retries included), on every backend; statistics show the time waited."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from pypline import Pipeline, work_pool
from pypline._rate import RateLimited
from pypline.executor import Attempt, Executor, ExecutorStatistics, OutcomeSink, StageSpec
from pypline.util import unwrap

pytestmark = pytest.mark.timeout(60)


#: Workers start an attempt a little after the engine hands it over (a thread or a process
#: picking it up): measured at the workers, the window is checked this much shorter.
DISPATCH_SLACK = 0.05


def max_in_window(starts: list[float], per: float) -> int:
    """Most starts in any window of ``per - DISPATCH_SLACK`` seconds."""
    per -= DISPATCH_SLACK
    starts = sorted(starts)
    j = 0
    best = 0
    for i, t in enumerate(starts):
        while t - starts[j] >= per:
            j += 1
        best = max(best, i - j + 1)
    return best


def stamp(x: int) -> float:
    return time.monotonic()  # CLOCK_MONOTONIC: one clock for every process on this host


@pytest.mark.parametrize("multi_proc", [False, True], ids=["threads", "processes"])
def test_no_window_holds_more_starts_than_the_rate(multi_proc: bool) -> None:
    p = Pipeline(range(60)) >> work_pool(stamp, num_workers=4, multi_proc=multi_proc, rate=(20, 0.5))
    t0 = time.monotonic()
    starts = unwrap(p.run_sync())
    assert len(starts) == 60
    assert max_in_window(starts, 0.5) <= 20
    assert time.monotonic() - t0 >= 59 * 0.5 / 20  # one start every 0.025 s
    assert p.last_stats is not None
    assert p.last_stats.stages[0].details["rate_waited_s"] > 0.5


def test_retries_count_against_the_rate() -> None:
    seen: dict[int, int] = {}
    starts: list[float] = []

    def flaky(x: int) -> int:
        starts.append(time.monotonic())
        seen[x] = seen.get(x, 0) + 1
        if seen[x] == 1:
            raise ConnectionError("try again")
        return x

    p = Pipeline(range(10)) >> work_pool(flaky, num_workers=4, retries=2, rate=(5, 0.3))
    assert unwrap(p.run_sync()) == list(range(10))
    assert len(starts) == 20 and max_in_window(starts, 0.3) <= 5


def test_rate_is_checked() -> None:
    with pytest.raises(TypeError, match=r"rate must be \(attempts, seconds\)"):
        work_pool(rate=100)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"rate\[1\] \(seconds\) must be > 0"):
        work_pool(rate=(10, 0))
    with pytest.raises(ValueError, match=r"rate\[0\] \(attempts\) must be >= 1"):
        work_pool(rate=(0, 1.0))


class _Inner(Executor):
    """Always has room; records what it is given."""

    def __init__(self) -> None:
        self.got: list[Attempt] = []

    async def start(self, spec: StageSpec, sink: OutcomeSink) -> None:
        self.sink = sink

    def capacity(self) -> int:
        return 1000

    def submit(self, attempts: Any) -> None:
        self.got.extend(attempts)

    async def aclose(self) -> None:
        pass

    def statistics(self) -> ExecutorStatistics:
        return ExecutorStatistics("fake", 1, 1000, len(self.got), 0)


def test_the_spacing_with_an_injected_clock() -> None:
    """One start every seconds/n, and no more out than workers; a timer says when it is due."""
    now = [100.0]
    woken: list[int] = []

    class Sink(OutcomeSink):
        def ok(self, attempt: Attempt, value: Any) -> None: ...
        def error(self, attempt: Attempt, exc: BaseException) -> None: ...
        def lost(self, attempt: Attempt, where: str) -> None: ...
        async def emit(self, attempt: Attempt, value: Any) -> None: ...
        def capacity_changed(self) -> None:
            woken.append(1)

    async def main() -> None:
        inner = _Inner()
        ex = RateLimited(inner, 4, 1.0, clock=lambda: now[0])  # one start every 0.25 s
        spec = work_pool(abs, num_workers=2).spec
        await ex.start(spec, Sink())
        a = [Attempt(i, None, 1) for i in range(3)]
        assert ex.capacity() == 1
        ex.submit([a[0]])
        assert ex.capacity() == 0  # the next start is due at 100.25
        now[0] += 0.25
        assert ex.capacity() == 1
        ex.submit([a[1]])
        now[0] += 0.25
        assert ex.capacity() == 0  # due, but both workers are busy
        inner.sink.ok(a[0], 0)
        assert ex.capacity() == 1
        ex.submit([a[2]])
        now[0] += 0.1
        assert ex.capacity() == 0
        await asyncio.sleep(0.35)  # the (real) timer set when a start was first not due fires
        assert woken and ex.statistics().details["rate_waited_s"] > 0
        await ex.aclose()

    asyncio.run(main())
