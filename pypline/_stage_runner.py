"""A stage at run time: its queue, its executor, and what happens to each outcome.

::

    upstream ── push(env) ──► [held ≤ buffer + num_workers] ── _dispatch ──► executor.submit
                                                                               │
       next stage / collector ◄── _forward ◄── ok / error / lost / emit ◄─────┘
                    │ full?                          │
                    └── park, stop dispatching ──────┘   (woken when it drains to half)

Everything here is synchronous bookkeeping ("decide"): the executor acts. A
failed attempt is retried (after its backoff, without holding a worker) while
attempts remain and the error matches ``retry_on``; a lost one is re-dispatched
without using up an attempt until ``max_lost``; fork mode gathers one result per
worker and merges them; a flat-map stage's yielded values travel on as new
envelopes while the parent stays accountable until its generator ends.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import TYPE_CHECKING, Any, Callable, Protocol, Sequence

from ._errors import ItemFailure, StageCancelled, WorkerLost, is_cancellation
from ._retry import RetryPolicy
from .executor import Attempt, Executor, ExecutorStatistics, OutcomeSink
from .util import Result

if TYPE_CHECKING:
    from ._stage import StageSpec

#: Longest message kept per earlier attempt in ``ItemFailure.history``.
HISTORY_MESSAGE = 200


class RunSide(Protocol):
    """What a stage runner needs from the run it belongs to (``Run`` implements it).

    ``item_failed(env, failure)``: the item in ``env`` failed for good in this stage.
    ``drop(src)``: one envelope of source item ``src`` left the pipeline (delivered,
    filtered out or failed). ``refill_inline()``: at the end of a batch report, pull the
    next run of a sync source now (see ``Run.refill_inline``). ``reporting`` is True while
    a batch report runs, ``refill_due`` once such a report returned enough permits;
    ``stopping`` once the run is stopping; ``max_lost`` the ``configure(max_lost=...)`` in force;
    ``sync_it`` the sync source being pulled (None otherwise); ``timing`` whether attempts are
    timed for statistics; ``loop`` the run's event loop.
    """

    loop: asyncio.AbstractEventLoop
    timing: bool
    stopping: bool
    reporting: bool
    refill_due: bool
    sync_it: Any
    max_lost: int

    def item_failed(self, env: Envelope, failure: ItemFailure) -> None: ...

    def drop(self, src: Envelope) -> None: ...

    def refill_inline(self) -> None: ...

__all__ = ["StageRunner"]



class _Try(Attempt):
    """An attempt as the engine tracks it: its item's job in this stage, whether its
    outcome is in, and the stage that handed it out (a stale report from an earlier
    stage, or a late one for a settled attempt, is recognised and ignored)."""

    __slots__ = ("_job", "_settled", "_owner")

    def __init__(self, item: Any, worker: int | None, number: int, lost: int, job: Any, owner: Any) -> None:
        self.item = item
        self.worker = worker
        self.number = number
        self.lost = lost
        self._job = job
        self._settled = False
        self._owner = owner


class Envelope(_Try):
    """An item travelling through the stages.

    In a plain stage the envelope is also its own first ``Attempt`` (no allocation
    per item and stage); ``_owner`` names the stage it was last handed to, so a
    stale report from an earlier stage can never be taken for a current one.
    The *root* envelope of a source item (``src is self``) also keeps that item's
    counters: descendants still travelling, results not yet taken, and the
    ordered stream's bucket of finished results.
    """

    # "key" (root only, journaled runs): the item's journal key, None once the item failed.
    # Set by the pump only when the run has a journal; nothing else reads it.
    __slots__ = ("src", "path", "index", "live", "pending", "bucket", "key")
    key: str | None  # not set in __init__: only a journaled run's pump sets (and reads) it

    def __init__(self, src: Envelope | None, path: tuple[int, ...], value: Any, index: int = -1) -> None:
        self.item = value
        self.worker = None
        self.number = 1  # an envelope is always a first attempt (retries are new Attempts)
        self.lost = 0
        self._job = self  # in a plain stage the envelope is its own job (cleared by _run._retire)
        self._settled = True
        self._owner = None
        self.src = self if src is None else src
        self.path = path
        self.index = index
        self.live = 1  # (root only) envelopes of this source item in the pipeline
        self.pending = 0  # (root only) results in the stream's ready queue, not yet taken
        self.bucket: list[tuple[tuple[int, ...], Result[Any, ItemFailure]]] | None = None


class _Job:
    """One item in one stage: counters that outlive a single attempt."""

    __slots__ = ("env", "remaining", "results", "partials", "failed", "lost", "agents", "emitted")

    def __init__(self, env: Envelope) -> None:
        self.env = env
        self.remaining = 0
        self.results: list[Any] | None = None
        self.partials: list[list[Any]] | None = None
        self.failed = False
        self.lost = 0
        self.agents: list[str] | None = None
        self.emitted = 0


class Inbox:
    """What a producer sees of the next hop: room, push, wait-for-room, end of input.

    ``held < limit`` means there is room; producers on the hot path read the two
    attributes instead of calling ``has_space()``.
    """

    __slots__ = ()
    held: int
    limit: int

    def has_space(self) -> bool:
        return self.held < self.limit

    def push(self, env: Envelope) -> None:
        raise NotImplementedError

    def push_many(self, envs: list[Envelope]) -> None:
        """Push several envelopes (at most ``limit - held``), in order."""
        for env in envs:
            self.push(env)

    def add_space_listener(self, callback: Callable[[], None], inline: bool = False) -> None:
        """Call ``callback`` once there is room again: on the next loop tick, or at once
        (``inline``) for a callback that only wakes a waiter and never pushes."""
        raise NotImplementedError

    def flush(self) -> None:
        """The producer's burst is over (see ``Executor.flush``)."""

    def close_input(self) -> None:
        raise NotImplementedError


async def wait_for_space(loop: asyncio.AbstractEventLoop, inbox: Inbox) -> None:
    while not inbox.has_space():
        fut: asyncio.Future[None] = loop.create_future()
        inbox.add_space_listener(lambda: _resolve(fut))
        await fut


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


class StageRunner(Inbox, OutcomeSink):
    """One stage's bookkeeping. Synchronous methods decide; the executor acts.

    In plain pool mode (no fork, no generator) an attempt's job is the envelope
    itself; fork and flat-map stages keep a ``_Job`` per item for their counters.
    """

    # Slots, not a __dict__: past ~30 attributes CPython stops inlining instance
    # attributes and every access on the hot path gets slower.
    __slots__ = (
        "run",
        "loop",
        "spec",
        "name",
        "ex",
        "down",
        "inbox",
        "ready",
        "parked",
        "held",
        "pushed",
        "queue_max",
        "times_full",
        "failed",
        "outputs",
        "retried",
        "lost_count",
        "limit",
        "timers",
        "listeners",
        "emit_waiters",
        "lost_info",
        "history",
        "retry_errors",
        "waiting_space",
        "upstream_done",
        "finished",
        "stopping",
        "low_water",
        "fork",
        "n",
        "flat",
        "plain",
        "gen_workers",
        "retries",
        "retry_on",
        "policy",
        "timing",
        "closing_stats",
    )

    def __init__(self, run: RunSide, spec: StageSpec, executor: Executor, down: Inbox) -> None:
        self.run = run
        self.loop = run.loop
        self.spec = spec
        self.name = spec.name
        self.ex = executor
        self.down = down
        self.inbox: deque[Envelope] = deque()
        self.ready: deque[Attempt] = deque()  # retries, re-dispatches, fork attempts
        self.parked: deque[Envelope] = deque()  # finished, waiting for room downstream
        # Items in this stage: inbox + with the executor + retrying + parked. At most
        # buffer + num_workers, so an executor may hold queued items itself (the
        # asyncio backend does): its queue and the inbox are one input queue.
        self.held = 0  # items in the stage now
        self.pushed = 0  # items received (monotonic); those that left = pushed - held
        self.queue_max = 0
        self.times_full = 0
        self.failed = 0
        self.outputs = 0  # flat map: values yielded
        self.retried = 0
        self.lost_count = 0
        self.limit = spec.buffer + spec.num_workers
        self.timers: set[asyncio.TimerHandle] = set()
        self.listeners: list[tuple[Callable[[], None], bool]] = []
        self.emit_waiters: list[asyncio.Future[None]] = []
        self.lost_info: dict[Any, list[str]] = {}  # job -> agents it was lost with
        self.history: dict[Any, list[tuple[str, str]]] = {}  # job -> how its earlier attempts failed
        self.retry_errors: dict[str, int] = {}  # retries, by the exception type that caused them
        self.waiting_space = False
        self.upstream_done = False
        self.finished = False
        self.stopping = False
        # Producers waiting for room are woken when the stage is half empty, so
        # items move between stages in batches rather than one wake-up per item.
        self.low_water = self.limit // 2
        self.fork = spec.fork_merge
        self.n = spec.num_workers
        self.flat = spec.fork_merge is None and spec.workers[0].kind.is_generator
        self.plain = spec.fork_merge is None and not self.flat
        self.gen_workers = [w.kind.is_generator for w in spec.workers]
        self.retries = spec.retries
        self.retry_on = spec.retry_on
        self.policy = RetryPolicy(spec.retries, spec.retry_on, spec.backoff, spec.max_backoff)
        self.timing = run.timing
        self.closing_stats: ExecutorStatistics | None = None  # taken just before the executor closes

    # --- the inbox, as the upstream hop sees it ------------------------------------------

    def push(self, env: Envelope) -> None:
        self.pushed += 1
        self.held += 1
        if self.plain and not (self.inbox or self.parked or self.ready or self.stopping):
            ex = self.ex
            if ex.capacity() > 0:  # the hot path: straight to the executor
                env._settled, env._owner = False, self
                ex.submit_one(env)
                return
        self.inbox.append(env)
        self._dispatch()

    def push_many(self, envs: list[Envelope]) -> None:
        n = len(envs)
        self.pushed += n
        self.held += n
        if self.plain and not (self.inbox or self.parked or self.ready or self.stopping):
            ex = self.ex
            if ex.capacity() >= n:  # the hot path: the whole run straight to the executor
                for env in envs:
                    env._settled, env._owner = False, self
                ex.submit(envs)
                return
        self.inbox.extend(envs)
        self._dispatch()

    def flush(self) -> None:
        self.ex.flush()

    def add_space_listener(self, callback: Callable[[], None], inline: bool = False) -> None:
        self.times_full += 1
        self.queue_max = self.limit
        self.listeners.append((callback, inline))

    def close_input(self) -> None:
        self.upstream_done = True
        self._check_done()

    # --- deciding ----------------------------------------------------------------------------

    def _dispatch(self) -> None:
        """Move work into the executor as far as its capacity allows."""
        if self.parked or self.stopping:
            return
        ex = self.ex
        cap = ex.capacity()
        if cap <= 0:
            return
        inbox = self.inbox
        if self.plain and not self.ready:
            if not inbox:
                return
            if cap == 1 or len(inbox) == 1:  # the hot path: one slot just came free
                env = inbox.popleft()
                env._settled, env._owner = False, self
                ex.submit((env,))
            else:
                k = min(cap, len(inbox))
                envs = [inbox.popleft() for _ in range(k)]
                for e in envs:
                    e._settled, e._owner = False, self
                ex.submit(envs)
        else:
            self._dispatch_general(cap)

    def _left(self) -> None:
        """An item left this stage (forwarded, failed or replaced by its flat-map outputs)."""
        self.held -= 1
        if self.listeners and self.held <= self.low_water:
            self._notify_producers()

    def _notify_producers(self) -> None:
        listeners, self.listeners = self.listeners, []
        for cb, inline in listeners:
            if inline:
                cb()
            else:
                self.loop.call_soon(cb)

    def _dispatch_general(self, cap: int) -> None:
        ready, inbox = self.ready, self.inbox
        batch: list[Attempt] = []
        while cap > 0:
            if ready:
                batch.append(ready.popleft())
                cap -= 1
            elif inbox:
                env = inbox.popleft()
                if self.plain:
                    env._settled, env._owner = False, self
                    batch.append(env)
                    cap -= 1
                    continue
                job = _Job(env)
                if self.fork is None:
                    batch.append(_Try(env.item, None, 1, 0, job, self))
                    cap -= 1
                else:
                    job.remaining = self.n
                    job.results = [None] * self.n
                    if any(self.gen_workers):
                        job.partials = [[] for _ in range(self.n)]
                    ready.extend(_Try(env.item, i, 1, 0, job, self) for i in range(self.n))
            else:
                break
        if batch:
            self.ex.submit(batch)

    def _check_done(self) -> None:
        if (
            self.upstream_done and not self.finished and self.held == 0  # nothing queued, running, retrying or parked
        ):
            self.finished = True
            self.down.close_input()

    def _env(self, job: Any) -> Envelope:
        env: Envelope = job if self.plain else job.env
        return env

    def _forward(self, env: Envelope) -> None:
        if not self.parked and self.down.has_space():
            self.down.push(env)
            self._left()
        else:
            self.parked.append(env)
            self._listen_downstream()

    def _listen_downstream(self) -> None:
        if not self.waiting_space:
            self.waiting_space = True
            self.down.add_space_listener(self._on_down_space)

    def _on_down_space(self) -> None:
        self.waiting_space = False
        if self.stopping:
            return
        parked, down = self.parked, self.down
        while parked and down.has_space():
            down.push(parked.popleft())
            self._left()
        if parked or (self.emit_waiters and not down.has_space()):
            self._listen_downstream()
            return
        waiters, self.emit_waiters = self.emit_waiters, []
        for w in waiters:
            if not w.done():
                w.set_result(None)
        self._dispatch()
        self._check_done()

    def _finish(self, job: Any) -> None:
        """An item left this stage (forwarded, filtered or failed): make room for the next."""
        if self.lost_info:
            self.lost_info.pop(job, None)
        if self.history:
            self.history.pop(job, None)
        self._dispatch()
        if self.upstream_done:
            self._check_done()

    def _fail(self, job: Any, attempt: _Try, exc: BaseException) -> None:
        if not self.plain:
            job.failed = True
        env = self._env(job)
        self.failed += 1
        history = tuple(self.history.pop(job, ())) if self.history else ()
        failure = ItemFailure(env.src.index, self.name, attempt.item, exc, attempt.number, self.retries, history)
        self.run.item_failed(env, failure)
        self._left()
        self._finish(job)

    def _retry(self, attempt: _Try, number: int, delay: float) -> None:
        self.retried += 1
        again = _Try(attempt.item, attempt.worker, number, attempt.lost, attempt._job, self)
        if delay > 0:
            handles: list[asyncio.TimerHandle] = []

            def due() -> None:
                self.timers.discard(handles[0])
                self.ready.append(again)
                self._dispatch()

            handles.append(self.loop.call_later(delay, due))
            self.timers.add(handles[0])
        else:
            self.ready.appendleft(again)
        self._dispatch()

    # --- the sink, as the executor sees it ---------------------------------------------------

    def ok(self, attempt: _Try, value: Any) -> None:  # type: ignore[override]  # only its own _Try come back
        if attempt._settled or attempt._owner is not self:
            return
        attempt._settled = True
        job = attempt._job
        if self.plain:  # the hot path, inlined: forward, then take the next item
            job.item = value
            down = self.down
            if not self.parked and down.held < down.limit:
                down.push(job)
                self.held -= 1
                if self.listeners and self.held <= self.low_water:
                    self._notify_producers()
            else:
                self.parked.append(job)
                self._listen_downstream()
            if self.lost_info:
                self.lost_info.pop(job, None)
            if self.history:
                self.history.pop(job, None)
            inbox = self.inbox
            if inbox and not self.parked and not self.stopping and not self.ready and self.ex.capacity() > 0:
                env = inbox.popleft()
                env._settled, env._owner = False, self
                self.ex.submit_one(env)
            elif self.ready:
                self._dispatch()
            if self.upstream_done:
                self._check_done()
            return
        if job.failed:
            self._dispatch()
            return
        if self.fork is not None:
            w = attempt.worker
            assert w is not None and job.results is not None
            job.results[w] = job.partials[w] if (job.partials is not None and self.gen_workers[w]) else value
            job.remaining -= 1
            if job.remaining:
                self._dispatch()
                return
            try:
                merged = self.fork(job.results)
            except Exception as exc:  # the merge function failed: the item fails, not retried
                self._fail(job, attempt, exc)
                return
            job.env.item = merged
            self._forward(job.env)
        else:  # flat map: the parent is replaced by what it yielded
            self.run.drop(job.env.src)
            self._left()
        self._finish(job)

    def ok_many(self, attempts: Sequence[_Try], values: Sequence[Any]) -> None:  # type: ignore[override]
        if not self.plain:
            for a, v in zip(attempts, values):
                self.ok(a, v)
            return
        run = self.run
        if run.reporting or run.sync_it is None:
            self._ok_many(attempts, values)
            return
        # The outermost batch report while a sync source feeds the run: the permits it
        # returns refill the first stage at its end, inline (Run.refill_inline).
        run.reporting = True
        try:
            self._ok_many(attempts, values)
        finally:
            run.reporting = False
            if run.refill_due:
                run.refill_inline()

    def _ok_many(self, attempts: Sequence[_Try], values: Sequence[Any]) -> None:
        done: list[Envelope] = []
        for a, v in zip(attempts, values):
            if a._settled or a._owner is not self:
                continue
            a._settled = True
            env: Envelope = a._job
            env.item = v
            done.append(env)
        if not done:
            return
        if self.lost_info:
            for env in done:
                self.lost_info.pop(env, None)
        if self.history:
            for env in done:
                self.history.pop(env, None)
        down = self.down
        room = 0 if self.parked else down.limit - down.held
        if room >= len(done):
            down.push_many(done)
            self.held -= len(done)
        else:
            if room > 0:
                down.push_many(done[:room])
                self.held -= room
            self.parked.extend(done[max(room, 0) :])
            self._listen_downstream()
        if self.listeners and self.held <= self.low_water:
            self._notify_producers()
        self._dispatch()
        if self.upstream_done:
            self._check_done()

    def error(self, attempt: _Try, exc: BaseException) -> None:  # type: ignore[override]
        if attempt._settled or attempt._owner is not self:
            return
        attempt._settled = True
        if is_cancellation(exc):  # the stage's own code was cancelled, not the run: an item error
            cancelled, exc = exc, StageCancelled(self.name)
            exc.__cause__ = cancelled
        job = attempt._job
        if not self.plain:
            if job.failed:
                self._dispatch()
                return
            if job.emitted:  # outputs already passed on are never taken back: no retry
                self._fail(job, attempt, exc)
                return
        delay = self.policy.decide(attempt.number, exc)
        if delay is None:
            self._fail(job, attempt, exc)
            return
        if self.stopping:
            # It would have been retried, but the run is stopping (fail_fast): the item was
            # interrupted, not failed. It stays unfinished and is counted in PipelineError.cancelled.
            return
        if not self.plain and job.partials is not None:
            job.partials[attempt.worker] = []
        kind = type(exc).__name__
        self.retry_errors[kind] = self.retry_errors.get(kind, 0) + 1
        self.history.setdefault(job, []).append((kind, str(exc)[:HISTORY_MESSAGE]))
        self._retry(attempt, attempt.number + 1, delay)

    def lost(self, attempt: _Try, where: str) -> None:  # type: ignore[override]
        if attempt._settled or attempt._owner is not self:
            return
        attempt._settled = True
        job = attempt._job
        if not self.plain and job.failed:
            self._dispatch()
            return
        self.lost_count += 1
        agents = self.lost_info.setdefault(job, [])
        agents.append(where)
        emitted = 0 if self.plain else job.emitted
        max_lost = self.run.max_lost
        if len(agents) > max_lost or emitted:
            why = (
                f"lost after yielding {emitted} output(s); not re-run to avoid duplicates"
                if emitted
                else f"lost with its worker {len(agents)} times (max_lost={max_lost})"
            )
            names = tuple(dict.fromkeys(agents))
            self._fail(job, attempt, WorkerLost(f"item {why}; agents: {', '.join(names)}", agents=names))
            return
        if not self.plain and job.partials is not None:
            job.partials[attempt.worker] = []
        # Not the item's fault: same attempt number, front of the queue.
        self.ready.appendleft(_Try(attempt.item, attempt.worker, attempt.number, len(agents), job, self))
        self._dispatch()

    async def emit(self, attempt: _Try, value: Any) -> None:  # type: ignore[override]
        if attempt._settled or attempt._owner is not self or self.plain:
            return
        job: _Job = attempt._job
        if job.failed or self.stopping:
            return
        if job.partials is not None and attempt.worker is not None:
            job.partials[attempt.worker].append(value)
            return
        env = job.env
        src = env.src
        child = Envelope(src, env.path + (job.emitted,), value)
        self.outputs += 1
        job.emitted += 1
        src.live += 1
        while self.parked or not self.down.has_space():
            fut: asyncio.Future[None] = self.loop.create_future()
            self.emit_waiters.append(fut)
            self._listen_downstream()
            await fut
            if self.stopping:
                return
        self.down.push(child)

    def capacity_changed(self) -> None:
        self._dispatch()

    def stop(self) -> None:
        self.stopping = True
        for t in self.timers:
            t.cancel()
        self.timers.clear()
        # Generators blocked on room downstream return now (emit sees stopping).
        waiters, self.emit_waiters = self.emit_waiters, []
        for w in waiters:
            if not w.done():
                w.set_result(None)
