"""The ``dask`` backend on a real ``LocalCluster(processes=True)``.

One cluster of two single-threaded worker processes serves the whole module (it
takes seconds to start); it is made with ``allowed-failures=0`` so that a worker
killed mid-item reaches pypline at once instead of after three more worker deaths.
Each test builds its own ``DaskBackend`` (a new asynchronous client per run). The
module's teardown checks that no child process of the test process is left.

Worker functions live at module level: pytest imports this file from its path, so
the backend ships them (and the exception class below) to the workers by value.
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from typing import Any, Iterator

import pytest

# CI sets PYPLINE_REQUIRE_ENGINES=1: there a missing engine is an error, not a skip.
if os.environ.get("PYPLINE_REQUIRE_ENGINES"):
    import distributed as distributed
else:
    distributed = pytest.importorskip(
        "distributed", reason="dask[distributed] is not installed (pip install 'pypline-async[dask]')"
   )

import dask  # noqa: E402  # type: ignore[import-not-found,import-untyped,unused-ignore]
import psutil  # noqa: E402

from pypline import (  # noqa: E402
    Pipeline,
    StageStartError,
    WorkerDied,
    configure,
    current_worker,
    mix_pool,
    work_pool,
)
from pypline.backends.on_dask import DaskBackend, DaskExecutor  # noqa: E402
from pypline.lowlevel import admission_bound  # noqa: E402
from pypline.util import is_err, is_ok, unwrap, unwrap_err  # noqa: E402


def wait_until(predicate: Any, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return bool(predicate())


def arun(coro: Any, timeout: float = 40.0) -> Any:
    async def main() -> Any:
        return await asyncio.wait_for(coro, timeout)

    return asyncio.run(main())


def _children() -> set[int]:
    """Descendants of the test process, except multiprocessing's resource tracker.

    Dask starts its worker processes with multiprocessing's ``spawn``, which starts
    one resource-tracker process per interpreter, on purpose alive until the
    interpreter exits; it is not a worker and not a leak.
    """
    found = set()
    for p in psutil.Process().children(recursive=True):
        try:
            if "multiprocessing.resource_tracker" in " ".join(p.cmdline()):
                continue
        except psutil.Error:  # gone meanwhile
            continue
        found.add(p.pid)
    return found


@pytest.fixture(scope="module")
def cluster() -> Iterator[Any]:
    """Two single-threaded worker processes; no child process outlives the module.

    ``lost-worker-timeout`` is raised for the module: a LocalCluster closes a
    worker's nanny for good when, 15 s after the worker was lost, no worker of that
    name is registered, which a test that kills workers on purpose can hit.
    """
    before = _children()
    with dask.config.set({"distributed.deploy.lost-worker-timeout": "1h"}):
        with dask.config.set({"distributed.scheduler.allowed-failures": 0}):
            c = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0")
        try:
            yield c
        finally:
            c.close()
    assert wait_until(lambda: not (_children() - before)), f"leftover processes: {_children() - before}"


@pytest.fixture
def backend(cluster: Any) -> DaskBackend:
    return DaskBackend(address=cluster.scheduler_address)


# --- worker functions ---------------------------------------------------------------------------


class CustomError(Exception):
    """Exists only in this test module: it must come back with its own type."""


def square(x: int) -> int:
    return x * x


async def async_square(x: int) -> int:
    await asyncio.sleep(0)
    return x * x


def whoami(x: Any) -> tuple[Any, str, int, int, int]:
    w = current_worker()
    return x, w.stage, w.index, w.attempt, os.getpid()


def fail_first_attempt(x: int) -> int:
    if current_worker().attempt == 1:
        raise ConnectionError(f"flaky {x}")
    return x


def custom_failure(x: int) -> int:
    if x == 3:
        raise CustomError("three is not allowed")
    return x


def spread(x: int) -> Iterator[int]:
    for i in range(x % 3):
        yield x * 10 + i


def block_on_five(x: int) -> int:
    if x == 5:
        threading.Event().wait(10)
    return x


def kill_own_process(x: int) -> int:
    """Item 7 kills its worker process on its first attempt; item 13 on every attempt."""
    if x == 13 or (x == 7 and current_worker().attempt == 1):
        os.kill(os.getpid(), signal.SIGKILL)
    return x


def checksum(x: bytes) -> tuple[int, int]:
    return len(x), x[0]


def part(x: int) -> tuple[int, int]:
    w = current_worker()
    return w.index, x * (w.index + 1)


def plus_one(x: int) -> int:
    return x + 1


def times_ten(x: int) -> int:
    return x * 10


# --- results, ordering, errors ------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_results_in_source_order_with_worker_info(backend: DaskBackend) -> None:
    """Outputs come back in source order, computed in the workers, with current_worker() set."""
    stage = work_pool(whoami, multi_proc=True, num_workers=2, name="who")
    pipeline = Pipeline(range(200)) >> stage
    out = unwrap(arun(pipeline.run(executor=backend)))
    assert [o[0] for o in out] == list(range(200))
    assert {(o[1], o[3]) for o in out} == {("who", 1)}
    assert {o[2] for o in out} <= {0, 1}
    assert os.getpid() not in {o[4] for o in out}
    stats = pipeline.last_stats
    assert stats is not None and stats.stages[0].backend == "dask"
    assert stats.stages[0].busy_seconds is not None and stats.stages[0].busy_seconds > 0


@pytest.mark.timeout(60)
def test_async_functions_and_flat_map(backend: DaskBackend) -> None:
    """async def workers run in the worker; a generator's outputs keep their order within each item."""
    pipeline = (
        Pipeline(range(30))
        >> work_pool(async_square, multi_proc=True, num_workers=2)
        >> work_pool(spread, multi_proc=True, num_workers=2)
   )
    out = unwrap(arun(pipeline.run(executor=backend)))
    assert out == [x * x * 10 + i for x in range(30) for i in range((x * x) % 3)]


@pytest.mark.timeout(60)
def test_exceptions_keep_their_type_and_remote_traceback(backend: DaskBackend) -> None:
    """A user exception comes back as itself, the remote traceback kept; other items succeed."""
    result = arun(
        (Pipeline(range(6)) >> work_pool(custom_failure, multi_proc=True, num_workers=2)).run(executor=backend)
   )
    err = unwrap_err(result)
    assert err.outputs == [0, 1, 2, 4, 5]
    [failure] = err.failures
    assert isinstance(failure.error, CustomError) and str(failure.error) == "three is not allowed"
    assert "custom_failure" in str(failure) and "remote traceback" in str(failure)


@pytest.mark.timeout(60)
def test_retries_and_retry_on(backend: DaskBackend) -> None:
    """A matching error is retried (attempt 2 succeeds); a non-matching one fails at once."""
    ok = Pipeline(range(20)) >> work_pool(fail_first_attempt, multi_proc=True, num_workers=2, retries=2)
    assert unwrap(arun(ok.run(executor=backend))) == list(range(20))
    strict = Pipeline(range(4)) >> work_pool(
        fail_first_attempt, multi_proc=True, num_workers=2, retries=3, retry_on=(ValueError,)
   )
    err = unwrap_err(arun(strict.run(executor=backend)))
    assert len(err.failures) == 4
    assert all(isinstance(f.error, ConnectionError) and f.attempts == 1 for f in err.failures)


@pytest.mark.timeout(60)
def test_fork_mode_and_mix_pool(backend: DaskBackend) -> None:
    """Fork mode: every worker sees every item, results ordered by worker index; mix_pool worker i runs function i."""
    fork = work_pool(part, multi_proc=True, num_workers=3, fork_merge=lambda rs: rs)
    out = unwrap(arun((Pipeline(range(10)) >> fork).run(executor=backend)))
    assert out == [[(i, x * (i + 1)) for i in range(3)] for x in range(10)]

    @mix_pool(multi_proc=True, fork_merge=tuple)
    def both() -> list[Any]:
        return [plus_one, times_ten]

    assert unwrap(arun((Pipeline(range(5)) >> both).run(executor=backend))) == [(x + 1, x * 10) for x in range(5)]


@pytest.mark.timeout(60)
def test_unpicklable_function_and_item(backend: DaskBackend) -> None:
    """An unpicklable function fails the run at start naming the stage; an unpicklable item fails alone."""
    lock = threading.Lock()

    def uses_lock(x: int) -> int:
        with lock:
            return x

    err = unwrap_err(
        arun((Pipeline([1]) >> work_pool(uses_lock, multi_proc=True, name="locked")).run(executor=backend))
   )
    assert isinstance(err.cause, StageStartError) and "locked" in str(err.cause)
    items: list[Any] = [1, threading.Lock(), 3]
    err = unwrap_err(arun((Pipeline(items) >> work_pool(square, multi_proc=True, retries=2)).run(executor=backend)))
    assert err.outputs == [1, 9]
    assert [f.index for f in err.failures] == [1]


@pytest.mark.timeout(60)
def test_big_items_travel_scattered(backend: DaskBackend) -> None:
    """Batches over INLINE_BYTES reach the workers by scatter, not inside the task; results are the same."""
    from pypline.backends.on_dask import INLINE_BYTES

    items = [bytes([i]) * 40_000 for i in range(40)]
    assert 2 * len(items[0]) > INLINE_BYTES  # a batch of two already goes by scatter
    out = unwrap(arun((Pipeline(items) >> work_pool(checksum, multi_proc=True, num_workers=2)).run(executor=backend)))
    assert out == [(len(x), x[0]) for x in items]


# --- timeouts and dead workers -------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_timeout_abandons_the_call_and_the_worker_keeps_serving(backend: DaskBackend) -> None:
    """A stuck attempt times out (TimeoutError per attempt); its worker thread is free for the rest at once."""
    pipeline = Pipeline(range(12)) >> work_pool(block_on_five, multi_proc=True, num_workers=2, timeout=0.5, retries=2)
    t0 = time.monotonic()
    err = unwrap_err(arun(pipeline.run(executor=backend)))
    elapsed = time.monotonic() - t0
    assert err.outputs == [x for x in range(12) if x != 5]
    [failure] = err.failures
    assert isinstance(failure.error, TimeoutError) and failure.attempts == 2
    assert "abandoned" in str(failure.error)
    assert elapsed < 8, f"the stuck calls held the stage for {elapsed:.1f} s"


@pytest.mark.timeout(90)
def test_worker_killed_mid_item_costs_one_attempt(backend: DaskBackend) -> None:
    """A process killed mid-item is WorkerDied for that item only: retried if attempts remain, the rest unaffected."""
    pipeline = Pipeline(range(16)) >> work_pool(kill_own_process, multi_proc=True, num_workers=2, retries=2)
    err = unwrap_err(arun(pipeline.run(executor=backend), timeout=80))
    assert err.outputs == [x for x in range(16) if x != 13], [str(f) for f in err.failures]
    assert err.outputs == [x for x in range(16) if x != 13]  # 7 died once, then succeeded
    [failure] = err.failures
    assert failure.index == 13 and failure.attempts == 2
    assert isinstance(failure.error, WorkerDied) and "KilledWorker" in str(failure.error)


# --- the memory bound --------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_read_ahead_stays_within_the_bound(backend: DaskBackend) -> None:
    """Pulled - delivered never exceeds sum(buffer + workers) + stages + 1, checked at every pull."""
    s1 = work_pool(square, multi_proc=True, num_workers=2, buffer=4)
    s2 = work_pool(plus_one, multi_proc=True, num_workers=1, buffer=3)
    bound = admission_bound([s1.spec, s2.spec])
    assert bound == (4 + 2) + (3 + 1) + 2 + 1
    pulled = delivered = worst = 0

    def source() -> Iterator[int]:
        nonlocal pulled, worst
        for i in range(300):
            pulled += 1
            worst = max(worst, pulled - delivered)
            assert pulled - delivered <= bound, (pulled, delivered)
            yield i

    async def consume() -> list[int]:
        nonlocal delivered
        got = []
        async with (Pipeline(source()) >> s1 >> s2).stream(executor=backend) as results:
            async for r in results:
                got.append(unwrap(r))
                delivered += 1
                if delivered % 50 == 0:
                    await asyncio.sleep(0.05)  # a slow consumer now and then: intake must stall
        return got

    assert sorted(arun(consume())) == sorted(x * x + 1 for x in range(300))
    assert worst <= bound


# --- configuration ------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_configure_backend_and_the_name_dask(cluster: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """configure(backend=DaskBackend(...)) and run(executor="dask") both run multi_proc stages on Dask."""
    stage = work_pool(square, multi_proc=True, num_workers=2)
    previous = configure(backend=DaskBackend(address=cluster.scheduler_address))
    try:
        pipeline = Pipeline(range(10)) >> stage
        assert unwrap(arun(pipeline.run())) == [x * x for x in range(10)]
        assert pipeline.last_stats is not None and pipeline.last_stats.stages[0].backend == "dask"
    finally:
        configure(previous)
    from pypline import _registry

    monkeypatch.setattr(_registry, "_entry_points", lambda: {"dask": "pypline.backends.on_dask:DaskBackend"})
    with dask.config.set({"scheduler-address": cluster.scheduler_address}):
        pipeline = Pipeline(range(10)) >> stage
        assert unwrap(arun(pipeline.run(executor="dask"))) == [x * x for x in range(10)]
        assert pipeline.last_stats is not None and pipeline.last_stats.stages[0].backend == "dask"


@pytest.mark.timeout(60)
def test_given_clients_are_used_and_never_closed(cluster: Any) -> None:
    """A synchronous Client (other loop) and an asynchronous one (this loop) both work and stay open."""
    with distributed.Client(cluster, set_as_default=False) as client:
        out = arun((Pipeline(range(5)) >> work_pool(square, multi_proc=True)).run(executor=DaskBackend(client)))
        assert unwrap(out) == [0, 1, 4, 9, 16]
        assert client.status == "running"

    async def with_async_client() -> Any:
        async with distributed.Client(cluster.scheduler_address, asynchronous=True, set_as_default=False) as client:
            result = await (Pipeline(range(5)) >> work_pool(square, multi_proc=True)).run(executor=DaskBackend(client))
            assert client.status == "running"
            return result

    assert unwrap(arun(with_async_client())) == [0, 1, 4, 9, 16]


@pytest.mark.timeout(60)
def test_only_clients_pypline_makes_get_the_short_write_interval(cluster: Any) -> None:
    """pypline's own client writes to the scheduler every CLIENT_SEND_INTERVAL_S; a client you give keeps its own."""
    from pypline.backends.on_dask import CLIENT_SEND_INTERVAL_S

    async def main() -> tuple[float, float, float]:
        made = DaskBackend(address=cluster.scheduler_address)
        await made.open()
        try:
            ours = made._client_for_run().scheduler_comm.interval
        finally:
            await made.aclose()
        async with distributed.Client(cluster.scheduler_address, asynchronous=True, set_as_default=False) as client:
            before = client.scheduler_comm.interval
            given = DaskBackend(client)
            await given.open()
            try:
                theirs = given._client_for_run().scheduler_comm.interval
                assert given._client_for_run() is client
            finally:
                await given.aclose()
        return ours, before, theirs

    ours, before, theirs = arun(main())
    assert ours == CLIENT_SEND_INTERVAL_S
    assert before > CLIENT_SEND_INTERVAL_S and theirs == before


@pytest.mark.timeout(60)
def test_results_are_released_after_the_run(cluster: Any) -> None:
    """Results are released (with the next submit, the last ones when the stage closes): none stays on the cluster."""

    def stage_keys(dask_scheduler: Any) -> list[str]:
        return [str(k) for k in dask_scheduler.tasks if str(k).startswith("pypline-square-")]

    async def main() -> tuple[list[Any], list[str]]:
        async with distributed.Client(cluster.scheduler_address, asynchronous=True, set_as_default=False) as client:
            stage = work_pool(square, multi_proc=True, num_workers=2, buffer=4)
            result = await (Pipeline(range(40)) >> stage).run(executor=DaskBackend(client))
            assert unwrap(result) == [x * x for x in range(40)]
            held = [k for k in client.futures if str(k).startswith("pypline-square-")]
            assert held == []  # nothing referenced by this client any more
            deadline = time.monotonic() + 10
            keys = await client.run_on_scheduler(stage_keys)
            while keys and time.monotonic() < deadline:
                await asyncio.sleep(0.05)  # the scheduler forgets released keys asynchronously
                keys = await client.run_on_scheduler(stage_keys)
            return unwrap(result), keys

    _, keys = arun(main())
    assert keys == []


@pytest.mark.timeout(60)
def test_backend_made_cluster_is_closed_after_the_run() -> None:
    """DaskBackend(**cluster_kwargs) with nothing to connect to starts a LocalCluster for the run and closes it."""
    before = _children()
    backend = DaskBackend(n_workers=1)
    with dask.config.set({"scheduler-address": None}):
        out = arun((Pipeline(range(4)) >> work_pool(square, multi_proc=True)).run(executor=backend))
    assert unwrap(out) == [0, 1, 4, 9]
    assert wait_until(lambda: not (_children() - before)), f"leftover processes: {_children() - before}"


def test_constructor_rejects_bad_arguments() -> None:
    """Wrong argument types are a TypeError naming what was expected."""
    with pytest.raises(TypeError, match="client or an address"):
        DaskBackend(client=object(), address="tcp://x:1")
    with pytest.raises(TypeError, match="distributed.Client"):
        DaskBackend(client=object())
    with pytest.raises(TypeError, match="address"):
        DaskBackend(address=5)  # type: ignore[arg-type]


# --- fault classification -------------------------------------------------------------------------


def test_fault_mapping() -> None:
    """KilledWorker is the process dying mid-item; a cancelled future or a broken connection is a lost worker."""
    from distributed.client import FutureCancelledError
    from distributed.scheduler import KilledWorker

    ex = DaskExecutor(work_pool(square, multi_proc=True).spec, DaskBackend())
    ex._client = None
    call: Any = type("C", (), {"settled": False, "key": "k", "attempts": [1]})()
    assert ex._verdict(call, KilledWorker("k", "tcp://w:1", 0))[0] == "died"
    assert ex._verdict(call, FutureCancelledError("k", "scheduler-connection-lost"))[0] == "lost"
    assert ex._verdict(call, OSError("connection closed"))[0] == "lost"
    assert ex._verdict(call, ValueError("x"))[0] == "error"
    call.settled = True
    assert ex._verdict(call, FutureCancelledError("k", "pypline"))[0] == "ignore"
