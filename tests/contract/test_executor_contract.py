"""The Executor contract (pypline/executor.py), checked against every backend.

Each test drives one executor directly through a recording sink, the way the
engine does, and checks a rule of the contract. A backend joins by adding a
factory to ``BACKENDS``; one that cannot run here is skipped with its reason.
``zmq`` runs against a real ``pypline-agent`` on a loopback port (conftest's
``shared_agent``). Worker functions live at module level and are shipped by
value, since the agent's host does not have this test module.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import sys
import threading
from typing import Any, Callable, Sequence

import cloudpickle
import pytest

from pypline import current_worker, mix_pool, work_pool
from pypline.executor import Attempt, Backend, Executor, OutcomeSink, StageSpec
from pypline.testing import MockBackend

pytestmark = pytest.mark.timeout(60)

cloudpickle.register_pickle_by_value(sys.modules[__name__])


def _asyncio_backend() -> Backend:
    from pypline.backends.local import AsyncioBackend

    return AsyncioBackend()


def _process_backend() -> Backend:
    if importlib.util.find_spec("pypline.backends.process") is None:
        pytest.skip("process backend not available")
    from pypline.backends.process import ProcessBackend  # type: ignore[import-not-found,unused-ignore]

    return ProcessBackend()  # type: ignore[no-any-return,unused-ignore]


# Cluster engines start once per module (seconds each) and are shut down by the
# module-scoped fixture below; each test still gets its own Backend instance. They
# skip when their library is missing, except where PYPLINE_REQUIRE_ENGINES is set (CI).
_SHARED: dict[str, Any] = {}


def _dask_backend() -> Backend:
    if importlib.util.find_spec("distributed") is None and not os.environ.get("PYPLINE_REQUIRE_ENGINES"):
        pytest.skip("dask[distributed] is not installed (pip install 'pypline-async[dask]')")
    from distributed import LocalCluster  # type: ignore[import-not-found,import-untyped,unused-ignore]

    from pypline.backends.on_dask import DaskBackend

    if "dask" not in _SHARED:
        _SHARED["dask"] = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0")
    return DaskBackend(address=_SHARED["dask"].scheduler_address)


def _ray_backend() -> Backend:
    if importlib.util.find_spec("ray") is None and not os.environ.get("PYPLINE_REQUIRE_ENGINES"):
        pytest.skip("ray is not installed (pip install 'pypline-async[ray]')")
    import ray  # type: ignore[import-not-found,import-untyped,unused-ignore]

    from pypline.backends.on_ray import RayBackend

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        _SHARED["ray"] = ray
    return RayBackend()


BACKENDS: dict[str, Callable[[], Backend]] = {
    "asyncio": _asyncio_backend,
    "mock": MockBackend,
    "process": _process_backend,
    "dask": _dask_backend,
    "ray": _ray_backend,
}


@pytest.fixture(scope="module", autouse=True)
def _shared_clusters() -> Any:
    """Shut down the clusters the factories started, once this module is done."""
    yield
    cluster = _SHARED.pop("dask", None)
    if cluster is not None:
        cluster.close()
    ray = _SHARED.pop("ray", None)
    if ray is not None:
        ray.shutdown()


@pytest.fixture(params=[*sorted(BACKENDS), "zmq"])
def backend_factory(request: pytest.FixtureRequest) -> Callable[[], Backend]:
    if request.param == "zmq":  # a real pypline-agent (2 workers) on a 127.0.0.x port, shared by the module
        agent = request.getfixturevalue("shared_agent")
        from pypline.backends.remote import ZmqBackend

        return lambda: ZmqBackend([agent.endpoint])
    return BACKENDS[request.param]


# --- worker functions (module level: picklable by reference or value) ------------------------


async def add_one(x: int) -> int:
    return x + 1


def sync_double(x: int) -> int:
    return x * 2


def fail_on_odd(x: int) -> int:
    if x % 2:
        raise ValueError(f"odd: {x}")
    return x


def whoami(x: Any) -> tuple[str, int, int]:
    info = current_worker()
    return (info.stage, info.index, info.attempt)


def count_up(n: int) -> Any:
    yield from range(n)


def block_forever(x: Any) -> Any:
    threading.Event().wait(30)
    return x


#: How long ``async_busy`` keeps a worker busy: far longer than aclose() may take, yet
#: bounded, because Dask cannot stop a running call: a call blocked forever would hold a
#: thread of the module's shared cluster, and the next Dask tests would time out waiting.
BUSY_S = 5.0


async def async_busy(x: Any) -> Any:
    await asyncio.sleep(BUSY_S)
    return x


async def awaits_a_cancelled_task(x: int) -> int:
    """Item 2 awaits a task that something else cancelled: the stage's own CancelledError."""
    if x == 2:
        inner = asyncio.ensure_future(asyncio.sleep(30))
        await asyncio.sleep(0)
        inner.cancel()
        await inner
    return x


def raises_cancelled(x: int) -> int:
    """Item 2 raises CancelledError from plain code (in a thread or a worker process)."""
    if x == 2:
        raise asyncio.CancelledError("from the stage's own code")
    return x


class CustomError(Exception):
    """An exception type of the user's own (this module travels by value)."""


class Unpicklable(Exception):
    def __reduce__(self) -> Any:
        raise TypeError("this exception refuses to be pickled")


def fail_with_custom(x: int) -> int:
    if x == 1:
        raise CustomError(f"custom failure of {x}")
    if x == 2:
        raise Unpicklable(f"unpicklable failure of {x}")
    return x


# --- the recording sink ---------------------------------------------------------------------


class RecordingSink(OutcomeSink):
    """Records every report and checks the sink-side rules as they happen."""

    def __init__(self, executor: Executor) -> None:
        self.executor = executor
        self.in_submit = False
        self.reentrant = 0
        self.terminal: dict[int, list[tuple[str, Any]]] = {}
        self.emitted: dict[int, list[Any]] = {}
        self.changed = asyncio.Event()
        self.loop_thread = threading.get_ident()
        self.wrong_thread = 0

    def _record(self, attempt: Attempt, kind: str, value: Any) -> None:
        if self.in_submit:
            self.reentrant += 1
        if threading.get_ident() != self.loop_thread:
            self.wrong_thread += 1
        self.terminal.setdefault(id(attempt), []).append((kind, value))
        self.changed.set()

    def ok(self, attempt: Attempt, value: Any) -> None:
        self._record(attempt, "ok", value)

    def error(self, attempt: Attempt, exc: BaseException) -> None:
        self._record(attempt, "error", exc)

    def lost(self, attempt: Attempt, where: str) -> None:
        self._record(attempt, "lost", where)

    async def emit(self, attempt: Attempt, value: Any) -> None:
        if id(attempt) in self.terminal:
            raise AssertionError("emit() after the attempt's terminal report")
        self.emitted.setdefault(id(attempt), []).append(value)

    def capacity_changed(self) -> None:
        self.changed.set()

    def submit(self, attempts: Sequence[Attempt]) -> None:
        assert len(attempts) <= self.executor.capacity(), "the test itself must respect capacity"
        self.in_submit = True
        try:
            self.executor.submit(attempts)
        finally:
            self.in_submit = False

    async def wait_reports(self, attempts: Sequence[Attempt], timeout: float = 20.0) -> None:
        async def all_in() -> None:
            while not all(id(a) in self.terminal for a in attempts):
                self.changed.clear()
                await self.changed.wait()

        await asyncio.wait_for(all_in(), timeout)


async def started(backend: Backend, spec: StageSpec) -> tuple[Executor, RecordingSink]:
    await backend.open()
    ex = backend.executor(spec)
    sink = RecordingSink(ex)
    await ex.start(spec, sink)
    return ex, sink


async def stop(backend: Backend, ex: Executor) -> None:
    await ex.aclose()
    await backend.aclose()


async def run_all(
    sink: RecordingSink, ex: Executor, items: Sequence[Any], worker: Callable[[int], int | None] = lambda i: None
) -> list[Attempt]:
    """Submit every item, never beyond capacity, and wait for every report."""
    attempts = [Attempt(x, worker(i), 1) for i, x in enumerate(items)]
    pending = list(attempts)
    while pending:
        free = ex.capacity()
        assert free >= 0
        if free:
            batch, pending = pending[:free], pending[free:]
            sink.submit(batch)
        else:
            sink.changed.clear()
            await asyncio.wait_for(sink.changed.wait(), 20)
    await sink.wait_reports(attempts)
    return attempts


def spec_of(stage: Any) -> StageSpec:
    spec: StageSpec = stage.spec
    return spec


# --- the rules ------------------------------------------------------------------------------------


def test_results_match_inputs(backend_factory: Callable[[], Backend], arun: Any) -> None:
    """Every attempt gets exactly one ok report carrying its own result."""

    async def main() -> None:
        backend = backend_factory()
        ex, sink = await started(backend, spec_of(work_pool(num_workers=3, multi_proc=True)(add_one)))
        try:
            attempts = await run_all(sink, ex, list(range(50)))
            for a in attempts:
                assert sink.terminal[id(a)] == [("ok", a.item + 1)]
            assert sink.reentrant == 0, "submit() called the sink synchronously"
            assert sink.wrong_thread == 0, "the sink was called off the loop thread"
        finally:
            await stop(backend, ex)

    arun(main())


def test_sync_functions_and_capacity_restored(backend_factory: Callable[[], Backend], arun: Any) -> None:
    """Capacity drops by what was submitted and comes back with every terminal report."""

    async def main() -> None:
        backend = backend_factory()
        ex, sink = await started(backend, spec_of(work_pool(num_workers=2, multi_proc=True)(sync_double)))
        try:
            full = ex.capacity()
            assert full >= 1
            attempts = [Attempt(i, None, 1) for i in range(full)]
            sink.submit(attempts)
            assert ex.capacity() == 0
            await sink.wait_reports(attempts)
            assert [sink.terminal[id(a)] for a in attempts] == [[("ok", a.item * 2)] for a in attempts]
            assert ex.capacity() >= full  # back, at least (an agent may grant more once it has timed calls)
        finally:
            await stop(backend, ex)

    arun(main())


def test_errors_reported_with_their_type(backend_factory: Callable[[], Backend], arun: Any) -> None:
    """A raising function gives one error report with the original exception type and message."""

    async def main() -> None:
        backend = backend_factory()
        ex, sink = await started(backend, spec_of(work_pool(num_workers=2, multi_proc=True)(fail_on_odd)))
        try:
            attempts = await run_all(sink, ex, list(range(10)))
            for a in attempts:
                [(kind, value)] = sink.terminal[id(a)]
                if a.item % 2:
                    assert kind == "error" and isinstance(value, ValueError) and f"odd: {a.item}" in str(value)
                else:
                    assert (kind, value) == ("ok", a.item)
        finally:
            await stop(backend, ex)

    arun(main())


def test_targeted_attempts_run_on_their_worker(backend_factory: Callable[[], Backend], arun: Any) -> None:
    """worker=i runs on worker i, and current_worker() names the stage, index and attempt number."""

    async def main() -> None:
        backend = backend_factory()
        stage = work_pool(num_workers=3, multi_proc=True, fork_merge=list, name="who")(whoami)
        ex, sink = await started(backend, spec_of(stage))
        try:
            attempts = await run_all(sink, ex, list(range(9)), worker=lambda i: i % 3)
            for a in attempts:
                assert sink.terminal[id(a)] == [("ok", ("who", a.worker, 1))]
            again = Attempt("x", 2, 4)
            sink.submit([again])
            await sink.wait_reports([again])
            assert sink.terminal[id(again)] == [("ok", ("who", 2, 4))]
        finally:
            await stop(backend, ex)

    arun(main())


def test_mix_pool_workers_run_their_own_function(backend_factory: Callable[[], Backend], arun: Any) -> None:
    """In a mix_pool, worker i runs function i."""

    async def main() -> None:
        backend = backend_factory()

        @mix_pool(multi_proc=True, fork_merge=list)
        def both() -> list[Any]:
            return [sync_double, add_one]

        ex, sink = await started(backend, spec_of(both))
        try:
            attempts = await run_all(sink, ex, [10, 10], worker=lambda i: i)
            assert [sink.terminal[id(a)] for a in attempts] == [[("ok", 20)], [("ok", 11)]]
        finally:
            await stop(backend, ex)

    arun(main())


def test_generators_emit_in_order_then_finish(backend_factory: Callable[[], Backend], arun: Any) -> None:
    """A generator attempt emits every value in order before its single terminal report."""

    async def main() -> None:
        backend = backend_factory()
        ex, sink = await started(backend, spec_of(work_pool(num_workers=2, multi_proc=True)(count_up)))
        try:
            attempts = await run_all(sink, ex, [0, 3, 5])
            for a in attempts:
                assert sink.emitted.get(id(a), []) == list(range(a.item))
                assert [k for k, _ in sink.terminal[id(a)]] == ["ok"]
        finally:
            await stop(backend, ex)

    arun(main())


def test_timeout_is_reported_and_worker_keeps_serving(backend_factory: Callable[[], Backend], arun: Any) -> None:
    """A timed-out attempt is one TimeoutError report; the executor then serves new attempts."""
    if backend_factory is MockBackend:
        pytest.skip("the mock executor does not enforce timeouts (tests script them with Raise)")

    async def main() -> None:
        backend = backend_factory()

        def maybe_block(x: Any) -> Any:
            return block_forever(x) if x == "stuck" else x

        ex, sink = await started(backend, spec_of(work_pool(num_workers=1, multi_proc=True, timeout=0.2)(maybe_block)))
        try:
            stuck = Attempt("stuck", None, 1)
            sink.submit([stuck])
            await sink.wait_reports([stuck])
            [(kind, value)] = sink.terminal[id(stuck)]
            assert kind == "error" and isinstance(value, TimeoutError)
            attempts = await run_all(sink, ex, ["a", "b"])
            assert [sink.terminal[id(a)] for a in attempts] == [[("ok", "a")], [("ok", "b")]]
        finally:
            await stop(backend, ex)

    arun(main())


def test_aclose_during_work_leaves_nothing_running(backend_factory: Callable[[], Backend], arun: Any) -> None:
    """aclose() with attempts in flight returns promptly, is idempotent, and leaves no task behind."""

    async def main() -> None:
        before = set(asyncio.all_tasks())
        backend = backend_factory()
        ex, sink = await started(backend, spec_of(work_pool(num_workers=2, multi_proc=True)(async_busy)))
        sink.submit([Attempt(i, None, 1) for i in range(ex.capacity())])
        await asyncio.sleep(0)
        await asyncio.wait_for(ex.aclose(), 10)
        await asyncio.wait_for(ex.aclose(), 10)  # idempotent
        await backend.aclose()
        leftover = {t for t in asyncio.all_tasks() if not t.done()} - before
        assert not leftover, f"tasks left running after aclose(): {leftover}"

    arun(main())


def test_unknown_or_late_reports_are_tolerated_by_the_engine(arun: Any) -> None:
    """A lost attempt that later answers anyway is delivered exactly once (engine side of rule 2)."""
    from pypline import Pipeline
    from pypline.testing import Lose
    from pypline.util import unwrap

    lost_once: set[int] = set()

    def fate(a: Attempt) -> Any:
        if a.item % 3 == 0 and a.item not in lost_once:
            lost_once.add(a.item)
            return Lose("agent-x", late_value=-1, late=True)
        return None

    backend = MockBackend(fate=fate, capacity=3, shuffle_seed=7)
    stage = work_pool(num_workers=2, multi_proc=True)(add_one)
    result = arun(Pipeline(range(30)).stage(stage).run(executor=backend))
    assert unwrap(result) == [x + 1 for x in range(30)]
    assert lost_once == set(range(0, 30, 3))
    assert backend.max_in_flight <= 3
    assert all(e.capacity_violations == 0 for e in backend.executors)


def test_flush_is_a_hint_that_never_reports(backend_factory: Callable[[], Backend], arun: Any) -> None:
    """flush() after a burst of submits calls no sink method itself; every attempt still gets one report."""

    async def main() -> None:
        backend = backend_factory()
        ex, sink = await started(backend, spec_of(work_pool(num_workers=2, multi_proc=True)(add_one)))
        try:
            attempts = [Attempt(x, None, 1) for x in range(min(8, ex.capacity()))]
            sink.in_submit = True
            ex.submit(attempts)
            ex.flush()
            ex.flush()  # twice: harmless
            sink.in_submit = False
            await sink.wait_reports(attempts)
            assert [sink.terminal[id(a)] for a in attempts] == [[("ok", x + 1)] for x in range(len(attempts))]
            assert sink.reentrant == 0
            ex.flush()  # with nothing submitted
        finally:
            await stop(backend, ex)

    arun(main())


class RefillingSink(RecordingSink):
    """Like the engine with a sync source: each report submits the next attempts and
    flushes, from inside the report (the slot was freed before the call, rule 3)."""

    def __init__(self, executor: Executor) -> None:
        super().__init__(executor)
        self.total = self.window = 0
        self.made: list[Attempt] = []

    def refill(self) -> None:
        in_flight = len(self.made) - len(self.terminal)
        k = min(self.executor.capacity(), self.window - in_flight, self.total - len(self.made))
        if k > 0:
            batch = [Attempt(len(self.made) + i, None, 1) for i in range(k)]
            self.made.extend(batch)
            self.executor.submit(batch)
        self.executor.flush()

    def _record(self, attempt: Attempt, kind: str, value: Any) -> None:
        super()._record(attempt, kind, value)
        self.refill()


def test_reports_may_submit_and_flush_from_inside(backend_factory: Callable[[], Backend], arun: Any) -> None:
    """submit() and flush() called from inside a report (as the engine's inline refill
    does): every attempt still gets exactly one report and all capacity comes back."""

    async def main() -> None:
        backend = backend_factory()
        spec = spec_of(work_pool(num_workers=2, multi_proc=True)(add_one))
        await backend.open()
        ex = backend.executor(spec)
        sink = RefillingSink(ex)
        await ex.start(spec, sink)
        try:
            full = ex.capacity()
            sink.window = min(full, 16)  # at most this many out: the rest goes in from inside reports
            sink.total = sink.window + 300
            sink.refill()
            while len(sink.made) < sink.total:
                await sink.wait_reports(list(sink.made))
            await sink.wait_reports(sink.made)
            assert [sink.terminal[id(a)] for a in sink.made] == [[("ok", x + 1)] for x in range(sink.total)]
            assert ex.capacity() >= full  # back, at least (an agent may grant more once it has timed calls)
        finally:
            await stop(backend, ex)

    arun(main())


def test_submit_one_behaves_like_submit(backend_factory: Callable[[], Backend], arun: Any) -> None:
    """submit_one(a) takes one unit of capacity and reports exactly like submit([a])."""

    async def main() -> None:
        backend = backend_factory()
        ex, sink = await started(backend, spec_of(work_pool(num_workers=2, multi_proc=True)(add_one)))
        try:
            full = ex.capacity()
            a = Attempt(41, None, 1)
            sink.in_submit = True
            ex.submit_one(a)
            sink.in_submit = False
            assert ex.capacity() == full - 1
            await sink.wait_reports([a])
            assert sink.terminal[id(a)] == [("ok", 42)] and sink.reentrant == 0
            assert ex.capacity() >= full  # back, at least (an agent may grant more once it has timed calls)
        finally:
            await stop(backend, ex)

    arun(main())


@pytest.mark.parametrize("fn", [awaits_a_cancelled_task, raises_cancelled], ids=["async", "sync"])
def test_stage_code_cancelled_error_is_an_outcome(
    backend_factory: Callable[[], Backend], arun: Any, fn: Callable[[int], Any]
) -> None:
    """Rule 7: a CancelledError from the stage's own code is reported as that attempt's error
    (the exception, or a RemoteError naming it), once, and the workers keep serving."""
    from pypline._errors import is_cancellation

    async def main() -> None:
        backend = backend_factory()
        ex, sink = await started(backend, spec_of(work_pool(num_workers=2, multi_proc=True)(fn)))
        try:
            attempts = await run_all(sink, ex, [0, 1, 2, 3])
            again = await run_all(sink, ex, [4, 2, 5])
        finally:
            await stop(backend, ex)
        reports = [sink.terminal[id(a)] for a in attempts + again]
        assert all(len(r) == 1 for r in reports)
        kinds = [r[0][0] for r in reports]
        assert kinds == ["ok", "ok", "error", "ok", "ok", "error", "ok"]
        for r in reports:
            if r[0][0] == "error":
                assert is_cancellation(r[0][1]), repr(r[0][1])

    arun(main())


@pytest.mark.parametrize("fn", [awaits_a_cancelled_task, raises_cancelled], ids=["async", "sync"])
def test_stage_code_cancelled_error_fails_only_its_item(
    backend_factory: Callable[[], Backend], arun: Any, fn: Callable[[int], Any]
) -> None:
    """Through the engine, on every backend: the item fails with StageCancelled after its
    attempts (retried per retry_on); every other item succeeds; run() returns, never hangs."""
    from pypline import Pipeline, StageCancelled
    from pypline.util import unwrap_err

    stage = work_pool(fn, multi_proc=True, retries=2)
    err = unwrap_err(arun((Pipeline(range(5)) >> stage).run(executor=backend_factory())))
    assert err.outputs == [0, 1, 3, 4]
    [failure] = err.failures
    assert failure.index == 2 and failure.attempts == 2
    assert isinstance(failure.error, StageCancelled) and failure.error.stage == fn.__name__


def test_cancelling_the_run_still_raises(backend_factory: Callable[[], Backend], arun: Any) -> None:
    """The caller's own cancellation is never turned into a Result: a deadline around run()
    with calls in flight raises (TimeoutError from wait_for), on every backend."""
    from pypline import Pipeline

    stage = work_pool(async_busy, multi_proc=True, num_workers=2)

    async def main() -> None:
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for((Pipeline(range(4)) >> stage).run(executor=backend_factory()), 1.0)

    arun(main(), timeout=40)


def test_errors_keep_their_type_and_remote_traceback(backend_factory: Callable[[], Backend], arun: Any) -> None:
    """One error path on every backend: an exception keeps its type where it can be
    unpickled, and the traceback of where it was raised always comes with it (as a
    RemoteTraceback cause from another process); one that cannot be pickled becomes a
    RemoteError naming its type, with the traceback text."""
    import traceback

    from pypline import Pipeline, RemoteError
    from pypline.executor import RemoteTraceback
    from pypline.util import unwrap_err

    backend = backend_factory()
    err = unwrap_err(arun((Pipeline(range(3)) >> work_pool(fail_with_custom, multi_proc=True)).run(executor=backend)))
    by_index = {f.index: f.error for f in err.failures}
    custom, unpicklable = by_index[1], by_index[2]
    assert err.outputs == [0]
    assert isinstance(custom, CustomError) and str(custom) == "custom failure of 1"
    cause = custom.__cause__
    if isinstance(cause, RemoteTraceback):  # raised in another process
        assert cause.type_name.endswith("CustomError") and "fail_with_custom" in cause.traceback_text
        assert isinstance(unpicklable, RemoteError) and unpicklable.type_name.endswith("Unpicklable")
        assert "fail_with_custom" in unpicklable.traceback_text
    else:  # raised in this process: the exception itself, with its own traceback
        assert "fail_with_custom" in "".join(traceback.format_tb(custom.__traceback__))
        assert isinstance(unpicklable, Unpicklable)
    in_process = type(backend).__name__ in ("AsyncioBackend", "MockBackend")
    assert isinstance(cause, RemoteTraceback) != in_process


def stamp_start(x: int) -> float:
    import time

    return time.monotonic()  # CLOCK_MONOTONIC: one clock for every process on this host


def test_rate_limit_holds_on_every_backend(backend_factory: Callable[[], Backend], arun: Any) -> None:
    """rate=(n, s) is the engine's: on every backend, no window of s seconds (less the
    workers' dispatch latency) holds more than n starts."""
    from pypline import Pipeline
    from pypline.util import unwrap

    stage = work_pool(stamp_start, multi_proc=True, num_workers=3, rate=(6, 0.4))
    starts = sorted(unwrap(arun((Pipeline(range(18)) >> stage).run(executor=backend_factory()), timeout=60)))
    window = 0.4 - 0.05
    j = 0
    for i, t in enumerate(starts):
        while t - starts[j] >= window:
            j += 1
        assert i - j + 1 <= 6, [round(s - starts[0], 3) for s in starts]
    assert starts[-1] - starts[0] >= 17 * 0.4 / 6 - 0.05  # one start every 0.4/6 s


def batch_check(xs: list[int]) -> list[int]:
    if 5 in xs:
        raise ValueError("5 fails alone")
    return [x + 100 for x in xs]


def test_batch_stages_on_every_backend(backend_factory: Callable[[], Backend], arun: Any) -> None:
    """A batch stage's calls go through any backend; each item keeps its own Result and attempts."""
    from pypline import Pipeline
    from pypline.util import unwrap_err

    stage = work_pool(batch_check, multi_proc=True, num_workers=2, batch=4, retries=2)
    err = unwrap_err(arun((Pipeline(range(12)) >> stage).run(executor=backend_factory()), timeout=60))
    assert err.outputs == [x + 100 for x in range(12) if x != 5]
    [failure] = err.failures
    assert failure.item == 5 and failure.attempts == 2 and isinstance(failure.error, ValueError)


def refused_for_a_while(item: tuple[int, float]) -> int:
    import time

    x, down_until = item
    if time.time() < down_until:  # the dependency is down until then (one clock for every process here)
        raise ConnectionError("refused")
    return x


def test_breaker_pauses_and_recovers_on_every_backend(backend_factory: Callable[[], Backend], arun: Any) -> None:
    """pause_after is the engine's: on every backend a stage whose calls fail for a while
    pauses, probes and finishes every item."""
    import time

    from pypline import Pipeline
    from pypline.util import unwrap

    stage = work_pool(refused_for_a_while, multi_proc=True, num_workers=2, retries=100, backoff=0.02,
                      max_backoff=0.1, pause_after=2)

    async def items() -> Any:
        down_until = time.time() + 0.5  # first pulled once the stage has started: its start-up is not counted
        for x in range(10):
            yield x, down_until

    async def main() -> Any:
        p = Pipeline(items()) >> stage
        return p, await p.run(executor=backend_factory())

    p, result = arun(main(), timeout=60)
    assert unwrap(result) == list(range(10))
    assert p.last_stats is not None and p.last_stats.stages[0].details["breaker_trips"] >= 1


# --- worker set-up and teardown ---------------------------------------------------------------
# Setups and teardowns leave files in a folder (every backend here runs on this host), so
# the test sees what ran in other processes: "setup-<token>" holds "pid index attempt",
# "teardown-<token>" the attempt current_worker() showed there.


def lifecycle_setup(folder: str) -> dict[str, Any]:
    import uuid

    info = current_worker()
    token = uuid.uuid4().hex[:12]
    with open(os.path.join(folder, f"setup-{token}"), "w") as f:
        f.write(f"{os.getpid()} {info.index} {info.attempt}")
    return {"token": token}


def lifecycle_teardown(folder: str, state: dict[str, Any]) -> None:
    with open(os.path.join(folder, f"teardown-{state['token']}"), "w") as f:
        f.write(str(current_worker().attempt))


def with_state(x: int) -> tuple[int, str]:
    return x, current_worker().state["token"]


def odd_fails_with_state(x: int) -> int:
    assert current_worker().state["token"]
    if x % 2:
        raise ValueError(f"odd: {x}")
    return x


def no_database() -> None:
    raise LookupError("no database here")


def touch(folder: str, x: int) -> int:
    with open(os.path.join(folder, f"item-{x}"), "w"):
        return x


def _lifecycle_files(folder: Any, prefix: str) -> dict[str, str]:
    return {n.split("-", 1)[1]: (folder / n).read_text() for n in os.listdir(folder) if n.startswith(prefix)}


def _torn_down(folder: Any, backend: Backend) -> tuple[dict[str, str], dict[str, str]]:
    """The setup and teardown files. An agent tears down as it closes the run's session,
    which its client ends (BYE) without waiting: for zmq, wait for it (bounded)."""
    import time

    deadline = time.monotonic() + (10 if type(backend).__name__ == "ZmqBackend" else 0)
    while len(_lifecycle_files(folder, "teardown-")) < len(_lifecycle_files(folder, "setup-")):
        if time.monotonic() > deadline:
            break
        time.sleep(0.02)
    return _lifecycle_files(folder, "setup-"), _lifecycle_files(folder, "teardown-")


def _hooks(folder: Any) -> dict[str, Any]:
    import functools

    return {
        "setup": functools.partial(lifecycle_setup, str(folder)),
        "teardown": functools.partial(lifecycle_teardown, str(folder)),
    }


def test_setup_state_reaches_calls_and_teardown_follows(
    backend_factory: Callable[[], Backend], arun: Any, tmp_path: Any
) -> None:
    """setup() runs in each worker before its first item; calls see its state as
    current_worker().state; every worker set up is torn down by the time run() returns."""
    from pypline import Pipeline
    from pypline.util import unwrap

    stage = work_pool(with_state, multi_proc=True, num_workers=2, **_hooks(tmp_path))
    backend = backend_factory()
    out = unwrap(arun((Pipeline(range(20)) >> stage).run(executor=backend), timeout=60))
    assert sorted(x for x, _ in out) == list(range(20))
    setups, teardowns = _torn_down(tmp_path, backend)
    assert {token for _, token in out} <= set(setups)  # every call saw a state a setup made
    assert 1 <= len(setups) <= 2  # one per worker (on Dask: per Dask worker process, 2 here)
    assert all(text.split()[2] == "0" for text in setups.values())  # attempt 0 inside setup
    assert set(teardowns) == set(setups)
    assert all(text == "0" for text in teardowns.values())


def test_failing_setup_fails_the_stage_at_start(backend_factory: Callable[[], Backend], arun: Any, tmp_path: Any) -> None:
    """A setup that raises fails the stage before any item runs, naming the setup and its error."""
    import functools

    from pypline import Pipeline, StageStartError
    from pypline.util import unwrap_err

    stage = work_pool(functools.partial(touch, str(tmp_path)), multi_proc=True, num_workers=2, setup=no_database, name="db")
    err = unwrap_err(arun((Pipeline(range(10)) >> stage).run(executor=backend_factory()), timeout=60))
    assert isinstance(err.cause, StageStartError), err
    assert err.cause.stage == "db"
    assert "setup() raised" in str(err.cause) and "LookupError: no database here" in str(err.cause)
    assert os.listdir(tmp_path) == [] and err.outputs == []


def first_setup_only(folder: str) -> dict[str, Any]:
    """The first setup to get here succeeds; every later one raises."""
    try:
        os.close(os.open(os.path.join(folder, "first"), os.O_CREAT | os.O_EXCL))
    except FileExistsError:
        raise LookupError("only one connection allowed") from None
    return lifecycle_setup(folder)


def test_a_failing_setup_tears_down_the_workers_set_up(
    backend_factory: Callable[[], Backend], arun: Any, tmp_path: Any
) -> None:
    import functools

    from pypline import Pipeline
    from pypline.util import unwrap_err

    hooks = {**_hooks(tmp_path), "setup": functools.partial(first_setup_only, str(tmp_path))}
    stage = work_pool(with_state, multi_proc=True, num_workers=2, **hooks)
    backend = backend_factory()
    err = unwrap_err(arun((Pipeline(range(10)) >> stage).run(executor=backend), timeout=60))
    assert "LookupError: only one connection allowed" in str(err.cause)
    setups, teardowns = _torn_down(tmp_path, backend)
    assert len(setups) == 1 and set(teardowns) == set(setups)


def test_teardown_runs_when_fail_fast_stops_the_run(
    backend_factory: Callable[[], Backend], arun: Any, tmp_path: Any
) -> None:
    from pypline import Pipeline
    from pypline.util import unwrap_err

    stage = work_pool(odd_fails_with_state, multi_proc=True, num_workers=2, **_hooks(tmp_path))
    backend = backend_factory()
    err = unwrap_err(arun((Pipeline(range(50)) >> stage).run(executor=backend, fail_fast=True), timeout=60))
    assert err.failures
    setups, teardowns = _torn_down(tmp_path, backend)
    assert setups and set(teardowns) == set(setups)
