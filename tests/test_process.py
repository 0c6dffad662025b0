"""The ``process`` backend: ``multi_proc=True`` stages in supervised worker processes.

Every test leaves no child process behind (checked after each test by the
``no_children`` fixture). Coordination across processes uses files, never sleeps:
a worker writes its pid to a file, the test waits for the file (a poll with a
deadline), then acts.
"""

from __future__ import annotations

import asyncio
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import psutil
import pytest

from pypline import (
    Pipeline,
    PipelineError,
    RemoteError,
    StageStartError,
    WorkerDied,
    current_worker,
    mix_pool,
    work_pool,
)
from pypline.lowlevel import admission_bound
from pypline.util import is_err, is_ok, unwrap, unwrap_err

T = TypeVar("T")

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="the process backend needs add_reader (POSIX)")


# --- helpers ------------------------------------------------------------------------------


def arun(coro: Awaitable[T], timeout: float = 45.0) -> T:
    """Run ``coro`` in a fresh event loop; fail (not hang) after ``timeout`` seconds."""

    async def main() -> T:
        return await asyncio.wait_for(coro, timeout)

    return asyncio.run(main())


def wait_until(predicate: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


async def await_until(predicate: Callable[[], bool], timeout: float = 20.0) -> None:
    """Poll ``predicate`` from a coroutine (the loop keeps running meanwhile)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.01)


def _children() -> list[psutil.Process]:
    """Every descendant of this process, zombies included (an unreaped child is a leak too)."""
    return psutil.Process().children(recursive=True)


def _new_children(before: set[int]) -> list[psutil.Process]:
    return [p for p in _children() if p.pid not in before]


@pytest.fixture(autouse=True)
def no_children() -> Iterator[None]:
    """After each test: no child process it started remains (no orphan, no zombie).

    Children that existed before the test (started by other test modules) are not
    this module's business.
    """
    before = {p.pid for p in _children()}
    yield
    assert wait_until(lambda: not _new_children(before), 5.0), f"leftover child processes: {_new_children(before)}"


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


# Functions at module level: pytest imports this file from its path, so workers get them
# (and the classes below) by value through cloudpickle.


class CustomError(Exception):
    """An exception class that only exists in this test module."""


class UnloadableError(Exception):
    """Pickles fine, but cannot be unpickled: __init__ needs two arguments, args has one."""

    def __init__(self, a: Any, b: Any) -> None:
        super().__init__(a)


def square(x: int) -> int:
    return x * x


async def async_square(x: int) -> int:
    await asyncio.sleep(0)
    return x * x


def repeat(x: int) -> Iterator[int]:
    for i in range(x % 3):
        yield x * 10 + i


async def arepeat(x: int) -> Any:
    for i in range(x % 3):
        await asyncio.sleep(0)
        yield x * 10 + i


def whoami(x: int) -> tuple[int, Any, int]:
    return x, current_worker(), os.getpid()


# --- results ----------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_results_correct_and_ordered_in_worker_processes() -> None:
    """Every output is right, in source order, and was computed outside the parent process."""
    stage = work_pool(whoami, multi_proc=True, num_workers=2, buffer=8)
    out = unwrap((Pipeline(range(300)) >> stage).run_sync())
    assert [x for x, _, _ in out] == list(range(300))
    pids = {pid for _, _, pid in out}
    assert os.getpid() not in pids
    assert 1 <= len(pids) <= 2


def scheduling_policy(_: Any) -> tuple[int, int]:
    return os.sched_getscheduler(0), os.getpriority(os.PRIO_PROCESS, 0)


@pytest.mark.timeout(60)
@pytest.mark.skipif(not hasattr(os, "sched_getscheduler"), reason="scheduling policies are Linux-only")
def test_workers_run_with_the_parents_scheduling_policy_and_priority() -> None:
    """Workers are ordinary processes: the parent's scheduling policy and nice level (no
    tuning that could make them wait a whole time slice on a busy machine)."""
    stage = work_pool(scheduling_policy, multi_proc=True, num_workers=2, buffer=2)
    out = unwrap((Pipeline(range(6)) >> stage).run_sync())
    assert set(out) == {(os.sched_getscheduler(0), os.getpriority(os.PRIO_PROCESS, 0))}


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "fn, expected",
    [
        (square, [x * x for x in range(20)]),
        (async_square, [x * x for x in range(20)]),
        (repeat, [x * 10 + i for x in range(20) for i in range(x % 3)]),
        (arepeat, [x * 10 + i for x in range(20) for i in range(x % 3)]),
    ],
    ids=["def", "async-def", "generator", "async-generator"],
)
def test_every_function_kind_runs_in_processes(fn: Callable[..., Any], expected: list[int]) -> None:
    """def, async def, generators and async generators give the same outputs as in-process."""
    stage = work_pool(fn, multi_proc=True, num_workers=2, buffer=4)
    assert unwrap((Pipeline(range(20)) >> stage).run_sync()) == expected
    local = work_pool(fn, num_workers=2, buffer=4)
    assert unwrap((Pipeline(range(20)) >> local).run_sync()) == expected


@pytest.mark.timeout(60)
def test_async_def_runs_on_an_event_loop_inside_the_worker() -> None:
    """An ``async def`` stage function sees a running loop in the worker process, not the parent's."""

    async def where(x: int) -> tuple[int, bool]:
        asyncio.get_running_loop()
        await asyncio.sleep(0.001)
        return os.getpid(), True

    out = unwrap((Pipeline(range(6)) >> work_pool(where, multi_proc=True, num_workers=2)).run_sync())
    assert all(ok for _, ok in out)
    assert os.getpid() not in {pid for pid, _ in out}


@pytest.mark.timeout(60)
def test_current_worker_in_process() -> None:
    """current_worker() names the stage, the worker index and the attempt inside a worker process."""
    stage = work_pool(whoami, multi_proc=True, num_workers=2, name="who")
    out = unwrap((Pipeline(range(40)) >> stage).run_sync())
    for _, info, _ in out:
        assert info.stage == "who"
        assert info.index in (0, 1)
        assert info.attempt == 1
    # The index identifies the process: one pid per index.
    by_index: dict[int, set[int]] = {}
    for _, info, pid in out:
        by_index.setdefault(info.index, set()).add(pid)
    assert all(len(p) == 1 for p in by_index.values())


@pytest.mark.timeout(60)
def test_mix_pool_multi_proc_pool_and_fork_mode() -> None:
    """mix_pool: pool mode runs each item once on one of the functions; fork mode merges by worker index."""

    def plus(x: int) -> tuple[str, int]:
        return "plus", x + 1

    def times(x: int) -> tuple[str, int]:
        return "times", x * 2

    @mix_pool(multi_proc=True)
    def pool_stage() -> list[Callable[[int], tuple[str, int]]]:
        return [plus, times]

    out = unwrap((Pipeline(range(30)) >> pool_stage).run_sync())
    assert len(out) == 30
    for x, (kind, value) in zip(range(30), out):
        assert value == (x + 1 if kind == "plus" else x * 2)

    @mix_pool(multi_proc=True, fork_merge=lambda rs: tuple(v for _, v in rs))
    def fork_stage() -> list[Callable[[int], tuple[str, int]]]:
        return [plus, times, lambda x: ("neg", -x)]

    assert unwrap((Pipeline(range(10)) >> fork_stage).run_sync()) == [(x + 1, x * 2, -x) for x in range(10)]


@pytest.mark.timeout(60)
def test_fork_mode_multi_proc() -> None:
    """work_pool fork mode in processes: every worker sees every item; results ordered by index."""

    def aspect(x: int) -> tuple[int, int]:
        return current_worker().index, x

    stage = work_pool(aspect, multi_proc=True, num_workers=3, fork_merge=list)
    out = unwrap((Pipeline(range(12)) >> stage).run_sync())
    assert out == [[(0, x), (1, x), (2, x)] for x in range(12)]


@pytest.mark.timeout(60)
def test_large_buffers_round_trip_with_their_types() -> None:
    """bytes, bytearray and memoryview items (raw frames) arrive intact and typed; views keep format and shape."""
    big = bytes(range(256)) * (4 * 4096)  # 4 MiB

    def describe(x: Any) -> tuple[str, int, int, Any]:
        data = bytes(x)
        return type(x).__name__, len(data), data[-1], x[:3] if not isinstance(x, memoryview) else bytes(x[:3])

    items = [big, bytearray(big), memoryview(big), b"small", big[:70_000]]
    out = unwrap((Pipeline(items) >> work_pool(describe, multi_proc=True, num_workers=2)).run_sync())
    assert [o[0] for o in out] == ["bytes", "bytearray", "memoryview", "bytes", "bytes"]
    assert [o[1] for o in out] == [len(big), len(big), len(big), 5, 70_000]
    assert out[0][3] == bytes(range(3))

    def echo(x: Any) -> Any:
        return x

    import array

    grid = memoryview(array.array("i", range(12))).cast("B").cast("i", (3, 4))
    views = unwrap((Pipeline([grid, memoryview(b"tiny")]) >> work_pool(echo, multi_proc=True)).run_sync())
    assert views[0].format == "i" and views[0].shape == (3, 4) and views[0].tolist() == grid.tolist()
    assert bytes(views[1]) == b"tiny"

    back = unwrap((Pipeline([big, bytearray(b"x" * 100_000)]) >> work_pool(echo, multi_proc=True)).run_sync())
    assert back[0] == big and type(back[0]) is bytes and hash(back[0]) == hash(big)
    assert back[1] == bytearray(b"x" * 100_000) and type(back[1]) is bytearray


# --- faults -------------------------------------------------------------------------------------


def crash_on_first_attempt(x: int) -> int:
    if x == 3 and current_worker().attempt == 1:
        os._exit(7)
    return x


@pytest.mark.timeout(60)
def test_worker_exit_mid_item_costs_one_attempt_and_is_retried() -> None:
    """os._exit mid-item: that attempt fails with WorkerDied; with retries=2 the item then succeeds."""
    stage = work_pool(crash_on_first_attempt, multi_proc=True, num_workers=2, retries=2, buffer=4)
    assert unwrap((Pipeline(range(20)) >> stage).run_sync()) == list(range(20))


def crash_first_attempts_below_4(x: int) -> tuple[int, int]:
    if x < 4 and current_worker().attempt == 1:
        os._exit(9)
    return x, os.getpid()


@pytest.mark.timeout(60)
def test_crashed_workers_are_replaced_and_never_shared_between_stages() -> None:
    """Four crashes in each of two stages: each crashed worker is replaced by a new process,
    every item succeeds on its second attempt, and no process ran both stages' functions
    (the no_children fixture checks that none outlives the run)."""
    a = work_pool(crash_first_attempts_below_4, multi_proc=True, num_workers=1, retries=2, buffer=1)
    b = work_pool(crash_first_attempts_below_4, multi_proc=True, num_workers=1, retries=2, buffer=1)
    first = unwrap((Pipeline(range(8)) >> a).run_sync())
    assert [x for x, _ in first] == list(range(8))
    assert len({pid for _, pid in first}) >= 2  # one worker, four crashes: served by new processes

    pids_a: list[int] = []

    def keep_pid(r: tuple[int, int]) -> int:
        pids_a.append(r[1])
        return r[0]

    both = Pipeline(range(8)) >> a >> work_pool(keep_pid, buffer=1) >> b
    out = unwrap(both.run_sync())
    assert [x for x, _ in out] == list(range(8))
    assert set(pids_a).isdisjoint(pid for _, pid in out)


@pytest.mark.timeout(60)
def test_worker_exit_mid_item_fails_only_that_item() -> None:
    """With retries=1 the crashing item fails with WorkerDied(exitcode=7); every other item succeeds."""
    stage = work_pool(crash_on_first_attempt, multi_proc=True, num_workers=2, retries=1, buffer=4)
    err = unwrap_err((Pipeline(range(20)) >> stage).run_sync())
    assert isinstance(err, PipelineError)
    assert [f.index for f in err.failures] == [3]
    failure = err.failures[0]
    assert isinstance(failure.error, WorkerDied)
    assert failure.error.exitcode == 7 and failure.error.signal is None
    assert failure.attempts == 1
    assert sorted(err.outputs) == [x for x in range(20) if x != 3]


def _segfault(x: int) -> int:
    if x == 1:
        import ctypes

        ctypes.string_at(0)  # dereference NULL: SIGSEGV
    return x


@pytest.mark.timeout(60)
def test_segfault_is_worker_died_with_signal() -> None:
    """A segfault in a worker fails that item with WorkerDied(signal=SIGSEGV) and nothing else."""
    stage = work_pool(_segfault, multi_proc=True, num_workers=2, buffer=2)
    err = unwrap_err((Pipeline(range(6)) >> stage).run_sync())
    assert [f.index for f in err.failures] == [1]
    assert isinstance(err.failures[0].error, WorkerDied)
    assert err.failures[0].error.signal == signal.SIGSEGV
    assert sorted(err.outputs) == [0, 2, 3, 4, 5]


@pytest.mark.timeout(60)
def test_sigkill_of_a_worker_mid_item(tmp_path: Path) -> None:
    """SIGKILL of a worker (by pid) mid-item: WorkerDied(signal=SIGKILL) for that item; others complete."""
    pidfile = tmp_path / "pid"

    def victim(x: int) -> int:
        if x == 5:
            tmp = pidfile.with_suffix(".tmp")
            tmp.write_text(str(os.getpid()))
            tmp.rename(pidfile)
            time.sleep(3600)
        return x

    async def main() -> Any:
        stage = work_pool(victim, multi_proc=True, num_workers=2, buffer=4)
        task = asyncio.ensure_future((Pipeline(range(12)) >> stage).run())
        await await_until(pidfile.exists)
        pid = int(pidfile.read_text())
        os.kill(pid, signal.SIGKILL)
        return await task, pid

    result, pid = arun(main())
    err = unwrap_err(result)
    assert [f.index for f in err.failures] == [5]
    died = err.failures[0].error
    assert isinstance(died, WorkerDied) and died.signal == signal.SIGKILL and died.exitcode is None
    assert str(pid) in str(died)
    assert sorted(err.outputs) == [x for x in range(12) if x != 5]


@pytest.mark.timeout(60)
def test_timeout_kills_and_replaces_a_stuck_worker(tmp_path: Path) -> None:
    """A timed-out attempt fails with TimeoutError; its process is killed; a new one runs the rest."""
    pidfile = tmp_path / "stuck"

    def stuck(x: int) -> int:
        if x == 2:
            pidfile.write_text(str(os.getpid()))
            time.sleep(3600)
        return os.getpid()

    stage = work_pool(stuck, multi_proc=True, num_workers=1, timeout=1.0, buffer=2)
    err = unwrap_err((Pipeline(range(6)) >> stage).run_sync())
    assert [f.index for f in err.failures] == [2]
    assert isinstance(err.failures[0].error, TimeoutError)
    stuck_pid = int(pidfile.read_text())
    assert _gone(stuck_pid)
    assert len(err.outputs) == 5
    before, after = set(err.outputs[:2]), set(err.outputs[2:])
    assert before == {stuck_pid}
    assert stuck_pid not in after and len(after) == 1  # the replacement ran items 3..5


@pytest.mark.timeout(60)
def test_not_started_items_of_a_dead_worker_are_rerun_transparently(tmp_path: Path) -> None:
    """Items queued on a worker that dies are re-run elsewhere: not their fault, no attempt used."""

    def crash_once(x: int) -> tuple[int, int]:
        if x == 0 and current_worker().attempt == 1:
            os._exit(3)
        return x, current_worker().attempt

    # One worker whose credits grow: items queued behind the crashing one must not fail.
    stage = work_pool(crash_once, multi_proc=True, num_workers=1, buffer=16, retries=1)
    err = unwrap_err((Pipeline(range(40)) >> stage).run_sync())
    assert [f.index for f in err.failures] == [0]
    assert sorted(err.outputs) == [(x, 1) for x in range(1, 40)]


# --- pickling ------------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_unpicklable_function_fails_at_start_naming_the_stage() -> None:
    """A function closing over a lock cannot be pickled: Err at start, its cause naming the stage."""
    lock = threading.Lock()

    def locked(x: int) -> int:
        with lock:
            return x

    stage = work_pool(locked, multi_proc=True, name="needs_lock")
    err = unwrap_err((Pipeline(range(3)) >> stage).run_sync())
    assert isinstance(err.cause, StageStartError)
    assert err.cause.stage == "needs_lock"
    assert "needs_lock" in str(err) and "pickle" in str(err)
    assert err.failures == [] and err.outputs == []


@pytest.mark.timeout(60)
def test_unpicklable_item_fails_only_that_item() -> None:
    """An item that cannot be pickled fails alone; the items around it succeed."""
    items: list[Any] = [1, 2, threading.Lock(), 4, 5]
    err = unwrap_err((Pipeline(items) >> work_pool(lambda x: x * 2, multi_proc=True)).run_sync())
    assert [f.index for f in err.failures] == [2]
    assert isinstance(err.failures[0].error, pickle.PicklingError)
    assert err.outputs == [2, 4, 8, 10]


@pytest.mark.timeout(60)
def test_unpicklable_result_fails_only_that_item() -> None:
    """A result that cannot be pickled in the worker fails that item only."""

    def maybe_lock(x: int) -> Any:
        return threading.Lock() if x == 2 else x

    err = unwrap_err((Pipeline(range(5)) >> work_pool(maybe_lock, multi_proc=True, num_workers=2)).run_sync())
    assert [f.index for f in err.failures] == [2]
    assert "pickle" in str(err.failures[0].error).lower()
    assert sorted(err.outputs) == [0, 1, 3, 4]


@pytest.mark.timeout(60)
def test_exception_types_survive_with_remote_traceback() -> None:
    """ValueError and a test-module exception class keep their type; the remote traceback is the cause."""

    def fails(x: int) -> int:
        if x == 1:
            raise ValueError("bad one")
        if x == 2:
            raise CustomError("custom two")
        return x

    err = unwrap_err((Pipeline(range(4)) >> work_pool(fails, multi_proc=True)).run_sync())
    by_index = {f.index: f.error for f in err.failures}
    assert type(by_index[1]) is ValueError and str(by_index[1]) == "bad one"
    assert type(by_index[2]) is CustomError and str(by_index[2]) == "custom two"
    for exc in by_index.values():
        cause = exc.__cause__
        assert isinstance(cause, RemoteError)
        assert "in fails" in cause.traceback_text and type(exc).__name__ in cause.traceback_text
        assert "Remote traceback" in str(cause)


@pytest.mark.timeout(60)
def test_exception_that_cannot_be_unpickled_becomes_remote_error() -> None:
    """An exception the parent cannot recreate is a RemoteError with type name, message and traceback."""

    def raises_unloadable(x: int) -> int:
        raise UnloadableError("first", "second")

    err = unwrap_err((Pipeline([1]) >> work_pool(raises_unloadable, multi_proc=True)).run_sync())
    exc = err.failures[0].error
    assert type(exc) is RemoteError
    assert exc.type_name.endswith("UnloadableError")
    assert "first" in exc.message
    assert "raises_unloadable" in exc.traceback_text


# --- backpressure and shutdown -------------------------------------------------------------------


def one_or_two(x: int) -> Iterator[int]:
    yield x * x
    if x % 2:
        yield -1


@pytest.mark.timeout(60)
@pytest.mark.parametrize("shape", ["def", "generator", "two-stages"])
def test_bound_holds_with_a_slow_consumer(shape: str) -> None:
    """Items pulled from the source minus items delivered never exceed the memory bound."""
    first = work_pool(one_or_two if shape == "generator" else square, multi_proc=True, num_workers=2, buffer=4)
    stages = [first]
    if shape == "two-stages":
        stages.append(work_pool(lambda y: y, multi_proc=True, num_workers=3, buffer=2))
    bound = admission_bound([s.spec for s in stages])
    state = {"pulled": 0, "delivered": 0, "worst": 0}

    def source() -> Iterator[int]:
        for i in range(400):
            state["pulled"] += 1  # this item is pulled now: it counts
            ahead = state["pulled"] - state["delivered"]
            state["worst"] = max(state["worst"], ahead)
            assert ahead <= bound, f"read {ahead} ahead, bound {bound}"
            yield i

    async def main() -> list[int]:
        out = []
        pipeline = Pipeline(source())
        for s in stages:
            pipeline = pipeline >> s
        async with pipeline.stream(ordered=True) as results:
            async for r in results:
                v = unwrap(r)
                out.append(v)
                # A source item is delivered with its last output: x*x, or -1 after an odd square.
                if shape != "generator" or v == -1 or v % 2 == 0:
                    state["delivered"] += 1
                if len(out) % 10 == 0:
                    await asyncio.sleep(0.005)  # a slow consumer
        return out

    out = arun(main())
    assert [x for x in out if x >= 0] == [x * x for x in range(400)]
    assert state["worst"] <= bound
    assert state["worst"] >= bound // 2  # the stage did run ahead: the bound is what stopped it


@pytest.mark.timeout(60)
def test_early_break_from_stream_leaves_no_child_process() -> None:
    """Leaving stream() after a few results stops every worker process."""

    before = {p.pid for p in _children()}

    async def main() -> int:
        n = 0
        async for r in (Pipeline(range(10_000)) >> work_pool(square, multi_proc=True, num_workers=2)).stream():
            assert is_ok(r)
            n += 1
            if n == 5:
                break
        return n

    assert arun(main()) == 5
    assert not _new_children(before)  # reaped before stream() returned: no wait needed


@pytest.mark.timeout(60)
def test_cancelling_run_stops_blocked_workers(tmp_path: Path) -> None:
    """Cancelling run() while every worker is blocked in a call kills them all and re-raises."""
    marks = tmp_path

    def block(x: int) -> int:
        (marks / f"{os.getpid()}.pid").write_text("")
        time.sleep(3600)
        return x

    async def main() -> None:
        task = asyncio.ensure_future((Pipeline(range(10)) >> work_pool(block, multi_proc=True, num_workers=2)).run())
        await await_until(lambda: len(list(marks.glob("*.pid"))) == 2)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    arun(main())
    pids = [int(p.stem) for p in marks.glob("*.pid")]
    assert all(_gone(pid) for pid in pids)


@pytest.mark.timeout(60)
def test_workers_exit_when_the_parent_is_sigkilled(tmp_path: Path) -> None:
    """kill -9 of the parent: its blocked workers notice (lifeline closes) and exit within seconds."""
    marks = tmp_path / "marks"
    marks.mkdir()
    script = tmp_path / "parent.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import os, time
            from pathlib import Path
            from pypline import Pipeline, work_pool

            MARKS = Path({str(marks)!r})

            def block(x):
                (MARKS / f"{{os.getpid()}}.pid").write_text("")
                time.sleep(3600)

            if __name__ == "__main__":
                (Pipeline(range(4)) >> work_pool(block, multi_proc=True, num_workers=2)).run_sync()
            """
       )
   )
    proc = subprocess.Popen([sys.executable, str(script)], cwd=tmp_path)
    try:
        assert wait_until(lambda: len(list(marks.glob("*.pid"))) == 2, 30.0), "workers never started"
        pids = [int(p.stem) for p in marks.glob("*.pid")]
        proc.kill()
        proc.wait()
        assert wait_until(lambda: all(_gone(pid) for pid in pids), 5.0), "workers outlived their parent"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.timeout(60)
def test_statistics_after_a_crash_count_the_replacement() -> None:
    """statistics() reports the process backend, its workers and one replacement after a crash."""
    from pypline.backends.process import ProcessBackend

    holder: dict[str, Any] = {}

    class Spy(ProcessBackend):
        def executor(self, spec: Any) -> Any:
            ex = super().executor(spec)
            holder["ex"] = ex
            return ex

    stage = work_pool(crash_on_first_attempt, multi_proc=True, num_workers=2, retries=2)
    assert unwrap((Pipeline(range(8)) >> stage).run_sync(executor=Spy())) == list(range(8))
    stats = holder["ex"].statistics()
    assert stats.backend == "process"
    assert stats.workers_replaced == 1
    assert stats.submitted == stats.completed == 9  # 8 items, one of them twice


@pytest.mark.timeout(60)
def test_is_err_when_the_function_cannot_be_loaded_in_the_worker(tmp_path: Path) -> None:
    """A function that pickles but fails to load in the worker fails the start, naming the stage."""

    class Exploding:
        def __reduce__(self) -> Any:
            return (_explode, ())

    boom = Exploding()

    def uses_it(x: int) -> Any:
        return boom, x

    result = (Pipeline([1]) >> work_pool(uses_it, multi_proc=True, name="explodes")).run_sync()
    assert is_err(result)
    err = unwrap_err(result)
    assert isinstance(err.cause, StageStartError) and err.cause.stage == "explodes"
    assert "refuses to load" in str(err.cause)


def _explode() -> None:
    raise RuntimeError("refuses to load")


def lazy_whoami(x: int) -> Any:
    import pypline  # imported during the call, not when the function was loaded

    return pypline.current_worker()


@pytest.mark.timeout(60)
def test_current_worker_when_pypline_is_first_imported_inside_the_call() -> None:
    """current_worker() works even when the worker's code imports pypline only during the call."""
    out = unwrap((Pipeline(range(4)) >> work_pool(lazy_whoami, multi_proc=True, name="lazy")).run_sync())
    assert [(i.stage, i.index, i.attempt) for i in out] == [("lazy", 0, 1)] * 4


@pytest.mark.timeout(60)
def test_a_slow_item_does_not_hold_queued_items_hostage(tmp_path: Path) -> None:
    """Items queued on a worker behind a call that blocks are taken back and run by the other worker."""
    release = tmp_path / "release"

    def slow_or_fast(x: int) -> int:
        if x == 200:
            while not release.exists():  # blocks until the test has seen every other output
                time.sleep(0.005)
        return x

    async def main() -> list[int]:
        seen: list[int] = []
        stage = work_pool(slow_or_fast, multi_proc=True, num_workers=2, buffer=64)
        async for r in (Pipeline(range(400)) >> stage).stream():
            seen.append(unwrap(r))
            if len(seen) == 399:  # everything but the slow item came through while it blocks
                assert 200 not in seen
                release.write_text("")
        return seen

    assert sorted(arun(main())) == list(range(400))


def modules_loaded(x: int) -> tuple[bool, bool]:
    return __name__ in sys.modules, "pytest" in sys.modules


@pytest.mark.timeout(60)
def test_test_module_functions_travel_by_value() -> None:
    """A function from a pytest-imported test module is shipped by value: workers never import the module."""
    out = unwrap((Pipeline([1]) >> work_pool(modules_loaded, multi_proc=True)).run_sync())
    assert out == [(False, False)]


class ZeroCopy(bytearray):
    """A bytearray that pickles its memory out-of-band with protocol 5 (like numpy arrays do)."""

    def __reduce_ex__(self, protocol: Any) -> Any:
        if protocol >= 5:
            return type(self)._rebuild, (pickle.PickleBuffer(self),), None
        return type(self)._rebuild, (bytes(self),)

    @classmethod
    def _rebuild(cls, obj: Any) -> ZeroCopy:
        with memoryview(obj) as m:
            return cls(m) if not isinstance(obj, cls) else obj


@pytest.mark.timeout(60)
def test_protocol5_out_of_band_buffers_both_ways() -> None:
    """Objects with out-of-band buffers (protocol 5) travel as raw frames and come back intact."""
    data = ZeroCopy(bytes(range(256)) * 2048)  # 512 KiB

    def flip(x: ZeroCopy) -> ZeroCopy:
        assert type(x).__name__ == "ZeroCopy"
        return ZeroCopy(bytes(x)[::-1])

    out = unwrap((Pipeline([data, data]) >> work_pool(flip, multi_proc=True)).run_sync())
    assert [bytes(o) for o in out] == [bytes(data)[::-1]] * 2
    assert all(type(o).__name__ == "ZeroCopy" for o in out)


class _LoadsBadly:
    """Pickles fine; unpickling it calls _explode."""

    def __reduce__(self) -> Any:
        return (_explode, ())


@pytest.mark.timeout(60)
def test_item_that_cannot_be_unpickled_in_the_worker_fails_alone() -> None:
    """An item that pickles but cannot be unpickled in the worker fails that item only."""
    items: list[Any] = [1, _LoadsBadly(), 3]
    err = unwrap_err((Pipeline(items) >> work_pool(lambda x: x, multi_proc=True)).run_sync())
    assert [f.index for f in err.failures] == [1]
    assert isinstance(err.failures[0].error, pickle.UnpicklingError)
    assert "refuses to load" in str(err.failures[0].error)
    assert err.outputs == [1, 3]


@pytest.mark.timeout(60)
def test_result_that_cannot_be_unpickled_in_the_parent_fails_alone() -> None:
    """A result that pickles in the worker but cannot be unpickled here fails that item only."""

    def maybe_bad(x: int) -> Any:
        return _LoadsBadly() if x == 1 else x

    err = unwrap_err((Pipeline(range(3)) >> work_pool(maybe_bad, multi_proc=True)).run_sync())
    assert [f.index for f in err.failures] == [1]
    assert isinstance(err.failures[0].error, pickle.UnpicklingError)
    assert err.outputs == [0, 2]


class Scaler:
    """A callable object as a stage function."""

    def __init__(self, k: int) -> None:
        self.k = k

    def __call__(self, x: int) -> int:
        return x * self.k

    def method(self, x: int) -> int:
        return x + self.k


@pytest.mark.timeout(60)
def test_partials_methods_and_callable_objects() -> None:
    """functools.partial, bound methods and callable objects run in worker processes."""
    import functools

    s = Scaler(3)
    for fn, expected in [
        (functools.partial(pow, 2), [1, 2, 4, 8]),
        (s, [0, 3, 6, 9]),
        (s.method, [3, 4, 5, 6]),
    ]:
        assert unwrap((Pipeline(range(4)) >> work_pool(fn, multi_proc=True)).run_sync()) == expected


@pytest.mark.timeout(60)
def test_fail_fast_stops_blocked_workers(tmp_path: Path) -> None:
    """fail_fast: the first failure ends the run promptly, killing workers blocked in calls."""

    def fail_or_block(x: int) -> int:
        if x == 0:
            raise ValueError("first")
        time.sleep(3600)
        return x

    started = time.monotonic()
    result = (Pipeline(range(4)) >> work_pool(fail_or_block, multi_proc=True, num_workers=2)).run_sync(fail_fast=True)
    assert time.monotonic() - started < 20
    err = unwrap_err(result)
    assert [f.index for f in err.failures] == [0]


@pytest.mark.timeout(60)
def test_cancel_during_start_leaves_no_child_process() -> None:
    """Cancelling run() while the worker processes are still starting stops and reaps them."""

    before = {p.pid for p in _children()}

    async def main() -> None:
        task = asyncio.ensure_future((Pipeline(range(4)) >> work_pool(square, multi_proc=True, num_workers=3)).run())
        await await_until(lambda: len(_new_children(before)) >= 1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    arun(main())
    assert not _new_children(before)  # reaped before the cancelled run() returned


def _load_unless(flag: str) -> str:
    if os.path.exists(flag):
        raise RuntimeError("the environment changed: cannot load any more")
    return flag


class _LoadGuard:
    """Unpickles (in a worker) only while ``flag`` does not exist."""

    def __init__(self, flag: str) -> None:
        self.flag = flag

    def __reduce__(self) -> Any:
        return (_load_unless, (self.flag,))


@pytest.mark.timeout(60)
def test_a_worker_that_cannot_be_restarted_fails_the_rest_instead_of_hanging(tmp_path: Path) -> None:
    """When the replacement of a dead worker cannot load the function, waiting items fail with WorkerDied."""
    flag = str(tmp_path / "no-more")
    guard = _LoadGuard(flag)

    def crash_and_break(x: int) -> int:
        assert guard  # the function carries the guard: every worker start unpickles it
        if x == 0:
            Path(flag).write_text("")
            os._exit(5)
        return x

    stage = work_pool(crash_and_break, multi_proc=True, num_workers=1, buffer=2)
    err = unwrap_err((Pipeline(range(4)) >> stage).run_sync())
    assert [f.index for f in err.failures] == [0, 1, 2, 3]
    assert err.failures[0].error.exitcode == 5
    for f in err.failures[1:]:
        assert isinstance(f.error, WorkerDied) and "could not be restarted" in str(f.error)


@pytest.mark.timeout(60)
def test_wire_frames_survive_any_split() -> None:
    """The frame reader rebuilds every message exactly, whatever sizes and however the stream is split."""
    import random
    import select
    import socket

    from pypline.backends._procwire import BIG_FRAME, READ_CHUNK, FrameReader, send_all

    rng = random.Random(1234)
    sizes = [0, 1, 7, BIG_FRAME - 1, BIG_FRAME, BIG_FRAME + 1, READ_CHUNK - 5, READ_CHUNK + 3, 3 * READ_CHUNK]
    messages = []
    for _ in range(300):
        n = rng.randint(1, 5)
        messages.append([rng.randbytes(rng.choice(sizes)) for _ in range(n)])
    messages.append([b"x"] * 3000)  # many frames: the length table alone is bigger than usual

    a, b = socket.socketpair()
    writer = threading.Thread(target=lambda: [send_all(a, m) for m in messages])
    writer.start()
    b.setblocking(False)
    reader = FrameReader(b)
    got: list[list[Any]] = []
    try:
        while len(got) < len(messages):
            select.select([b], [], [], 5.0)
            try:
                got.extend(reader.read())
            except BlockingIOError:
                continue
    finally:
        writer.join()
        a.close()
        b.close()
    assert [[bytes(f) for f in m] for m in got] == messages


def yield_then_die(x: int) -> Iterator[int]:
    for i in range(3):
        yield x * 10 + i
    if x == 2:
        os._exit(9)


@pytest.mark.timeout(60)
def test_generator_worker_dying_after_yielding_fails_that_item_without_rerun() -> None:
    """A generator whose process dies after yielding: WorkerDied, not retried (no duplicate outputs)."""
    stage = work_pool(yield_then_die, multi_proc=True, num_workers=2, retries=3, buffer=4)
    err = unwrap_err((Pipeline(range(6)) >> stage).run_sync())
    assert [f.index for f in err.failures] == [2]
    failure = err.failures[0]
    assert isinstance(failure.error, WorkerDied) and failure.error.exitcode == 9
    assert failure.attempts == 1
    others = sorted(v for v in err.outputs if v // 10 != 2)
    assert others == [x * 10 + i for x in (0, 1, 3, 4, 5) for i in range(3)]
    assert sorted(v for v in err.outputs if v // 10 == 2) in ([], [20], [20, 21], [20, 21, 22])


def slow_stream(x: int) -> Iterator[int]:
    yield x
    if x == 1:
        time.sleep(3600)
    yield -x


@pytest.mark.timeout(60)
def test_timeout_of_a_streaming_generator() -> None:
    """A generator attempt that exceeds its timeout fails with TimeoutError; the others stream on."""
    stage = work_pool(slow_stream, multi_proc=True, num_workers=2, timeout=1.0, buffer=4)
    err = unwrap_err((Pipeline(range(4)) >> stage).run_sync())
    assert [f.index for f in err.failures] == [1]
    assert isinstance(err.failures[0].error, TimeoutError)
    assert sorted(v for v in err.outputs if v != 1) == sorted([0, 0, 2, -2, 3, -3])
