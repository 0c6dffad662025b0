"""The bookkeeping the Dask and Ray backends share (``pypline.backends._batching``).

A fake engine stands in for Dask/Ray: each remote call is a future the test resolves
(or fails) by hand, so batching, capacity, fault verdicts, the quarantine of
suspects and timeouts are checked deterministically, without a cluster, a sleep
or a real process.
"""

from __future__ import annotations

import asyncio
import pickle
import threading
from typing import Any, Awaitable, Sequence

import pytest

from pypline import WorkerDied, work_pool
from pypline.backends import _batch_wire as w
from pypline.backends import _batching as b
from pypline.executor import Attempt, OutcomeSink, StageSpec

pytestmark = pytest.mark.timeout(30)


class Died(Exception):
    """The fake engine's 'worker process died'."""


class Lost(Exception):
    """The fake engine's 'lost the node'."""


class FakeExecutor(b.BatchingExecutor):
    """Calls are futures in ``self.calls``; verdicts by exception class."""

    backend_name = "fake"

    def __init__(self, spec: StageSpec, scope: str = "slot", depth: int = 2, deadline: float | None = None) -> None:
        self.blame_scope = scope  # type: ignore[misc]
        self.calls_per_slot = depth  # type: ignore[misc]
        super().__init__(spec)
        self.calls: list[tuple[b.Call, list[Any], asyncio.Future[Any]]] = []
        self.repaired: list[int] = []
        self.abandoned: list[b.Call] = []
        self.deadline = deadline

    async def _start_slots(self, blob: bytes) -> None:
        pass

    def _send(self, call: b.Call, payloads: list[bytes]) -> Awaitable[Any]:
        fut: asyncio.Future[Any] = self._loop.create_future()
        self.calls.append((call, [pickle.loads(p) for p in payloads], fut))
        return fut

    def _verdict(self, call: b.Call, exc: BaseException) -> tuple[str, Any]:
        if isinstance(exc, Died):
            return b.DIED, f"died: {exc}"
        if isinstance(exc, Lost):
            return b.LOST, "node-1"
        return b.ERROR, exc

    def _deadline(self, call: b.Call) -> float | None:
        return self.deadline

    def _abandon(self, calls: list[b.Call], why: str) -> None:
        self.abandoned.extend(calls)

    def _repair(self, slot: int, why: str) -> None:
        self.repaired.append(slot)

    def open_calls(self) -> list[tuple[b.Call, list[Any], asyncio.Future[Any]]]:
        return [c for c in self.calls if not c[2].done()]


class Sink(OutcomeSink):
    def __init__(self, ex: FakeExecutor) -> None:
        self.ex = ex
        self.reports: list[tuple[str, Any, Any]] = []
        self.emitted: list[tuple[Any, Any]] = []
        self.capacity_seen: list[int] = []

    def _add(self, kind: str, a: Attempt, value: Any) -> None:
        self.capacity_seen.append(self.ex.capacity())
        self.reports.append((kind, a.item, value))

    def ok(self, attempt: Attempt, value: Any) -> None:
        self._add("ok", attempt, value)

    def error(self, attempt: Attempt, exc: BaseException) -> None:
        self._add("error", attempt, exc)

    def lost(self, attempt: Attempt, where: str) -> None:
        self._add("lost", attempt, where)

    async def emit(self, attempt: Attempt, value: Any) -> None:
        self.emitted.append((attempt.item, value))

    def capacity_changed(self) -> None:
        pass


def spec(workers: int = 2, **kw: Any) -> StageSpec:
    def f(x: Any) -> Any:
        return x

    s: StageSpec = work_pool(f, multi_proc=True, num_workers=workers, **kw).spec
    return s


def ok_result(items: Sequence[Any]) -> tuple[list[Any], float, None]:
    return [(w.OK, pickle.dumps(x * 10)) for x in items], 0.001 * len(items), None


async def started(ex: FakeExecutor) -> Sink:
    sink = Sink(ex)
    await ex.start(ex._spec, sink)
    return sink


async def settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


def run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 20))


def test_batches_share_the_queue_and_capacity_returns_before_each_report() -> None:
    """Attempts are spread over the slots' openings in batches; each report comes after its slot is freed."""

    async def main() -> None:
        ex = FakeExecutor(spec(2))
        sink = await started(ex)
        full = ex.capacity()
        ex.submit([Attempt(i, None, 1) for i in range(8)])
        assert ex.capacity() == full - 8
        await settle()
        sizes = [len(items) for _, items, _ in ex.calls]
        assert sizes == [2, 2, 2, 2]  # FIRST_BATCH per call, 2 calls per slot, 2 slots
        assert sorted(x for _, items, _ in ex.calls for x in items) == list(range(8))
        for call, items, fut in list(ex.calls):
            fut.set_result(ok_result(items))
        await settle()
        assert sorted(r[1] for r in sink.reports) == list(range(8))
        assert all(kind == "ok" and value == item * 10 for kind, item, value in sink.reports)
        # capacity was given back before each report (rule 3)
        assert sink.capacity_seen == [full - 8 + k for k in range(1, 9)]
        await ex.aclose()

    run(main())


def test_max_call_bytes_caps_what_one_call_carries() -> None:
    """Once item sizes are measured (an average), a call takes only as many as fit ``max_call_bytes``.

    An item bigger than the cap still travels (alone, when nothing else is queued).
    """

    async def main() -> None:
        ex = FakeExecutor(spec(1), depth=1)
        ex.max_call_bytes = 35_000  # type: ignore[misc]
        await started(ex)
        items = [bytes([i]) * 10_000 for i in range(30)]
        ex.submit([Attempt(x, None, 1) for x in items])
        done: list[bytes] = []
        while len(done) < 31:
            if len(done) == 30:
                items.append(b"x" * 50_000)
                ex.submit([Attempt(items[-1], None, 1)])
            await settle()
            [(_, got, fut)] = ex.open_calls()
            size = sum(len(pickle.dumps(x, protocol=5)) for x in got)
            assert size <= ex.max_call_bytes or len(got) == 1, (len(got), size)
            # measured results say "microseconds per item": only the byte cap limits the batch
            fut.set_result(([(w.OK, pickle.dumps(len(x))) for x in got], 1e-6 * len(got), None))
            done.extend(got)
        assert done == items
        sizes = [len(got) for _, got, _ in ex.calls]
        assert sizes[0] == b.FIRST_BATCH and max(sizes) == 3 and sizes[-1] == 1
        await ex.aclose()

    run(main())


def test_without_max_call_bytes_batches_are_not_capped_by_size() -> None:
    async def main() -> None:
        ex = FakeExecutor(spec(1), depth=1)
        assert ex.max_call_bytes is None
        await started(ex)
        items = [bytes([i]) * 10_000 for i in range(30)]
        ex.submit([Attempt(x, None, 1) for x in items])
        await settle()
        [(_, got, fut)] = ex.open_calls()
        fut.set_result(([(w.OK, pickle.dumps(len(x))) for x in got], 1e-6 * len(got), None))
        await settle()
        [(_, got, _)] = ex.open_calls()
        assert len(got) == 28  # everything left: the time-based limit allows far more
        await ex.aclose()

    run(main())


def test_targeted_attempts_go_to_their_slot() -> None:
    """worker=i attempts only ever travel in slot i's calls."""

    async def main() -> None:
        ex = FakeExecutor(spec(3))
        await started(ex)
        ex.submit([Attempt(i, i % 3, 1) for i in range(9)])
        await settle()
        for call, items, _ in ex.calls:
            assert all(x % 3 == call.slot for x in items)
        await ex.aclose()

    run(main())


def test_unpicklable_item_fails_alone() -> None:
    """An item that cannot be pickled is an error for that attempt; the rest of its batch is sent."""

    async def main() -> None:
        ex = FakeExecutor(spec(1))
        sink = await started(ex)
        ex.submit([Attempt(1, None, 1), Attempt(threading.Lock(), None, 1)])
        await settle()
        assert [items for _, items, _ in ex.calls] == [[1]]
        [(kind, _, exc)] = sink.reports
        assert kind == "error" and isinstance(exc, Exception)
        await ex.aclose()

    run(main())


def test_a_death_is_blamed_only_on_an_attempt_running_alone() -> None:
    """A batch that died is re-run one attempt at a time (stage scope: one call at all); only a solo death is WorkerDied."""

    async def main() -> None:
        ex = FakeExecutor(spec(2), scope="stage", depth=1)
        sink = await started(ex)
        ex.submit([Attempt(i, None, 1) for i in range(3)])
        await settle()
        first = ex.calls[0]
        assert first[1] == [0, 1] and len(ex.calls) == 2
        first[2].set_exception(Died("boom"))
        await settle()
        assert sink.reports == [] and ex.repaired == [first[0].slot]
        ex.calls[1][2].set_result(ok_result(ex.calls[1][1]))  # the other slot's call ends normally
        await settle()
        assert [r[1] for r in sink.reports] == [2]
        for expected in ([0], [1]):
            [(call, items, fut)] = ex.open_calls()  # one suspect at a time, alone in the stage
            assert items == expected and call.solo
            if items == [1]:
                fut.set_exception(Died("again"))
            else:
                fut.set_result(ok_result(items))
            await settle()
        kinds = {item: (kind, value) for kind, item, value in sink.reports}
        assert kinds[0] == ("ok", 0)
        assert kinds[1][0] == "error" and isinstance(kinds[1][1], WorkerDied) and "again" in str(kinds[1][1])
        ex.submit([Attempt(9, None, 1), Attempt(8, None, 1)])  # back to normal batches afterwards
        await settle()
        assert not ex.open_calls()[0][0].solo
        await ex.aclose()

    run(main())


def test_slot_scope_suspects_calls_queued_at_a_dead_worker() -> None:
    """Slot scope: the calls queued behind a dead head are suspects too (their reply may be what was lost)."""

    async def main() -> None:
        ex = FakeExecutor(spec(1), scope="slot", depth=2)
        sink = await started(ex)
        ex.submit([Attempt(i, None, 1) for i in range(4)])
        await settle()
        (head, hi, hf), (behind, bi, bf) = ex.calls
        hf.set_exception(Died("x"))
        await settle()
        bf.set_exception(Died("x"))  # already settled as queued behind the dead head: ignored
        await settle()
        assert sink.reports == []
        assert ex._suspects == {id(a) for a in head.attempts + behind.attempts}
        await ex.aclose()

    run(main())


def test_lost_reports_the_running_call_and_requeues_the_rest() -> None:
    """A lost worker: the running call's attempts are reported lost, those queued behind it go again silently."""

    async def main() -> None:
        ex = FakeExecutor(spec(1), depth=2)
        sink = await started(ex)
        ex.submit([Attempt(i, None, 1) for i in range(4)])
        await settle()
        (head, hi, hf), (behind, bi, bf) = ex.calls
        bf.set_exception(Lost())  # arrives first: it was only queued
        hf.set_exception(Lost())
        await settle()
        assert sorted((k, i) for k, i, _ in sink.reports) == [("lost", x) for x in sorted(hi)]
        assert sorted(x for _, items, _ in ex.open_calls() for x in items) == sorted(bi)
        await ex.aclose()

    run(main())


def test_a_malformed_result_fails_the_call() -> None:
    """A result that is not one outcome per attempt fails every attempt of the call, nothing hangs."""

    async def main() -> None:
        ex = FakeExecutor(spec(1))
        sink = await started(ex)
        ex.submit([Attempt(1, None, 1), Attempt(2, None, 1), Attempt(3, None, 1), Attempt(4, None, 1)])
        await settle()
        call, items, fut = ex.calls[0]
        assert len(items) == 2
        fut.set_result(([(w.OK, pickle.dumps(1))], 0.0, None))  # one outcome for two attempts
        await settle()
        assert sorted((k, i) for k, i, _ in sink.reports) == [("error", x) for x in items]
        await ex.aclose()

    run(main())


def test_deadline_reports_timeout_and_abandons() -> None:
    """A call past its deadline: TimeoutError per attempt, the call handed to _abandon, a late answer ignored."""

    async def main() -> None:
        ex = FakeExecutor(spec(1, timeout=0.05), deadline=0.05)
        sink = await started(ex)
        ex.submit([Attempt(1, None, 1)])
        await settle()
        [(call, items, fut)] = ex.calls
        await asyncio.sleep(0.15)
        [(kind, item, exc)] = sink.reports
        assert (kind, item) == ("error", 1) and isinstance(exc, TimeoutError)
        assert ex.abandoned == [call]
        fut.set_result(ok_result(items))  # too late: dropped
        await settle()
        assert len(sink.reports) == 1
        await ex.aclose()

    run(main())


def stage_worker(fns: list[tuple[str, Any]], stage: str, setup: Any = None, teardown: Any = None) -> Any:
    return w.StageWorker(fns, setup, teardown, stage)


def test_run_batch_isolates_every_item() -> None:
    """run_batch: per-item outcomes (value, generator list, exception with type and traceback), current_worker() set."""
    from pypline import current_worker

    def fn(x: Any) -> Any:
        if x == "boom":
            raise KeyError("k")
        if x == "lock":
            return threading.Lock()  # a result that cannot be pickled
        return (x, current_worker())

    outcomes, spent, durations = w.run_batch(
        stage_worker([("sync", fn)], "st"), 0, [1, 2, 3], [pickle.dumps(v) for v in ("a", "boom", "lock")], None, True, "here"
    )
    assert spent >= 0 and durations is not None and len(durations) == 3
    assert outcomes[0][0] == w.OK and pickle.loads(outcomes[0][1])[0] == "a"
    assert pickle.loads(outcomes[0][1])[1].stage == "st" and pickle.loads(outcomes[0][1])[1].attempt == 1
    err = w.decode_error(outcomes[1])
    assert isinstance(err, KeyError) and "fn" in str(err.__cause__)
    assert outcomes[2][0] == w.ERR
    gen = w.run_batch(stage_worker([("gen", lambda n: iter(range(n)))], "g"), 0, [1], [pickle.dumps(3)], None, False, "here")
    assert gen[0][0][0] == w.GEN and pickle.loads(gen[0][0][1]) == [0, 1, 2] and gen[2] is None


def test_run_batch_deadline_abandons_a_stuck_call() -> None:
    """With a timeout, a call that overruns is a TimeoutError and the batch goes on with the next item."""
    release = threading.Event()

    def fn(x: Any) -> Any:
        if x == "stuck":
            release.wait(10)
        return x

    try:
        outcomes, _, _ = w.run_batch(
            stage_worker([("sync", fn)], "st"), 0, [1, 1], [pickle.dumps("stuck"), pickle.dumps("next")], 0.05, False, "here"
        )
    finally:
        release.set()
    assert isinstance(w.decode_error(outcomes[0]), TimeoutError)
    assert pickle.loads(outcomes[1][1]) == "next"


def test_a_stage_worker_sets_up_serves_its_state_and_tears_down_once() -> None:
    """StageWorker (a Dask worker process's or a Ray actor's side): setup's state reaches
    the calls, with a deadline too (the call runs in another thread); teardown runs once."""
    from pypline import current_worker

    torn: list[Any] = []

    async def setup() -> dict[str, int]:  # an async setup runs on the worker thread's loop
        return {"n": current_worker().attempt}

    def fn(x: int) -> Any:
        return x, current_worker().state

    sw = stage_worker([("sync", fn)], "st", setup, torn.append)
    sw.start(0)
    for timeout in (None, 5.0):
        outcomes, _, _ = w.run_batch(sw, 0, [1], [pickle.dumps(7)], timeout, False, "here")
        assert pickle.loads(outcomes[0][1]) == (7, {"n": 0})
    assert sw.stop(0) is None and sw.stop(0) is None
    assert torn == [{"n": 0}]
