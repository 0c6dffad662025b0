"""One client's session on the agent, and the stages it runs here.

::

    TASKS ─► Session.on_tasks ─► StageHost.accept ─► queue ─pump─► local Executor (process/asyncio)
                                  (decode; a value that       ▲      │ its workers run the calls
                                   does not unpickle fails    │      ▼
                                   that item at once)         │   StageHost as OutcomeSink:
                                                              │   ok / error / lost / emit
                                      slot free ──────────────┘      │
                                                                      ▼
    RESULTS ◄── flush (end of loop tick, or a full batch) ◄── outbox (Encoder)

A ``StageHost`` hosts an engine-style executor from a local backend, so crash
handling (``WorkerDied``), ``timeout`` kills and ``current_worker()`` come from the
``process`` backend unchanged; the host is the executor's ``OutcomeSink`` and turns
its reports into RESULTS entries.

**Credit window: work goes where a worker is free.** A stage's window is how many of
its tasks the client may have at this agent (sent, not yet answered). The host keeps
at most ``workers x depth`` of them in the executor, where ``depth`` is how many calls
cover ``TARGET_QUEUE_S`` of work at the measured time per call (1 for calls of
``TARGET_QUEUE_S`` or more, and until a call has been timed; up to ``MAX_DEPTH`` for
microsecond calls, so they travel in batches); the rest waits in the host's queue,
from which a drain hands it back at once. The window is that plus a prefetch: as much
again for fast calls (a batch in transit while one is computed), a single task for slow
ones. So a client never parks a pile of slow items behind one agent's busy workers
while another agent has free ones. The window is also capped by the agent's memory
budget (``serve --max-memory``): the bytes of every task held, across all sessions,
stay under it, give or take one task per stage (a stage holding nothing may always
take one, so every stage makes progress). Every RESULTS carries the current window;
``CREDIT`` announces one that grew without results. Draining makes it 0.

**Emits** (generator stages) are flow-controlled separately: at most
``EMIT_WINDOW`` yielded values of a stage may be unacknowledged by the client;
``emit`` waits beyond that, which pauses the worker's outcome stream (backpressure
reaches the generator through the local backend).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from typing import TYPE_CHECKING, Any

from pypline.executor import Attempt, Executor, OutcomeSink, StageSpec, WorkerDied

from pypline.backends.wire import protocol as P
from .pool import SinkProxy

if TYPE_CHECKING:
    from .server import Agent

log = logging.getLogger("pypline.agent")

#: Work an executor holds per worker: calls covering this many seconds (see "Credit window").
TARGET_QUEUE_S = 0.02
#: Most calls one worker's share of the executor holds (microsecond calls).
MAX_DEPTH = 1024
#: Weight of a new sample in the time-per-call average.
SERVICE_EWMA = 0.2

#: Bounds of a session's time-to-live (the client proposes twice its heartbeat timeout).
MIN_TTL_S = 1.0
MAX_TTL_S = 300.0

#: Unacknowledged yielded values per stage before a generator waits. Enough to keep
#: the pipe full across a round trip of small values; bounds memory on both sides.
EMIT_WINDOW = 1024


class Task(Attempt):
    """An attempt received from a client; ``tid`` is the client's task id, ``nbytes`` what
    its item took on the wire (counted against the agent's memory budget)."""

    __slots__ = ("tid", "nbytes", "sent_at", "rounds")

    def __init__(self, item: Any, worker: int | None, number: int, tid: int, nbytes: int = 0) -> None:
        self.item = item
        self.worker = worker
        self.number = number
        self.lost = 0
        self.tid = tid
        self.nbytes = nbytes
        self.sent_at = 0.0  # when handed to the executor
        self.rounds = 1  # calls per worker it had to wait for, itself included


def _never_merge(results: list[Any]) -> Any:  # pragma: no cover - merging happens at the client
    raise RuntimeError("fork_merge runs in the client, never on an agent")


class StageHost(OutcomeSink):
    """One declared stage of one session: its local executor, queue and outbox."""

    def __init__(
        self, session: Session, sid: int, spec: StageSpec, executor: Executor, proxy: SinkProxy, key: Hashable
    ) -> None:
        self.session = session
        self.proxy = proxy
        self.key = key
        proxy.target = self
        self.agent = session.agent
        self.sid = sid
        self.spec = spec
        self.ex = executor
        self.queue: deque[Task] = deque()
        self.running: dict[int, Task] = {}  # handed to the executor, not yet reported
        self.started = False
        self.closed = False
        self.out = P.Encoder()
        self.flush_scheduled = False
        self.last_window = 0
        self.emits_unacked = 0
        self.emit_waiters: list[asyncio.Future[None]] = []
        self.received = 0
        self.completed = 0
        self.service: float | None = None  # measured seconds per call (EWMA)
        self.held_bytes = 0  # wire bytes of the tasks queued and running here
        self.task_bytes = 0  # the largest task received so far (bytes on the wire)

    # --- the window ------------------------------------------------------------------------

    def depth(self) -> int:
        """Calls per worker the executor holds: ``TARGET_QUEUE_S`` of work, at least one."""
        if self.service is None or self.service >= TARGET_QUEUE_S:
            return 1
        return min(MAX_DEPTH, int(TARGET_QUEUE_S / max(self.service, 1e-7)))

    def window(self) -> int:
        if self.closed or not self.started or self.agent.draining:
            return 0
        depth = self.depth()
        in_executor = self.spec.num_workers * depth
        window = in_executor + (in_executor if depth > 1 else 1)
        held = len(self.queue) + len(self.running)
        if self.task_bytes:
            room = max(0, self.agent.config.max_memory - self.agent.held_bytes) // self.task_bytes
            window = min(window, held + room)
        return max(window, 1 if not held else 0)

    def statistics(self) -> dict[str, Any]:
        workers = self.spec.num_workers
        return {
            "sid": self.sid,
            "name": self.spec.name,
            "workers": workers,
            "window": self.window(),
            "running": min(len(self.running), workers),
            "queued": len(self.queue) + max(0, len(self.running) - workers),
            "held_bytes": self.held_bytes,
            "seconds_per_call": self.service,
            "received": self.received,
            "completed": self.completed,
        }

    def _hold(self, nbytes: int) -> None:
        self.held_bytes += nbytes
        self.agent.held_bytes += nbytes

    # --- tasks in ------------------------------------------------------------------------------

    def accept(self, tasks: Sequence[Task]) -> None:
        self.received += len(tasks)
        if self.agent.draining or self.closed:
            for t in tasks:
                self.out.add_none(t.tid, P.S_LOST)
            self._schedule_flush()
            return
        self._hold(sum(t.nbytes for t in tasks))
        self.task_bytes = max(self.task_bytes, max(t.nbytes for t in tasks))
        self.queue.extend(tasks)
        self.pump()

    def fail_now(self, tid: int, exc: BaseException) -> None:
        """An item that could not be decoded here: it fails at once (its attempt is used)."""
        self.received += 1
        self.completed += 1
        self.out.add_error(tid, P.S_ERROR, P.error_info(exc))
        self._schedule_flush()

    def pump(self) -> None:
        """Move queued tasks into the executor, up to ``workers x depth`` there in all."""
        if self.closed or not self.started:
            return
        q = self.queue
        if not q:
            return
        workers = self.spec.num_workers
        running = self.running
        cap = min(self.ex.capacity(), workers * self.depth() - len(running))
        if cap <= 0:
            return
        k = min(cap, len(q))
        batch = [q.popleft() for _ in range(k)]
        now = time.monotonic()
        ahead = len(running)
        for i, t in enumerate(batch):
            t.sent_at = now
            t.rounds = (ahead + i) // workers + 1
            running[t.tid] = t
        self.ex.submit(batch)

    def return_queued(self) -> int:
        """Hand every task not yet started back to the client as lost (draining)."""
        n = len(self.queue)
        while self.queue:
            t = self.queue.popleft()
            self._hold(-t.nbytes)
            self.out.add_none(t.tid, P.S_LOST)
        if n:
            self._schedule_flush()
        return n

    def abandon_running(self) -> int:
        """Report what the executor still runs as lost (drain deadline); later reports are ignored."""
        n = len(self.running)
        for tid, t in self.running.items():
            self._hold(-t.nbytes)
            self.out.add_none(tid, P.S_LOST)
        self.running.clear()
        if n:
            self.flush()
        return n

    # --- the executor's reports (OutcomeSink) ------------------------------------------------

    def _terminal(self, a: Attempt) -> bool:
        """Take ``a`` out of ``running``; False if it is not ours (any more).

        By identity, not only by task id: an executor taken over from an earlier session of
        the same client (a repeated HELLO) may still report that session's tasks, whose ids
        the new session can use again."""
        tid = a.tid  # type: ignore[attr-defined]
        if self.running.get(tid) is not a:
            return False  # reported already, handed back as lost, or an earlier session's
        del self.running[tid]
        self.completed += 1
        t: Task = a
        self._hold(-t.nbytes)
        per_call = (time.monotonic() - t.sent_at) / t.rounds
        self.service = per_call if self.service is None else self.service + SERVICE_EWMA * (per_call - self.service)
        return True

    def ok(self, attempt: Attempt, value: Any) -> None:
        if not self._terminal(attempt):
            return
        tid = attempt.tid  # type: ignore[attr-defined]
        out = self.out
        before = out.nbytes
        if not out.add(tid, P.S_OK, -1, value):
            self._unpicklable(tid, value)
        elif out.nbytes - before > self.agent.max_item:
            size = (out.nbytes - before) / 2**20
            out.pop_last(before)
            self._unpicklable(
                tid,
                value,
                P.MessageTooLarge(
                    f"the result is {size:.1f} MiB pickled, more than a message may carry "
                    f"({self.agent.max_item / 2**20:.1f} MiB, pypline-agent serve --max-message)"
                ),
            )
        if self.queue:
            self.pump()
        if len(out) >= P.MAX_BATCH_ITEMS or out.nbytes >= P.BATCH_BYTES:
            self.flush()
        elif not self.flush_scheduled:
            self._schedule_flush()
        if self.agent.draining:
            self.agent.reported()

    def error(self, attempt: Attempt, exc: BaseException) -> None:
        if not self._terminal(attempt):
            return
        if isinstance(exc, WorkerDied):
            status = P.S_DIED
        elif isinstance(exc, TimeoutError):
            status = P.S_TIMEOUT
        else:
            status = P.S_ERROR
        self.out.add_error(attempt.tid, status, P.error_info(exc))  # type: ignore[attr-defined]
        self._after_report()

    def lost(self, attempt: Attempt, where: str) -> None:
        if not self._terminal(attempt):
            return
        self.out.add_none(attempt.tid, P.S_LOST)  # type: ignore[attr-defined]
        self._after_report()

    async def emit(self, attempt: Attempt, value: Any) -> None:
        t: Task = attempt  # type: ignore[assignment]
        if self.running.get(t.tid) is not t or self.closed:
            return
        if not self.out.add(t.tid, P.S_EMIT, -1, value):
            exc = self.out.failure
            err = TypeError(f"a value yielded by stage {self.spec.name!r} cannot be pickled: {exc}")
            self.out.add_error(t.tid, P.S_ERROR, P.error_info(err))
        self.emits_unacked += 1
        self._schedule_flush()
        while self.emits_unacked >= EMIT_WINDOW and not self.closed:
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self.emit_waiters.append(fut)
            await fut

    def capacity_changed(self) -> None:
        self.pump()
        w = self.window()
        if w > self.last_window:
            self.last_window = w
            self.session.send(P.header(P.CREDIT, sid=self.sid, win=w))

    def ack_emits(self, n: int) -> None:
        self.emits_unacked = max(0, self.emits_unacked - n)
        if self.emits_unacked < EMIT_WINDOW:
            waiters, self.emit_waiters = self.emit_waiters, []
            for f in waiters:
                if not f.done():
                    f.set_result(None)

    def _unpicklable(self, tid: int, value: Any, err: BaseException | None = None) -> None:
        if err is None:
            exc = self.out.failure
            err = TypeError(
                f"the result of stage {self.spec.name!r} (a {type(value).__qualname__}) cannot be pickled "
                f"to send it back: {type(exc).__name__}: {exc}"
            )
        self.out.add_error(tid, P.S_ERROR, P.error_info(err))

    def _after_report(self) -> None:
        self.pump()
        out = self.out
        if len(out) >= P.MAX_BATCH_ITEMS or out.nbytes >= P.BATCH_BYTES:
            self.flush()
        else:
            self._schedule_flush()
        self.agent.reported()

    # --- results out ---------------------------------------------------------------------------

    def _schedule_flush(self) -> None:
        if not self.flush_scheduled:
            self.flush_scheduled = True
            asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        self.flush_scheduled = False
        if not len(self.out):
            return
        n, frames = self.out.finish()
        w = self.window()
        self.last_window = w
        self.session.send(*P.message(P.RESULTS, frames, sid=self.sid, n=n, win=w))

    async def aclose(self) -> None:
        """Park the executor for the next identical stage of the same client unless the agent
        is draining, else close it (and its workers).

        A busy executor is parked too: what it still runs belonged to a session its client
        gave up on (it said HELLO again after a partition or a stall, or went away), and
        those reports go nowhere; its slots come back as the calls end. So a client's
        repeated HELLO never costs worker processes."""
        self.closed = True
        self.ack_emits(self.emits_unacked)
        self._hold(-self.held_bytes)
        self.queue.clear()
        self.running.clear()
        lifecycle = self.spec.setup is not None or self.spec.teardown is not None  # teardown runs now
        if self.started and not self.agent.draining and not lifecycle:
            self.agent.park(self.key, self.ex, self.proxy)
            return
        self.proxy.target = None
        try:
            await self.ex.aclose()
        except Exception:
            log.exception("closing stage %r of session %s failed", self.spec.name, self.session.name)


class Session:
    """One client connection (routing id) after a successful HELLO."""

    def __init__(self, agent: Agent, rid: bytes, hello: dict[str, Any], user: str | None, peer: str) -> None:
        self.agent = agent
        self.rid = rid
        self.name = rid.hex()[:8]
        self.user = user
        self.peer = peer
        self.role = str(hello.get("role", "client"))
        self.started = time.monotonic()
        self.last_seen = self.started
        hb = float(hello["hb"])
        #: Silence after which the session is dropped: twice the client's own heartbeat
        #: timeout (it pings several times per timeout), between MIN_TTL_S and MAX_TTL_S
        #: whatever the client asks (a session must not be immortal).
        self.ttl = min(max(2.0 * hb, MIN_TTL_S), MAX_TTL_S)
        self.stages: dict[int, StageHost] = {}
        self.closed = False

    def send(self, *frames: Any) -> None:
        if not self.closed:
            self.agent.send(self, [self.rid, *frames])

    def inflight(self) -> int:
        return sum(len(h.running) + len(h.queue) for h in self.stages.values())

    def statistics(self) -> dict[str, Any]:
        now = time.monotonic()
        return {
            "session": self.name,
            "peer": self.peer,
            "user": self.user,
            "age_s": round(now - self.started, 1),
            "ttl_s": self.ttl,
            "idle_s": round(now - self.last_seen, 1),
            "stages": [h.statistics() for h in self.stages.values()],
        }

    async def aclose(self) -> None:
        self.closed = True
        hosts = list(self.stages.values())
        self.stages.clear()
        for h in hosts:
            h.closed = True
        await asyncio.gather(*(h.aclose() for h in hosts))


def stage_key(h: dict[str, Any], spec: StageSpec, user: str | None) -> Hashable:
    """What makes two STAGE declarations interchangeable executors (see ``pool.py``).

    The client's identity (its CURVE public key; ``None`` without keys) is part of it:
    warm worker processes keep whatever module-level state one client's functions built,
    so they are never handed to another client."""
    hooks = tuple(h.get("hooks") or ())
    return (user, tuple(h["fns"]), tuple(h["kinds"]), hooks, h["fork"], h["timeout"], h["retries"], h["name"], spec.num_workers)


def build_spec(
    h: dict[str, Any],
    fns: list[Callable[..., Any]],
    agent_workers: int,
    setup: Callable[[], Any] | None = None,
    teardown: Callable[[Any], Any] | None = None,
) -> StageSpec:
    """The local ``StageSpec`` for a STAGE declaration.

    A fork or mix_pool stage keeps all its workers (the worker index matters); a
    work_pool in pool mode (one function, ``num_workers`` copies) runs
    ``min(num_workers, agent workers)`` of them here.
    """
    from pypline.lowlevel import FnKind, WorkerFn

    workers = [WorkerFn(fn, FnKind(kind)) for fn, kind in zip(fns, h["kinds"])]
    identical = len(set(h["fns"])) == 1 and len(set(h["kinds"])) == 1
    if identical and not h["fork"]:
        workers = workers[: max(1, min(len(workers), agent_workers))]
    n = len(workers)
    return StageSpec(
        name=h["name"],
        workers=tuple(workers),
        buffer=n,
        retries=h["retries"],
        multi_proc=True,
        fork_merge=_never_merge if h["fork"] else None,
        timeout=h["timeout"],
        backoff=0.0,
        retry_on=(Exception,),
        setup=setup,
        teardown=teardown,
    )
