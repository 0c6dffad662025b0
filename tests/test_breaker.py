"""pause_after=k: a stage whose dependency is down stops sending it work, probes, resumes."""

from __future__ import annotations

import time
from typing import Any

import pytest

from pypline import Pipeline, work_pool
from pypline._retry import RetryPolicy
from pypline.util import unwrap

pytestmark = pytest.mark.timeout(60)


class Down(ConnectionError):
    pass


def test_an_outage_costs_few_calls_and_the_run_recovers() -> None:
    """The server is down for its first 0.6 s. Without the breaker every free worker keeps
    calling it; with pause_after=3 the stage pauses, probes with one item, and resumes."""

    def run(pause_after: int | None) -> tuple[list[int], int, dict[str, Any]]:
        calls_while_down = [0]
        up_at = time.monotonic() + 0.6

        def call(x: int) -> int:
            if time.monotonic() < up_at:
                calls_while_down[0] += 1
                time.sleep(0.01)
                raise Down("connection refused")
            return x

        stage = work_pool(call, num_workers=4, retries=50, backoff=0.01, max_backoff=0.05, pause_after=pause_after)
        p = Pipeline(range(40)) >> stage
        out = unwrap(p.run_sync())
        assert p.last_stats is not None
        return out, calls_while_down[0], dict(p.last_stats.stages[0].details)

    out, without, _ = run(None)
    assert out == list(range(40))
    out, with_breaker, details = run(3)
    assert out == list(range(40))  # nothing failed because of the pause
    assert details["breaker_trips"] >= 1 and details["paused_s"] > 0.2
    assert with_breaker * 3 < without, (with_breaker, without)


def test_the_pause_doubles_up_to_max_backoff_and_a_success_closes_it() -> None:
    import asyncio

    from pypline._breaker import CLOSED, HALF_OPEN, OPEN, Breaker
    from pypline.executor import Attempt, Executor, ExecutorStatistics, OutcomeSink, StageSpec

    class Inner(Executor):
        async def start(self, spec: StageSpec, sink: OutcomeSink) -> None:
            self.sink = sink

        def capacity(self) -> int:
            return 8

        def submit(self, attempts: Any) -> None:
            pass

        async def aclose(self) -> None:
            pass

        def statistics(self) -> ExecutorStatistics:
            return ExecutorStatistics("fake", 1, 8, 0, 0)

    class Sink(OutcomeSink):
        def ok(self, attempt: Attempt, value: Any) -> None: ...
        def error(self, attempt: Attempt, exc: BaseException) -> None: ...
        def lost(self, attempt: Attempt, where: str) -> None: ...
        async def emit(self, attempt: Attempt, value: Any) -> None: ...
        def capacity_changed(self) -> None: ...

    async def main() -> None:
        inner = Inner()
        b = Breaker(inner, 2, 0.01, 0.03, RetryPolicy(3, (ConnectionError,)).matches)
        await b.start(work_pool(abs).spec, Sink())
        a = [Attempt(i, None, 1) for i in range(6)]
        b.submit(a[:2])
        inner.sink.error(a[0], ValueError("not retryable: does not count"))
        inner.sink.error(a[1], Down("1"))
        assert b.state == CLOSED
        b.submit(a[2:3])
        inner.sink.error(a[2], Down("2"))
        assert b.state == OPEN and b.capacity() == 0
        await asyncio.sleep(0.02)
        assert b.state == HALF_OPEN and b.capacity() == 1
        b.submit(a[3:4])
        assert b.capacity() == 0  # one probe at a time
        inner.sink.error(a[3], Down("probe"))
        assert b.state == OPEN and b.pause == 0.02
        await asyncio.sleep(0.03)
        b.submit(a[4:5])
        inner.sink.error(a[4], Down("probe again"))
        assert b.pause == 0.03  # capped
        await asyncio.sleep(0.04)
        b.submit(a[5:6])
        inner.sink.ok(a[5], 5)
        assert b.state == CLOSED and b.capacity() == 8 and b.pause == 0.01
        await b.aclose()

    asyncio.run(main())


def test_max_backoff_caps_the_wait_between_attempts() -> None:
    policy = RetryPolicy(10, (Exception,), backoff=1.0, max_backoff=3.0, random=lambda: 0.0)
    assert [policy.decide(n, ValueError()) for n in range(1, 6)] == [1.0, 2.0, 3.0, 3.0, 3.0]
