"""Inside a worker process of the ``process`` backend: its runtime.

::

    parent (pypline.backends.process)                 worker process (this module's main())
    ---------------------------------                 -------------------------------------
    hello: stage, index, kind, fn (cloudpickle) ────►  load fn once; run the stage's setup (its
           [, setup and teardown]                        state is current_worker().state);
                                                         reply ready(pid) or failed(tb, what)
    tasks: first tid, attempt numbers, items    ────►  main thread: deque of tasks, FIFO, one at a time
                                                         slot := tid; call fn; slot := 0
                                                         outcome -> outbox (ok / error / emit)
    results: first tid, [value, ...]            ◄────  outbox flushed: queue empty, half the credits
    events: [(tid, ok|error|emit, value), ...]  ◄────    done, or the oldest outcome waited FLUSH_LATENCY_S
                                                         (a flusher thread bounds it while a long call runs)
    lifeline pipe: "R" (a call runs too long)   ────►  monitor thread: returned: [tids not started]
    stop (a stage with a teardown)               ────►  after the call in progress: teardown(state);
    stopped: error fields or None               ◄────    then exit
    lifeline pipe closed (parent gone or done)  ────►  monitor thread: teardown if it has not run
                                                         (in that thread), then os._exit(0), even mid-call

How messages are framed and values encoded is ``_procwire`` (both sides use it); how an
exception is described is ``wire/errors.py`` (every backend uses it).

**Faults.** The shared ``slot`` (8 bytes of shared memory) holds the id of the task
being executed, written without a system call. When the process dies, the parent
reads it: that task died with the process (``WorkerDied``); the others were only
queued and are re-run elsewhere.

A worker process loads this file by its path, not as ``pypline.backends._procworker``,
so that it does not import pypline (asyncio, the engine) unless the stage's function
does (see ``_ContextHook``); it loads ``_procwire.py`` (and, when it reports an error,
``wire/errors.py``) the same way. It imports asyncio only for ``async`` functions and
cloudpickle only when a value needs it. That halves a worker's start-up.
"""

from __future__ import annotations

import itertools
import mmap
import os
import pickle
import select
import socket
import sys
import threading
import time
import types
from collections import deque
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

# --- tuning -----------------------------------------------------------------------------

#: The longest a finished outcome waits in a worker before it is sent (plus up to
#: one GIL switch interval while a call runs). Shorter means lower latency; longer
#: means fewer messages, and every message wakes the parent, which on a machine
#: with as many busy workers as cores takes CPU from a worker. 5 ms lets results of
#: calls of a few milliseconds travel in twos and threes (measured: a third of the
#: scheduling gaps of 2 ms on 2 cores) and is still below what a person notices.
FLUSH_LATENCY_S = 0.005

#: Empty checks (FLUSH_LATENCY_S apart) after which the flusher thread parks. While
#: it checks, it takes the GIL every few ms (cheap); parking and waking it costs a
#: thread switch each, so it stays awake through ~100 ms of quiet.
FLUSHER_IDLE_CHECKS = 50

#: How often a worker whose lifeline pipe is still open checks that its parent
#: process is the one that started it (the pipe can be inherited by a process the
#: parent forked, which would keep it open after the parent died).
PARENT_CHECK_S = 1.0

def _sibling(name: str, *path: str) -> types.ModuleType:
    """A module of this package, loaded by its path as this file was (in a worker process
    this file is loaded outside any package, so that it does not import pypline)."""
    import importlib.machinery as im

    file = os.path.join(os.path.dirname(os.path.abspath(__file__)), *path)
    loader = im.SourceFileLoader(name, file)
    module = types.ModuleType(name)
    module.__spec__ = im.ModuleSpec(name, loader, origin=file)
    module.__loader__, module.__file__ = loader, file
    sys.modules[name] = module
    loader.exec_module(module)
    return module


if TYPE_CHECKING:
    from . import _procwire as wire
else:
    try:  # imported as pypline.backends._procworker (the parent side, the tests)
        from . import _procwire as wire
    except ImportError:  # a worker process: load the wire module by its path
        wire = _sibling("_pypline_procwire", "_procwire.py")

EMIT, ERROR, INLINE, OK, REVOKE, STOP = wire.EMIT, wire.ERROR, wire.INLINE, wire.OK, wire.REVOKE, wire.STOP
INLINE_TYPES = wire.INLINE_TYPES
Encoder, FrameReader, decode, send_all = wire.Encoder, wire.FrameReader, wire.decode, wire.send_all

_error_wire: Any = None


def exception_fields(exc: BaseException) -> tuple[str, str, str]:
    """(type name, message, traceback text): ``pypline.backends.wire.errors.describe``,
    loaded on first use (by its path in a worker process, as this file was)."""
    global _error_wire
    if _error_wire is None:
        try:
            from .wire import errors as module
        except ImportError:
            module = _sibling("_pypline_wire_errors", "wire", "errors.py")
        _error_wire = module
    result: tuple[str, str, str] = _error_wire.describe(exc)
    return result


# --- the worker process -----------------------------------------------------------------


class _Worker:
    """The worker's state: its function, task queue, outbox and the two helper threads."""

    def __init__(
        self, sock: socket.socket, lifeline: int, slot: mmap.mmap, parent: int, arena: mmap.mmap | None = None
    ) -> None:
        self.sock = sock
        self.lifeline = lifeline
        self.slot_map = slot
        self.slot = memoryview(slot).cast("Q")  # slot[0] := task id: one store per task, no system call
        self.parent = parent
        self.reader = FrameReader(sock, memoryview(arena) if arena is not None else None)
        self.poller = select.poll()
        self.poller.register(sock, select.POLLIN)
        self._encoder: wire.Encoder | None = None  # built on first use: imports cloudpickle
        self.queue: deque[tuple[int, int, Any]] = deque()  # (tid, attempt, item or (tag, data))
        self.frames_of: dict[int, list[Any]] = {}  # tid -> its message's frames, for non-inline items
        self.outbox: deque[tuple[Any, ...]] = deque()  # (tid, code, value) or (tid, ERROR, exc)
        self.out_first = 0.0  # when the oldest outcome in the outbox was added
        self.busy_s = 0.0  # time spent in calls since the last flush
        self.done = 0  # calls finished since the last flush
        self.flush_at = 1
        self.samples: list[float] = []  # durations of one call in every `sample_every`
        self.sample_every = 32
        self.since_sample = 0
        self.lock = threading.Lock()  # one flush at a time, in order
        self.read_lock = threading.Lock()  # the main thread's reads vs give_back()'s
        self.parked = False
        self.wake = threading.Event()
        self.stage = "?"
        self.index = 0
        self.fn: Callable[..., Any] | None = None
        self.kind = "sync"
        self.infos: dict[int, Any] = {}
        self.set_info: Callable[[Any], None] | None = None
        self.make_info: Callable[..., Any] | None = None
        self.number = 0
        self.loop: Any = None
        self.emitted_sent = False  # something was sent since the current task began
        self.state: Any = None  # what the stage's setup returned here
        self.teardown_fn: Callable[[Any], Any] | None = None  # taken (under hook_lock) by whoever runs it
        self.hook_lock = threading.Lock()
        self.in_hook = False  # setup or teardown runs: current_worker() says attempt 0

    @property
    def encoder(self) -> wire.Encoder:
        if self._encoder is None:
            self._encoder = Encoder()
        return self._encoder

    # -- helper threads ---------------------------------------------------------------
    def start_threads(self) -> None:
        threading.Thread(target=self._monitor, name="pypline-worker-monitor", daemon=True).start()
        threading.Thread(target=self._flusher, name="pypline-worker-flusher", daemon=True).start()

    def _monitor(self) -> None:
        """Exit at once when the lifeline closes (the parent is done or died)."""
        poller = select.poll()  # not select(): the inherited fd number may be above FD_SETSIZE
        poller.register(self.lifeline, select.POLLIN)
        while True:
            if poller.poll(PARENT_CHECK_S * 1000):
                try:
                    data = os.read(self.lifeline, 64)
                except OSError:
                    data = b""
                if not data:
                    self.teardown()  # the process goes now: tear down here if the main thread has not
                    _exit_now()
                if STOP in data and self.slot[0]:  # inside a call: it may run long; stop now
                    self._stop()
                if REVOKE in data:
                    self.give_back()
            elif os.getppid() != self.parent:
                _exit_now()

    def give_back(self) -> None:
        """The parent wants back every task not yet started (a slow call holds them up).

        Runs in the monitor thread while the main thread is inside a call. Tasks still
        in the socket are read first (unless the main thread is reading: then it is
        idle and has nothing to give back), so none stays stuck behind the call.
        """
        if self.read_lock.acquire(blocking=False):
            try:
                while True:
                    msgs = self.reader.read(socket.MSG_DONTWAIT)
                    self._handle(msgs)
            except (BlockingIOError, InterruptedError):
                pass
            except (EOFError, ConnectionError, OSError):
                _exit_now()
            finally:
                self.read_lock.release()
        with self.lock:
            taken = []
            queue = self.queue
            while True:
                try:
                    taken.append(queue.pop())  # atomic: the main thread pops the other end
                except IndexError:
                    break
            taken.reverse()
            for t in taken:
                self.frames_of.pop(t[0], None)
            self.send([pickle.dumps(("returned", [t[0] for t in taken]), protocol=5)])

    def _flusher(self) -> None:
        """Send outcomes that waited FLUSH_LATENCY_S while a long call runs.

        Parked (no wake-ups, so no GIL hand-offs that would slow the worker) until
        the main thread starts a call while outcomes are still unsent; then it checks
        every FLUSH_LATENCY_S and parks again after FLUSHER_IDLE_CHECKS empty checks,
        so a stream of fast batches wakes it once, not once per batch.
        """
        idle = FLUSHER_IDLE_CHECKS
        while True:
            if idle >= FLUSHER_IDLE_CHECKS:
                self.parked = True
                if not self.outbox:  # re-check after parking: the main thread tests `parked` after appending
                    self.wake.wait()
                    self.wake.clear()
                self.parked = False
                idle = 0
            time.sleep(FLUSH_LATENCY_S)
            if self.outbox:
                idle = 0
                if time.perf_counter() - self.out_first >= FLUSH_LATENCY_S:
                    self.flush()
            else:
                idle += 1

    def send(self, frames: list[Any]) -> None:
        """Send one message; if the parent is gone, so is this worker."""
        try:
            send_all(self.sock, frames)
        except OSError:
            _exit_now()

    # -- outcomes ------------------------------------------------------------------------
    def _add(self, event: tuple[Any, ...]) -> None:
        if not self.outbox:
            self.out_first = time.perf_counter()
        self.outbox.append(event)

    def flush(self) -> None:
        with self.lock:
            outbox = self.outbox
            if not outbox:
                return
            self._flush(outbox)

    def _flush(self, outbox: deque[tuple[Any, ...]]) -> None:
        """Send the outbox as one message (under ``lock``)."""
        n = len(outbox)
        events = [outbox.popleft() for _ in range(n)]
        busy, done, samples = self.busy_s, self.done, self.samples
        self.busy_s = 0.0
        self.done = 0
        self.samples = []
        inline = INLINE_TYPES
        first = events[0][0]
        values: list[Any] = []
        for tid, code, value in events:  # the common case: in-order results of builtin types
            if code != OK or type(value) not in inline or tid != first + len(values):
                break
            values.append(value)
        else:
            self.send([pickle.dumps(("results", busy, done, samples, first, values), protocol=5)])
            self.emitted_sent = True
            return
        enc = self.encoder
        enc.reset()
        entries: list[tuple[Any, ...]] = []
        for ev in events:
            tid, code = ev[0], ev[1]
            if type(ev[2]) in inline and code != ERROR:
                entries.append((tid, code, INLINE, ev[2]))
                continue
            if code == ERROR:
                entries.append(self._encode_error(tid, ev[2]))
                continue
            mark = len(enc.frames)
            try:
                tag, data = enc.value(ev[2])
            except BaseException as exc:  # noqa: BLE001 - any pickling failure fails that item only
                del enc.frames[mark:]
                err = pickle.PicklingError(
                    f"{'a yielded value' if code == EMIT else 'the result'} of type "
                    f"{type(ev[2]).__qualname__} could not be pickled to send it back: {exc}"
                )
                err.__cause__ = exc
                entries.append(self._encode_error(tid, err))
                continue
            entries.append((tid, code, tag, data))
        frames = enc.finish(("events", busy, done, samples, entries))
        self.send(frames)
        self.emitted_sent = True

    def _encode_error(self, tid: int, exc: BaseException) -> tuple[Any, ...]:
        name, message, tb = exception_fields(exc)
        enc = self.encoder
        mark = len(enc.frames)
        try:
            tag, data = enc.value(exc)
        except BaseException:  # noqa: BLE001 - the parent gets a RemoteError instead
            del enc.frames[mark:]
            tag, data = INLINE, None
        return (tid, ERROR, tag, data, name, message, tb)

    # -- messages from the parent ------------------------------------------------------
    def receive(self) -> None:
        """Block until at least one message came, and handle it.

        It waits in ``poll(POLLIN)``, not in a blocking ``recv``: Linux wakes a task
        blocked in ``recv`` on a Unix socket also whenever the peer reads what this
        side sent (``unix_write_space``), i.e. once per batch of results, and on a
        small machine each such empty wake-up costs both processes a context switch.
        A poll waiter is woken only for data.
        """
        with self.read_lock:
            poll, read = self.poller.poll, self.reader.read
            while True:
                poll()
                try:
                    msgs = read(socket.MSG_DONTWAIT)
                except (BlockingIOError, InterruptedError):
                    continue
                except (EOFError, ConnectionError, OSError):
                    _exit_now()
                if msgs:
                    break
            self._handle(msgs)

    def _handle(self, msgs: list[list[Any]]) -> None:
        for frames in msgs:
            env = pickle.loads(frames[0])
            kind = env[0]
            if kind == "tasks":
                _, self.flush_at, first, numbers, items = env
                tids = range(first, first + len(items))
                self.queue.extend(zip(tids, numbers or itertools.repeat(1), items))
                if len(frames) > 1:  # some items travel in frames of their own
                    for tid, x in zip(tids, items):
                        if type(x) is tuple:
                            self.frames_of[tid] = frames
            elif kind == "hello":
                self._hello(env, frames)
            elif kind == "stop":
                self._stop()

    def _hello(self, env: tuple[Any, ...], frames: list[Any]) -> None:
        _, stage, index, kind, tag, data, self.sample_every, hooks = env
        self.stage, self.index = stage, index
        what = "load"
        try:
            fn = decode(tag, data, frames)
            setup, teardown = decode(hooks[0], hooks[1], frames) if hooks is not None else (None, None)
        except BaseException as exc:  # noqa: BLE001 - reported to the parent, which fails the start
            self._failed(exc, what)
            return
        self.fn, self.kind = fn, kind
        self.infos = {}
        self.number = 0
        context = sys.modules.get("pypline._context")
        if context is not None:
            self.bind_context(context)
        elif not any(isinstance(f, _ContextHook) for f in sys.meta_path):
            sys.meta_path.insert(0, _ContextHook(self))
        if setup is not None:
            try:
                self.state = self._call_hook(setup)
            except BaseException as exc:  # noqa: BLE001 - reported to the parent, which fails the start
                self._failed(exc, "setup")
                return
        self.teardown_fn = teardown
        self.send([pickle.dumps(("ready", os.getpid(), self.reader.arena is not None), protocol=5)])

    def _failed(self, exc: BaseException, what: str) -> None:
        name, message, tb = exception_fields(exc)
        self.send([pickle.dumps(("failed", name, message, tb, what), protocol=5)])

    def _call_hook(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run setup or teardown here, ``current_worker()`` saying attempt 0; await it if async."""
        self.in_hook = True
        if self.set_info is not None:
            assert self.make_info is not None
            self.set_info(self.make_info(self.stage, self.index, 0, self.state))
        try:
            value = fn(*args)
            if type(value) is _CoroutineType:
                if threading.current_thread() is threading.main_thread():
                    value = self._loop().run_until_complete(value)
                else:  # the monitor thread, while the main thread may be inside a call
                    import asyncio

                    value = asyncio.run(value)
            return value
        finally:
            self.in_hook = False
            self.number = 0
            if self.set_info is not None:
                self.set_info(None)

    def teardown(self) -> str | None:
        """Run the stage's teardown once, in whichever thread gets here first (the other
        waits for it to end); say how it failed."""
        with self.hook_lock:
            fn, self.teardown_fn = self.teardown_fn, None
            if fn is None:
                return None
            try:
                self._call_hook(fn, self.state)
            except BaseException as exc:  # noqa: BLE001 - reported to the parent, which logs it
                name, message, tb = exception_fields(exc)
                return f"{name}: {message}\n{tb}"
            return None

    def _stop(self) -> None:
        """The parent stops this worker: tear down (in the main thread when it is idle), say so, exit."""
        problem = self.teardown()
        with self.lock:
            self.send([pickle.dumps(("stopped", problem), protocol=5)])
        _exit_now()

    def bind_context(self, context: Any) -> None:
        """pypline is imported here: from now on set ``current_worker()`` around each call."""
        self.make_info, self.set_info = context.WorkerInfo, context.set_worker_info
        self.infos = {}
        if self.in_hook:  # imported during setup or teardown
            self.set_info(self.make_info(self.stage, self.index, 0, self.state))
        elif self.number:  # imported during a call: that call needs its info now
            number, self.number = self.number, 0
            self._info(number)

    def _info(self, number: int) -> None:
        if number != self.number:
            self.number = number
            if self.set_info is None:  # pypline not imported: nobody can ask (see _ContextHook)
                return
            info = self.infos.get(number)
            if info is None:
                assert self.make_info is not None
                info = self.infos[number] = self.make_info(self.stage, self.index, number, self.state)
            self.set_info(info)

    # -- running tasks --------------------------------------------------------------------
    def serve(self) -> None:
        while True:
            if not self.queue:
                self.flush()
                self.receive()
                continue
            if self.kind in ("async", "async_gen"):
                self._loop().run_until_complete(self._run_async())
            else:
                self._run_sync()

    def _loop(self) -> Any:
        if self.loop is None:
            import asyncio

            self.loop = asyncio.new_event_loop()
            asyncio.set_event_loop(self.loop)
        return self.loop

    def _item(self, tid: int, tag: int, data: Any) -> Any:
        """Decode a non-inline item; on failure report the task and return ``_NO_ITEM``."""
        frames = self.frames_of.pop(tid, ())
        try:
            return decode(tag, data, frames)
        except BaseException as exc:  # noqa: BLE001 - that item fails, nothing else
            err = pickle.UnpicklingError(f"the item could not be unpickled in the worker process: {exc}")
            err.__cause__ = exc
            self._add((tid, ERROR, err))
            return _NO_ITEM

    def _end_generator(self) -> None:
        if self.emitted_sent:
            # A generator whose outputs were already sent: send its end before the next
            # task starts, so a crash later never leaves its outputs without an outcome.
            self.flush()

    def _emit(self, tid: int, value: Any) -> None:
        self._add((tid, EMIT, value))
        if len(self.outbox) >= self.flush_at or time.perf_counter() - self.out_first >= FLUSH_LATENCY_S:
            self.flush()
        elif self.parked:  # the generator goes on computing: bound the value's wait
            self.wake.set()

    def _run_sync(self) -> None:
        """Run queued tasks of a plain ``def`` (or, see ``_run_gen``, a generator). The hot loop.

        One clock read per call: a call's time runs from the end of the previous one
        (it includes this loop's ~0.1 µs), which is what the parent's credits need
        (time per item) and what a latency sample shows.
        """
        if self.kind == "gen":
            self._run_gen()
            return
        queue, fn, outbox, slot = self.queue, self.fn, self.outbox, self.slot
        assert fn is not None
        popleft, append = queue.popleft, outbox.append
        clock = time.perf_counter
        latency = FLUSH_LATENCY_S
        k, every = self.since_sample, self.sample_every
        start = t0 = clock()
        done = 0
        while queue:
            tid, number, item = popleft()
            if type(item) is tuple:  # (tag, data): not an inline value
                item = self._item(tid, item[0], item[1])
                if item is _NO_ITEM:
                    continue
            if number != self.number:
                self._info(number)
            slot[0] = tid
            try:
                value = fn(item)
                if type(value) is _CoroutineType:  # a def that returned a coroutine
                    value = self._loop().run_until_complete(value)
            except BaseException as exc:  # noqa: BLE001 - the user's function failed: report it
                event: tuple[Any, ...] = (tid, ERROR, exc)
            else:
                event = (tid, OK, value)
            slot[0] = 0
            item = value = None  # no reference left here: a big item's memory is freed now
            t1 = clock()
            if not outbox:
                self.out_first = t1
            append(event)
            done += 1
            k += 1
            if k >= every:
                k = 0
                self.samples.append(t1 - t0)
            t0 = t1
            if not queue or len(outbox) >= self.flush_at or t1 - self.out_first >= latency:
                self.busy_s += t1 - start
                self.done += done
                start, done = t1, 0
                self.flush()
            elif self.parked:  # outcomes stay unsent while the next call runs: bound their wait
                self.wake.set()
        self.busy_s += t0 - start
        self.done += done
        self.since_sample = k

    def _run_gen(self) -> None:
        """Run queued tasks of a generator function: each value goes out as it is yielded."""
        queue, fn, outbox, slot = self.queue, self.fn, self.outbox, self.slot
        assert fn is not None
        clock = time.perf_counter
        latency = FLUSH_LATENCY_S
        busy = 0.0
        done = 0
        k, every = self.since_sample, self.sample_every
        while queue:
            tid, number, item = queue.popleft()
            if type(item) is tuple:  # (tag, data): not an inline value
                item = self._item(tid, item[0], item[1])
                if item is _NO_ITEM:
                    continue
            if number != self.number:
                self._info(number)
            self.emitted_sent = False
            slot[0] = tid
            t0 = clock()
            try:
                for v in fn(item):
                    self._emit(tid, v)
            except BaseException as exc:  # noqa: BLE001 - the user's function failed: report it
                event: tuple[Any, ...] = (tid, ERROR, exc)
            else:
                event = (tid, OK, None)
            t1 = clock()
            item = v = None  # no reference left here: a big item's memory is freed now
            if not outbox:
                self.out_first = t1
            outbox.append(event)
            slot[0] = 0
            busy += t1 - t0
            done += 1
            k += 1
            if k >= every:
                k = 0
                self.samples.append(t1 - t0)
            if self.emitted_sent:
                self.busy_s += busy
                self.done += done
                busy, done = 0.0, 0
                self._end_generator()
            elif not queue or len(outbox) >= self.flush_at or t1 - self.out_first >= latency:
                self.busy_s += busy
                self.done += done
                busy, done = 0.0, 0
                self.flush()
            elif self.parked:  # outcomes stay unsent while the next call runs: bound their wait
                self.wake.set()
        self.busy_s += busy
        self.done += done
        self.since_sample = k

    async def _run_async(self) -> None:
        """Run queued tasks of an ``async def`` (or async generator) function on this loop."""
        queue, fn, outbox, slot = self.queue, self.fn, self.outbox, self.slot
        assert fn is not None
        agen = self.kind == "async_gen"
        clock = time.perf_counter
        self.number = 0  # a new task: its context has no worker info yet
        while queue:
            tid, number, item = queue.popleft()
            if type(item) is tuple:  # (tag, data): not an inline value
                item = self._item(tid, item[0], item[1])
                if item is _NO_ITEM:
                    continue
            if number != self.number:
                self._info(number)
            self.emitted_sent = False
            slot[0] = tid
            t0 = clock()
            try:
                if agen:
                    it = fn(item)
                    try:
                        async for v in it:
                            self._emit(tid, v)
                    finally:
                        await it.aclose()
                    value = None
                else:
                    value = await fn(item)
            except BaseException as exc:  # noqa: BLE001 - the user's function failed: report it
                event: tuple[Any, ...] = (tid, ERROR, exc)
            else:
                event = (tid, OK, value)
            t1 = clock()
            item = None
            if not outbox:
                self.out_first = t1
            outbox.append(event)
            slot[0] = 0
            self.busy_s += t1 - t0
            self.done += 1
            self.since_sample += 1
            if self.since_sample >= self.sample_every:
                self.since_sample = 0
                self.samples.append(t1 - t0)
            if agen and self.emitted_sent:
                self._end_generator()
            elif not queue or len(outbox) >= self.flush_at or t1 - self.out_first >= FLUSH_LATENCY_S:
                self.flush()
            elif self.parked:
                self.wake.set()


class _ContextHook:
    """Binds ``current_worker()`` the moment a worker's code first imports pypline.

    Workers do not import pypline themselves (it would cost a fresh interpreter
    ~70 ms: asyncio, the engine), and a function that never asks for
    ``current_worker()`` never needs it. A function that does has imported pypline
    by the time it asks, at the latest during its call: this meta-path hook sees
    ``pypline._context`` being imported and hands it to the worker, which sets the
    info of the call in progress. Removes itself after that one import.
    """

    def __init__(self, worker: _Worker) -> None:
        self.worker = worker

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> Any:
        if name != "pypline._context":
            return None
        import importlib.util

        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        loader = getattr(spec, "loader", None)
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        run, worker = loader.exec_module, self.worker

        def exec_module(module: Any) -> None:
            run(module)
            worker.bind_context(module)

        loader.exec_module = exec_module
        return spec


_NO_ITEM = object()
_CoroutineType = types.CoroutineType


def _exit_now() -> None:
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(0)


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of a worker process: ``main([data_fd, lifeline_fd, slot_fd, parent_pid, arena_fd])``.

    ``arena_fd`` is -1 (or absent) when the parent has no shared-memory arena for it.
    """
    import signal

    args = list(sys.argv[1:] if argv is None else argv)
    data_fd, life_fd, slot_fd, parent = (int(a) for a in args[:4])
    arena_fd = int(args[4]) if len(args) > 4 else -1
    # Ctrl-C goes to the whole process group; the parent decides when workers stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sock = socket.socket(fileno=data_fd)
    sock.setblocking(True)
    slot = mmap.mmap(slot_fd, 8)
    os.close(slot_fd)
    arena = None
    if arena_fd >= 0:
        try:  # the parent writes slots' data; this process only reads them
            arena = mmap.mmap(arena_fd, os.fstat(arena_fd).st_size, prot=mmap.PROT_READ)
        except OSError:  # e.g. an address-space limit: "ready" tells the parent to use the socket
            arena = None
        finally:
            os.close(arena_fd)
    worker = _Worker(sock, life_fd, slot, parent, arena)
    worker.start_threads()
    try:
        worker.serve()
    finally:
        _exit_now()
