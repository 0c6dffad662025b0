"""The ``process`` backend: ``multi_proc=True`` stages in supervised local worker processes.

How an item flows::

    StageRunner.submit([a, b, ...]) ─► queue (or worker i's own queue, fork mode)
           │ one dispatch per loop tick (call_soon, or at once on the engine's flush()):
           │ the least loaded worker first, up to its free credits; items are encoded
           │ (cloudpickle, protocol 5; buffers >= 64 KiB copied once into the worker's
           ▼ shared-memory arena, else raw frames) into ONE "tasks" message per worker
    WorkerProc.send ── socketpair ──► worker process: runs them one at a time, FIFO
                                      (_procworker: def directly, async def on its own loop,
                                      generators stream each value back)
    add_reader ◄── "events" message ── outcomes batched: when its queue empties, when half
           │                           its credits are done, or after FLUSH_LATENCY_S
           ▼
    slot freed, then sink.ok / sink.error, or `await sink.emit` for each yielded value
    (a worker whose outputs wait for room downstream stops being read: backpressure
    reaches the worker through the socket)

**Credits (adaptive batching).** ``capacity()`` is ``num_workers x MAX_CREDITS``
minus every attempt handed to us and not yet reported, so the engine's memory
bound holds (its permits cap the total anyway) and capacity returns exactly with
each terminal report. What a worker may *hold* is its own adaptive limit; the
rest waits here, unsent, for whichever worker frees a slot first. A limit starts
at ``MIN_CREDITS`` (one call running, one waiting, so a worker never idles for a
round trip) and follows the measured time per call: a worker holds about
``TARGET_QUEUE_S`` of work, at most ``MAX_CREDITS`` attempts. Microsecond calls
thus travel hundreds per message; calls of a few milliseconds one or two at a
time, so an item never waits long behind a slow one on the same worker. With a
``timeout`` the limit is 1: an attempt's clock starts when it is sent, which is
then also when it starts.

**Slow items.** A worker runs its tasks one at a time, so tasks queued behind a
call that turns out slow would wait for it. A worker that has reported nothing for
``STUCK_AFTER_S`` while holding unstarted tasks is asked for them back (a byte on
its lifeline; its monitor thread answers while the call runs) and they go to the
other workers: an item waits behind a slow one for at most ~``STUCK_AFTER_S``.

**Faults.** A worker that dies (EOF on its socket) is reaped; the task it was
executing (read from the shared slot) gets ``WorkerDied`` with the exit code or
signal; the attempts it held but had not started are re-queued here, transparently
(not the item's fault, so no attempt and no ``lost`` is counted); a new process
takes its index. A ``timeout`` SIGKILLs the worker, reports ``TimeoutError`` and
the same replacement follows. A worker index whose replacement fails to start
``MAX_RESTART_FAILURES`` times in a row is given up: attempts that need it fail
with ``WorkerDied`` rather than wait forever. Execution is at-least-once: outcomes
a worker had finished but not yet sent when it died are computed again.

**Errors** and **functions from unimportable modules**: see ``_procpool``, where
everything that crosses the process boundary is converted.
"""

from __future__ import annotations

import asyncio
import logging
import pickle
from collections import deque
from collections.abc import Sequence
from itertools import repeat
from operator import attrgetter
from typing import Any

from pypline.executor import (
    Attempt,
    Backend,
    Executor,
    ExecutorStatistics,
    OutcomeSink,
    StageSpec,
    StageStartError,
    WorkerDied,
)

from pypline.lowlevel import LATENCY_SAMPLE_EVERY, TEARDOWN_TIMEOUT_S, setup_failed

from ._procpool import WorkerProc, WorkerStartFailed, decode_event, pickle_function, pickle_hooks
from ._procwire import INLINE_TYPES, BLOB, EMIT, ERROR, INLINE, OK, Encoder, RawValue

__all__ = ["ProcessBackend", "ProcessExecutor", "RawValue"]  # RawValue: for the agent (server.py)

log = logging.getLogger("pypline.process")

# --- tuning -------------------------------------------------------------------------------

#: Credits a worker starts with and never goes below (without a timeout): one call
#: running and one waiting in its queue, so it starts the next call without a round
#: trip. More would let a slow item hold more items hostage behind it.
MIN_CREDITS = 2

#: Most attempts one worker holds. Caps the batch size for microsecond calls
#: (1,024 is ~1 ms of work at 1 µs per call: big enough to amortise a message;
#: more buys nothing since the parent's per-item cost dominates there).
MAX_CREDITS = 1024

#: How much work (seconds of measured call time) a worker is given at once. Small
#: keeps the wait of an item queued behind others short; large amortises messages
#: (half of it is flushed at once). 10 ms: 3-4 calls of ~3 ms, or the MAX_CREDITS
#: cap for microsecond calls; an outlier is bounded by STUCK_AFTER_S anyway.
TARGET_QUEUE_S = 0.010

#: Weight of the newest measurement in the per-worker average time per call.
SERVICE_EWMA = 0.3

#: A worker that sent nothing for this long while it holds tasks it has not started
#: (a call running long) gives them back, to go to other workers: the bound on how
#: long an item waits behind a slow one. Short enough to be unnoticeable next to a
#: slow call; long enough that normal work (which reports every FLUSH_LATENCY_S)
#: never triggers it.
STUCK_AFTER_S = 0.05

#: How often the executor looks for such workers (a timer on the loop, no task).
STUCK_CHECK_S = 0.025

#: Seconds a worker gets to exit after its lifeline closes before it is SIGKILLed.
CLOSE_GRACE_S = 1.0

#: Restarts of one worker index that may fail in a row before the attempts waiting
#: for it fail with ``WorkerDied`` (a function that can no longer be loaded, fork
#: limits, ...).
MAX_RESTART_FAILURES = 3

_DIED = -1  # pseudo outcome code: the worker's end of the stream
_FIRST = frozenset({1})
_ANY_WORKER = frozenset({None})
_WORKER = attrgetter("worker")
_ITEM = attrgetter("item")
_NUMBER = attrgetter("number")


class ProcessExecutor(Executor):
    """Runs one stage's workers in local processes. See the module docstring."""

    def __init__(self, spec: StageSpec) -> None:
        self._spec = spec
        self._n = spec.num_workers
        self._timeout = spec.timeout
        self._workers: list[WorkerProc | None] = [None] * self._n
        self._procs: set[WorkerProc] = set()  # every process not yet reaped
        self._queue: deque[Attempt] = deque()
        self._own: list[deque[Attempt]] = [deque() for _ in range(self._n)]
        self._held = 0  # attempts handed to us and not yet reported
        self._cap_total = 0  # what the stage takes: num_workers x MAX_CREDITS, once started
        self._tid = 0
        self._timers: dict[int, asyncio.TimerHandle] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._restart_failures = [0] * self._n
        self._broken: list[BaseException | None] = [None] * self._n  # workers that cannot restart
        self._any_broken = False
        self._scheduled = False
        self._dispatch_handle: asyncio.Handle | None = None
        self._in_message = False  # handling a worker's message: dispatch once, at its end
        self._closed = False
        self._submitted = 0
        self._replaced = 0
        self._spawn_error: BaseException | None = None
        self._encoder: Encoder | None = None
        self._stuck_timer: asyncio.TimerHandle | None = None
        self._busy = 0.0  # seconds workers spent in calls, as they report it
        # Durations of one call in LATENCY_SAMPLE_EVERY, timed in the workers; bounded.
        self._latencies: deque[float] = deque(maxlen=2048)

    # --- start ---------------------------------------------------------------------------------
    def prespawn(self) -> None:
        """Start the processes now (they boot while other stages are set up)."""
        loop = asyncio.get_running_loop()
        self._loop = loop
        try:
            for i in range(self._n):
                self._spawn(i)
        except Exception as exc:  # noqa: BLE001 - reported by start()
            self._spawn_error = exc

    def _spawn(self, i: int) -> WorkerProc:
        w = WorkerProc(self._loop, i)
        self._procs.add(w)
        self._workers[i] = w
        return w

    async def start(self, spec: StageSpec, sink: OutcomeSink) -> None:
        self._spec = spec
        self._sink = sink
        self._loop = asyncio.get_running_loop()
        self._encoder = Encoder()
        if not hasattr(self._loop, "add_reader"):  # pragma: no cover - e.g. the Windows proactor loop
            raise StageStartError(spec.name, "the process backend needs an event loop with add_reader()")
        self._hellos: list[list[Any]] = []
        hooks: bytes | None = None
        if spec.setup is not None or spec.teardown is not None:
            try:
                hooks = pickle_hooks(spec.setup, spec.teardown)
            except Exception as exc:
                raise StageStartError(
                    spec.name, f"its setup or teardown cannot be pickled to run in a worker process: {type(exc).__name__}: {exc}"
                ) from exc
        pickled: dict[int, bytes] = {}
        for i, wf in enumerate(spec.workers):
            key = id(wf.fn)
            if key not in pickled:
                try:
                    pickled[key] = pickle_function(wf.fn)
                except Exception as exc:
                    name = getattr(wf.fn, "__qualname__", None) or repr(wf.fn)
                    raise StageStartError(
                        spec.name,
                        f"its function {name} (worker {i}) cannot be pickled to run in a worker process: "
                        f"{type(exc).__name__}: {exc}",
                   ) from exc
            env = ("hello", spec.name, i, wf.kind.value, BLOB, (1, 0), LATENCY_SAMPLE_EVERY, hooks and (BLOB, (2, 0)))
            self._hellos.append([pickle.dumps(env, protocol=5), pickled[key], *([hooks] if hooks else [])])
        if self._spawn_error is not None:
            raise StageStartError(
                spec.name, f"could not start a worker process: {self._spawn_error}"
           ) from self._spawn_error
        if not self._procs:
            try:
                for i in range(self._n):
                    self._spawn(i)
            except Exception as exc:
                raise StageStartError(spec.name, f"could not start a worker process: {exc}") from exc
        workers = [w for w in self._workers if w is not None]
        results = await asyncio.gather(*(w.handshake(self._hellos[w.index]) for w in workers), return_exceptions=True)
        for w, r in zip(workers, results):
            if isinstance(r, WorkerStartFailed) and r.what == "setup":
                detail = f"\n{r.traceback_text}" if r.traceback_text else ""
                raise setup_failed(spec.name, f"worker {w.index} (process {w.pid})", r, f"{r}{detail}")
            if isinstance(r, WorkerStartFailed):
                detail = f"\n{r.traceback_text}" if r.traceback_text else ""
                raise StageStartError(
                    spec.name, f"its function could not be loaded in a worker process: {r}{detail}"
               ) from r
            if isinstance(r, BaseException):
                raise r
        for w in workers:
            self._install(w)
        self._cap_total = self._n * MAX_CREDITS
        if self._timeout is None:  # with a timeout a worker holds one attempt: nothing to take back
            self._stuck_timer = self._loop.call_later(STUCK_CHECK_S, self._check_stuck)

    def _install(self, w: WorkerProc) -> None:
        w.on_message = self._on_message
        w.on_eof = self._on_eof
        w.limit = 1 if self._timeout is not None else MIN_CREDITS
        w.flush_at = max(1, w.limit // 2)
        w.ready = True
        w.resume_reading()

    # --- the contract -------------------------------------------------------------------------
    def capacity(self) -> int:
        cap = self._cap_total - self._held
        return max(0, cap)

    def submit(self, attempts: Sequence[Attempt]) -> None:
        n = len(attempts)
        held = self._held + n
        if held > self._cap_total:
            raise RuntimeError(f"submit() got {n} attempts with capacity {self.capacity()}")
        self._held = held
        self._submitted += n
        if n == 1:  # the engine's hot path: one slot came free
            a = attempts[0]
            if a.worker is None:
                self._queue.append(a)
            else:
                self._own[a.worker].append(a)
        elif _ANY_WORKER.issuperset(map(_WORKER, attempts)):  # a run of pool-mode attempts
            self._queue.extend(attempts)
        else:
            queue = self._queue
            for a in attempts:
                if a.worker is None:
                    queue.append(a)
                else:
                    self._own[a.worker].append(a)
        if not self._scheduled:
            self._schedule()

    def _schedule(self) -> None:
        """Dispatch soon: on the next loop tick, or, inside a worker's message, at its end."""
        if not self._scheduled and not self._closed:
            self._scheduled = True
            if not self._in_message:
                self._dispatch_handle = self._loop.call_soon(self._dispatch)

    def flush(self) -> None:
        """The engine's burst of submits is over: send now rather than on the next loop tick."""
        if self._scheduled and not self._in_message:  # in a message: _on_message sends at its end
            handle = self._dispatch_handle
            if handle is not None:
                handle.cancel()
            self._dispatch()

    # --- deciding who gets what ---------------------------------------------------------------
    def _dispatch(self) -> None:
        self._scheduled = False
        self._dispatch_handle = None
        if self._closed:
            return
        if self._any_broken:
            self._fail_broken()
        ready = [w for w in self._workers if w is not None and w.ready]
        batches: dict[WorkerProc, list[Attempt]] = {}
        for w in ready:
            w.free = w.limit - len(w.inflight)
            own = self._own[w.index]
            if own and w.free > 0:
                k = min(len(own), w.free)
                batches[w] = [own.popleft() for _ in range(k)]
                w.free -= k
        # The shared queue: least loaded first, levelling (water-filling), so a worker
        # that just emptied gets one whole batch instead of a slice of a split.
        queue = self._queue
        cands = [w for w in ready if w.free > 0] if queue else []
        load = {w: w.limit - w.free for w in cands}
        while queue and cands:
            cands.sort(key=load.__getitem__)
            low = load[cands[0]]
            group = [w for w in cands if load[w] == low]
            share = -(-len(queue) // len(group))
            if len(group) < len(cands):  # only up to the next level; then level again
                share = min(share, load[cands[len(group)]] - low)
            for w in group:
                k = min(share, w.free, len(queue))
                batch = batches.get(w)
                if batch is None:
                    batch = batches[w] = []
                if k == len(queue):
                    batch.extend(queue)
                    queue.clear()
                else:
                    batch.extend([queue.popleft() for _ in range(k)])
                w.free -= k
                load[w] += k
            cands = [w for w in cands if w.free > 0]
        for w, batch in batches.items():
            self._send(w, batch)

    def _send(self, w: WorkerProc, batch: list[Attempt]) -> None:
        enc = self._encoder
        assert enc is not None
        enc.reset(w.arena)  # big buffers go to this worker's shared memory (_procpool.Arena)
        failed: list[tuple[Attempt, BaseException]] = []
        inflight = w.inflight
        timeout = self._timeout
        if not w.inflight:
            w.last_progress = self._loop.time()
        first = tid = self._tid + 1
        if timeout is None:
            items = list(map(_ITEM, batch))
            if INLINE_TYPES.issuperset(map(type, items)) and _FIRST.issuperset(map(_NUMBER, batch)):
                # The common case (small builtin items, first attempts): no per-item work here.
                inflight.update(zip(range(first, first + len(items)), batch))
                self._tid = first + len(items) - 1
                w.send(enc.finish(("tasks", w.flush_at, first, None, items)))
                return
        items = []
        numbers: list[int] | None = None  # attempt numbers, sent only when one is not 1
        for a in batch:
            item = a.item
            if type(item) not in INLINE_TYPES:
                mark = len(enc.frames)
                enc.owner = tid  # owns the arena slots it takes
                try:
                    tag, data = enc.value(item)
                except Exception as exc:  # noqa: BLE001 - this item cannot travel: it fails, nothing else does
                    del enc.frames[mark:]
                    failed.append((a, exc))
                    continue
                item = data if tag == INLINE else (tag, data)  # a tuple marks an encoded item
            inflight[tid] = a
            if a.number != 1 and numbers is None:
                numbers = [1] * len(items)
            if numbers is not None:
                numbers.append(a.number)
            items.append(item)
            if timeout is not None:
                self._timers[tid] = self._loop.call_later(timeout, self._timed_out, w, tid)
            tid += 1
        self._tid = tid - 1
        if items:
            w.send(enc.finish(("tasks", w.flush_at, first, numbers, items)))
        else:
            enc.frames = []
        for a, why in failed:
            err = pickle.PicklingError(
                f"an item of type {type(a.item).__qualname__} cannot be pickled to send it to a worker "
                f"process of stage {self._spec.name!r}: {type(why).__name__}: {why}"
           )
            err.__cause__ = why
            self._report(a, ERROR, err)

    def _report(self, a: Attempt, code: int, value: Any) -> None:
        """Free the slot, then tell the engine."""
        self._held -= 1
        if self._queue or any(self._own):  # attempts waiting for a freed slot
            self._schedule()
        if code == OK:
            self._sink.ok(a, value)
        else:
            self._sink.error(a, value)

    # --- what workers send back -------------------------------------------------------------
    def _on_message(self, w: WorkerProc, frames: list[Any]) -> None:
        """One message from a worker. Whatever its outcomes free up or bring in (the
        engine refills from inside ``ok_many``) is dispatched once, at the end."""
        self._in_message = True
        try:
            self._handle_message(w, frames)
        finally:
            self._in_message = False
            if self._scheduled and self._dispatch_handle is None:
                self._dispatch()

    def _handle_message(self, w: WorkerProc, frames: list[Any]) -> None:
        env = pickle.loads(frames[0])
        w.last_progress = self._loop.time()
        kind = env[0]
        if kind == "returned":
            self._returned(w, env[1])
            return
        w.revoking = False
        _, busy, done, samples, *rest = env
        if done:
            self._measure(w, busy, done)
            self._busy += busy
            if samples:
                self._latencies.extend(samples)
        inflight = w.inflight
        if kind == "results":  # consecutive tasks' results, all of builtin types
            tid, values = rest
            if w.backlog is None and not self._timers:
                # The hot path: every slot freed, then one report for the batch.
                n = len(values)
                done = list(map(inflight.pop, range(tid, tid + n), repeat(None, n)))
                if None in done:  # some were timed out or taken back already
                    pairs = [(a, v) for a, v in zip(done, values) if a is not None]
                    done, values = [a for a, _ in pairs], [v for _, v in pairs]
                self._held -= len(done)
                self._sink.ok_many(done, values)
            else:
                self._deliver(w, [(t, OK, v) for t, v in enumerate(values, tid)])
        else:
            (entries,) = rest
            self._deliver(w, [decode_event(e, frames) for e in entries])
        if self._queue or any(self._own):  # attempts waiting for this worker's freed slots
            self._schedule()

    def _returned(self, w: WorkerProc, tids: list[int]) -> None:
        """The worker gave back tasks it had not started: they go first to whoever is free."""
        w.revoking = False
        back = []
        for tid in tids:
            a = w.inflight.pop(tid, None)
            if a is not None:
                back.append(a)
                timer = self._timers.pop(tid, None)
                if timer is not None:
                    timer.cancel()
        for a in reversed(back):
            (self._queue if a.worker is None else self._own[a.worker]).appendleft(a)
        if back:
            self._schedule()

    def _check_stuck(self) -> None:
        """Every STUCK_CHECK_S: take back the queued tasks of a worker stuck in a long call."""
        self._stuck_timer = None
        if self._closed:
            return
        now = self._loop.time()
        for w in self._workers:
            if (
                w is not None
                and w.ready
                and not w.revoking
                and len(w.inflight) > 1
                and now - w.last_progress >= STUCK_AFTER_S
           ):
                w.revoking = True
                w.limit, w.flush_at = 1, 1  # nothing more for it until the long call ends
                w.revoke()
        self._stuck_timer = self._loop.call_later(STUCK_CHECK_S, self._check_stuck)

    def _measure(self, w: WorkerProc, busy: float, done: int) -> None:
        """Update the worker's time per call and, from it, how many attempts it may hold."""
        per = busy / done
        w.service = per if w.service is None else w.service + SERVICE_EWMA * (per - w.service)
        if self._timeout is not None:
            return
        target = 1 + int(TARGET_QUEUE_S / max(w.service, 1e-7))
        limit = max(MIN_CREDITS, min(MAX_CREDITS, target, w.limit * 2))
        if limit != w.limit:
            w.limit = limit
            w.flush_at = max(1, limit // 2)

    def _deliver(self, w: WorkerProc, events: list[tuple[int, int, Any]]) -> None:
        if w.backlog is not None:
            w.backlog.extend(events)
            return
        for i, ev in enumerate(events):
            tid, code, value = ev
            if code == EMIT or code == _DIED:
                w.backlog = deque(events[i:])
                w.pause_reading()
                task = self._loop.create_task(self._drain(w), name=f"pypline-{self._spec.name}-{w.index}-drain")
                w.drain = task
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
                return
            self._outcome(w, tid, code, value)

    def _outcome(self, w: WorkerProc, tid: int, code: int, value: Any) -> None:
        a = w.inflight.pop(tid, None)
        if a is None:  # timed out already, or a stale report
            return
        if self._timers:
            t = self._timers.pop(tid, None)
            if t is not None:
                t.cancel()
        self._report(a, code, value)

    async def _drain(self, w: WorkerProc) -> None:
        """Deliver a worker's outcomes in order, waiting for room for each yielded value."""
        backlog = w.backlog
        assert backlog is not None
        sink = self._sink
        try:
            while backlog:
                tid, code, value = backlog.popleft()
                if code == EMIT:
                    a = w.inflight.get(tid)
                    if a is not None:
                        await sink.emit(a, value)
                elif code == _DIED:
                    self._died(w)
                else:
                    self._outcome(w, tid, code, value)
        finally:
            w.backlog = None
            w.drain = None
            if not self._closed:
                w.resume_reading()

    # --- faults ----------------------------------------------------------------------------------
    def _on_eof(self, w: WorkerProc) -> None:
        self._deliver(w, [(0, _DIED, None)])

    def _timed_out(self, w: WorkerProc, tid: int) -> None:
        self._timers.pop(tid, None)
        a = w.inflight.pop(tid, None)
        if a is None or self._closed:
            return
        w.kill()
        exc = TimeoutError(
            f"attempt {a.number} of stage {self._spec.name!r} timed out after {self._timeout:g} s; "
            f"its worker process (pid {w.pid}) was killed and is being replaced"
       )
        self._report(a, ERROR, exc)
        if w.eof:  # its end was seen already (the reader was paused): handle it now
            self._died(w)

    def _died(self, w: WorkerProc) -> None:
        if w.detached or self._closed:
            return
        culprit_tid = w.current_task()
        w.detach()
        w.ready = False
        culprit = w.inflight.pop(culprit_tid, None) if culprit_tid else None
        others = list(w.inflight.items())
        w.inflight.clear()
        for tid in [culprit_tid, *(t for t, _ in others)]:
            t = self._timers.pop(tid, None)
            if t is not None:
                t.cancel()
        # Not started: not the item's fault. Back to the front, in their order.
        for _, a in reversed(others):
            if a.worker is None:
                self._queue.appendleft(a)
            else:
                self._own[w.index].appendleft(a)
        if self._workers[w.index] is w:
            self._workers[w.index] = None
        self._replaced += 1
        task = self._loop.create_task(self._replace(w, culprit), name=f"pypline-{self._spec.name}-{w.index}-restart")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        if others:
            self._schedule()

    async def _replace(self, dead: WorkerProc, culprit: Attempt | None) -> None:
        if not await dead.wait_exit(CLOSE_GRACE_S):
            dead.kill()
            await dead.wait_exit(CLOSE_GRACE_S)
        rc = dead.returncode
        dead.reap()
        self._procs.discard(dead)
        if culprit is not None:
            exc = WorkerDied(
                f"the worker process (pid {dead.pid}) of stage {self._spec.name!r} died while running "
                f"the item ({dead.describe_exit()}); a new process took its place",
                exitcode=rc if rc is not None and rc >= 0 else None,
                signal=-rc if rc is not None and rc < 0 else None,
           )
            self._report(culprit, ERROR, exc)
        i = dead.index
        while not self._closed:
            try:
                w = self._spawn(i)
                await w.handshake(self._hellos[i])
            except Exception as exc:  # noqa: BLE001 - counted; after too many, the waiting items fail
                w_now = self._workers[i]
                if w_now is not None:
                    self._workers[i] = None
                    w_now.reap()
                    self._procs.discard(w_now)
                self._restart_failures[i] += 1
                if self._restart_failures[i] >= MAX_RESTART_FAILURES:
                    self._give_up(i, exc)
                    return
                await asyncio.sleep(0.05 * 2 ** self._restart_failures[i])
                continue
            self._restart_failures[i] = 0
            self._install(w)
            self._schedule()
            return

    def _give_up(self, i: int, exc: BaseException) -> None:
        """Worker ``i`` cannot be restarted: what only it could run fails, now and later."""
        why = WorkerDied(f"worker {i} of stage {self._spec.name!r} could not be restarted: {exc}")
        why.__cause__ = exc
        self._broken[i] = why
        self._any_broken = True
        self._schedule()

    def _fail_broken(self) -> None:
        """Fail the attempts that wait for a worker that will not come back (decided in _dispatch)."""
        for i, why in enumerate(self._broken):
            if why is not None:
                own = self._own[i]
                while own:
                    self._report(own.popleft(), ERROR, why)
        if all(why is not None for why in self._broken):
            queue = self._queue
            while queue:
                self._report(queue.popleft(), ERROR, self._broken[0])

    # --- stop ----------------------------------------------------------------------------------
    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        if self._stuck_timer is not None:
            self._stuck_timer.cancel()
            self._stuck_timer = None
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if self._spec.teardown is not None:
            await self._farewell()
        procs = list(self._procs)
        for w in procs:
            w.ready = False
            w.detach()  # the lifeline closes: each worker exits at once
        try:
            if tasks:
                await asyncio.gather(*tasks, return_exceptions=True)
            await _stop_processes(list(self._procs))
        finally:
            for w in list(self._procs):
                w.reap()  # SIGKILL what is left (started meanwhile), and wait for it
            self._procs.clear()
            self._workers = [None] * self._n
            self._cap_total = 0

    async def _farewell(self) -> None:
        """Each started worker runs the stage's teardown and exits (at most TEARDOWN_TIMEOUT_S)."""
        live = [w for w in self._workers if w is not None and w.loaded and not w.detached]
        results = await asyncio.gather(*(w.farewell(TEARDOWN_TIMEOUT_S) for w in live), return_exceptions=True)
        for w, r in zip(live, results):
            if isinstance(r, str):
                log.warning("stage %r worker %d (process %d): teardown() raised %s", self._spec.name, w.index, w.pid, r)
            elif isinstance(r, BaseException):
                log.warning("stage %r worker %d: %s; it is stopped without it", self._spec.name, w.index, r)

    def statistics(self) -> ExecutorStatistics:
        extra: dict[str, Any] = {}
        if "busy_seconds" in getattr(ExecutorStatistics, "__dataclass_fields__", {}):
            extra = {
                "running": sum(1 for w in self._workers if w is not None and w.ready and w.inflight),
                "busy_seconds": self._busy,
                "latencies": tuple(self._latencies),
            }
        return ExecutorStatistics(
            backend="process",
            workers=sum(1 for w in self._workers if w is not None and w.ready),
            capacity=self.capacity(),
            submitted=self._submitted,
            completed=self._submitted - self._held,
            workers_replaced=self._replaced,
            **extra,
       )


async def _stop_processes(procs: list[WorkerProc]) -> None:
    """Close their lifelines (each exits at once), wait up to CLOSE_GRACE_S, then SIGKILL
    and reap what is left: no zombie, no orphan."""
    for w in procs:
        w.detach()
    try:
        await asyncio.gather(*(w.wait_exit(CLOSE_GRACE_S) for w in procs))
    finally:
        for w in procs:
            w.reap()


class ProcessBackend(Backend):
    """Backend ``process``: each ``multi_proc`` stage's workers in local processes.

    The processes of every stage of a run are started as soon as the run plans its
    stages (``executor()``), so they boot in parallel while the stages are set up.
    A worker that crashed or timed out is replaced by a new process, started then.
    """

    name = "process"

    def executor(self, spec: StageSpec) -> Executor:
        ex = ProcessExecutor(spec)
        try:
            asyncio.get_running_loop()
        except RuntimeError:  # no loop: start() spawns them
            return ex
        ex.prespawn()
        return ex
