"""The ``asyncio`` backend: a stage's workers on the pipeline's own event loop.

::

    StageRunner.submit([a, b, c]) ─► shared deque (or worker i's own deque, fork mode)
                                        │  an idle worker task is woken (one future per idle
                                        ▼  worker, not per item)
    worker task i ── async def ─────────► await fn(item)                 ─┐
                  ── def / generator ──► its own daemon thread runs fn ───┤ call_soon_threadsafe
                  ── async generator ──► async for v in fn(item): emit    │
                                                                          ▼
                                       slot freed, then sink.ok / sink.error (same loop tick)

Capacity is ``buffer + num_workers``: the engine never lets a stage hold more, so
the shared deque *is* the stage's input queue and items skip a hop. At most
``num_workers`` attempts run at once. A worker task keeps taking attempts from the
deque without suspending while they are there, so a burst of fast ``async def``
calls runs back to back in one loop step.

Each worker running plain ``def`` functions owns one thread (not a shared pool),
so a call that times out can be abandoned (Python cannot kill a thread) and the
worker gets a fresh thread; the abandoned call's result is discarded. Threads are
daemons so an abandoned call never blocks interpreter exit.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import logging
import queue
import sys
import threading
import time
from collections import deque
from typing import Any, Callable, Sequence

from pypline.executor import (
    Attempt,
    Backend,
    Executor,
    ExecutorStatistics,
    FnKind,
    OutcomeSink,
    StageSpec,
    WorkerFn,
    WorkerInfo,
)
from pypline.lowlevel import (
    LATENCY_SAMPLE_EVERY,
    SETUP_TIMEOUT_S,
    TEARDOWN_TIMEOUT_S,
    arun_setup,
    arun_teardown,
    run_setup,
    run_teardown,
    set_worker_info,
    setup_failed,
)

__all__ = ["AsyncioBackend", "AsyncioExecutor"]

log = logging.getLogger("pypline.asyncio")

_STOP = object()


class _WorkerThread:
    """One daemon thread that runs a worker's sync calls, one at a time."""

    def __init__(self, loop: asyncio.AbstractEventLoop, name: str) -> None:
        self.loop = loop
        self.jobs: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.abandoned = False
        self.exited: asyncio.Future[None] = loop.create_future()
        self.thread = threading.Thread(target=self._main, name=name, daemon=True)
        self.thread.start()

    def run(self, call: Callable[[], Any]) -> asyncio.Future[Any]:
        fut: asyncio.Future[Any] = self.loop.create_future()
        self.jobs.put((call, fut))
        return fut

    def stop(self) -> None:
        self.jobs.put(_STOP)

    def _report(self, fut: asyncio.Future[Any], ok: bool, value: Any) -> None:
        if fut.done():
            return
        if ok:
            fut.set_result(value)
        else:
            fut.set_exception(value)

    def _post(self, callback: Callable[..., Any], *args: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(callback, *args)
        except RuntimeError:  # the loop is closed: the run is over, nobody waits for this
            pass

    def _main(self) -> None:
        while True:
            job = self.jobs.get()
            if job is _STOP:
                break
            call, fut = job
            try:
                value = call()
            except BaseException as exc:  # delivered to the awaiting worker task
                if isinstance(exc, asyncio.CancelledError):  # the function's own: must not look like
                    exc = _RaisedInThread(exc)  # the cancellation of the task awaiting it
                self._post(self._report, fut, False, exc)
            else:
                self._post(self._report, fut, True, value)
            del job, call, fut
            if self.abandoned:
                return
        self._post(self._mark_exited)

    def _mark_exited(self) -> None:
        if not self.exited.done():
            self.exited.set_result(None)


def _being_cancelled() -> bool:
    """Is the current task being cancelled? (Python 3.11+; before that only ``aclose`` tells.)"""
    task = asyncio.current_task()
    return sys.version_info >= (3, 11) and task is not None and task.cancelling() > 0


class _RaisedInThread(Exception):
    """Carries a ``CancelledError`` that a function raised in a worker thread to its worker task."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(error)
        self.error = error


class _Abandoned(Exception):
    """Raised inside an abandoned generator thread to stop it at its next yield."""


class AsyncioExecutor(Executor):
    """Runs a stage's workers as tasks on the running loop (sync functions in threads)."""

    def __init__(self) -> None:
        self._capacity = 0
        self._completed = 0
        self._replaced = 0
        self._tasks: list[asyncio.Task[None]] = []
        self._threads: list[_WorkerThread | None] = []
        self._shared: deque[Attempt] = deque()
        self._own: list[deque[Attempt]] = []
        self._idle: list[asyncio.Future[None] | None] = []
        self._idle_order: list[int] = []  # idle workers, most recent last
        # Sampled attempt durations: bounded, so a long run keeps a recent window.
        self._latencies: deque[float] = deque(maxlen=2048)
        # Per worker: [wall seconds, CPU seconds] of its sampled plain calls, and its call count.
        self._call_times: list[list[float]] = []
        self._targeted = False
        self._closed = False
        self._states: list[Any] = []  # per worker: what the stage's setup returned there
        self._set_up: list[bool] = []  # per worker: set up, not yet torn down

    async def start(self, spec: StageSpec, sink: OutcomeSink) -> None:
        self._spec = spec
        self._sink = sink
        self._loop = asyncio.get_running_loop()
        n = spec.num_workers
        # The engine bounds a stage to buffer + num_workers items, so accepting that
        # many lets queued attempts wait here (one queue, no second hop) while at most
        # num_workers run at once.
        self._capacity = n + spec.buffer
        self._own = [deque() for _ in range(n)]
        self._idle = [None] * n
        self._idle_order = []
        self._targeted = spec.is_fork
        self._threads = [None] * n
        self._call_times = [[0.0, 0.0, 0] for _ in range(n)]
        self._states = [None] * n
        self._set_up = [False] * n
        if spec.setup is not None:
            await self._setup_all(spec.setup)
        self._infos = [
            [WorkerInfo(spec.name, i, a, self._states[i]) for a in range(1, spec.retries + 1)] for i in range(n)
        ]
        for i, wf in enumerate(spec.workers):
            task = self._loop.create_task(self._work(i, wf), name=f"pypline-{spec.name}-{i}")
            self._tasks.append(task)

    def capacity(self) -> int:
        return self._capacity

    def submit(self, attempts: Sequence[Attempt]) -> None:
        n = len(attempts)
        cap = self._capacity - n
        if cap < 0:
            raise RuntimeError(f"submit() got {n} attempts with capacity {self._capacity}")
        self._capacity = cap
        idle = self._idle
        if not self._targeted:
            self._shared.extend(attempts)
            while n and self._idle_order:
                i = self._idle_order.pop()
                f = idle[i]
                idle[i] = None
                if f is not None and not f.done():
                    f.set_result(None)
                    n -= 1
            return
        for a in attempts:
            w = a.worker
            if w is None:  # a fork stage's attempts are all targeted; be lenient anyway
                w = 0
            self._own[w].append(a)
            f = idle[w]
            if f is not None:
                idle[w] = None
                if not f.done():
                    f.set_result(None)

    def submit_one(self, attempt: Attempt) -> None:
        if self._capacity <= 0:
            raise RuntimeError("submit_one() with no capacity left")
        if self._targeted:
            self.submit((attempt,))
            return
        self._capacity -= 1
        self._shared.append(attempt)
        order = self._idle_order
        while order:
            i = order.pop()
            f = self._idle[i]
            self._idle[i] = None
            if f is not None and not f.done():
                f.set_result(None)
                return

    def _info(self, i: int, number: int) -> WorkerInfo:
        infos = self._infos[i]
        return infos[number - 1] if number <= len(infos) else WorkerInfo(self._spec.name, i, number, self._states[i])

    # --- set-up and teardown: on the loop for async functions, in the worker's thread otherwise ---
    def _thread(self, i: int) -> _WorkerThread:
        worker = self._threads[i]
        if worker is None or worker.abandoned:
            worker = self._threads[i] = _WorkerThread(self._loop, f"pypline-{self._spec.name}-{i}")
        return worker

    def _on_loop(self, i: int) -> bool:
        return self._spec.workers[i].kind in (FnKind.ASYNC, FnKind.ASYNC_GEN)

    async def _setup_all(self, setup: Callable[[], Any]) -> None:
        """Run ``setup`` in every worker at once; if one fails, undo the others and fail the start."""
        name = self._spec.name

        async def one(i: int) -> None:
            if self._on_loop(i):
                pending: Any = arun_setup(setup, name, i)
            else:
                pending = self._thread(i).run(functools.partial(run_setup, setup, name, i))
            try:
                self._states[i] = await asyncio.wait_for(pending, SETUP_TIMEOUT_S)
            except _RaisedInThread as carried:
                raise carried.error from None
            except asyncio.TimeoutError:
                if not self._on_loop(i):
                    self._abandon(i, self._thread(i))
                raise TimeoutError(f"it did not return within {SETUP_TIMEOUT_S:g} s") from None
            self._set_up[i] = True

        results = await asyncio.gather(*(one(i) for i in range(self._spec.num_workers)), return_exceptions=True)
        failed = next(((i, r) for i, r in enumerate(results) if isinstance(r, BaseException)), None)
        if failed is not None:
            await self.aclose()  # tears down the workers that were set up
            i, exc = failed
            if isinstance(exc, asyncio.CancelledError):
                raise exc
            raise setup_failed(name, f"worker {i}", exc)

    async def _teardown_all(self, teardown: Callable[[Any], Any]) -> None:
        """``teardown(state)`` in every worker that was set up, at most TEARDOWN_TIMEOUT_S for all."""
        name = self._spec.name
        waits: list[asyncio.Future[Any]] = []
        for i, state in enumerate(self._states):
            if not self._set_up[i]:
                continue
            self._set_up[i] = False
            if self._on_loop(i):
                waits.append(asyncio.ensure_future(arun_teardown(teardown, state, name, i)))
            else:  # its own thread, unless a call still runs there (then a fresh one)
                waits.append(self._thread(i).run(functools.partial(run_teardown, teardown, state, name, i)))
        if not waits:
            return
        _, late = await asyncio.wait(waits, timeout=TEARDOWN_TIMEOUT_S)
        for w in late:
            w.cancel()
        if late:
            log.warning("stage %r: %d teardown(s) did not end within %g s; left running", name, len(late), TEARDOWN_TIMEOUT_S)

    async def _work(self, i: int, wf: WorkerFn) -> None:
        own, shared, sink = self._own[i], self._shared, self._sink
        kind, fn = wf.kind, wf.fn
        timeout = self._spec.timeout
        fast = kind is FnKind.ASYNC and timeout is None
        number = 0
        # Time one attempt in LATENCY_SAMPLE_EVERY; a negative countdown never reaches 0.
        every = LATENCY_SAMPLE_EVERY if sink.timing else -1
        countdown = every
        samples = self._latencies
        clock = time.perf_counter
        while True:
            if own:
                a = own.popleft()
            elif shared:
                a = shared.popleft()
            else:
                fut = self._loop.create_future()
                self._idle[i] = fut
                self._idle_order.append(i)
                await fut
                continue
            if a.number != number:
                number = a.number
                set_worker_info(self._info(i, number))
            countdown -= 1
            if countdown:
                t0 = 0.0
            else:
                countdown = every
                t0 = clock()
            try:
                if fast:
                    value = await fn(a.item)
                else:
                    value = await self._call(i, kind, fn, a, self._info(i, number), timeout)
            except BaseException as exc:  # the user's function failed: report, keep serving
                if isinstance(exc, asyncio.CancelledError) and (self._closed or _being_cancelled()):
                    raise  # this worker task is cancelled (aclose, loop shutdown). Any other CancelledError
                    #       is the stage code's own (it awaited something cancelled): an outcome (rule 7)
                if t0:
                    samples.append(clock() - t0)
                self._capacity += 1
                self._completed += 1
                sink.error(a, exc)
                continue
            if t0:
                samples.append(clock() - t0)
            self._capacity += 1
            self._completed += 1
            sink.ok(a, value)

    async def _call(
        self, i: int, kind: FnKind, fn: Callable[..., Any], a: Attempt, info: WorkerInfo, timeout: float | None
    ) -> Any:
        if kind is FnKind.ASYNC:
            coro = fn(a.item)
        elif kind is FnKind.ASYNC_GEN:
            coro = self._drain_async_gen(fn, a)
        else:
            coro = self._in_thread(i, kind, fn, a, info)
        if timeout is None:
            return await coro
        try:
            if sys.version_info >= (3, 11):
                async with asyncio.timeout(timeout):
                    return await coro
            else:  # pragma: no cover - Python 3.10
                return await asyncio.wait_for(coro, timeout)
        except asyncio.TimeoutError:
            raise TimeoutError(f"attempt {a.number} of stage {self._spec.name!r} timed out after {timeout:g} s") from None

    async def _drain_async_gen(self, fn: Callable[..., Any], a: Attempt) -> None:
        agen = fn(a.item)
        try:
            async for value in agen:
                await self._sink.emit(a, value)
        finally:
            await agen.aclose()

    async def _in_thread(self, i: int, kind: FnKind, fn: Callable[..., Any], a: Attempt, info: WorkerInfo) -> Any:
        worker = self._threads[i]
        if worker is None:
            worker = self._threads[i] = _WorkerThread(self._loop, f"pypline-{self._spec.name}-{i}")
        # One plain call in LATENCY_SAMPLE_EVERY is timed: its CPU time in its thread against
        # its wall time as the loop sees it, from hand-over to result. Waits for I/O, and for
        # the interpreter's lock behind a busy loop, show as wall time without CPU time (the
        # bottleneck hint reads the share).
        timing = self._call_times[i]
        timing[2] += 1
        sampled = kind is not FnKind.GEN and timing[2] % LATENCY_SAMPLE_EVERY == 0
        if kind is FnKind.GEN:
            call = self._gen_call(worker, fn, a, info)
        elif sampled:

            def call() -> Any:
                set_worker_info(info)
                c0 = time.thread_time()
                try:
                    return fn(a.item)
                finally:
                    timing[1] += time.thread_time() - c0

        else:

            def call() -> Any:
                set_worker_info(info)
                return fn(a.item)

        w0 = time.perf_counter() if sampled else 0.0
        fut = worker.run(call)
        try:
            value = await fut
        except _RaisedInThread as carried:
            raise carried.error from None
        except (asyncio.CancelledError, TimeoutError, asyncio.TimeoutError):
            # Timed out or cancelled while the thread runs: abandon it, give the worker a new one.
            self._abandon(i, worker)
            raise
        finally:
            if sampled:
                timing[0] += time.perf_counter() - w0
        if asyncio.iscoroutine(value):  # a plain function returned a coroutine: await it here
            value = await value
        return value

    def _gen_call(self, worker: _WorkerThread, fn: Callable[..., Any], a: Attempt, info: WorkerInfo) -> Callable[[], None]:
        loop, sink = self._loop, self._sink

        def call() -> None:
            set_worker_info(info)
            gen = fn(a.item)
            try:
                for value in gen:
                    if worker.abandoned:
                        raise _Abandoned()
                    coro = sink.emit(a, value)
                    try:
                        cf = asyncio.run_coroutine_threadsafe(coro, loop)
                    except RuntimeError:  # the loop is closed: the run is over
                        coro.close()
                        raise _Abandoned() from None
                    while True:
                        if worker.abandoned:
                            cf.cancel()
                            raise _Abandoned()
                        try:
                            cf.result(0.05)
                            break
                        except concurrent.futures.TimeoutError:
                            continue
            finally:
                gen.close()

        return call

    def _abandon(self, i: int, worker: _WorkerThread) -> None:
        worker.abandoned = True
        worker.stop()
        if self._closed:  # shutting down: nothing replaces it
            log.info(
                "stage %r worker %d: thread %s still runs a call at shutdown; it is abandoned and its "
                "result discarded (a running thread cannot be stopped)",
                self._spec.name,
                i,
                worker.thread.name,
            )
            return
        log.warning(
            "stage %r worker %d: abandoning thread %s (timed out mid-call; its result will be "
            "discarded), starting a new one",
            self._spec.name,
            i,
            worker.thread.name,
        )
        if self._threads[i] is worker:
            self._threads[i] = None
            self._replaced += 1

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        for t in self._tasks:
            t.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        if any(self._set_up) and self._spec.teardown is not None:
            await self._teardown_all(self._spec.teardown)
        waits = []
        for w in self._threads:
            if w is not None and not w.abandoned:
                w.stop()
                waits.append(w)
        self._threads = []
        if waits:
            # Idle threads exit at once on STOP; a thread stuck in a user call is abandoned.
            await asyncio.wait([w.exited for w in waits], timeout=1.0)
            for w in waits:
                if w.exited.done():
                    w.thread.join()

    def statistics(self) -> ExecutorStatistics:
        lat = tuple(self._latencies)
        busy = (sum(lat) / len(lat)) * self._completed if lat else None
        wall = sum(t[0] for t in self._call_times)
        cpu = sum(t[1] for t in self._call_times)
        return ExecutorStatistics(
            cpu_share=min(1.0, cpu / wall) if wall > 0 else None,
            backend="asyncio",
            workers=len(self._own),
            capacity=self._capacity,
            submitted=self._completed + len(self._own) + self._spec.buffer - self._capacity,
            completed=self._completed,
            workers_replaced=self._replaced,
            running=sum(1 for f in self._idle if f is None) if not self._closed else 0,
            busy_seconds=busy,
            latencies=lat,
        )


class AsyncioBackend(Backend):
    """Backend ``asyncio``: tasks on the pipeline's loop, plain functions in threads."""

    name = "asyncio"

    def executor(self, spec: StageSpec) -> Executor:
        return AsyncioExecutor()
