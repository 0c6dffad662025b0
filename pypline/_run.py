"""One run of a pipeline: how an item travels from the source to the caller.

::

    source ─pump─► stage 0 (≤ buffer + workers) ─► stage 1 ─► ... ─► collector ─► run(): result list
      ▲            queue → executor → outcome                          │          stream(): ready queue
      │                                                                │                     ─► consumer
      └──── permits: the memory bound, one per source item until all its outputs are delivered ◄┘

Actors:

- The **pump** (the only engine task) takes a permit, pulls ONE item from the source
  and pushes it into stage 0, waiting while stage 0 is full. Permits number
  ``sum(buffer + workers) + stages + 1``, so the bound holds by construction
  wherever items are (queued, in flight at an agent, retrying, waiting in the
  reorder window or for a slow ``stream()`` consumer).
- A **StageRunner** per stage (``_stage_runner.py``) is synchronous bookkeeping:
  it moves items into its executor as far as ``capacity()`` allows and decides
  what each outcome means (forward, retry, re-dispatch, fail). A stage holds at
  most ``buffer + num_workers`` items; when the next one is full, finished items
  are parked and no new work starts: backpressure with no task, future or lock
  per item. Producers waiting for room are woken when a stage drains to half,
  so items move between stages in batches.
- The **collector** at the end counts each source item's live descendants (a
  flat-map stage may turn one item into many); when none is left the item is
  delivered and its permit goes back to the pump.

Nothing awaits per item: the hot path is a few method calls, which is why the W1
benchmark (tests/benchmarks/bench_core.py) runs at or above the speed of a
hand-written ``asyncio.Queue`` chain.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from collections import deque
from itertools import islice
from operator import attrgetter
from typing import TYPE_CHECKING, Any, AsyncIterator, Callable, Iterable, Iterator, TextIO

from ._config import current_settings, effective_agents
from ._errors import ItemFailure, PipelineError, StageStartError
from ._batch import Batched
from ._breaker import Breaker
from ._retry import RetryPolicy
from ._deadletter import FAILURES_KEPT, DeadLetters
from ._journal import Journal
from ._rate import RateLimited
from ._progress import REFRESH_SECONDS, Display, ProgressChoice, make_display
from ._registry import load_backend
from ._stage_runner import StageRunner, Envelope, Inbox, wait_for_space
from ._stats import RunStatistics, StageStatistics, bottleneck, percentile
from .executor import Backend, Executor, ExecutorStatistics
from .util import Err, Ok, Result

if TYPE_CHECKING:
    from ._stage import Stage, StageSpec

__all__ = ["Run", "admission_bound"]

SOURCE_STAGE = "<source>"

_ITEM = attrgetter("item")
_INDEX = attrgetter("index")

#: How long one run of pulls from a sync source may take: the next run is as many
#: items as the last one's pace fits in it (a slow source's items go on one by one,
#: so its first items reach the workers without waiting for a whole run).
PULL_RUN_S = 0.001

#: Most items the pump pulls from a sync source in one run.
MAX_PULL_BATCH = 1024


def _retire(env: Envelope) -> None:
    """Break a finished source item's reference cycles, so reference counting frees it.

    A root envelope is its own ``src`` and, in a plain stage, its own attempt's
    ``_job``: left as they are, every envelope would wait for the cycle collector,
    which then costs a quarter of the engine's time per item (measured). Called once
    the item's last output was delivered or it failed; late reports for it only read
    ``_settled`` and ``_owner``.
    """
    env._job = None
    env.src = _RETIRED


class _Exhausted(Exception):
    """Marks a sync source that ended inside a run of pulls."""


_EXHAUSTED = _Exhausted()

#: What a retired envelope's ``src`` points to (see ``_retire``).
_RETIRED = Envelope(None, (), None)

log = logging.getLogger("pypline.engine")


def admission_bound(specs: Iterable[StageSpec]) -> int:
    """The memory bound: ``sum(buffer + num_workers) + len(stages) + 1``."""
    specs = list(specs)
    return sum(s.buffer + s.num_workers for s in specs) + len(specs) + 1


async def _settle(tasks: list[asyncio.Task[Any]]) -> asyncio.CancelledError | None:
    """Wait until every task is done, even while the caller is being cancelled.

    Returns the caller's cancellation if one arrived meanwhile (to be re-raised once the
    clean-up is over: it is never swallowed), else None. The tasks' own outcomes are not
    raised. Cancellation is edge-triggered in asyncio, so the next wait is not
    interrupted by the same request.
    """
    held: asyncio.CancelledError | None = None
    while not all(t.done() for t in tasks):
        try:
            await asyncio.wait(tasks)
        except asyncio.CancelledError as exc:
            held = exc
    return held


def _executor_statistics(r: StageRunner) -> ExecutorStatistics:
    try:
        return r.ex.statistics()
    except Exception:  # an executor that never started (or a broken one) must not hide the run's result
        return ExecutorStatistics(backend=type(r.ex).__name__, workers=r.n, capacity=0, submitted=0, completed=0)


def _stage_statistics(r: StageRunner, elapsed: float) -> StageStatistics:
    es = r.closing_stats or _executor_statistics(r)
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
        details=es.details,
        cpu_share=es.cpu_share,
        retries_by_error=dict(r.retry_errors),
   )


class _Counted(list):  # type: ignore[type-arg]
    """Stands for ``Run.outputs`` under ``run(collect=False)``: counts what is added, keeps nothing."""

    __slots__ = ("n",)

    def __init__(self) -> None:
        super().__init__()
        self.n = 0

    def append(self, item: Any) -> None:
        self.n += 1

    def extend(self, items: Any) -> None:
        for _ in items:
            self.n += 1

    def __len__(self) -> int:
        return self.n


class _Collector(Inbox):
    """The end of the pipeline: hands outputs to the run. Always has room (permits bound it)."""

    __slots__ = ("run", "held", "limit")

    def __init__(self, run: Run) -> None:
        self.run = run
        self.held = 0
        self.limit = sys.maxsize

    def push(self, env: Envelope) -> None:
        run = self.run
        if run.streaming:
            run._deliver(env)
            return
        src = env.src  # run(): the hot path, inlined
        if run.ordered:
            run.keys.append((src.index, env.path) if run.paths else src.index)
        run.outputs.append(env.item)
        src.live -= 1
        env._job = None  # see _retire
        if not src.live:
            journal = run.journal
            if journal is not None and src.key is not None:  # Journal.delivered, inlined
                journal.lines.append(src.key)
                if not journal.write_due:
                    journal.schedule_write()
            _retire(src)
            run._release()

    def push_many(self, envs: list[Envelope]) -> None:
        run = self.run
        if run.streaming or run.paths:
            for env in envs:
                self.push(env)
            return
        # run() with no flat-map stage: every envelope is its source item's only one (its
        # own root, live == 1), so each delivery returns one permit.
        run.outputs.extend(map(_ITEM, envs))
        if run.ordered:
            run.keys.extend(map(_INDEX, envs))
        if run.journal is not None:
            for env in envs:
                run.journal.delivered(env.key)
        for env in envs:  # see _retire
            env.live = 0
            env._job = None
            env.src = _RETIRED
        run._release(len(envs))

    def add_space_listener(self, callback: Callable[[], None], inline: bool = False) -> None:  # pragma: no cover - never full
        self.run.loop.call_soon(callback)

    def close_input(self) -> None:
        self.run._all_done()


class Run:
    """The state of one ``run()`` / ``stream()`` call."""

    # Slots, not a __dict__: past ~30 attributes CPython stops inlining instance
    # attributes and every access on the hot path gets slower.
    __slots__ = (
        "loop",
        "stages",
        "source",
        "ordered",
        "fail_fast",
        "streaming",
        "choice",
        "max_lost",
        "agents",
        "specs",
        "bound",
        "permits",
        "permit_low",
        "pump_waiter",
        "stopping",
        "finished",
        "outputs",
        "failures",
        "cause",
        "source_failure",
        "journal",
        "dead_letters",
        "ready",
        "consumer",
        "order",
        "runners",
        "executors",
        "backends",
        "pump_task",
        "closing",
        "reporter",
        "renderer",
        "on_stats",
        "started",
        "loop_cpu_at",
        "loop_busy",
        "ended",
        "pulled",
        "taken",
        "failed_count",
        "consumer_waited",
        "timing",
        "keys",
        "paths",
        "pull_batch",
        "first",
        "sync_it",
        "reporting",
        "refill_due",
        "space_listening",
   )

    def __init__(
        self,
        stages: tuple[Stage[Any, Any], ...],
        source: Any,
        *,
        ordered: bool,
        fail_fast: bool,
        streaming: bool,
        executor: str | Backend | None,
        timing: bool = True,
        journal: Journal | None = None,
        dead_letters: DeadLetters | None = None,
   ) -> None:
        self.loop = asyncio.get_running_loop()
        self.timing = timing
        self.stages = stages
        self.journal = journal
        self.dead_letters = dead_letters
        self.source = source if journal is None else journal.filter(source)
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
        # run(ordered=True): each output's sort key, kept apart from the outputs (no tuple
        # per item): the source index, or (index, path) when a flat-map stage can give one
        # source item several outputs.
        self.keys: list[Any] = []
        self.paths = any(s.fork_merge is None and s.workers[0].kind.is_generator for s in self.specs)
        self.pull_batch = 1  # items the pump pulls from a sync source at a time (adapts)
        # A sync source is also refilled inline, at the end of a batch report
        # (StageRunner.ok_many), instead of waking the pump task: see refill_inline.
        self.first: Inbox | None = None
        self.sync_it: Iterator[Any] | None = None  # set while the pump serves a sync source
        self.reporting = False  # inside a batch report that refills at its end
        self.refill_due = False
        self.space_listening = False  # the pump's listener is registered with the first stage
        self.failures: list[ItemFailure] = []
        self.cause: BaseException | None = None
        self.source_failure: ItemFailure | None = None
        self.ready: deque[tuple[Envelope | None, Result[Any, ItemFailure]]] = deque()
        self.consumer: asyncio.Future[None] | None = None
        self.order: deque[Envelope] = deque()
        self.runners: list[StageRunner] = []
        self.executors: list[Executor] = []
        self.backends: list[Backend] = []
        self.pump_task: asyncio.Task[None] | None = None
        self.closing = False  # shutdown() has started
        self.reporter: asyncio.Task[None] | None = None
        self.renderer: Display | None = None
        self.on_stats: Callable[[RunStatistics], None] | None = None
        self.started = time.perf_counter()
        self.ended: float | None = None
        # The event loop's own CPU time (Run is made on the loop's thread): how busy the loop
        # was, for the bottleneck hint. Fixed when the run ends.
        self.loop_cpu_at = time.thread_time()
        self.loop_busy: float | None = None
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
                ex = backend.executor(spec)
                # Engine-side wrappers, innermost first; each counts calls (of batches, in a batch stage).
                if spec.rate is not None:
                    ex = RateLimited(ex, *spec.rate)
                if spec.pause_after is not None:
                    first_pause = min(spec.backoff or 1.0, spec.max_backoff)
                    retryable = RetryPolicy(spec.retries, spec.retry_on).matches
                    ex = Breaker(ex, spec.pause_after, first_pause, spec.max_backoff, retryable)
                if spec.batch is not None:
                    ex = Batched(ex, spec.batch, spec.batch_wait)
                self.executors.append(ex)
            # Runners are built back to front so each knows its downstream hop.
            nxt: Inbox = collector
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
        first: Inbox = self.runners[0] if self.runners else collector
        self.pump_task = self.loop.create_task(self._pump(first), name="pypline-pump")
        return True

    async def shutdown(self) -> None:
        """Stop the pump, every timer, executor and backend. Safe to call more than once.

        The clean-up always completes: nothing the run started may outlive the call. If
        the caller is cancelled meanwhile, the cancellation is held until the clean-up is
        done and then re-raised (never swallowed), so ``asyncio.timeout()`` around
        ``run()`` still raises ``TimeoutError``.
        """
        if self.closing:
            return
        self.closing = True
        self.stopping = True
        if self.pump_task is not None and not self.pump_task.done():
            self.pump_task.cancel()
        for runner in self.runners:
            runner.stop()
        held = None
        if self.pump_task is not None:
            held = await _settle([self.pump_task]) or held  # its outcome was reported already
            if not self.pump_task.cancelled() and self.pump_task.exception() is not None:
                log.error("the source pump failed", exc_info=self.pump_task.exception())
        for runner in self.runners:  # what the executors knew, before closing them forgets it
            if runner.closing_stats is None:
                runner.closing_stats = _executor_statistics(runner)
        executors, self.executors = self.executors, []
        held = await self._close_all([(f"the executor {type(ex).__name__}", ex) for ex in executors]) or held
        backends, self.backends = self.backends, []
        held = await self._close_all([(f"the {b.name!r} backend", b) for b in backends]) or held
        if held is not None:
            raise held

    async def _close_all(self, named: list[tuple[str, Executor | Backend]]) -> asyncio.CancelledError | None:
        """``aclose()`` each at once and wait for all (see ``_settle``); a failure is logged on
        ``pypline.engine`` and the run's result is kept. Returns a held cancellation, if any."""
        closing = [self.loop.create_task(obj.aclose(), name="pypline-close") for _, obj in named]
        held = await _settle(closing)
        for (what, _), t in zip(named, closing):
            exc = asyncio.CancelledError() if t.cancelled() else t.exception()
            if exc is not None:
                log.error("closing %s failed; the run's result is kept", what, exc_info=exc)
        return held

    # --- the pump ------------------------------------------------------------------------------

    async def _pump(self, first: Inbox) -> None:
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
            if it is not None:
                await self._pump_sync(first, it)
                return
            while True:
                if self.permits <= 0:
                    first.flush()
                    self.pulled = index  # kept current wherever the pump yields, for snapshots
                    if self.streaming and self.ready:
                        self.consumer_waited += 1  # results sit untaken: the consumer is the limit
                    self.pump_waiter = loop.create_future()
                    await self.pump_waiter
                    continue
                try:
                    self.pulled = index
                    assert aiter is not None
                    value = await aiter.__anext__()
                except StopAsyncIteration:
                    break
                except Exception as exc:
                    self._source_failed(index, exc)
                    break
                self.permits -= 1
                if self.journal is None:
                    env = Envelope(None, (), value, index)
                else:  # the journal's filter gives (key, item)
                    env = Envelope(None, (), value[1], index)
                    env.key = value[0]
                index += 1
                self.pulled = index
                if self.streaming and self.ordered:
                    self.order.append(env)
                if not first.has_space():
                    await wait_for_space(loop, first)
                first.push(env)
        except asyncio.CancelledError:
            if aiter is not None and hasattr(aiter, "aclose"):
                try:
                    await aiter.aclose()
                except Exception:  # noqa: S110 - the source's clean-up error is not ours to report
                    pass
            raise
        finally:
            if not self.stopping:
                first.close_input()

    async def _pump_sync(self, first: Inbox, it: Iterator[Any]) -> None:
        """Feed a sync source into the first stage, as far as permits and its room allow.

        Between pulls the pump waits on ``pump_waiter``, woken when a quarter of the
        permits are back (``_release``) or the first stage has drained to its low
        water (``_space_back``). While it waits, a batch report refills inline
        (``refill_inline``): the run of items goes out in the same loop iteration
        as the results that made room for it, with no task wake-up in between.
        """
        self.first, self.sync_it = first, it
        try:
            while not self._pull_sync():
                first.flush()
                if self.permits <= 0 and self.streaming and self.ready:
                    self.consumer_waited += 1  # results sit untaken: the consumer is the limit
                self.pump_waiter = waiter = self.loop.create_future()
                if self.permits > 0 and not self.space_listening:  # the first stage's room ran out
                    self.space_listening = True
                    first.add_space_listener(self._space_back, inline=True)
                await waiter
        finally:
            self.sync_it = None
            self.pump_waiter = None

    def _pull_sync(self) -> bool:
        """Pull runs from the sync source into the first stage while permits and room
        last; True once the source is finished (exhausted or failed)."""
        it, first = self.sync_it, self.first
        if it is None or first is None:
            return True
        while True:
            k = min(self.permits, first.limit - first.held)
            if k <= 0:
                return False
            envs, failure = self._pull_run(it, self.pulled, k)
            if envs:
                self.pulled += len(envs)
                self.permits -= len(envs)
                if self.streaming and self.ordered:
                    self.order.extend(envs)
                first.push_many(envs)
            if failure is not None:
                self.sync_it = None
                if failure is not _EXHAUSTED:
                    self._source_failed(self.pulled, failure)
                return True

    def _space_back(self) -> None:
        """The first stage drained to its low water (called at once, see _pump_sync)."""
        self.space_listening = False
        w = self.pump_waiter
        if w is None or w.done():
            return
        if self.reporting:  # the batch report that made the room refills at its end
            self.refill_due = True
            return
        self._wake_pump()

    def _wake_pump(self) -> None:
        w = self.pump_waiter
        if w is not None:
            self.pump_waiter = None
            if not w.done():
                w.set_result(None)

    def refill_inline(self) -> None:
        """At the end of a batch report that returned permits: pull the next run now.

        Called by ``StageRunner.ok_many`` once its bookkeeping is done, so the first
        stage's ``push_many`` (and the executor's ``submit``/``flush``) run from inside
        the executor's callback, as any report's follow-up submits already do.
        """
        self.refill_due = False
        w = self.pump_waiter
        if w is None or w.done():  # the pump is awake: it pulls by itself
            return
        if self.stopping:
            self._wake_pump()
            return
        try:
            finished = self._pull_sync()
        except BaseException:
            self._wake_pump()
            raise
        if finished:  # the pump closes the first stage's input
            self._wake_pump()
        elif self.first is not None:
            self.first.flush()

    def _pull_run(self, it: Iterator[Any], index: int, k: int) -> tuple[list[Envelope], Exception | None]:
        """Up to ``k`` items from a sync source, as envelopes; and why it stopped early, if it did.

        How many items go per run adapts to the source's pace (see ``PULL_RUN_S``):
        a quick source is pulled hundreds at a time (one push and one submit per
        run), a slow one item by item.
        """
        k = min(k, self.pull_batch)
        envs: list[Envelope] = []
        append = envs.append
        t0 = time.perf_counter()
        try:
            if self.journal is None:
                for value in islice(it, k):
                    append(Envelope(None, (), value, index))
                    index += 1
            else:  # the journal's filter gives (key, item)
                for key, value in islice(it, k):
                    env = Envelope(None, (), value, index)
                    env.key = key
                    append(env)
                    index += 1
        except Exception as exc:
            return envs, exc
        if len(envs) < k:
            return envs, _EXHAUSTED
        per_item = (time.perf_counter() - t0) / k
        self.pull_batch = max(1, min(MAX_PULL_BATCH, int(PULL_RUN_S / per_item) if per_item > 0 else MAX_PULL_BATCH))
        return envs, None

    def _source_failed(self, index: int, exc: Exception) -> None:
        self.cause = exc
        self.source_failure = ItemFailure(index, SOURCE_STAGE, None, exc, 1)
        if self.fail_fast:
            self._abort()

    def _release(self, n: int = 1) -> None:
        self.permits += n
        w = self.pump_waiter
        if w is not None and self.permits >= self.permit_low and not w.done():
            if self.reporting:  # the batch report that returned them refills at its end
                self.refill_due = True
                return
            self._wake_pump()

    # --- delivery ------------------------------------------------------------------------------

    def _deliver(self, env: Envelope) -> None:
        src = env.src
        if not self.streaming:
            if self.ordered:
                self.keys.append((src.index, env.path) if self.paths else src.index)
            self.outputs.append(env.item)
        else:
            self._stream_result(src, env.path, Ok(env.item))
        env._job = None
        self.drop(src)

    def item_failed(self, env: Envelope, failure: ItemFailure) -> None:
        self.failed_count += 1
        src = env.src
        src.key = None  # a journal does not record it (harmless without one)
        if not self.streaming:
            letters = self.dead_letters
            # With on_failure, memory keeps the first few (and any it could not take).
            if letters is None or not letters.send(failure) or len(self.failures) < FAILURES_KEPT:
                self.failures.append(failure)
            if self.fail_fast:
                self._abort()
        else:
            self._stream_result(src, env.path, Err(failure))
        env._job = None
        self.drop(src)

    def _stream_result(self, src: Envelope, path: tuple[int, ...], result: Result[Any, ItemFailure]) -> None:
        if self.ordered:
            if src.bucket is None:
                src.bucket = []
            src.bucket.append((path, result))
        else:
            src.pending += 1
            self.ready.append((src, result))
            self._wake_consumer()

    def drop(self, src: Envelope) -> None:
        """One of ``src``'s envelopes left the pipeline."""
        src.live -= 1
        if src.live:
            return
        if not self.streaming:
            if self.journal is not None:
                self.journal.delivered(src.key)
            _retire(src)
            self._release()
        elif not self.ordered:
            if src.pending == 0:
                if self.journal is not None:
                    self.journal.delivered(src.key)
                _retire(src)
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
                if self.journal is not None:
                    self.journal.delivered(head.key)
                _retire(head)
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
        if self.loop_busy is None:  # the run goes on: the loop thread's CPU time so far (called on the loop)
            loop_busy: float | None = min(1.0, (time.thread_time() - self.loop_cpu_at) / elapsed)
        else:
            loop_busy = self.loop_busy
        name, hint = (
            bottleneck(stages, consumer_waited=self.consumer_waited > 0, loop_busy=loop_busy) if finished else (None, None)
        )
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
            loop_busy=loop_busy,
       )

    def start_reporting(
        self, on_stats: Callable[[RunStatistics], None] | None, progress: ProgressChoice, interval: float, stream: TextIO
   ) -> None:
        """Call ``on_stats`` every ``interval`` s and/or draw progress where it can be shown."""
        renderer = make_display(progress, stream)
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
            self.loop_busy = min(1.0, (time.thread_time() - self.loop_cpu_at) / max(self.ended - self.started, 1e-9))
        if self.reporter is not None:
            self.reporter.cancel()
            held = await _settle([self.reporter])
            self.reporter = None
            if held is not None:
                raise held
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

    def result(self) -> Result[Any, PipelineError]:
        outputs = self.outputs
        if type(outputs) is _Counted:
            n = outputs.n
            if self.failed_count or self.cause is not None:
                return Err(self._error([], n))
            return Ok(n)
        if self.ordered:
            keys = self.keys
            order = sorted(range(len(keys)), key=keys.__getitem__)
            outputs = list(map(outputs.__getitem__, order))
        if self.failed_count or self.cause is not None:
            return Err(self._error(outputs, len(outputs)))
        return Ok(outputs)

    def _error(self, outputs: list[Any], delivered: int) -> PipelineError:
        failures = sorted(self.failures, key=_INDEX)
        cancelled = 0
        if self.fail_fast and self.failures:
            # The failure that stopped the run comes first; items still in flight when it
            # stopped were interrupted, not failed: counted apart.
            first = self.failures[0]
            failures.remove(first)
            failures.insert(0, first)
            cancelled = self.bound - self.permits
        return PipelineError(
            failures=failures,
            outputs=outputs,
            cause=self.cause,
            cancelled=cancelled,
            delivered=delivered,
            failed=self.failed_count,
        )

    def discard_outputs(self) -> None:
        """``run(collect=False)``: count the outputs, keep none (nor their order)."""
        self.outputs = _Counted()
        self.ordered = False

    async def next_result(self) -> Result[Any, ItemFailure] | None:
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
                if self.journal is not None:
                    self.journal.delivered(src.key)
                _retire(src)
                self._release()
        if self.journal is not None:
            self.journal.write()  # every key of what was delivered is in the file before it is handed over
        return result
