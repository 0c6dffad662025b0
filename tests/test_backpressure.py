"""Backpressure (the memory bound): what ``buffer`` guarantees.

At every moment, items pulled from the source but not yet delivered (to ``run()``'s
result list or to ``stream()``'s consumer) number at most::

    sum(buffer + num_workers for each stage) + len(stages) + 1

Every test here instruments both ends: the source counts each pull, and the
collector point counts each delivered source item:

- ``stream()``: the consumer counts a source item when it has received the item's
  result (all of its results, for a flat-map stage);
- ``run()``: the last stage counts an item when its ``async def`` worker returns
  (or when its ``fork_merge`` runs): from there the engine hands the value to the
  result list synchronously, with no await in between, so the count is exact. (A
  last stage running plain ``def`` in a thread counts slightly early, which can only
  make the check more lenient, never flaky.)

The bound is checked by the source itself at EVERY pull. Slow consumers and slow
items are made with events, not sleeps; ``settle()`` only yields control to the loop
so that the pipeline runs until it can go no further (deterministic with ``async def``
stages, which is what the exact-stall tests use).
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any, AsyncIterator, Callable, Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pypline import Pipeline, PipelineStream, current_worker, mix_pool, work_pool
from pypline.util import Ok, is_ok, unwrap

# --- instruments ---------------------------------------------------------------------------------


def bound_of(*stages: tuple[int, int]) -> int:
    """The memory bound for stages given as ``(buffer, workers)``, computed independently of the engine."""
    return sum(buffer + workers for buffer, workers in stages) + len(stages) + 1


class Meter:
    """Counts source pulls and deliveries; checks the memory bound at every single pull."""

    def __init__(self, bound: int) -> None:
        self.bound = bound
        self.pulled = 0
        self.delivered = 0
        self.max_outstanding = 0
        self.violations: list[tuple[int, int]] = []
        self._lock = threading.Lock()  # deliver() may be called from a stage's worker thread

    @property
    def outstanding(self) -> int:
        return self.pulled - self.delivered

    def _pull(self) -> None:
        with self._lock:
            self.pulled += 1
            out = self.pulled - self.delivered
            self.max_outstanding = max(self.max_outstanding, out)
            if out > self.bound:
                self.violations.append((self.pulled, self.delivered))

    def deliver(self) -> None:
        with self._lock:
            self.delivered += 1

    def source(self, n: int) -> Iterator[int]:
        for i in range(n):
            self._pull()
            yield i

    async def asource(self, n: int) -> AsyncIterator[int]:
        for i in range(n):
            self._pull()
            yield i

    def assert_bound(self) -> None:
        assert not self.violations, (
            f"bound {self.bound} exceeded at (pulled, delivered) = {self.violations[:5]}"
       )
        assert self.max_outstanding <= self.bound


async def settle(rounds: int = 100) -> None:
    """Yield control to the event loop ``rounds`` times (never waits for time to pass)."""
    for _ in range(rounds):
        await asyncio.sleep(0)


def extra_tasks(before: set[asyncio.Task[Any]]) -> set[asyncio.Task[Any]]:
    return {t for t in asyncio.all_tasks() if t not in before and not t.done()}


async def consume_slowly(
    m: Meter, stream: PipelineStream, on_result: Callable[[Any], None] | None = None
) -> tuple[list[Any], list[int]]:
    """A slow consumer: before each ``next`` it lets the pipeline run until it stands still.

    Returns the results and, for each standstill, how many items were outstanding then.
    ``on_result`` replaces the default accounting (one delivery per result).
    """
    results: list[Any] = []
    standstills: list[int] = []
    async with stream as s:
        it = s.__aiter__()
        while True:
            await settle()
            standstills.append(m.outstanding)
            try:
                r = await it.__anext__()
            except StopAsyncIteration:
                break
            results.append(r)
            if on_result is None:
                m.deliver()
            else:
                on_result(r)
    return results, standstills


# --- deterministic scenarios --------------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_slow_stream_consumer_stalls_intake_at_exactly_the_bound(arun: Any) -> None:
    """A consumer that stops asking stalls intake exactly at buffer + workers + stages + 1, and no further."""

    async def main() -> None:
        m = Meter(bound_of((2, 1)))
        before = asyncio.all_tasks()

        @work_pool(buffer=2, num_workers=1)
        async def inc(x: int) -> int:
            return x + 1

        async with (Pipeline(m.source(40)) >> inc).stream() as s:
            first = await s.__anext__()
            m.deliver()
            await settle()
            assert m.outstanding == m.bound == 5
            pulled = m.pulled
            await settle()
            assert m.pulled == pulled, "intake went on while the consumer was not asking"
            rest, standstills = await consume_slowly(m, s)
        assert max(standstills) == m.bound
        assert sorted(unwrap(r) for r in [first, *rest]) == list(range(1, 41))
        m.assert_bound()
        assert m.pulled == m.delivered == 40
        assert extra_tasks(before) == set()

    arun(main())


@pytest.mark.timeout(30)
def test_blocked_worker_stalls_intake_within_the_bound(arun: Any) -> None:
    """With its only worker blocked, a stage fills its buffer and then intake stops within the bound."""

    async def main() -> None:
        m = Meter(bound_of((2, 1)))
        gate = asyncio.Event()

        @work_pool(buffer=2, num_workers=1)
        async def held(x: int) -> int:
            await gate.wait()
            m.deliver()  # last stage: the engine delivers synchronously after this returns
            return x

        task = asyncio.create_task((Pipeline(m.source(100)) >> held).run())
        await settle()
        stalled = m.pulled
        assert 2 + 1 <= stalled <= m.bound, stalled  # the buffer is used, the bound is respected
        await settle()
        assert m.pulled == stalled, "intake went on while the stage was blocked"
        gate.set()
        assert await task == Ok(list(range(100)))
        m.assert_bound()

    arun(main())


@pytest.mark.timeout(30)
def test_blocked_downstream_stage_stalls_a_chain_within_the_bound(arun: Any) -> None:
    """A blocked second stage backs up into the first one; intake stops within the two-stage bound."""

    async def main() -> None:
        m = Meter(bound_of((3, 2), (2, 1)))
        gate = asyncio.Event()
        first_calls: list[int] = []

        @work_pool(buffer=3, num_workers=2)
        async def first(x: int) -> int:
            first_calls.append(x)
            return x * 2

        @work_pool(buffer=2, num_workers=1)
        async def second(x: int) -> int:
            await gate.wait()
            m.deliver()
            return x + 1

        task = asyncio.create_task((Pipeline(m.source(200)) >> first >> second).run())
        await settle()
        stalled = m.pulled
        assert stalled <= m.bound and len(first_calls) < 200
        await settle()
        assert m.pulled == stalled
        gate.set()
        assert await task == Ok([x * 2 + 1 for x in range(200)])
        m.assert_bound()

    arun(main())


@pytest.mark.timeout(30)
def test_ordered_stream_slow_head_item_stalls_intake(arun: Any) -> None:
    """stream(ordered=True) with item 0 blocked: intake stalls within the bound; then all arrive in order."""

    async def main() -> None:
        m = Meter(bound_of((3, 2)))
        release = asyncio.Event()
        before = asyncio.all_tasks()

        @work_pool(buffer=3, num_workers=2)
        async def fn(x: int) -> int:
            if x == 0:
                await release.wait()
            return x

        got: list[int] = []

        async def consumer() -> None:
            async with (Pipeline(m.source(100)) >> fn).stream(ordered=True) as s:
                async for r in s:
                    got.append(unwrap(r))
                    m.deliver()
                    await asyncio.sleep(0)

        task = asyncio.create_task(consumer())
        await settle()
        stalled = m.pulled
        assert got == [] and stalled <= m.bound
        await settle()
        assert m.pulled == stalled, "a slow head item must stall intake, not buffer without limit"
        release.set()
        await task
        assert got == list(range(100))
        m.assert_bound()
        assert extra_tasks(before) == set()

    arun(main())


@pytest.mark.timeout(30)
@pytest.mark.parametrize("ordered", [False, True])
def test_flat_map_fan_out_is_bounded_in_source_items(arun: Any, ordered: bool) -> None:
    """A stage yielding 3 outputs per input: a source item counts until all its outputs are consumed."""

    async def main() -> None:
        m = Meter(bound_of((2, 2), (3, 1)))

        @work_pool(buffer=2, num_workers=2)
        async def explode(x: int) -> AsyncIterator[tuple[int, int]]:
            for k in range(3):
                yield (x, k)

        @work_pool(buffer=3)
        async def tag(pair: tuple[int, int]) -> tuple[int, int]:
            return pair

        seen: dict[int, int] = {}

        def on_result(r: Any) -> None:
            x, _ = unwrap(r)
            seen[x] = seen.get(x, 0) + 1
            if seen[x] == 3:
                m.deliver()

        results, standstills = await consume_slowly(
            m, (Pipeline(m.source(30)) >> explode >> tag).stream(ordered=ordered), on_result
       )
        values = [unwrap(r) for r in results]
        expected = [(x, k) for x in range(30) for k in range(3)]
        assert (values if ordered else sorted(values)) == expected
        assert max(standstills) <= m.bound
        m.assert_bound()
        assert m.delivered == 30

    arun(main())


@pytest.mark.timeout(30)
@pytest.mark.parametrize("consumer", ["run", "stream"])
def test_retries_with_backoff_in_flight_stay_within_the_bound(arun: Any, consumer: str) -> None:
    """Items waiting out a backoff between attempts still count against the bound; all finally succeed."""

    async def main() -> None:
        m = Meter(bound_of((2, 2), (4, 1)))
        attempts: dict[int, list[int]] = {}

        @work_pool(buffer=2, num_workers=2, retries=3, backoff=0.001)
        async def flaky(x: int) -> int:
            attempts.setdefault(x, []).append(current_worker().attempt)
            if x % 2 == 0 and current_worker().attempt < 3:
                raise ConnectionError(f"try again {x}")
            return x

        @work_pool(buffer=4)
        async def inc(x: int) -> int:
            if consumer == "run":
                m.deliver()
            return x + 1

        p = Pipeline(m.source(30)) >> flaky >> inc
        if consumer == "run":
            assert await p.run() == Ok([x + 1 for x in range(30)])
        else:
            got = []
            async with p.stream() as s:
                async for r in s:
                    got.append(unwrap(r))
                    m.deliver()
                    await asyncio.sleep(0)
            assert sorted(got) == [x + 1 for x in range(30)]
        assert all(attempts[x] == ([1, 2, 3] if x % 2 == 0 else [1]) for x in range(30))
        m.assert_bound()

    arun(main())


@work_pool(buffer=2, num_workers=3, fork_merge=lambda parts: tuple(parts))
async def fork3(x: int) -> tuple[int, int]:
    return (x, current_worker().index)


def _mix_workers() -> list[Callable[[int], Any]]:
    async def a(x: int) -> tuple[int, int]:
        return (x, 0)

    async def b(x: int) -> tuple[int, int]:
        await asyncio.sleep(0)
        return (x, 1)

    async def c(x: int) -> tuple[int, int]:
        return (x, 2)

    return [a, b, c]


mix3 = mix_pool(buffer=2)(_mix_workers)
mix3_fork = mix_pool(buffer=2, fork_merge=lambda parts: tuple(parts), name="mix3_fork")(_mix_workers)


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    "stage, fork",
    [pytest.param(fork3, True, id="work_pool-fork"), pytest.param(mix3, False, id="mix_pool"),
     pytest.param(mix3_fork, True, id="mix_pool-fork")],
)
def test_fork_mode_and_mix_pool_count_each_worker_and_each_item_once(arun: Any, stage: Any, fork: bool) -> None:
    """Three workers (fork or mix_pool): bound = buffer + 3 + 1 + 1; a slow consumer stalls exactly there."""

    async def main() -> None:
        m = Meter(bound_of((2, 3)))
        results, standstills = await consume_slowly(m, (Pipeline(m.source(40)) >> stage).stream(ordered=True))
        values = [unwrap(r) for r in results]
        if fork:  # each output: worker i's result at position i
            assert values == [tuple((x, i) for i in range(3)) for x in range(40)]
        else:
            assert [v[0] for v in values] == list(range(40)) and {v[1] for v in values} <= {0, 1, 2}
        assert max(standstills) == m.bound
        m.assert_bound()

    arun(main())


# --- property test ---------------------------------------------------------------------------------------

stage_configs = st.fixed_dictionaries(
    {
        "buffer": st.integers(1, 8),
        "workers": st.integers(1, 4),
        "sync": st.sampled_from([False, False, False, True]),  # mostly async def
        "fork": st.sampled_from([False, False, True]),
        "yields": st.integers(0, 2),  # how often an async worker gives up control per call
    }
)


def build_stage(i: int, cfg: dict[str, Any], m: Meter, counts_delivery: bool) -> Any:
    """A stage that adds 1; the last stage of a run() counts deliveries (see module docstring)."""
    n, yields = cfg["workers"], cfg["yields"]
    count_in_worker = counts_delivery and not cfg["fork"]

    if cfg["sync"]:

        def fn(x: int) -> int:
            if count_in_worker:
                m.deliver()
            return x + 1

    else:

        async def fn(x: int) -> int:  # type: ignore[misc]
            for _ in range(yields):
                await asyncio.sleep(0)
            if count_in_worker:
                m.deliver()
            return x + 1

    merge = None
    if cfg["fork"]:

        def merge(parts: list[int]) -> int:
            assert len(parts) == n and len(set(parts)) == 1, parts
            if counts_delivery:
                m.deliver()
            return parts[0]

    return work_pool(fn, buffer=cfg["buffer"], num_workers=n, fork_merge=merge, name=f"s{i}")


@pytest.mark.timeout(120)
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    cfgs=st.lists(stage_configs, min_size=1, max_size=4),
    n=st.integers(0, 60),
    consumer=st.sampled_from(["run", "stream"]),
    ordered=st.booleans(),
    async_source=st.booleans(),
    rnd=st.randoms(use_true_random=False),
)
def test_bound_holds_for_random_pipelines(
    arun: Any,
    no_thread_leaks: None,
    cfgs: list[dict[str, Any]],
    n: int,
    consumer: str,
    ordered: bool,
    async_source: bool,
    rnd: Any,
) -> None:
    """For random stages, sources and consumers: the bound holds at every pull, outputs are right, nothing is left."""

    async def main() -> None:
        before = asyncio.all_tasks()
        m = Meter(bound_of(*((c["buffer"], c["workers"]) for c in cfgs)))
        p = Pipeline(m.asource(n) if async_source else m.source(n))
        for i, cfg in enumerate(cfgs):
            p = p >> build_stage(i, cfg, m, counts_delivery=(consumer == "run" and i == len(cfgs) - 1))
        expected = [x + len(cfgs) for x in range(n)]
        if consumer == "run":
            result = await p.run(ordered=ordered)
            assert is_ok(result), result
            outputs = unwrap(result)
        else:
            outputs = []
            async with p.stream(ordered=ordered) as s:
                async for r in s:
                    outputs.append(unwrap(r))
                    m.deliver()
                    for _ in range(rnd.randint(0, 3)):
                        await asyncio.sleep(0)
        assert (outputs if ordered else sorted(outputs)) == expected
        m.assert_bound()
        assert m.pulled == n
        assert extra_tasks(before) == set()

    arun(main(), timeout=30)
