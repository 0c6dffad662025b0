"""The bottleneck hint advises only what its measurements support.

More workers help a stage whose calls wait for I/O. They do not help a stage whose calls
are CPU-bound in threads (one core under the GIL), nor one whose calls wait for the
interpreter behind a busy event loop: there the calls' wall time says nothing about their
work (a crawl's `def parse` looked 98 % busy at 8 ms a call, yet cost 51 us on an idle
thread). The hint reads the calls' CPU share and the loop's own CPU share.
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any

import pytest

from pypline import Pipeline, work_pool
from pypline._stats import StageStatistics, bottleneck
from pypline.util import unwrap

pytestmark = pytest.mark.timeout(60)


def _stage(**kw: Any) -> StageStatistics:
    base = StageStatistics(
        name="parse", backend="asyncio", kind="sync", workers=2, buffer=16, received=1000, succeeded=1000,
        failed=0, outputs=1000, attempts=1000, retries=0, lost=0, workers_replaced=0, busy_seconds=9.8,
        utilisation=0.98, latency_mean=0.008, latency_p50=0.008, latency_p95=0.01, latency_max=0.02,
        queue_depth=0, queue_max=18, capacity=18, times_full=0, throughput=100.0,
    )
    return replace(base, **kw)


def test_waiting_behind_a_busy_loop_is_not_a_lack_of_workers() -> None:
    """Calls mostly off-CPU while the loop was busy: no "num_workers" advice, the loop named."""
    _, hint = bottleneck([_stage(cpu_share=0.05)], consumer_waited=False, loop_busy=0.95)
    assert hint is not None and "num_workers" not in hint
    assert "event loop" in hint and "95%" in hint and "5% of their time on a CPU" in hint


def test_waiting_for_io_with_an_idle_loop_asks_for_more_workers() -> None:
    """Calls mostly off-CPU and the loop mostly idle: they wait for I/O, more workers help."""
    _, hint = bottleneck([_stage(cpu_share=0.05)], consumer_waited=False, loop_busy=0.10)
    assert hint is not None and "try num_workers=4" in hint


def test_cpu_bound_threads_are_sent_to_processes() -> None:
    """Calls on a CPU most of their time: multi_proc=True, not more threads."""
    _, hint = bottleneck([_stage(cpu_share=0.97)], consumer_waited=False, loop_busy=0.10)
    assert hint is not None and "multi_proc=True" in hint and "num_workers" not in hint


def test_unmeasured_backends_keep_the_general_advice() -> None:
    """Where nothing says otherwise (a process backend), more workers is the advice."""
    _, hint = bottleneck([_stage(backend="process", cpu_share=None)], consumer_waited=False, loop_busy=0.95)
    assert hint is not None and "try num_workers=4" in hint


def test_a_saturated_loop_in_a_real_run_gets_no_more_workers_advice() -> None:
    """An async stage that computes on the loop (as a busy HTTP client does) starves a cheap
    `def parse` stage of the interpreter. The hint must not advise more workers for parse."""

    @work_pool(num_workers=4)
    async def hog(x: int) -> int:
        t = time.perf_counter()
        while time.perf_counter() - t < 0.004:  # computes on the loop, never awaits
            pass
        return x

    @work_pool(num_workers=2)
    def parse(x: int) -> int:
        return sum(range(200)) + x  # ~10 us of work

    pipeline = Pipeline(range(400)) >> hog >> parse
    unwrap(pipeline.run_sync())
    stats = pipeline.last_stats
    assert stats is not None and stats.loop_busy is not None
    if stats.loop_busy < 0.7:  # the loop's CPU share is what was measured: it needs a CPU to itself
        pytest.skip(f"this machine is too busy for the loop to saturate a CPU (it got {stats.loop_busy:.0%})")
    parse_stats = stats.stages[1]
    assert parse_stats.cpu_share is not None and parse_stats.cpu_share < 0.7
    assert stats.hint is not None
    assert not (stats.bottleneck == "parse" and "num_workers" in stats.hint), stats.hint
