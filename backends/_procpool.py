"""One supervised worker process, as the parent's event loop sees it.

::

    WorkerProc ── socketpair (data, both ways) ──────────────► worker main thread
               ── pipe (lifeline; parent holds the write end) ► worker monitor thread
                  (closing it stops the worker; a byte "R" asks for unstarted tasks back)
               ── memfd, 8 bytes (the running task's id) ◄──── written by the worker per task
               ── memfd arena (Arena: big buffers of tasks) ──► decoded from, never kept

    loop.add_reader(data socket) ─► FrameReader.read() ─► on_message(proc, frames)
                                                       └─► on_eof(proc) when the worker is gone
    send(frames) ─► non-blocking sendmsg of the frames as they are; whatever the socket
                    does not take now waits in a deque and goes out from add_writer

**Why a fresh interpreter (spawn semantics) and not fork.** The parent runs an
event loop and usually threads (the asyncio backend's workers, the default
executor); forking such a process copies locks held by other threads and the
loop's selector, and the child can deadlock. multiprocessing's own ``spawn`` and
``forkserver`` contexts are safe but each keeps a helper process alive for the
rest of the parent's life (the resource tracker, the fork server), which would be
a child process outliving every run. So the worker is started with
``subprocess.Popen([sys.executable, "-c", ...], pass_fds=...)``: a fresh
interpreter (``spawn`` semantics, and ``posix_spawn``/``vfork``+``exec`` under the
hood, which is safe with threads), handed exactly its three file descriptors and
the parent's ``sys.path``. It does not re-import the parent's ``__main__`` (the
function arrives cloudpickled), so scripts work without special care.

**No orphans.** The worker's monitor thread blocks on the lifeline pipe: when the
parent closes it (``detach()``) or dies, even by ``SIGKILL``, the kernel closes it
and the worker ``os._exit``s at once, even in the middle of a call (a call that
holds the GIL in C code delays this until it returns; the executor's ``aclose()``
SIGKILLs a worker that is not gone after a short grace, and waits for it).

**Errors.** An exception raised by the function is recreated in the parent when it
unpickles, with ``__cause__`` set to a ``RemoteError`` whose ``traceback_text`` (and
``str()``) is the remote traceback; if it cannot be unpickled here, the error IS a
``RemoteError(type_name, message, traceback_text)``. A function that cannot be
pickled fails ``start()`` with ``StageStartError``; an item or result that cannot be
pickled (or unpickled) fails that item only.

**Functions from unimportable modules.** cloudpickle pickles functions by
reference to their module when it can. A module that a fresh interpreter cannot
import by name (``__main__``, a test module pytest imported from a path, a file
loaded with ``importlib``), or that was loaded through an import hook a worker does
not have (a test module pytest rewrote), is registered with
``cloudpickle.register_pickle_by_value`` (process-wide and harmless: by reference
would not work, or would import a different module), so its functions and
classes travel by value and a worker never imports a test module.

The event loop must support ``add_reader`` (every selector loop and uvloop; not
the Windows proactor loop).
"""

from __future__ import annotations

import asyncio
import bisect
import functools
import importlib.machinery
import inspect
import marshal
import mmap
import os
import pickle
import signal
import socket
import struct
import subprocess
import sys
import tempfile
from collections import deque
from collections.abc import Callable
from typing import Any

from .wire.errors import rebuild

from ._procwire import (
    ARENA_ALIGN,
    EMIT,
    ERROR,
    IOV_BATCH,
    REVOKE,
    STOP,
    FrameReader,
    advance,
    decode,
    message_header,
    one_frame_header,
    wire_view,
)

__all__ = ["Arena", "WorkerProc", "WorkerStartFailed", "decode_event", "pickle_function", "pickle_hooks"]

#: Kernel buffer asked for each direction of a worker's socket (the kernel caps it
#: at net.core.[rw]mem_max). Bigger buffers let a multi-MiB item move in fewer
#: wake-ups; the memory is only used while data is in transit.
SOCKET_BUFFER = 4 * 1024 * 1024

#: How long a worker process gets to start and load the stage's function. Generous:
#: a cold interpreter on a loaded machine can take a second or two.
START_TIMEOUT_S = 60.0

#: Reads done per readiness callback before yielding to other callbacks: keeps one
#: chatty worker from starving the others and the rest of the loop.
READS_PER_WAKEUP = 16

#: Size of each worker's shared-memory arena (see ``Arena``). Address space only:
#: the memfd is sparse, and pages exist once touched, so a worker's arena costs the
#: most big-buffer bytes it ever had in flight at once, at most this. Buffers that
#: do not fit when they are sent take the socket.
ARENA_BYTES = 256 * 1024 * 1024

# The worker's first line of Python: restore the parent's sys.path and load the
# worker module by its path, as a top-level module (importing it as
# pypline.backends._procworker would import all of pypline first).
# What a worker runs: load _procworker.py by path (through its .pyc) and call main().
# Only modules a fresh interpreter has already loaded (marshal is built in, importlib's
# machinery frozen), so the boot costs no imports: json would pull in re, and
# importlib.util contextlib, ~4-7 ms of every worker start.
_BOOT = (
    "import sys, marshal, importlib.machinery as im; p, f = marshal.loads(bytes.fromhex(sys.argv[1])); "
    "sys.path[:] = p; n = '_pypline_procworker'; l = im.SourceFileLoader(n, f); "
    "s = im.ModuleSpec(n, l, origin=f); s.has_location = True; m = type(sys)(n); "
    "m.__spec__, m.__loader__, m.__file__ = s, l, f; sys.modules[n] = m; l.exec_module(m); m.main(sys.argv[2:])"
)
_WORKER_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_procworker.py")
_SLOT = struct.Struct("<Q")


class Arena:
    """A worker's shared-memory arena: big buffers of the tasks sent to it, one copy each.

    A memfd (anonymous: no name in ``/dev/shm``, nothing to clean up) mapped
    read-write here and read-only in the worker, which gets the fd at start-up. The
    parent copies a big buffer into a free slot (``put``) and sends its offset; the
    worker copies the value out of the slot before the call (``_procworker.decode``).

    **When a slot is reused.** A slot belongs to the task whose encoding put it
    there (``owner``, its task id) and is free again once that task is no longer in
    the worker's ``inflight`` (``sweep``, at the first ``put`` of each message).
    A task leaves ``inflight`` when (a) its outcome arrives: the worker decodes a
    task (copying out of the slot) before calling the function, and reports after,
    so it is done with the slot; (b) the worker gave it back unstarted
    (``returned``): it took it off its queue and will never decode it; (c) it timed
    out: its worker is SIGKILLed, and nothing it reads any more is reported; or (d)
    the worker died: the whole arena goes with it (``close``); its replacement
    gets a new one. Task ids are never reused within an executor.

    What user code in the worker gets never refers to the arena: raw ``bytes``/
    ``bytearray``/``memoryview`` values and pickle's out-of-band buffers are copied
    out, and a pickle stream is read in place by the unpickler, which copies what it
    keeps. So a slot is free as soon as its task is out of flight.

    **No leaks.** The memfd has no name; the parent closes its fd once the worker
    has it, and unmaps at ``close``; the worker's mapping goes when it exits (it
    exits when its lifeline closes, e.g. when the parent is ``kill -9``ed). The
    memory is freed with the last mapping.
    """

    def __init__(self, size: int | None = None) -> None:
        size = ARENA_BYTES if size is None else size
        self.fd = os.memfd_create("pypline-arena", os.MFD_CLOEXEC)
        try:
            os.ftruncate(self.fd, size)  # sparse: no memory until written
            self._map: mmap.mmap | None = mmap.mmap(self.fd, size)
        except BaseException:
            os.close(self.fd)
            raise
        self.size = size
        self.view: memoryview | None = memoryview(self._map)
        self._free: list[list[int]] = [[0, size]]  # [offset, size], sorted, coalesced
        self._used: dict[int, tuple[int, int]] = {}  # offset -> (slot size, owner task id)
        self.in_flight: Callable[[int], bool] = lambda tid: True

    @staticmethod
    def available() -> bool:
        return hasattr(os, "memfd_create")

    def close_fd(self) -> None:
        """The worker has its copy of the fd (or never will)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    @property
    def used(self) -> int:
        """Bytes in slots now."""
        return sum(n for n, _ in self._used.values())

    def put(self, buf: memoryview, owner: int) -> int | None:
        """Copy ``buf`` into a free slot owned by task ``owner``; where its data starts, or None (no room)."""
        view = self.view
        if view is None:
            return None
        n = buf.nbytes
        need = -(-n // ARENA_ALIGN) * ARENA_ALIGN
        off = self._take(need)
        if off is None:
            self.sweep(owner)
            off = self._take(need)
            if off is None:
                return None
        if buf.format != "B" or buf.ndim != 1:
            buf = buf.cast("B")
        view[off : off + n] = buf
        self._used[off] = (need, owner)
        return off

    def _take(self, need: int) -> int | None:
        for ext in self._free:  # first fit: low offsets, whose pages are touched already
            if ext[1] >= need:
                off = ext[0]
                ext[0] += need
                ext[1] -= need
                if not ext[1]:
                    self._free.remove(ext)
                return off
        return None

    def sweep(self, keep: int) -> None:
        """Free the slots of tasks no longer in flight (except ``keep``'s: being encoded now)."""
        in_flight = self.in_flight
        for off, (_, owner) in list(self._used.items()):
            if owner != keep and not in_flight(owner):
                self.release(off)

    def release(self, off: int) -> None:
        need, _ = self._used.pop(off)
        free = self._free
        i = bisect.bisect_left(free, [off, 0])
        if i > 0 and free[i - 1][0] + free[i - 1][1] == off:  # merge with the extent before
            i -= 1
            free[i][1] += need
        else:
            free.insert(i, [off, need])
        if i + 1 < len(free) and free[i][0] + free[i][1] == free[i + 1][0]:  # and the one after
            free[i][1] += free[i + 1][1]
            del free[i + 1]

    def close(self) -> None:
        """Unmap (the memory is freed once the worker's mapping is gone too). Idempotent."""
        self.close_fd()
        self._used.clear()
        self._free = []
        try:
            if self.view is not None:
                self.view.release()
            if self._map is not None:
                self._map.close()
        except BufferError:  # pragma: no cover - a view still exists: unmapped when collected
            pass
        self.view = None
        self._map = None
        self.in_flight = lambda tid: True


class WorkerStartFailed(Exception):
    """A worker process could not start or could not load the stage's function."""

    def __init__(self, message: str, traceback_text: str = "", what: str = "load") -> None:
        super().__init__(message)
        self.traceback_text = traceback_text
        self.what = what  # "load": the function could not be loaded; "setup": the stage's setup raised


class WorkerProc:
    """A worker process and its transport. The executor decides; this acts.

    Scheduling state (``limit``, ``inflight``, ...) lives here too so the executor
    can keep one object per worker; only the executor touches it.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, index: int, use_arena: bool = True) -> None:
        self.loop = loop
        self.index = index
        # --- executor-owned scheduling state ---
        self.ready = False
        self.loaded = False  # it answered its hello with "ready" (the stage's setup ran there)
        self.limit = 0
        self.flush_at = 1
        self.inflight: dict[int, Any] = {}
        self.service: float | None = None  # EWMA of seconds per call
        self.backlog: deque[tuple[int, int, Any]] | None = None
        self.last_progress = 0.0  # loop time of its last message, or of work sent to it idle
        self.revoking = False
        self.drain: asyncio.Task[None] | None = None
        self.free = 0
        # --- transport ---
        self.on_message: Callable[[WorkerProc, list[Any]], None] = lambda p, f: None
        self.on_eof: Callable[[WorkerProc], None] = lambda p: None
        self.reading = False
        self.writing = False
        self.detached = False
        self.eof = False
        self._out: deque[memoryview] = deque()
        self._tmp: Any = None
        self.arena: Arena | None = None
        parent, child = socket.socketpair()
        life_r, self._life_w = os.pipe()
        slot_fd = self._slot_fd()
        if use_arena and Arena.available():
            try:
                self.arena = Arena()
            except OSError:  # no memfd here (ENOSYS, limits): everything takes the socket
                self.arena = None
            else:
                self.arena.in_flight = lambda tid: tid in self.inflight  # the executor's own record
        try:
            for s in (parent, child):
                try:
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER)
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER)
                except OSError:  # pragma: no cover - a smaller buffer only costs speed
                    pass
            os.ftruncate(slot_fd, _SLOT.size)
            self._slot = mmap.mmap(slot_fd, _SLOT.size)
            cmd = [
                sys.executable,
                "-c",
                _BOOT,
                marshal.dumps(([str(p) for p in sys.path], _WORKER_FILE)).hex(),
                str(child.fileno()),
                str(life_r),
                str(slot_fd),
                str(os.getpid()),
                str(self.arena.fd if self.arena is not None else -1),
            ]
            fds = (child.fileno(), life_r, slot_fd) + ((self.arena.fd,) if self.arena is not None else ())
            self.proc = subprocess.Popen(cmd, pass_fds=fds, stdin=subprocess.DEVNULL)
        except BaseException:
            parent.close()
            os.close(self._life_w)
            if self.arena is not None:
                self.arena.close()
            raise
        finally:
            child.close()
            os.close(life_r)
            os.close(slot_fd)
            if self.arena is not None:
                self.arena.close_fd()
            if self._tmp is not None:
                self._tmp.close()
        os.set_blocking(self._life_w, False)
        self.pid = self.proc.pid
        self.sock = parent
        parent.setblocking(False)
        self.reader = FrameReader(parent)

    def _slot_fd(self) -> int:
        if hasattr(os, "memfd_create"):
            return os.memfd_create("pypline-slot", os.MFD_CLOEXEC)
        self._tmp = tempfile.TemporaryFile()  # noqa: SIM115 - closed once the worker has its fd
        return os.dup(self._tmp.fileno())

    def __repr__(self) -> str:
        return f"<WorkerProc {self.index} pid={self.pid}{' ready' if self.ready else ''}>"

    # --- start -------------------------------------------------------------------------
    async def handshake(self, hello: list[Any]) -> None:
        """Send the hello (the function) and wait for ``ready``; raise WorkerStartFailed."""
        fut: asyncio.Future[Any] = self.loop.create_future()

        def first(proc: WorkerProc, frames: list[Any]) -> None:
            if not fut.done():
                fut.set_result(pickle.loads(frames[0]))

        def gone(proc: WorkerProc) -> None:
            if not fut.done():
                fut.set_result(None)

        self.on_message, self.on_eof = first, gone
        self.resume_reading()
        self.send(hello)
        try:
            reply = await asyncio.wait_for(fut, START_TIMEOUT_S)
        except asyncio.TimeoutError:
            raise WorkerStartFailed(f"worker process {self.pid} did not start within {START_TIMEOUT_S:g} s") from None
        if reply is None:
            await self.wait_exit(1.0)
            raise WorkerStartFailed(f"worker process {self.pid} exited during start-up ({self.describe_exit()})")
        if reply[0] == "failed":
            _, name, message, tb, what = reply
            raise WorkerStartFailed(f"{name}: {message}", tb, what)
        if self.arena is not None and not (len(reply) > 2 and reply[2]):  # it could not map the arena
            self.arena.close()
            self.arena = None
        self.loaded = True

    # --- I/O -------------------------------------------------------------------------------
    def send(self, frames: list[Any]) -> None:
        """Queue one message; it goes out as soon as the socket takes it. Never blocks."""
        if self.detached:
            return
        out = self._out
        if not out and len(frames) == 1 and type(frames[0]) is bytes:  # most messages: one pickled envelope
            data = frames[0]
            head = one_frame_header(data)
            try:
                sent = self.sock.sendmsg((head, data))
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError:  # the worker is gone; the reader sees EOF and reports it
                return
            if sent == len(head) + len(data):
                return
            out.append(memoryview(head))
            out.append(memoryview(data))
            advance(out, sent)
            self._write()
            return
        out.append(memoryview(message_header(frames)))
        for f in frames:
            m = wire_view(f)
            if m.nbytes:
                out.append(m)
        if not self.writing:
            self._write()

    def _write(self) -> None:
        out = self._out
        try:
            while out:
                sent = self.sock.sendmsg(list(out)[:IOV_BATCH] if len(out) > IOV_BATCH else out)
                advance(out, sent)
        except (BlockingIOError, InterruptedError):
            pass
        except OSError:  # the worker is gone; the reader sees EOF and reports it
            out.clear()
        if out and not self.writing:
            self.writing = True
            self.loop.add_writer(self.sock.fileno(), self._write)
        elif not out and self.writing:
            self.writing = False
            self.loop.remove_writer(self.sock.fileno())

    def resume_reading(self) -> None:
        if not self.reading and not self.detached and not self.eof:
            self.reading = True
            self.loop.add_reader(self.sock.fileno(), self._readable)

    def pause_reading(self) -> None:
        if self.reading:
            self.reading = False
            self.loop.remove_reader(self.sock.fileno())

    def _readable(self) -> None:
        reader = self.reader
        for _ in range(READS_PER_WAKEUP):
            try:
                msgs = reader.read()
            except (BlockingIOError, InterruptedError):
                return
            except (EOFError, OSError):
                self.eof = True
                self.pause_reading()
                self.on_eof(self)
                return
            for frames in msgs:
                self.on_message(self, frames)
            if not self.reading or reader.drained:  # paused by the handler, or nothing more to read now
                return

    # --- the running task, read from shared memory --------------------------------------
    def current_task(self) -> int:
        """The id of the task the worker was executing (0: none). Exact once it is dead."""
        try:
            return int(_SLOT.unpack_from(self._slot, 0)[0])
        except ValueError:  # the map is closed
            return 0

    # --- stop ----------------------------------------------------------------------------
    async def farewell(self, timeout: float) -> str | None:
        """Stop the worker the polite way: it runs the stage's teardown, answers ``stopped``
        and exits. Returns how its teardown failed (None: it did not fail, or the worker
        is gone); raises ``TimeoutError`` if it did not answer in ``timeout`` seconds."""
        fut: asyncio.Future[str | None] = self.loop.create_future()

        def on_message(proc: WorkerProc, frames: list[Any]) -> None:
            try:
                env = pickle.loads(frames[0])
            except Exception:  # noqa: BLE001 - an outcome of a call; nobody waits for it now
                return
            if env[0] == "stopped" and not fut.done():
                fut.set_result(env[1])

        def gone(proc: WorkerProc) -> None:
            if not fut.done():
                fut.set_result(None)

        self.on_message, self.on_eof = on_message, gone
        self.resume_reading()
        self.send([pickle.dumps(("stop",), protocol=5)])
        try:
            os.write(self._life_w, STOP)
        except OSError:
            pass
        try:
            return await asyncio.wait_for(fut, timeout)
        except asyncio.TimeoutError:
            raise TimeoutError(f"worker process {self.pid} did not stop within {timeout:g} s") from None

    def detach(self) -> None:
        """Close our ends: the worker sees its lifeline close and exits. Idempotent."""
        if self.detached:
            return
        self.detached = True
        self.pause_reading()
        if self.writing:
            self.writing = False
            self.loop.remove_writer(self.sock.fileno())
        self._out.clear()
        self.sock.close()
        os.close(self._life_w)
        if self.arena is not None:
            self.arena.close()  # nothing more is sent; the worker's own mapping goes when it exits

    def revoke(self) -> None:
        """Ask the worker for the tasks it has not started (answered by a ``returned`` message)."""
        if not self.detached:
            try:
                os.write(self._life_w, REVOKE)
            except OSError:  # full (a revoke is pending anyway) or gone (the reader sees EOF)
                pass

    def kill(self) -> None:
        """SIGKILL the process if it still runs."""
        if self.proc.returncode is None:
            try:
                self.proc.send_signal(signal.SIGKILL)
            except OSError:  # pragma: no cover - already gone
                pass

    async def wait_exit(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for the process to exit; True if it did."""
        deadline = self.loop.time() + timeout
        delay = 0.0005
        while self.proc.poll() is None:
            if self.loop.time() >= deadline:
                return False
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.02)
        return True

    def reap(self) -> None:
        """Detach, kill if still running, and wait for the exit (blocks briefly). Idempotent."""
        self.detach()
        if self.proc.poll() is None:
            self.kill()
            self.proc.wait()
        if not self._slot.closed:
            self._slot.close()

    @property
    def returncode(self) -> int | None:
        return self.proc.returncode

    def describe_exit(self) -> str:
        rc = self.proc.returncode
        if rc is None:
            return "still running"
        if rc < 0:
            try:
                name = signal.Signals(-rc).name
            except ValueError:
                name = f"signal {-rc}"
            return f"killed by {name}"
        return f"exit code {rc}"


# --- what crosses the boundary ----------------------------------------------------------


def importable(name: str, file: str | None) -> bool:
    """Would a fresh interpreter with our ``sys.path`` import module ``name`` from ``file``?

    Asks only the finders every interpreter starts with (built-in modules and the path
    finder), never an import hook installed at run time (a test runner's, say), which a
    worker process does not have.
    """
    if not name or name == "__main__" or name.endswith(".__main__"):
        return False
    if name in sys.builtin_module_names:
        return True
    parts = name.split(".")
    path: Any = None
    spec = None
    for i in range(len(parts)):
        try:
            spec = importlib.machinery.PathFinder.find_spec(".".join(parts[: i + 1]), path)
        except Exception:  # noqa: BLE001 - an unreadable path entry just does not find it
            spec = None
        if spec is None:
            return False
        path = spec.submodule_search_locations
    if spec is None:
        return False
    if file is None or spec.origin in (None, "built-in", "frozen"):
        return True
    try:
        return os.path.samefile(spec.origin, file)
    except OSError:
        return False


def modules_of(fn: Any) -> list[str]:
    """The modules whose code ``fn`` is: its own, and its class's for a callable object or method."""
    target = fn
    while isinstance(target, functools.partial):
        target = target.func
    names = [getattr(target, "__module__", None)]
    if inspect.ismethod(target):
        names.append(type(target.__self__).__module__)
    elif not (inspect.isfunction(target) or inspect.isbuiltin(target)):
        names.append(type(target).__module__)
    return [n for n in names if isinstance(n, str)]


def ship_unimportable_by_value(fn: Any) -> None:
    """Have cloudpickle ship ``fn``'s modules by value where a worker could not import them
    by name (``__main__`` it ships by value already). Process-wide and harmless: pickling by
    reference could not have worked for those modules."""
    import cloudpickle  # type: ignore[import-untyped,unused-ignore]

    for name in modules_of(fn):
        module = sys.modules.get(name)
        if module is None or name == "__main__":
            continue
        if not importable(name, getattr(module, "__file__", None)):
            try:
                cloudpickle.register_pickle_by_value(module)
            except (ValueError, TypeError):  # pragma: no cover - not registrable: try by reference
                pass


def pickle_function(fn: Callable[..., Any]) -> bytes:
    """cloudpickle ``fn``, by value for modules a worker could not import by name."""
    import cloudpickle  # type: ignore[import-untyped,unused-ignore]

    ship_unimportable_by_value(fn)
    return cloudpickle.dumps(fn, protocol=5)  # type: ignore[no-any-return]


def pickle_hooks(setup: Callable[..., Any] | None, teardown: Callable[..., Any] | None) -> bytes:
    """cloudpickle a stage's ``(setup, teardown)``, by value like its functions where needed."""
    import cloudpickle  # type: ignore[import-untyped,unused-ignore]

    for hook in (setup, teardown):
        if hook is not None:
            ship_unimportable_by_value(hook)
    return cloudpickle.dumps((setup, teardown), protocol=5)  # type: ignore[no-any-return]


def decode_event(e: tuple[Any, ...], frames: list[Any]) -> tuple[int, int, Any]:
    """One outcome of an ``events`` message as ``(tid, code, value or exception)``, never raising."""
    tid, code, tag, data = e[0], e[1], e[2], e[3]
    try:
        value = decode(tag, data, frames)
    except Exception as exc:  # noqa: BLE001 - any failure to load fails that item only
        if code == ERROR:  # its type does not exist here
            return tid, code, rebuild(e[4], e[5], e[6], None)
        err = pickle.UnpicklingError(
            f"{'a yielded value' if code == EMIT else 'the result'} sent back by the worker "
            f"process could not be unpickled: {type(exc).__name__}: {exc}"
        )
        err.__cause__ = exc
        return tid, ERROR, err
    if code == ERROR:
        value = rebuild(e[4], e[5], e[6], value if isinstance(value, BaseException) else None)
    return tid, code, value
