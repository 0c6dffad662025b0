"""The ``ray`` backend on a real local Ray (``ray.init(num_cpus=2)``).

Ray starts once for the module (it takes seconds) and is shut down at its end;
the teardown checks that none of Ray's processes (GCS, raylet, workers) is left.
Each test builds its own ``RayBackend``, which finds Ray initialised and uses it;
one test checks, in a subprocess, that a backend that starts Ray itself also
shuts it down.

Worker functions live at module level: pytest imports this file from its path, so
the backend ships them (and the exception class below) to the actors by value.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from typing import Any, Iterator

import pytest

# CI sets PYPLINE_REQUIRE_ENGINES=1: there a missing engine is an error, not a skip.
if os.environ.get("PYPLINE_REQUIRE_ENGINES"):
    import ray as ray
else:
    ray = pytest.importorskip("ray", reason="ray is not installed (pip install 'pypline-async[ray]')")

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
from pypline.backends.on_ray import RayBackend, RayExecutor  # noqa: E402
from pypline.lowlevel import admission_bound  # noqa: E402
from pypline.util import unwrap, unwrap_err  # noqa: E402


def wait_until(predicate: Any, timeout: float = 15.0) -> bool:
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
    """Live descendants of the test process (Ray's daemons and workers among them)."""
    found = set()
    for p in psutil.Process().children(recursive=True):
        try:
            if p.status() != psutil.STATUS_ZOMBIE and "multiprocessing.resource_tracker" not in " ".join(p.cmdline()):
                found.add(p.pid)
        except psutil.Error:  # gone meanwhile
            continue
    return found


@pytest.fixture(scope="module", autouse=True)
def local_ray() -> Iterator[None]:
    """Ray with two CPUs for the module; afterwards none of its processes is left."""
    before = _children()
    if ray.is_initialized():  # pragma: no cover - a previous module left it running
        ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()
    assert wait_until(lambda: not (_children() - before)), f"leftover processes: {_children() - before}"


@pytest.fixture
def backend() -> RayBackend:
    return RayBackend()


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
        threading.Event().wait(30)
    return x


def kill_own_process(x: int) -> int:
    """Item 7 kills its actor's process on its first attempt; item 13 on every attempt."""
    if x == 13 or (x == 7 and current_worker().attempt == 1):
        os.kill(os.getpid(), signal.SIGKILL)
    return x


def part(x: int) -> tuple[int, int]:
    w = current_worker()
    return w.index, x * (w.index + 1)


def size_of(x: bytes) -> int:
    return len(x)


def plus_one(x: int) -> int:
    return x + 1


def times_ten(x: int) -> int:
    return x * 10


# --- results, ordering, errors ------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_results_in_order_one_actor_per_worker(backend: RayBackend) -> None:
    """Outputs come back in source order; worker i is one actor process for the whole run; current_worker() is set."""
    pipeline = Pipeline(range(200)) >> work_pool(whoami, multi_proc=True, num_workers=2, name="who")
    out = unwrap(arun(pipeline.run(executor=backend)))
    assert [o[0] for o in out] == list(range(200))
    assert {(o[1], o[3]) for o in out} == {("who", 1)}
    pids: dict[int, set[int]] = {}
    for o in out:
        pids.setdefault(o[2], set()).add(o[4])
    assert set(pids) <= {0, 1} and all(len(p) == 1 for p in pids.values())
    assert os.getpid() not in {o[4] for o in out}
    stats = pipeline.last_stats
    assert stats is not None and stats.stages[0].backend == "ray"
    assert stats.stages[0].busy_seconds is not None and stats.stages[0].busy_seconds > 0


@pytest.mark.timeout(60)
def test_async_functions_and_flat_map(backend: RayBackend) -> None:
    """async def workers run in the actor; a generator's outputs keep their order within each item."""
    pipeline = (
        Pipeline(range(30))
        >> work_pool(async_square, multi_proc=True, num_workers=2)
        >> work_pool(spread, multi_proc=True, num_workers=2)
   )
    out = unwrap(arun(pipeline.run(executor=backend)))
    assert out == [x * x * 10 + i for x in range(30) for i in range((x * x) % 3)]


@pytest.mark.timeout(60)
def test_exceptions_keep_their_type_and_remote_traceback(backend: RayBackend) -> None:
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
def test_retries_and_retry_on(backend: RayBackend) -> None:
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
def test_fork_mode_and_mix_pool(backend: RayBackend) -> None:
    """Fork mode: every worker sees every item, results ordered by worker index; mix_pool worker i runs function i."""
    fork = work_pool(part, multi_proc=True, num_workers=3, fork_merge=lambda rs: rs)
    out = unwrap(arun((Pipeline(range(10)) >> fork).run(executor=backend)))
    assert out == [[(i, x * (i + 1)) for i in range(3)] for x in range(10)]

    @mix_pool(multi_proc=True, fork_merge=tuple)
    def both() -> list[Any]:
        return [plus_one, times_ten]

    assert unwrap(arun((Pipeline(range(5)) >> both).run(executor=backend))) == [(x + 1, x * 10) for x in range(5)]


@pytest.mark.timeout(60)
def test_unpicklable_function_and_item(backend: RayBackend) -> None:
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


# --- timeouts and dead workers -------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_timeout_kills_and_replaces_the_actor(backend: RayBackend) -> None:
    """A stuck attempt times out (TimeoutError per attempt); its actor is killed and replaced; the rest succeed."""
    pipeline = Pipeline(range(12)) >> work_pool(block_on_five, multi_proc=True, num_workers=2, timeout=1.0, retries=2)
    t0 = time.monotonic()
    err = unwrap_err(arun(pipeline.run(executor=backend)))
    elapsed = time.monotonic() - t0
    assert err.outputs == [x for x in range(12) if x != 5]
    [failure] = err.failures
    assert isinstance(failure.error, TimeoutError) and failure.attempts == 2
    assert "killed" in str(failure.error)
    assert elapsed < 20, f"the stuck calls held the stage for {elapsed:.1f} s"
    stats = pipeline.last_stats
    assert (
        stats is not None and stats.stages[0].workers_replaced >= 1
   )  # the last replacement may still be starting at the end


@pytest.mark.timeout(90)
def test_actor_killed_mid_item_costs_one_attempt(backend: RayBackend) -> None:
    """A process killed mid-item is WorkerDied for that item only: retried if attempts remain, the rest unaffected."""
    pipeline = Pipeline(range(16)) >> work_pool(kill_own_process, multi_proc=True, num_workers=2, retries=2)
    err = unwrap_err(arun(pipeline.run(executor=backend), timeout=80))
    assert err.outputs == [x for x in range(16) if x != 13], [str(f) for f in err.failures]  # 7 died once
    [failure] = err.failures
    assert failure.index == 13 and failure.attempts == 2
    assert isinstance(failure.error, WorkerDied) and "ActorDiedError" in str(failure.error)
    stats = pipeline.last_stats
    assert stats is not None and stats.stages[0].workers_replaced >= 3


# --- the memory bound --------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_read_ahead_stays_within_the_bound(backend: RayBackend) -> None:
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
def test_a_call_carries_about_max_call_bytes_of_items(backend: RayBackend) -> None:
    """Big items travel a few per call (MAX_CALL_BYTES), not as many as the buffer allows."""
    from pypline.backends.on_ray import MAX_CALL_BYTES

    items = [bytes([i % 256]) * 50_000 for i in range(60)]
    pipeline = Pipeline(items) >> work_pool(size_of, multi_proc=True, num_workers=2, buffer=64)
    assert unwrap(arun(pipeline.run(executor=backend))) == [50_000] * 60
    stats = pipeline.last_stats
    assert stats is not None
    per_call = MAX_CALL_BYTES // 50_000
    assert stats.stages[0].details["calls_sent"] >= len(items) // per_call


@pytest.mark.timeout(60)
def test_configure_backend_and_the_name_ray(monkeypatch: pytest.MonkeyPatch) -> None:
    """configure(backend=RayBackend()) and run(executor="ray") both run multi_proc stages on Ray (left running)."""
    stage = work_pool(square, multi_proc=True, num_workers=2)
    previous = configure(backend=RayBackend())
    try:
        pipeline = Pipeline(range(10)) >> stage
        assert unwrap(arun(pipeline.run())) == [x * x for x in range(10)]
        assert pipeline.last_stats is not None and pipeline.last_stats.stages[0].backend == "ray"
    finally:
        configure(previous)
    from pypline import _registry

    monkeypatch.setattr(_registry, "_entry_points", lambda: {"ray": "pypline.backends.on_ray:RayBackend"})
    pipeline = Pipeline(range(10)) >> stage
    assert unwrap(arun(pipeline.run(executor="ray"))) == [x * x for x in range(10)]
    assert pipeline.last_stats is not None and pipeline.last_stats.stages[0].backend == "ray"
    assert ray.is_initialized(), "a backend that did not start Ray must not shut it down"


@pytest.mark.timeout(90)
def test_backend_started_ray_is_shut_down_after_the_run(tmp_path: Any) -> None:
    """RayBackend(**init_kwargs) with Ray not initialised starts it for the run and shuts it down (no process left)."""
    script = textwrap.dedent(
        """
        import asyncio, psutil, ray
        from pypline import Pipeline, work_pool
        from pypline.backends.on_ray import RayBackend

        def square(x):
            return x * x

        backend = RayBackend(num_cpus=1, log_to_driver=False)
        result = asyncio.run((Pipeline(range(5)) >> work_pool(square, multi_proc=True)).run(executor=backend))
        print(result.unwrap() if hasattr(result, "unwrap") else result)
        print("initialised after:", ray.is_initialized())
        """
   )
    path = tmp_path / "owned.py"
    path.write_text(script)
    proc = subprocess.run([sys.executable, str(path)], capture_output=True, text=True, timeout=80, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "[0, 1, 4, 9, 16]" in proc.stdout and "initialised after: False" in proc.stdout, proc.stdout


def test_constructor_rejects_bad_arguments() -> None:
    """Wrong argument types are a TypeError naming what was expected."""
    with pytest.raises(TypeError, match="address"):
        RayBackend(address=5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="actor_options"):
        RayBackend(actor_options=[1])  # type: ignore[arg-type]


# --- fault classification -------------------------------------------------------------------------


def test_fault_mapping() -> None:
    """A dead actor process is WorkerDied; a dead node or an unreachable actor is a lost worker."""
    from ray import exceptions as rx

    ex = RayExecutor(work_pool(square, multi_proc=True).spec, RayBackend())
    call: Any = type("C", (), {"slot": 0, "settled": False, "attempts": [1]})()
    assert ex._verdict(call, rx.ActorDiedError())[0] == "died"
    assert ex._verdict(call, rx.WorkerCrashedError())[0] == "died"
    assert ex._verdict(call, rx.ActorUnavailableError("network", None))[0] == "lost"
    node_died = rx.ActorDiedError()
    node_died.error_msg = (
        "The actor died unexpectedly before finishing this task.\nThe actor died because its node has died."
   )
    assert ex._verdict(call, node_died)[0] == "lost"
    assert ex._verdict(call, ValueError("x"))[0] == "error"
