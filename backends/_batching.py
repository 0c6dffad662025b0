"""What the Dask and Ray backends share: attempts travel in batches, one remote call each.

::

    StageRunner.submit([a, b, ...]) ─► shared queue (or slot i's own queue: fork mode, mix_pool)
          │  one dispatch per loop tick (call_soon): every slot with room for another call
          │  gets a batch, its own attempts first, then a fair share of the shared queue,
          ▼  at most its adaptive batch limit; each item pickled here, one by one
    engine._send(call) ──► Dask future / Ray object ref ──► worker process: run_batch()
          │                                                   runs the batch in order, sets
          │  one asyncio task per call (not per item)         current_worker() per item,
          ▼  awaits it                                        catches and pickles per item
    outcomes, in batch order: the slot is freed, then sink.ok / sink.error; a generator's
    values are materialised in the worker and given to `await sink.emit` one by one, in
    order, before its sink.ok (on these engines one item's outputs are not streamed)

**Slots.** Worker index ``i`` of a stage is a *slot*. A slot's calls run one after
the other, never at the same time, so a stage never runs more than ``num_workers``
calls at once, as on every other backend. On Ray a slot is an actor and keeps
``CALLS_PER_SLOT`` (2) calls there: the next batch waits at the actor while the
current one runs, so the actor never idles for a round trip. On Dask a slot has one
call outstanding (Dask may run two tasks of one slot at once on two workers, and
ordering them by a data dependency makes Dask keep and re-compute results), so each
batch costs one round trip, amortised by batches of ~50 ms of work.

**Batches.** A slot's batch limit follows the measured time per item: a call carries
about ``target_call_s`` of work (set per engine from its per-call overhead), at most
``MAX_BATCH`` attempts, and, where the engine sets ``max_call_bytes``, about that many
bytes of pickled items (by their average size so far; Ray, whose big arguments go
through its shared-memory object store). The engine's memory bound caps what a stage holds anyway
(``buffer + num_workers`` items), so with the default ``buffer=16`` a call carries at
most a handful of items; a larger ``buffer`` lets microsecond calls travel hundreds at
a time.

**Per-item isolation.** Items and results are pickled one by one, so an item or
result that cannot be pickled fails that attempt only, and a user's exception never
fails the whole call (``_batch_wire`` says what travels and how errors keep their type).

**Faults** (the engine decides each verdict in ``_verdict``):

- ``died``: the process running the call died. Who is to blame is not always clear:
  a batch does not say which of its items was running, Dask fails every task that
  was *assigned* to a dying worker (running or queued), and a Ray actor may die
  before the reply of the call it had just finished got out. So pypline blames an
  item only when it killed its worker *running alone*: every attempt of a call that
  died (and of the calls queued behind it) is re-queued as a *suspect*, uncounted;
  suspects then run one per call with nothing else queued at their worker (on
  Dask: with no other call of the stage anywhere), normal work waiting meanwhile.
  A suspect that kills its worker again gets ``WorkerDied``, which costs it one
  attempt (the item may be what kills it); the others simply succeed.
  Execution is at-least-once.
- ``lost``: the engine lost the worker or the connection (a node died, the scheduler
  went away): each attempt of the call is reported ``lost`` (not the item's fault;
  the engine re-dispatches it up to ``max_lost`` times).
- calls queued behind a call that failed never ran: their attempts are re-queued
  transparently.
- ``error``: anything else (the remote wrapper itself failed): every attempt of the
  call gets that error.

**Timeouts** are the engine's business (``_deadline`` and ``_abandon``): Ray kills
and replaces the actor, Dask abandons the call in a thread of its worker. See the
engine modules for exactly what each can and cannot stop.
"""

from __future__ import annotations

import asyncio
import logging
import pickle
from collections import deque
from typing import Any, Awaitable, ClassVar, Sequence

from pypline.executor import Attempt, Executor, ExecutorStatistics, OutcomeSink, StageSpec, WorkerDied
from pypline.lowlevel import LATENCY_SAMPLE_EVERY

from ._batch_wire import GEN, OK, decode_error, dumps, pickle_function

__all__ = ["DIED", "ERROR", "IGNORE", "LOST", "BatchingExecutor", "Call"]

log = logging.getLogger("pypline.batching")

# --- tuning -------------------------------------------------------------------------------

#: Calls a slot may have outstanding: one running and one waiting where it runs, so
#: a worker starts its next batch without waiting for a round trip to the client.
#: More would only let a slow batch hold more items hostage behind it.
CALLS_PER_SLOT = 2

#: Most attempts one call carries. Caps the batch of microsecond calls (256 of them
#: are well under a millisecond of work) so one call's payload stays small.
MAX_BATCH = 256

#: Batch limit of a slot before anything was measured: small, so the first calls of
#: a slow function do not queue many items behind one worker.
FIRST_BATCH = 2

#: Weight of the newest measurement in a slot's average time per item.
SERVICE_EWMA = 0.3


class Call:
    """One remote call: a batch of attempts for one slot."""

    __slots__ = (
        "slot",
        "attempts",
        "seq",
        "handle",
        "task",
        "timer",
        "returned",
        "settled",
        "generation",
        "key",
        "solo",
   )

    def __init__(self, slot: int, attempts: list[Attempt], seq: int, generation: int) -> None:
        self.slot = slot
        self.attempts = attempts
        self.seq = seq
        self.generation = generation
        self.handle: Any = None  # the engine's future / object ref
        self.task: asyncio.Task[None] | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.returned = False  # its result arrived (it is no longer running anywhere)
        self.settled = False  # every attempt of it was reported or re-queued
        self.key = ""
        self.solo = False  # sent while no other call of the stage was outstanding

    def __repr__(self) -> str:
        return f"<Call slot={self.slot} seq={self.seq} n={len(self.attempts)}>"


class _Slot:
    __slots__ = ("index", "own", "calls", "limit", "ewma", "ready", "dead")

    def __init__(self, index: int) -> None:
        self.index = index
        self.own: deque[Attempt] = deque()  # attempts that must run on this worker
        self.calls: deque[Call] = deque()  # outstanding, oldest (running) first
        self.limit = FIRST_BATCH
        self.ewma = 0.0  # seconds per item, 0 until measured
        self.ready = True
        self.dead = False  # could not be restarted: its attempts fail


def _pop_first(queue: deque[Attempt], wanted: set[int]) -> Attempt | None:
    """Remove and return the first attempt of ``queue`` whose id is in ``wanted``."""
    for i, a in enumerate(queue):
        if id(a) in wanted:
            del queue[i]
            return a
    return None


# Verdicts on a call that failed as a whole (see the module docstring).
DIED = "died"
LOST = "lost"
ERROR = "error"
IGNORE = "ignore"  # a failure we caused (a cancel or kill): already handled


class BatchingExecutor(Executor):
    """A stage's slots, batches and outcomes; the engine subclass moves the calls."""

    #: Name in statistics.
    backend_name: ClassVar[str] = "batching"
    #: Seconds of work one call should carry: a few times the engine's per-call overhead.
    target_call_s: ClassVar[float] = 0.01
    #: Whether a timeout forces batches of one (the clock then runs per call).
    timeout_batches_of_one: ClassVar[bool] = True
    #: Where a suspect must run alone to be blamed for a worker's death: ``"slot"``
    #: (nothing else queued at its worker: Ray, whose actor may lose the reply of the
    #: call before the one that killed it) or ``"stage"`` (no other call of the stage
    #: anywhere: Dask, which fails every task *assigned* to a dying worker).
    blame_scope: ClassVar[str] = "slot"
    #: Calls a slot may have outstanding (see CALLS_PER_SLOT).
    calls_per_slot: ClassVar[int] = CALLS_PER_SLOT
    #: Most bytes of pickled items one call should carry (None: no limit). Items
    #: measured so far (an average) decide how many a batch takes; a single item
    #: bigger than this still travels, alone.
    max_call_bytes: ClassVar[int | None] = None

    def __init__(self, spec: StageSpec) -> None:
        self._spec = spec
        self._n = spec.num_workers
        self._slots = [_Slot(i) for i in range(self._n)]
        self._queue: deque[Attempt] = deque()
        self._suspects: set[int] = set()  # id() of attempts re-queued to run alone
        self._held = 0  # attempts given to us and not yet reported
        self._cap_total = 0
        self._depth = self.calls_per_slot
        self._seq = 0
        self._scheduled = False
        self._closed = False
        self._started = False
        self._tasks: set[asyncio.Task[Any]] = set()
        self._submitted = 0
        self._completed = 0
        self._replaced = 0
        self._calls_sent = 0
        self._busy = 0.0
        self._latencies: deque[float] = deque(maxlen=2048)
        self._countdown = LATENCY_SAMPLE_EVERY
        self._timing = True
        self._item_bytes = 0.0  # average pickled size of an item, 0 until measured

    # --- hooks for the engine subclass ------------------------------------------------------------

    async def _start_slots(self, blob: bytes) -> None:
        """Ship the functions and get every slot ready. Raise ``StageStartError`` if impossible."""
        raise NotImplementedError

    def _send(self, call: Call, payloads: list[bytes]) -> Awaitable[Any]:
        """Start ``call`` remotely, never blocking; what it returns is awaited for the outcome."""
        raise NotImplementedError

    def _verdict(self, call: Call, exc: BaseException) -> tuple[str, Any]:
        """Classify a whole call's failure: (DIED, message) | (LOST, where) | (ERROR, exc) | (IGNORE, None)."""
        raise NotImplementedError

    def _deadline(self, call: Call) -> float | None:
        """Seconds the client waits for ``call`` once it runs (is its slot's oldest), or None."""
        return None

    def _abandon(self, calls: list[Call], why: str) -> None:
        """Stop what can be stopped of these calls (timed out, or queued behind a failure)."""

    def _repair(self, slot: int, why: str) -> None:
        """The slot's worker is gone (died/lost/killed): get a new one (set ready again, dispatch)."""

    async def _stop_slots(self) -> None:
        """Release every remote resource; called once from ``aclose``."""

    def _release(self, call: Call) -> None:
        """``call``'s result has been received: drop the engine's handle (its result may go)."""
        call.handle = None

    # --- the contract ---------------------------------------------------------------------------

    async def start(self, spec: StageSpec, sink: OutcomeSink) -> None:
        self._spec = spec
        self._sink = sink
        self._loop = asyncio.get_running_loop()
        self._timing = bool(getattr(sink, "timing", True))
        if spec.timeout is not None and self.timeout_batches_of_one:
            self._depth = 1
            for s in self._slots:
                s.limit = 1
        blob = pickle_function(spec)
        await self._start_slots(blob)
        self._cap_total = self._n * self._depth * MAX_BATCH
        self._started = True

    def capacity(self) -> int:
        cap = self._cap_total - self._held
        return cap if cap > 0 else 0

    def submit_one(self, attempt: Attempt) -> None:
        if self._held >= self._cap_total:
            raise RuntimeError(f"submit_one() with capacity {self.capacity()}")
        self._held += 1
        self._submitted += 1
        if attempt.worker is None:
            self._queue.append(attempt)
        else:
            self._slots[attempt.worker].own.append(attempt)
        if not self._scheduled and not self._closed:
            self._scheduled = True
            self._loop.call_soon(self._dispatch)

    def submit(self, attempts: Sequence[Attempt]) -> None:
        n = len(attempts)
        if self._held + n > self._cap_total:
            raise RuntimeError(f"submit() got {n} attempts with capacity {self.capacity()}")
        self._held += n
        self._submitted += n
        for a in attempts:
            if a.worker is None:
                self._queue.append(a)
            else:
                self._slots[a.worker].own.append(a)
        self._schedule()

    def _schedule(self) -> None:
        if not self._scheduled and not self._closed:
            self._scheduled = True
            self._loop.call_soon(self._dispatch)

    # --- deciding: which attempts go where -------------------------------------------------------

    def _dispatch(self) -> None:
        self._scheduled = False
        if self._closed:
            return
        if self._suspects:
            self._dispatch_suspects()
            return
        depth = self._depth
        slots = [s for s in self._slots if s.ready and not s.dead and len(s.calls) < depth]
        if not slots:
            self._fail_orphans()
            return
        openings = sum(depth - len(s.calls) for s in slots)
        queue = self._queue
        for level in range(depth):  # idle slots first, then a second call for each
            for s in slots:
                if len(s.calls) != level:
                    continue
                share = -(-len(queue) // openings) if queue else 0
                openings -= 1
                batch = self._take(s, share)
                if batch:
                    self._launch(s, batch)
        if self._queue or any(s.own for s in self._slots):
            self._fail_orphans()

    def _dispatch_suspects(self) -> None:
        """Quarantine: each suspect runs alone (see ``blame_scope``) until it is cleared or blamed.

        Normal attempts wait meanwhile; suspects appear only after a worker died.
        """
        suspects = self._suspects
        if self.blame_scope == "stage" and any(s.calls for s in self._slots):
            return  # wait until every outstanding call of the stage has ended
        for s in self._slots:
            if not s.ready or s.dead or s.calls:
                continue
            a = _pop_first(s.own, suspects) or _pop_first(self._queue, suspects)
            if a is None:
                continue
            self._launch(s, [a], solo=True)
            if self.blame_scope == "stage":
                return
        if any(s.calls for s in self._slots):
            return
        queued = any(id(a) in suspects for a in self._queue) or any(
            id(a) in suspects for s in self._slots for a in s.own
       )
        if not queued:
            suspects.clear()  # every suspect was reported: back to normal
            self._schedule()

    def _take(self, s: _Slot, share: int) -> list[Attempt]:
        """Up to the slot's limit: its own attempts, then ``share`` from the shared queue."""
        own, limit = s.own, s.limit
        if self.max_call_bytes is not None and self._item_bytes > 0:
            limit = max(1, min(limit, int(self.max_call_bytes // self._item_bytes)))
        batch = [own.popleft() for _ in range(min(limit, len(own)))]
        queue = self._queue
        for _ in range(min(limit - len(batch), share, len(queue))):
            batch.append(queue.popleft())
        return batch

    def _fail_orphans(self) -> None:
        """Attempts that no live slot can ever run (their slot could not be restarted)."""
        if not any(s.dead for s in self._slots):
            return
        orphans: list[Attempt] = []
        for s in self._slots:
            if s.dead and s.own:
                orphans.extend(s.own)
                s.own.clear()
        if all(s.dead for s in self._slots) and self._queue:
            orphans.extend(self._queue)
            self._queue.clear()
        for a in orphans:
            which = "no worker of the stage" if a.worker is None else f"its worker {a.worker}"
            self._report_error(a, WorkerDied(f"stage {self._spec.name!r}: {which} could not be restarted"))

    def _launch(self, s: _Slot, batch: list[Attempt], solo: bool = False) -> None:
        payloads: list[bytes] = []
        good: list[Attempt] = []
        for a in batch:
            try:
                payloads.append(dumps(a.item))
            except Exception as exc:  # an item that cannot be pickled fails alone
                self._report_error(a, exc)
                continue
            good.append(a)
        if not good:
            return
        if self.max_call_bytes is not None:
            per_item = sum(map(len, payloads)) / len(payloads)
            ib = self._item_bytes
            self._item_bytes = per_item if ib == 0.0 else (1 - SERVICE_EWMA) * ib + SERVICE_EWMA * per_item
        self._seq += 1
        call = Call(s.index, good, self._seq, 0)
        call.solo = solo
        try:
            handle = self._send(call, payloads)
        except Exception as exc:  # the engine refused the call (e.g. its client is closed)
            s.calls.append(call)
            self._call_failed(call, exc)
            return
        s.calls.append(call)
        self._calls_sent += 1
        if s.calls[0] is call:
            self._arm(call)
        call.task = self._loop.create_task(self._await(call, handle), name=f"pypline-{self._spec.name}-call")
        self._tasks.add(call.task)
        call.task.add_done_callback(self._tasks.discard)

    def _arm(self, call: Call) -> None:
        """``call`` is now its slot's oldest: it runs, so its clock starts."""
        if call.timer is None and not call.settled:
            deadline = self._deadline(call)
            if deadline is not None:
                call.timer = self._loop.call_later(deadline, self._expired, call, deadline)

    # --- acting on what comes back ------------------------------------------------------------

    async def _await(self, call: Call, handle: Awaitable[Any]) -> None:
        try:
            result = await handle
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # noqa: BLE001 - the call failed as a whole: classify it
            if not call.settled and not self._closed:
                self._call_failed(call, exc)
            return
        if call.settled or self._closed:
            return
        try:
            outcomes, spent, durations = result
            if len(outcomes) != len(call.attempts):
                raise ValueError(f"{len(outcomes)} outcomes for {len(call.attempts)} attempts")
        except Exception as exc:  # noqa: BLE001 - not what run_batch returns: the call failed
            self._call_failed(call, exc)
            return
        await self._call_returned(call, outcomes, spent, durations)

    def _retire(self, call: Call) -> None:
        """``call`` no longer runs anywhere: take it off its slot, start the next one's clock."""
        call.returned = True
        if call.timer is not None:
            call.timer.cancel()
            call.timer = None
        s = self._slots[call.slot]
        try:
            s.calls.remove(call)
        except ValueError:
            pass
        if s.calls:
            self._arm(s.calls[0])
        self._schedule()

    async def _call_returned(
        self, call: Call, outcomes: list[Any], spent: float, durations: list[float] | None
   ) -> None:
        self._release(call)
        self._retire(call)
        s = self._slots[call.slot]
        k = len(call.attempts)
        self._busy += spent
        per_item = spent / k if k else 0.0
        s.ewma = per_item if s.ewma == 0.0 else (1 - SERVICE_EWMA) * s.ewma + SERVICE_EWMA * per_item
        if self._spec.timeout is None or not self.timeout_batches_of_one:
            s.limit = max(1, min(MAX_BATCH, int(self.target_call_s / s.ewma) if s.ewma > 0 else MAX_BATCH))
        if durations is not None:
            self._sample(durations)
        call.settled = True
        sink = self._sink
        for a, outcome in zip(call.attempts, outcomes):
            if self._closed:
                return
            if self._suspects:
                self._suspects.discard(id(a))
            code = outcome[0]
            if code == OK:
                try:
                    value = pickle.loads(outcome[1])
                except Exception as exc:  # noqa: BLE001 - a result that cannot be unpickled here fails its item
                    self._report_error(a, exc)
                    continue
                self._held -= 1
                self._completed += 1
                sink.ok(a, value)
            elif code == GEN:
                try:
                    values = pickle.loads(outcome[1])
                except Exception as exc:  # noqa: BLE001
                    self._report_error(a, exc)
                    continue
                for v in values:
                    await sink.emit(a, v)
                    if self._closed:
                        return
                self._held -= 1
                self._completed += 1
                sink.ok(a, None)
            else:
                self._report_error(a, decode_error(outcome))

    def _sample(self, durations: list[float]) -> None:
        """Keep one attempt duration in LATENCY_SAMPLE_EVERY, counting across calls."""
        i = self._countdown - 1
        n = len(durations)
        while i < n:
            self._latencies.append(durations[i])
            i += LATENCY_SAMPLE_EVERY
        self._countdown = i - n + 1

    def _report_error(self, a: Attempt, exc: BaseException) -> None:
        self._suspects.discard(id(a))
        self._held -= 1
        self._completed += 1
        self._sink.error(a, exc)

    def _requeue(self, attempts: list[Attempt], alone: bool = False) -> None:
        """Attempts that did not run (or must run again alone): back to the front, uncounted."""
        for a in reversed(attempts):
            if alone:
                self._suspects.add(id(a))
            if a.worker is None:
                self._queue.appendleft(a)
            else:
                self._slots[a.worker].own.appendleft(a)
        self._schedule()

    def _call_failed(self, call: Call, exc: BaseException) -> None:
        kind, detail = self._verdict(call, exc)
        s = self._slots[call.slot]
        running = bool(s.calls) and s.calls[0] is call
        log.debug("stage %r: %r failed (%s, running=%s): %r", self._spec.name, call, kind, running, exc)
        if kind == IGNORE:
            return
        doomed = running and kind in (DIED, LOST)
        behind = [c for c in s.calls if c is not call and not c.settled] if doomed else []
        self._retire(call)
        call.settled = True
        if not running:  # it was queued behind another call that failed: it never ran
            self._requeue(call.attempts)
            return
        for c in behind:  # queued behind this one: never ran
            c.settled = True
            self._retire(c)
        if behind:
            self._abandon(behind, "queued behind a failed call")
            self._requeue([a for c in behind for a in c.attempts], alone=kind == DIED and not call.solo)
        if kind == DIED:
            self._repair(call.slot, str(detail))
            if call.solo:  # it ran alone: it is what the worker died of (or was with it)
                self._report_error(call.attempts[0], WorkerDied(str(detail)))
            else:
                log.info(
                    "stage %r: a worker died with %d attempt(s) of this stage; re-running each alone to find the cause",
                    self._spec.name,
                    len(call.attempts),
               )
                self._requeue(call.attempts, alone=True)
        elif kind == LOST:
            self._repair(call.slot, f"lost: {detail}")
            for a in call.attempts:
                self._suspects.discard(id(a))
                self._held -= 1
                self._completed += 1
                self._sink.lost(a, str(detail))
        else:
            for a in call.attempts:
                self._report_error(a, detail if isinstance(detail, BaseException) else exc)

    def _expired(self, call: Call, deadline: float) -> None:
        call.timer = None
        if call.settled or call.returned or self._closed:
            return
        s = self._slots[call.slot]
        behind = [c for c in s.calls if c is not call and not c.settled]
        call.settled = True
        self._retire(call)
        for c in behind:
            c.settled = True
            self._retire(c)
        self._abandon([call, *behind], "timed out")
        if behind:
            self._requeue([a for c in behind for a in c.attempts])
        for a in call.attempts:
            self._report_error(a, self._timeout_error(call, a, deadline))

    def _timeout_error(self, call: Call, a: Attempt, waited: float) -> TimeoutError:
        return TimeoutError(f"attempt {a.number} of stage {self._spec.name!r} timed out after {waited:g} s")

    # --- closing and statistics -------------------------------------------------------------------

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        for s in self._slots:
            for c in s.calls:
                if c.timer is not None:
                    c.timer.cancel()
                    c.timer = None
        tasks = list(self._tasks)
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks.clear()
        await self._stop_slots()

    def _spawn(self, coro: Awaitable[Any], name: str) -> asyncio.Task[Any]:
        """A background task of this executor, cancelled by ``aclose``."""
        task: asyncio.Task[Any] = self._loop.create_task(coro, name=name)  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _details(self) -> dict[str, Any]:
        return {}

    def statistics(self) -> ExecutorStatistics:
        lat = tuple(self._latencies)
        calls = sum(len(s.calls) for s in self._slots)
        return ExecutorStatistics(
            backend=self.backend_name,
            workers=self._n,
            capacity=self.capacity(),
            submitted=self._submitted,
            completed=self._completed,
            workers_replaced=self._replaced,
            running=sum(1 for s in self._slots if s.calls) if not self._closed else 0,
            busy_seconds=self._busy,
            latencies=lat,
            details={
                "calls_in_flight": calls,
                "calls_sent": self._calls_sent,
                "batch_limits": [s.limit for s in self._slots],
                **self._details(),
            },
       )
