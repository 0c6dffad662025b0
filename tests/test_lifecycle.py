"""Worker set-up and teardown (``work_pool(setup=..., teardown=...)``), where backends differ.

The contract suite checks, on every backend, that calls see the state and that every
worker set up is torn down (also on fail_fast), and that a failing setup fails the start.
Here: where each runs (the worker's own thread, the worker process's main thread), async
hooks, cancellation, a teardown that raises, a setup that hangs, a worker process that is
replaced, a call still running at stop, agents not keeping such a stage warm, and the
argument checks.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import sqlite3
import sys
import threading
import time
from typing import Any

import cloudpickle
import pytest

from pypline import Pipeline, StageStartError, current_worker, work_pool
from pypline.util import unwrap, unwrap_err

pytestmark = pytest.mark.timeout(60)

cloudpickle.register_pickle_by_value(sys.modules[__name__])


# --- helpers that run in workers (module level: shipped to worker processes by value) -------


def note(folder: str, text: str) -> None:
    """Append one line to ``folder/log``: every process of the run writes to the same file."""
    with open(os.path.join(folder, "log"), "a") as f:
        f.write(text + "\n")


def lines(folder: Any) -> list[str]:
    path = os.path.join(str(folder), "log")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return f.read().splitlines()


def open_db(folder: str) -> sqlite3.Connection:
    """A resource bound to the thread that made it: sqlite refuses use from another thread."""
    info = current_worker()
    note(folder, f"setup {info.index} {threading.current_thread().name} {os.getpid()}")
    return sqlite3.connect(os.path.join(folder, f"db{info.index}.sqlite"))


def close_db(folder: str, conn: sqlite3.Connection) -> None:
    conn.execute("select 1")  # raises ProgrammingError in any thread but the one that opened it
    conn.close()
    note(folder, f"teardown {current_worker().index} {threading.current_thread().name} {os.getpid()}")


def query(x: int) -> tuple[int, int, str, int]:
    row = current_worker().state.execute("select ?", (x,)).fetchone()
    return row[0], current_worker().index, threading.current_thread().name, os.getpid()


def db_hooks(folder: Any) -> dict[str, Any]:
    return {"setup": functools.partial(open_db, str(folder)), "teardown": functools.partial(close_db, str(folder))}


# --- where setup and teardown run -------------------------------------------------------------------


def test_sync_stage_hooks_run_in_each_workers_own_thread(arun: Any, tmp_path: Any) -> None:
    """asyncio backend, plain functions: setup, every call and teardown of a worker share its
    thread, so a thread-bound resource (sqlite) works."""
    stage = work_pool(query, num_workers=3, **db_hooks(tmp_path))
    out = unwrap(arun((Pipeline(range(30)) >> stage).run()))
    assert sorted(o[0] for o in out) == list(range(30))
    threads_of = {idx: thread for _, idx, thread, _ in out}
    log = lines(tmp_path)
    setups = [line.split() for line in log if line.startswith("setup")]
    teardowns = [line.split() for line in log if line.startswith("teardown")]
    assert sorted(int(s[1]) for s in setups) == [0, 1, 2] and sorted(int(t[1]) for t in teardowns) == [0, 1, 2]
    for _, idx, thread, _ in [("setup", *s[1:]) for s in setups] + [("teardown", *t[1:]) for t in teardowns]:
        assert thread == f"pypline-query-{idx}"
        if int(idx) in threads_of:
            assert threads_of[int(idx)] == thread


def test_process_hooks_run_in_the_worker_processes_main_thread(arun: Any, tmp_path: Any) -> None:
    stage = work_pool(query, num_workers=2, multi_proc=True, **db_hooks(tmp_path))
    out = unwrap(arun((Pipeline(range(20)) >> stage).run()))
    assert sorted(o[0] for o in out) == list(range(20))
    log = [line.split() for line in lines(tmp_path)]
    pids = {int(pid) for _, _, _, pid in out}
    assert {int(w[3]) for w in log if w[0] == "setup"} == {int(w[3]) for w in log if w[0] == "teardown"} >= pids
    assert all(w[2] == "MainThread" for w in log), log
    assert os.getpid() not in pids


async def open_session() -> dict[str, Any]:
    await asyncio.sleep(0)
    return {"loop": id(asyncio.get_running_loop()), "open": True}


async def close_session(folder: str, state: dict[str, Any]) -> None:
    await asyncio.sleep(0)
    same = state["loop"] == id(asyncio.get_running_loop())
    note(folder, f"closed {current_worker().index} same-loop={same}")


async def uses_session(x: int) -> int:
    state = current_worker().state
    assert state["open"] and state["loop"] == id(asyncio.get_running_loop())
    return x


@pytest.mark.parametrize("multi_proc", [False, True], ids=["asyncio", "process"])
def test_async_hooks_run_on_the_loop_of_the_workers_calls(arun: Any, tmp_path: Any, multi_proc: bool) -> None:
    stage = work_pool(
        uses_session,
        num_workers=2,
        multi_proc=multi_proc,
        setup=open_session,
        teardown=functools.partial(close_session, str(tmp_path)),
    )
    assert sorted(unwrap(arun((Pipeline(range(10)) >> stage).run()))) == list(range(10))
    assert sorted(lines(tmp_path)) == ["closed 0 same-loop=True", "closed 1 same-loop=True"]


# --- stopping ------------------------------------------------------------------------------------------


def blocks_until_released(folder: str, x: int) -> int:
    note(folder, f"call {x}")
    deadline = time.monotonic() + 20
    while not os.path.exists(os.path.join(folder, "release")) and time.monotonic() < deadline:
        time.sleep(0.01)
    return x


def simple_setup() -> str:
    return "state"


def noting_teardown(folder: str, state: str) -> None:
    note(folder, f"teardown {state} {threading.current_thread().name}")


@pytest.mark.parametrize("multi_proc", [False, True], ids=["asyncio", "process"])
def test_cancelling_the_run_tears_workers_down(arun: Any, tmp_path: Any, multi_proc: bool) -> None:
    """Cancel the run while a call runs: teardown still runs, in every worker."""
    stage = work_pool(
        functools.partial(blocks_until_released, str(tmp_path)),
        num_workers=2,
        multi_proc=multi_proc,
        setup=simple_setup,
        teardown=functools.partial(noting_teardown, str(tmp_path)),
        name="blocking",
    )

    async def main() -> None:
        task = asyncio.ensure_future((Pipeline(range(4)) >> stage).run())
        while not any(line.startswith("call") for line in lines(tmp_path)):
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    t0 = time.monotonic()
    arun(main(), timeout=30)
    took = time.monotonic() - t0
    (tmp_path / "release").touch()  # let an abandoned thread end
    teardowns = [line for line in lines(tmp_path) if line.startswith("teardown")]
    assert len(teardowns) == 2, lines(tmp_path)
    assert took < 10  # not held up by the calls still running


def test_process_worker_inside_a_long_call_tears_down_at_once(arun: Any, tmp_path: Any) -> None:
    """fail_fast while another worker process is inside a call: its monitor thread runs the
    teardown and the process ends, without waiting for the call."""
    folder = str(tmp_path)

    def fails_first(x: int) -> int:
        if x == 0:
            while not any(line.startswith("call") for line in lines(folder)):
                time.sleep(0.01)
            raise ValueError("first")
        return blocks_until_released(folder, x)

    stage = work_pool(
        fails_first,
        num_workers=2,
        multi_proc=True,
        setup=simple_setup,
        teardown=functools.partial(noting_teardown, folder),
        buffer=1,
    )
    t0 = time.monotonic()
    err = unwrap_err(arun((Pipeline(range(2)) >> stage).run(fail_fast=True), timeout=30))
    took = time.monotonic() - t0
    (tmp_path / "release").touch()
    assert [f.item for f in err.failures] == [0]
    teardowns = sorted(line.split()[2] for line in lines(tmp_path) if line.startswith("teardown"))
    assert teardowns == ["MainThread", "pypline-worker-monitor"], lines(tmp_path)
    assert took < 8


def raising_teardown(state: Any) -> None:
    raise OSError("the connection was already gone")


@pytest.mark.parametrize("multi_proc", [False, True], ids=["asyncio", "process"])
def test_a_teardown_that_raises_is_logged_not_the_runs_outcome(
    arun: Any, caplog: pytest.LogCaptureFixture, multi_proc: bool
) -> None:
    stage = work_pool(query_free, multi_proc=multi_proc, setup=simple_setup, teardown=raising_teardown, name="td")
    with caplog.at_level(logging.WARNING, logger="pypline"):
        assert unwrap(arun((Pipeline(range(3)) >> stage).run())) == [0, 1, 2]
    messages = [r.getMessage() for r in caplog.records]
    assert any("'td'" in m and "teardown() raised" in m and "OSError: the connection was already gone" in m for m in messages)


def query_free(x: int) -> int:
    assert current_worker().state == "state"
    return x


# --- starting --------------------------------------------------------------------------------------------


def test_a_setup_that_hangs_fails_the_start_in_bounded_time(
    arun: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    import pypline.backends.local as local

    monkeypatch.setattr(local, "SETUP_TIMEOUT_S", 0.3)
    release = threading.Event()
    stage = work_pool(query_free, num_workers=2, setup=lambda: release.wait(10), name="slow")
    try:
        err = unwrap_err(arun((Pipeline(range(3)) >> stage).run(), timeout=10))
    finally:
        release.set()
    assert isinstance(err.cause, StageStartError)
    assert "setup() raised in worker" in str(err.cause) and "did not return within 0.3 s" in str(err.cause)


def test_setup_failing_in_one_worker_tears_down_the_others(arun: Any, tmp_path: Any) -> None:
    folder = str(tmp_path)

    def setup() -> int:
        if current_worker().index == 2:
            raise RuntimeError("worker 2 has no GPU")
        return current_worker().index

    stage = work_pool(query_free, num_workers=3, setup=setup, teardown=functools.partial(noting_teardown, folder))
    err = unwrap_err(arun((Pipeline(range(3)) >> stage).run()))
    assert "setup() raised in worker 2: RuntimeError: worker 2 has no GPU" in str(err.cause)
    assert sorted(line.split()[1] for line in lines(tmp_path)) == ["0", "1"]


def crash_on_first(folder: str, x: int) -> int:
    if x == 0 and not os.path.exists(os.path.join(folder, "crashed")):
        open(os.path.join(folder, "crashed"), "w").close()
        os._exit(3)
    return x


def setup_noting_pid(folder: str) -> int:
    note(folder, f"setup {os.getpid()}")
    return os.getpid()


def test_a_replaced_worker_process_runs_setup_again(arun: Any, tmp_path: Any) -> None:
    folder = str(tmp_path)
    stage = work_pool(
        functools.partial(crash_on_first, folder), multi_proc=True, retries=2, setup=functools.partial(setup_noting_pid, folder)
    )
    assert unwrap(arun((Pipeline(range(3)) >> stage).run())) == [0, 1, 2]
    pids = [line.split()[1] for line in lines(tmp_path)]
    assert len(pids) == 2 and pids[0] != pids[1]


# --- agents ----------------------------------------------------------------------------------------------


def test_an_agent_runs_setup_per_run_and_never_keeps_such_a_stage_warm(
    agents: Any, arun: Any, tmp_path: Any
) -> None:
    """Two runs in a row: each sets its workers up and tears them down (a warm executor
    would have kept the first run's state)."""
    from pypline.backends.remote import ZmqBackend

    def wait_for_lines(n: int) -> bool:
        deadline = time.monotonic() + 10
        while len(lines(tmp_path)) < n and time.monotonic() < deadline:
            time.sleep(0.02)
        return len(lines(tmp_path)) == n

    agent = agents(workers=1)
    folder = str(tmp_path)
    stage = work_pool(
        query_free,
        multi_proc=True,
        setup=simple_setup,
        teardown=functools.partial(noting_teardown, folder),
    )
    for run in (1, 2):
        assert unwrap(arun((Pipeline(range(3)) >> stage).run(executor=ZmqBackend([agent.endpoint])))) == [0, 1, 2]
        assert wait_for_lines(run), lines(tmp_path)


# --- arguments -----------------------------------------------------------------------------------------


def test_setup_and_teardown_arguments_are_checked() -> None:
    def gen() -> Any:
        yield 1

    with pytest.raises(TypeError, match="setup must be callable or None, got 3"):
        work_pool(setup=3)  # type: ignore[call-overload]
    with pytest.raises(TypeError, match="teardown must be a function, not a generator: 'gen'"):
        work_pool(teardown=gen)


# --- with the other stage options ---------------------------------------------------------------------


async def async_worker(x: int) -> tuple[str, Any]:
    return "async", current_worker().state


def sync_worker(x: int) -> tuple[str, Any]:
    return "sync", current_worker().state


def named_state() -> str:
    return f"w{current_worker().index}-{threading.current_thread().name}"


def test_mix_pool_workers_are_set_up_where_each_runs(arun: Any) -> None:
    """A mix_pool of an async and a plain worker: each worker's setup ran where its calls run."""
    from pypline import mix_pool

    stage = mix_pool(lambda: [async_worker, sync_worker], setup=named_state, name="mixed", fork_merge=list)
    out = unwrap(arun((Pipeline(range(3)) >> stage).run()))
    assert out == [[("async", "w0-MainThread"), ("sync", "w1-pypline-mixed-1")]] * 3


def batch_with_state(xs: list[int]) -> list[tuple[int, Any]]:
    return [(x, current_worker().state) for x in xs]


@pytest.mark.parametrize("multi_proc", [False, True], ids=["asyncio", "process"])
def test_batch_stages_see_their_workers_state(arun: Any, multi_proc: bool) -> None:
    stage = work_pool(batch_with_state, batch=4, num_workers=2, multi_proc=multi_proc, setup=simple_setup)
    out = unwrap(arun((Pipeline(range(10)) >> stage).run()))
    assert sorted(out) == [(x, "state") for x in range(10)]


def test_worker_processes_tear_down_when_the_pipelines_process_is_killed(tmp_path: Any) -> None:
    """kill -9 of the process running the pipeline: each worker process notices its lifeline
    close, runs the teardown (in its monitor thread, its call still running) and exits."""
    import signal
    import subprocess

    folder = str(tmp_path)
    script = tmp_path / "job.py"
    script.write_text(
        f"""
import os, time
from pypline import Pipeline, work_pool

FOLDER = {folder!r}

def setup():
    return os.getpid()

def teardown(pid):
    open(os.path.join(FOLDER, f"teardown-{{pid}}"), "w").close()

def block(x):
    open(os.path.join(FOLDER, f"running-{{os.getpid()}}"), "w").close()
    time.sleep(60)
    return x

(Pipeline(range(2)) >> work_pool(block, multi_proc=True, num_workers=2, setup=setup, teardown=teardown)).run_sync()
"""
    )

    def pids(prefix: str) -> set[int]:
        return {int(n.split("-")[1]) for n in os.listdir(folder) if n.startswith(prefix)}

    def wait(predicate: Any, seconds: float) -> bool:
        deadline = time.monotonic() + seconds
        while not predicate() and time.monotonic() < deadline:
            time.sleep(0.02)
        return bool(predicate())

    proc = subprocess.Popen([sys.executable, str(script)], cwd=folder)
    try:
        assert wait(lambda: len(pids("running-")) == 2, 30), "the workers did not start"
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        assert wait(lambda: pids("teardown-") == pids("running-"), 10), (pids("running-"), pids("teardown-"))

        def gone(pid: int) -> bool:  # exited (a zombie waiting for whoever adopted it counts)
            try:
                with open(f"/proc/{pid}/stat") as f:
                    return f.read().rsplit(")", 1)[1].split()[0] == "Z"
            except FileNotFoundError:
                return True

        assert wait(lambda: all(gone(p) for p in pids("running-")), 10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


@pytest.mark.parametrize("multi_proc", [False, True], ids=["asyncio", "process"])
def test_leaving_iter_early_tears_workers_down(tmp_path: Any, multi_proc: bool) -> None:
    """``iter()`` left with ``break``: the run stops and its workers are torn down before
    the loop's next statement."""
    stage = work_pool(
        query_free,
        num_workers=2,
        multi_proc=multi_proc,
        setup=simple_setup,
        teardown=functools.partial(noting_teardown, str(tmp_path)),
    )
    for result in (Pipeline(range(1000)) >> stage).iter():
        assert result.unwrap() is not None
        break
    assert len(lines(tmp_path)) == 2
