"""The engine's side of the Executor contract, driven by the scripted MockBackend.

These are the behaviours no real backend can trigger on demand: agents lost and
answering late, workers dying, results out of order, credits held back.
"""

from __future__ import annotations

from typing import Any

import pytest

from pypline import Pipeline, WorkerDied, WorkerLost, configure, work_pool
from pypline.executor import Attempt
from pypline.testing import Die, Hold, Lose, MockBackend, Raise
from pypline.util import Err, Ok, unwrap

pytestmark = pytest.mark.timeout(30)


def double(x: int) -> int:
    return x * 2


@pytest.fixture(autouse=True)
def _reset_settings() -> Any:
    yield
    configure()


def test_results_out_of_order_are_delivered_in_source_order(arun: Any) -> None:
    """Shuffled completion order still yields source order with ordered=True."""
    backend = MockBackend(capacity=8, shuffle_seed=1)
    stage = work_pool(num_workers=8, multi_proc=True)(double)
    assert unwrap(arun(Pipeline(range(100)).stage(stage).run(executor=backend))) == [2 * x for x in range(100)]


def test_credits_are_never_exceeded(arun: Any) -> None:
    """The engine submits no more than capacity() allows, however many items wait."""
    backend = MockBackend(capacity=1)
    stage = work_pool(num_workers=4, buffer=8, multi_proc=True)(double)
    assert unwrap(arun(Pipeline(range(50)).stage(stage).run(executor=backend))) == [2 * x for x in range(50)]
    [ex] = backend.executors
    assert ex.max_in_flight == 1 and ex.capacity_violations == 0


def test_lost_items_are_redispatched_without_using_retries(arun: Any) -> None:
    """An item lost with its agent is re-run; it does not consume its single attempt."""
    lost: list[int] = []

    def fate(a: Attempt) -> Any:
        if a.item < 5 and lost.count(a.item) < 2:
            lost.append(a.item)
            return Lose(f"agent-{a.item}")
        return None

    stage = work_pool(retries=1, multi_proc=True)(double)
    result = arun(Pipeline(range(10)).stage(stage).run(executor=MockBackend(fate=fate)))
    assert unwrap(result) == [2 * x for x in range(10)]
    assert sorted(lost) == sorted(list(range(5)) * 2)


def test_lost_more_than_max_lost_fails_with_worker_lost(arun: Any) -> None:
    """After max_lost losses the item fails with WorkerLost naming every agent; others succeed."""
    configure(max_lost=2)
    hosts = iter(["a:1", "b:2", "a:1", "c:3"])

    def fate(a: Attempt) -> Any:
        return Lose(next(hosts)) if a.item == 0 else None

    stage = work_pool(retries=3, multi_proc=True, name="remote")(double)
    result = arun(Pipeline(range(4)).stage(stage).run(executor=MockBackend(fate=fate)))
    assert isinstance(result, Err)
    [failure] = result.error.failures
    assert failure.index == 0 and failure.stage == "remote"
    assert isinstance(failure.error, WorkerLost)
    assert failure.error.agents == ("a:1", "b:2")
    assert "a:1" in str(failure.error) and "b:2" in str(failure.error)
    assert failure.attempts == 1, "losses are not attempts"
    assert result.error.outputs == [2, 4, 6]


def test_late_answer_from_a_lost_agent_is_discarded(arun: Any) -> None:
    """A 'dead' agent's late result never appears as a second output (exactly-once delivery)."""
    first = set()

    def fate(a: Attempt) -> Any:
        if a.item not in first:
            first.add(a.item)
            return Lose("flaky", late_value=("late", a.item), late=True)
        return None

    stage = work_pool(num_workers=2, multi_proc=True)(double)
    backend = MockBackend(fate=fate, shuffle_seed=3)
    outputs = unwrap(arun(Pipeline(range(20)).stage(stage).run(executor=backend)))
    assert outputs == [2 * x for x in range(20)]
    assert sum(1 for how, _ in backend.executors[0].reports if how == "late-ok") == 20


def test_worker_died_costs_one_attempt_and_is_retried(arun: Any) -> None:
    """WorkerDied counts as a failed attempt: retried while attempts remain, else the failure."""

    def fate(a: Attempt) -> Any:
        if a.item == 1 and a.number == 1:
            return Die(exitcode=-9)
        if a.item == 2:
            return Die(exitcode=3)
        return None

    stage = work_pool(retries=2, multi_proc=True)(double)
    result = arun(Pipeline(range(4)).stage(stage).run(executor=MockBackend(fate=fate)))
    assert isinstance(result, Err)
    [failure] = result.error.failures
    assert failure.index == 2 and failure.attempts == 2
    assert isinstance(failure.error, WorkerDied) and failure.error.exitcode == 3
    assert result.error.outputs == [0, 2, 6]


def test_retry_on_applies_to_reported_errors(arun: Any) -> None:
    """An executor-reported error not matching retry_on fails at once."""

    def fate(a: Attempt) -> Any:
        return Raise(KeyError("k")) if a.item == 0 else None

    stage = work_pool(retries=5, retry_on=ValueError, multi_proc=True)(double)
    result = arun(Pipeline(range(3)).stage(stage).run(executor=MockBackend(fate=fate)))
    assert isinstance(result, Err) and result.error.failures[0].attempts == 1


def test_items_held_remotely_count_against_the_bound(arun: Any) -> None:
    """Items in flight at a (mock) agent count toward the memory bound: intake stops within it.

    With both credits taken and the buffer full, the pump stops: it pulls from a
    sync source only what the first stage has room for (buffer + workers), inside
    the bound (which also allows one item per stage waiting for room downstream).
    """
    hold = Hold()
    pulled = 0

    def source() -> Any:
        nonlocal pulled
        for i in range(1000):
            pulled += 1
            yield i

    def fate(a: Attempt) -> Any:
        return hold

    stage = work_pool(num_workers=2, buffer=3, multi_proc=True)(double)
    bound = (3 + 2) + 1 + 1

    async def main() -> Any:
        import asyncio

        task = asyncio.ensure_future(Pipeline(source()).stage(stage).run(executor=MockBackend(fate=fate, capacity=2)))
        for _ in range(50):
            await asyncio.sleep(0)
        assert pulled == 3 + 2 < bound
        hold.release.set()
        return await task

    assert unwrap(arun(main())) == [2 * x for x in range(1000)]


def test_unpicklable_style_start_failure_is_an_err_naming_the_stage(arun: Any) -> None:
    """An executor whose start() fails makes run() return Err whose cause names the stage."""
    from pypline.executor import StageStartError
    from pypline.testing import MockExecutor

    class Broken(MockBackend):
        def executor(self, spec: Any) -> Any:
            class Ex(MockExecutor):
                async def start(self, spec: Any, sink: Any) -> None:
                    raise StageStartError(spec.name, "function cannot be pickled")

            return Ex()

    stage = work_pool(multi_proc=True, name="needs_pickle")(double)
    result = arun(Pipeline(range(3)).stage(stage).run(executor=Broken()))
    assert isinstance(result, Err)
    assert isinstance(result.error.cause, StageStartError)
    assert "needs_pickle" in str(result.error)


def test_backend_opened_and_closed_once_per_run(arun: Any) -> None:
    """A backend shared by several stages is opened and closed once per run, every executor closed."""
    backend = MockBackend()
    s1 = work_pool(multi_proc=True)(double)
    s2 = work_pool(multi_proc=True)(double)
    assert arun(Pipeline([1, 2]).stage(s1).stage(s2).run(executor=backend)) == Ok([4, 8])
    assert (backend.opened, backend.closed) == (1, 1)
    assert all(e.closed for e in backend.executors) and len(backend.executors) == 2


def test_unknown_backend_name_lists_known_ones(arun: Any) -> None:
    """run(executor='nope') is misuse: ValueError listing the known backends."""
    stage = work_pool(multi_proc=True)(double)
    with pytest.raises(ValueError, match="asyncio.*process"):
        arun(Pipeline([1]).stage(stage).run(executor="nope"))


def test_configured_backend_runs_multi_proc_stages_and_run_executor_wins(arun: Any) -> None:
    """configure(backend=...) picks the backend for multi_proc stages; run(executor=...) overrides it."""
    configured, explicit = MockBackend(), MockBackend()
    configure(backend=configured, agents=["tcp://127.0.0.1:1"])  # backend wins over agents
    stage = work_pool(multi_proc=True)(double)
    assert arun(Pipeline([1, 2]).stage(stage).run()) == Ok([2, 4])
    assert len(configured.executors) == 1
    assert arun(Pipeline([3]).stage(stage).run(executor=explicit)) == Ok([6])
    assert len(explicit.executors) == 1 and len(configured.executors) == 1
    with pytest.raises(TypeError, match="backend"):
        configure(backend=3)
