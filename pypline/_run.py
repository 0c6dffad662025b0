"""One run of a pipeline: how an item travels from the source to the caller.

::

    source ─pump─► [inbox 0 ≤ buffer] ─dispatch─► executor 0 ─ok/error/lost─► forward ─► [inbox 1] ─► ...
      ▲                                                                                          │
      │                                                                       collector ◄────────┘
      │                                                                  run(): result list
      │                                                                  stream(): ready queue ─► consumer
      └──────── permits: the §2.6 bound, released when a source item is fully delivered ◄─────────┘

Actors:

- The **pump** (the only engine task) takes a permit, pulls ONE item from the source
  and pushes it into stage 0's inbox, waiting while the inbox is full. Permits
  number ``sum(buffer + workers) + stages + 1``, so the bound holds by construction
  wherever items are (queued, in flight at an agent, retrying, waiting in the
  reorder window or for a slow ``stream()`` consumer).
- A **StageRunner** per stage is plain synchronous bookkeeping: ``_dispatch`` moves
  items from its inbox into the executor as far as ``capacity()`` allows; the
  executor's reports (``ok``/``error``/``lost``/``emit``) decide retry, failure or
  forwarding into the next inbox. When the next inbox is full, finished items are
  *parked* and no new work is dispatched until it drains: backpressure with no
  task, future or lock per item. Producers waiting for room are woken when an inbox
  drains to half its capacity, so items move between stages in batches.
- The **collector** at the end counts each source item's live descendants (a
  flat-map stage may turn one item into many); when none is left the item is
  delivered and its permit goes back to the pump.

Nothing here awaits per item: the hot path is a few method calls, which is what
makes pypline faster than a hand-written ``asyncio.Queue`` chain.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from operator import itemgetter
from collections import deque
from typing import TYPE_CHECKING, Any, AsyncIterator, Callable, Iterable, Iterator, TextIO

from ._config import current_settings, effective_agents
from ._errors import ItemFailure, PipelineError, StageStartError, WorkerLost
from ._registry import load_backend
from ._progress import REFRESH_SECONDS, ProgressRenderer
from ._stats import RunStatistics, StageStatistics, bottleneck, percentile
from .executor import Attempt, Backend, Executor, ExecutorStatistics, OutcomeSink
from .util import Err, Ok, Result

if TYPE_CHECKING:
    from ._stage import Stage, StageSpec

__all__ = ["Run", "admission_bound"]

SOURCE_STAGE = "<source>"

log = logging.getLogger("pypline.engine")

# Backoff jitter: each sleep is the nominal ``backoff * 2**(attempt-1)`` plus up to
# this fraction more, so retries of many items that failed together spread out
# without ever sleeping less than the documented delay.
_JITTER = 0.1


def admission_bound(specs: Iterable[StageSpec]) -> int:
    """The §2.6 bound: ``sum(buffer + num_workers) + len(stages) + 1``."""
    specs = list(specs)
    return sum(s.buffer + s.num_workers for s in specs) + len(specs) + 1


def _stage_statistics(r: StageRunner, elapsed: float) -> StageStatistics:
    try:
        es = r.ex.statistics()
    except Exception:  # an executor that never started (or a broken one) must not hide the run's result
        es = ExecutorStatistics(backend=type(r.ex).__name__, workers=r.n, capacity=0, submitted=0, completed=0)
    lat = sorted(es.latencies)
    workers = r.spec.num_workers
    busy = es.busy_seconds
    succeeded = r.pushed - r.held - r.failed
    taken = r.pushed - len(r.inbox)
    return StageStatistics(
        name=r.name,
        backend=es.backend,
        kind=kinds.pop() if len(kinds := {w.kind.value for w in r.spec.workers}) == 1 else "mixed",
        workers=workers,
        buffer=r.spec.buffer,
        received=r.pushed,
        succeeded=succeeded,
        failed=r.failed,
        outputs=r.outputs if r.flat else succeeded,
        attempts=taken * (workers if r.fork is not None else 1) + r.retried + r.lost_count,
        retries=r.retried,
        lost=r.lost_count,
        workers_replaced=es.workers_replaced,
        busy_seconds=busy,
        utilisation=min(1.0, busy / (elapsed * workers)) if busy is not None else None,
        latency_mean=sum(lat) / len(lat) if lat else None,
        latency_p50=percentile(lat, 0.5),
        latency_p95=percentile(lat, 0.95),
        latency_max=lat[-1] if lat else None,
        queue_depth=r.held,
        queue_max=max(r.queue_max, r.held),
        capacity=r.limit,
        times_full=r.times_full,
        throughput=succeeded / elapsed,
    )


class _Env(Attempt):
    """An item travelling through the stages.

    In a plain stage the envelope is also its own first ``Attempt`` (no allocation
    per item and stage); ``_owner`` names the stage it was last handed to, so a
    stale report from an earlier stage can never be taken for a current one.
    The *root* envelope of a source item (``src is self``) also keeps that item's
    counters: descendants still travelling, results not yet taken, and the
    ordered stream's bucket of finished results.
    """

    __slots__ = ("src", "path", "index", "live", "pending", "bucket")

    def __init__(self, src: _Env | None, path: tuple[int, ...], value: Any, index: int = -1) -> None:
        self.item = value
        self.worker = None
        self.number = 1
        self._job = None
        self._settled = True
        self._owner = None
        self.src = self if src is None else src
        self.path = path
        self.index = index
        self.live = 1  # (root only) envelopes of this source item in the pipeline
        self.pending = 0  # (root only) results in the stream's ready queue, not yet taken
        self.bucket: list[tuple[tuple[int, ...], Result[Any]]] | None = None


class _Job:
    """One item in one stage: counters that outlive a single attempt."""

    __slots__ = ("env", "remaining", "results", "partials", "failed", "lost", "agents", "emitted")

    def __init__(self, env: _Env) -> None:
        self.env = env
        self.remaining = 0
        self.results: list[Any] | None = None
        self.partials: list[list[Any]] | None = None
        self.failed = False
        self.lost = 0
        self.agents: list[str] | None = None
        self.emitted = 0


class _Inbox:
    """What a producer sees of the next hop: room, push, wait-for-room, end of input."""

    __slots__ = ()

    def has_space(self) -> bool:
        raise NotImplementedError

    def push(self, env: _Env) -> None:
        raise NotImplementedError

    def add_space_listener(self, callback: Callable[[], None]) -> None:
        raise NotImplementedError

    def close_input(self) -> None:
        raise NotImplementedError


async def _wait_for_space(loop: asyncio.AbstractEventLoop, inbox: _Inbox) -> None:
    while not inbox.has_space():
        fut: asyncio.Future[None] = loop.create_future()
        inbox.add_space_listener(lambda: _resolve(fut))
        await fut


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


class _Collector(_Inbox):
    """The end of the pipeline: hands outputs to the run. Always has room (permits bound it)."""

    __slots__ = ("run",)

    def __init__(self, run: Run) -> None:
        self.run = run

    def has_space(self) -> bool:
        return True

    def push(self, env: _Env) -> None:
        run = self.run
        if run.streaming:
            run._deliver(env)
            return
        src = env.src  # run(): the hot path, inlined
        run.outputs.append((src.index, env.path, env.item) if run.ordered else env.item)
        src.live -= 1
        if not src.live:
            run._release()

    def add_space_listener(self, callback: Callable[[], None]) -> None:  # pragma: no cover - never full
        self.run.loop.call_soon(callback)

    def close_input(self) -> None:
        self.run._all_done()


class StageRunner(_Inbox, OutcomeSink):
    """One stage's bookkeeping. Synchronous methods decide; the executor acts.

    In plain pool mode (no fork, no generator) an attempt's job is the envelope
    itself; fork and flat-map stages keep a ``_Job`` per item for their counters.
    """

    # Slots, not a __dict__: past ~30 attributes CPython stops inlining instance
    # attributes and every access on the hot path gets slower.
    __slots__ = (
        "run", "loop", "spec", "name", "ex", "down", "inbox", "ready", "parked", "held", "pushed",
        "queue_max", "times_full", "failed", "outputs", "retried", "lost_count", "limit", "timers",
        "listeners", "emit_waiters", "lost_info", "waiting_space", "upstream_done", "finished", "stopping",
        "low_water", "fork", "n", "flat", "plain", "gen_workers", "retries", "retry_on", "timing",
    )

    def __init__(self, run: Run, spec: StageSpec, executor: Executor, down: _Inbox) -> None:
        self.run = run
        self.loop = run.loop
        self.spec = spec
        self.name = spec.name
        self.ex = executor
        self.down = down
        self.inbox: deque[_Env] = deque()
        self.ready: deque[Attempt] = deque()  # retries, re-dispatches, fork attempts
        self.parked: deque[_Env] = deque()  # finished, waiting for room downstream
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
        self.listeners: list[Callable[[], None]] = []
        self.emit_waiters: list[asyncio.Future[None]] = []
        self.lost_info: dict[Any, list[str]] = {}  # job -> agents it was lost with
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
        self.timing = run.timing

    # --- the inbox, as the upstream hop sees it ------------------------------------------

    def has_space(self) -> bool:
        return self.held < self.limit

    def push(self, env: _Env) -> None:
        self.pushed += 1
        self.held += 1
        if self.plain and not (self.inbox or self.parked or self.ready or self.stopping):
            ex = self.ex
            if ex.capacity() > 0:  # the hot path: straight to the executor
                env.number, env._job, env._settled, env._owner = 1, env, False, self
                ex.submit((env,))
                return
        self.inbox.append(env)
        self._dispatch()

    def add_space_listener(self, callback: Callable[[], None]) -> None:
        self.times_full += 1
        self.queue_max = self.limit
        self.listeners.append(callback)

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
                env.number, env._job, env._settled, env._owner = 1, env, False, self
                ex.submit((env,))
            else:
                k = min(cap, len(inbox))
                envs = [inbox.popleft() for _ in range(k)]
                for e in envs:
                    e.number, e._job, e._settled, e._owner = 1, e, False, self
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
        for cb in listeners:
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
                    env.number, env._job, env._settled, env._owner = 1, env, False, self
                    batch.append(env)
                    cap -= 1
                    continue
                job = _Job(env)
                if self.fork is None:
                    batch.append(Attempt(env.item, None, 1, job, self))
                    cap -= 1
                else:
                    job.remaining = self.n
                    job.results = [None] * self.n
                    if any(self.gen_workers):
                        job.partials = [[] for _ in range(self.n)]
                    ready.extend(Attempt(env.item, i, 1, job, self) for i in range(self.n))
            else:
                break
        if batch:
            self.ex.submit(batch)

    def _check_done(self) -> None:
        if (
            self.upstream_done
            and not self.finished
            and self.held == 0  # nothing queued, running, retrying or parked
        ):
            self.finished = True
            self.down.close_input()

    def _env(self, job: Any) -> _Env:
        env: _Env = job if self.plain else job.env
        return env

    def _forward(self, env: _Env) -> None:
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
        self._dispatch()
        if self.upstream_done:
            self._check_done()

    def _fail(self, job: Any, attempt: Attempt, exc: BaseException) -> None:
        if not self.plain:
            job.failed = True
        env = self._env(job)
        self.failed += 1
        failure = ItemFailure(env.src.index, self.name, attempt.item, exc, attempt.number, self.retries)
        self.run._item_failed(env, failure)
        self._left()
        self._finish(job)

    def _retry(self, attempt: Attempt, number: int) -> None:
        self.retried += 1
        again = Attempt(attempt.item, attempt.worker, number, attempt._job, self)
        backoff = self.spec.backoff
        if backoff > 0:
            delay = backoff * 2 ** (attempt.number - 1) * (1 + _JITTER * random.random())
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

    def ok(self, attempt: Attempt, value: Any) -> None:
        if attempt._settled or attempt._owner is not self:
            return
        attempt._settled = True
        job = attempt._job
        if self.plain:  # the hot path, inlined: forward, then take the next item
            job.item = value
            down = self.down
            if not self.parked and down.has_space():
                down.push(job)
                self.held -= 1
                if self.listeners and self.held <= self.low_water:
                    self._notify_producers()
            else:
                self.parked.append(job)
                self._listen_downstream()
            if self.lost_info:
                self.lost_info.pop(job, None)
            inbox = self.inbox
            if inbox and not self.parked and not self.stopping and not self.ready and self.ex.capacity() > 0:
                env = inbox.popleft()
                env.number, env._job, env._settled, env._owner = 1, env, False, self
                self.ex.submit((env,))
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
            self.run._drop(job.env.src)
            self._left()
        self._finish(job)

    def error(self, attempt: Attempt, exc: BaseException) -> None:
        if attempt._settled or attempt._owner is not self:
            return
        attempt._settled = True
        job = attempt._job
        if not self.plain:
            if job.failed:
                self._dispatch()
                return
            if job.emitted:  # outputs already passed on are never taken back: no retry
                self._fail(job, attempt, exc)
                return
        if attempt.number < self.retries and isinstance(exc, self.retry_on) and not self.stopping:
            if not self.plain and job.partials is not None:
                job.partials[attempt.worker] = []
            self._retry(attempt, attempt.number + 1)
        else:
            self._fail(job, attempt, exc)

    def lost(self, attempt: Attempt, where: str) -> None:
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
        self.ready.appendleft(Attempt(attempt.item, attempt.worker, attempt.number, job, self))
        self._dispatch()

    async def emit(self, attempt: Attempt, value: Any) -> None:
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
        child = _Env(src, env.path + (job.emitted,), value)
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


class Run:
    """The state of one ``run()`` / ``stream()`` call."""

    # Slots, not a __dict__: past ~30 attributes CPython stops inlining instance
    # attributes and every access on the hot path gets slower.
    __slots__ = (
        "loop", "stages", "source", "ordered", "fail_fast", "streaming", "choice", "max_lost", "agents",
        "specs", "bound", "permits", "permit_low", "pump_waiter", "stopping", "finished", "outputs",
        "failures", "cause", "source_failure", "ready", "consumer", "order", "runners", "executors",
        "backends", "pump_task", "reporter", "renderer", "on_stats", "started", "ended", "pulled", "taken",
        "failed_count", "consumer_waited", "timing",
    )

    def __init__(
        self,
        stages: tuple[Stage, ...],
        source: Any,
        *,
        ordered: bool,
        fail_fast: bool,
        streaming: bool,
        executor: str | Backend | None,
        timing: bool = True,
    ) -> None:
        self.loop = asyncio.get_running_loop()
        self.timing = timing
        self.stages = stages
        self.source = source
        self.ordered = ordered
        self.fail_fast = fail_fast
        self.streaming = streaming
        settings = current_settings()
        self.choice = executor if executor is not None else settings.backend
        self.max_lost = settings.max_lost
        self.agents = effective_agents(settings)
        self.specs = [s.spec for s in stages]
        self.bound = admission_bound(self.specs)
        self.permits = self.bound
        # Wake the pump when a quarter of the permits are back: intake in batches.
        self.permit_low = max(1, self.bound // 4)
        self.pump_waiter: asyncio.Future[None] | None = None
        self.stopping = False
        self.finished: asyncio.Future[None] = self.loop.create_future()
        self.outputs: list[Any] = []
        self.failures: list[ItemFailure] = []
        self.cause: BaseException | None = None
        self.source_failure: ItemFailure | None = None
        self.ready: deque[tuple[_Env | None, Result[Any]]] = deque()
        self.consumer: asyncio.Future[None] | None = None
        self.order: deque[_Env] = deque()
        self.runners: list[StageRunner] = []
        self.executors: list[Executor] = []
        self.backends: list[Backend] = []
        self.pump_task: asyncio.Task[None] | None = None
        self.reporter: asyncio.Task[None] | None = None
        self.renderer: ProgressRenderer | None = None
        self.on_stats: Callable[[RunStatistics], None] | None = None
        self.started = time.perf_counter()
        self.ended: float | None = None
        self.pulled = 0
        self.taken = 0
        self.failed_count = 0
        self.consumer_waited = 0

    # --- start and stop -----------------------------------------------------------------------

    def _backend_for(self, spec: StageSpec, cache: dict[Any, Backend]) -> Backend:
        if not spec.multi_proc:
            key: Any = "asyncio"
        elif self.choice is not None:
            key = self.choice
        elif self.agents:
            key = "zmq"
        else:
            key = "process"
        if key not in cache:
            if isinstance(key, Backend):
                cache[key] = key
            elif isinstance(key, str):
                cache[key] = load_backend(key)()
            else:
                raise TypeError(f"run(executor=...) takes a backend name or a pypline.executor.Backend, got {key!r}")
        return cache[key]

    async def start(self) -> bool:
        """Start every stage's executor and the pump. False if a stage could not start."""
        cache: dict[Any, Backend] = {}
        plan = [(spec, self._backend_for(spec, cache)) for spec in self.specs]
        collector = _Collector(self)
        stage = "?"
        try:
            for backend in cache.values():
                stage = f"<backend {backend.name}>"
                self.backends.append(backend)
                await backend.open()
            for spec, backend in plan:
                stage = spec.name
                self.executors.append(backend.executor(spec))
            # Runners are built back to front so each knows its downstream hop.
            nxt: _Inbox = collector
            for spec, ex in reversed(list(zip(self.specs, self.executors))):
                nxt = StageRunner(self, spec, ex, nxt)
                self.runners.insert(0, nxt)
            for runner in self.runners:
                stage = runner.name
                await runner.ex.start(runner.spec, runner)
        except StageStartError as exc:
            self.cause = exc
            log.warning("%s", exc)
            return False
        except Exception as exc:
            self.cause = StageStartError(stage, f"{type(exc).__name__}: {exc}")
            self.cause.__cause__ = exc
            log.warning("%s", self.cause)
            return False
        log.debug(
            "run started: %d stage(s) (%s), admission bound %d",
            len(self.runners),
            ", ".join(f"{r.name}:{type(r.ex).__name__}" for r in self.runners),
            self.bound,
        )
        first: _Inbox = self.runners[0] if self.runners else collector
        self.pump_task = self.loop.create_task(self._pump(first), name="pypline-pump")
        return True

    async def shutdown(self) -> None:
        """Stop the pump, every timer, executor and backend. Safe to call more than once."""
        self.stopping = True
        if self.pump_task is not None and not self.pump_task.done():
            self.pump_task.cancel()
        for runner in self.runners:
            runner.stop()
        if self.pump_task is not None:
            try:
                await self.pump_task
            except BaseException:  # noqa: S110 - the pump's own end does not matter here
                pass
        results = await asyncio.gather(*(ex.aclose() for ex in self.executors), return_exceptions=True)
        self.executors = []
        await asyncio.gather(*(b.aclose() for b in self.backends), return_exceptions=True)
        self.backends = []
        for r in results:
            if isinstance(r, BaseException) and not isinstance(r, asyncio.CancelledError):
                raise r

    # --- the pump ------------------------------------------------------------------------------

    async def _pump(self, first: _Inbox) -> None:
        loop = self.loop
        source = self.source
        index = 0
        aiter: AsyncIterator[Any] | None = None
        it: Iterator[Any] | None = None
        try:
            try:
                if hasattr(source, "__aiter__"):
                    aiter = source.__aiter__()
                else:
                    it = iter(source)
            except Exception as exc:
                self._source_failed(index, exc)
                return
            while True:
                if self.permits <= 0:
                    self.pulled = index  # kept current wherever the pump yields, for snapshots
                    if self.streaming and self.ready:
                        self.consumer_waited += 1  # results sit untaken: the consumer is the limit
                    self.pump_waiter = loop.create_future()
                    await self.pump_waiter
                    continue
                try:
                    if aiter is not None:
                        self.pulled = index
                        value = await aiter.__anext__()
                    else:
                        assert it is not None
                        value = next(it)
                except (StopIteration, StopAsyncIteration):
                    break
                except Exception as exc:
                    self._source_failed(index, exc)
                    break
                self.permits -= 1
                env = _Env(None, (), value, index)
                index += 1
                if self.streaming and self.ordered:
                    self.order.append(env)
                if not first.has_space():
                    self.pulled = index
                    await _wait_for_space(loop, first)
                first.push(env)
        except asyncio.CancelledError:
            if aiter is not None and hasattr(aiter, "aclose"):
                try:
                    await aiter.aclose()
                except Exception:  # noqa: S110 - the source's clean-up error is not ours to report
                    pass
            raise
        finally:
            self.pulled = index
            if not self.stopping:
                first.close_input()

    def _source_failed(self, index: int, exc: Exception) -> None:
        self.cause = exc
        self.source_failure = ItemFailure(index, SOURCE_STAGE, None, exc, 1)
        if self.fail_fast:
            self._abort()

    def _release(self) -> None:
        self.permits += 1
        w = self.pump_waiter
        if w is not None and self.permits >= self.permit_low and not w.done():
            w.set_result(None)
            self.pump_waiter = None

    # --- delivery ------------------------------------------------------------------------------

    def _deliver(self, env: _Env) -> None:
        src = env.src
        if not self.streaming:
            if self.ordered:
                self.outputs.append((src.index, env.path, env.item))
            else:
                self.outputs.append(env.item)
        else:
            self._stream_result(src, env.path, Ok(env.item))
        self._drop(src)

    def _item_failed(self, env: _Env, failure: ItemFailure) -> None:
        self.failed_count += 1
        src = env.src
        if not self.streaming:
            self.failures.append(failure)
            if self.fail_fast:
                self._abort()
        else:
            self._stream_result(src, env.path, Err(failure))
        self._drop(src)

    def _stream_result(self, src: _Env, path: tuple[int, ...], result: Result[Any]) -> None:
        if self.ordered:
            if src.bucket is None:
                src.bucket = []
            src.bucket.append((path, result))
        else:
            src.pending += 1
            self.ready.append((src, result))
            self._wake_consumer()

    def _drop(self, src: _Env) -> None:
        """One of ``src``'s envelopes left the pipeline."""
        src.live -= 1
        if src.live:
            return
        if not self.streaming:
            self._release()
        elif not self.ordered:
            if src.pending == 0:
                self._release()
        else:
            self._flush_ordered()

    def _flush_ordered(self) -> None:
        order = self.order
        woke = False
        while order and order[0].live == 0:
            head = order.popleft()
            bucket = head.bucket or []
            head.bucket = None
            if len(bucket) > 1:
                bucket.sort(key=lambda pr: pr[0])
            head.pending = len(bucket)
            for _, result in bucket:
                self.ready.append((head, result))
            woke = woke or bool(bucket)
            if not bucket:
                self._release()
        if woke:
            self._wake_consumer()

    def _wake_consumer(self) -> None:
        c = self.consumer
        if c is not None and not c.done():
            c.set_result(None)

    def _all_done(self) -> None:
        if self.streaming and self.source_failure is not None:
            self.ready.append((None, Err(self.source_failure)))
        if not self.finished.done():
            self.finished.set_result(None)
        self._wake_consumer()

    def _abort(self) -> None:
        if not self.stopping:
            log.info("fail_fast: stopping the run after the first failure")
        self.stopping = True
        for runner in self.runners:
            runner.stop()
        if not self.finished.done():
            self.finished.set_result(None)
        self._wake_consumer()

    # --- what the caller gets ----------------------------------------------------------------------

    # --- statistics -------------------------------------------------------------------------------

    def statistics(self, finished: bool = False) -> RunStatistics:
        """A snapshot of every stage; cheap enough to take ten times a second."""
        end = self.ended if self.ended is not None else time.perf_counter()
        elapsed = max(end - self.started, 1e-9)
        stages = tuple(_stage_statistics(r, elapsed) for r in self.runners)
        name, hint = bottleneck(stages, consumer_waited=self.consumer_waited > 0) if finished else (None, None)
        try:
            length: int | None = len(self.source)
        except Exception:
            length = None
        delivered = self.taken if self.streaming else len(self.outputs)
        return RunStatistics(
            elapsed=elapsed,
            pulled=self.pulled,
            delivered=delivered,
            failed=self.failed_count,
            finished=finished,
            source_length=length,
            stages=stages,
            bottleneck=name,
            hint=hint,
        )

    def start_reporting(
        self, on_stats: Callable[[RunStatistics], None] | None, progress: bool, interval: float, stream: TextIO
    ) -> None:
        """Call ``on_stats`` every ``interval`` s and/or draw progress (terminals only)."""
        renderer = ProgressRenderer(stream) if progress and stream.isatty() else None
        if on_stats is None and renderer is None:
            return
        self.renderer = renderer
        self.on_stats = on_stats
        self.reporter = self.loop.create_task(self._report(interval), name="pypline-stats")

    async def _report(self, interval: float) -> None:
        tick = REFRESH_SECONDS if self.renderer is not None else interval
        since = 0.0
        while True:
            await asyncio.sleep(tick)
            since += tick
            snap = self.statistics(False)
            if self.renderer is not None:
                self.renderer.draw(snap)
            if self.on_stats is not None and since + 1e-9 >= interval:
                since = 0.0
                self._call_on_stats(snap)

    def _call_on_stats(self, snap: RunStatistics) -> None:
        assert self.on_stats is not None
        try:
            self.on_stats(snap)
        except Exception:  # a broken callback must not break the run
            log.exception("on_stats callback raised; statistics reporting continues")

    async def finish_reporting(self) -> RunStatistics:
        """Stop the reporter; the final snapshot, also given to ``on_stats`` and the renderer."""
        if self.ended is None:
            self.ended = time.perf_counter()
        if self.reporter is not None:
            self.reporter.cancel()
            try:
                await self.reporter
            except asyncio.CancelledError:
                pass
            self.reporter = None
        final = self.statistics(True)
        log.debug(
            "run finished in %.3f s: %d pulled, %d delivered, %d failed",
            final.elapsed,
            final.pulled,
            final.delivered,
            final.failed,
        )
        if self.renderer is not None:
            self.renderer.finish(final)
            self.renderer = None
        if self.on_stats is not None:
            self._call_on_stats(final)
            self.on_stats = None
        return final

    def result(self) -> Result[list[Any]]:
        outputs = self.outputs
        if self.ordered:
            outputs.sort(key=itemgetter(0, 1))
            outputs = [t[2] for t in outputs]
        if self.failures or self.cause is not None:
            failures = sorted(self.failures, key=lambda f: f.index)
            return Err(PipelineError(failures=failures, outputs=outputs, cause=self.cause))
        return Ok(outputs)

    async def next_result(self) -> Result[Any] | None:
        """The next streamed result, or None at the end."""
        while not self.ready:
            if self.finished.done():
                return None
            self.consumer = self.loop.create_future()
            await self.consumer
        src, result = self.ready.popleft()
        self.taken += 1
        if src is not None:
            src.pending -= 1
            if src.pending == 0 and src.live == 0:
                self._release()
        return result
