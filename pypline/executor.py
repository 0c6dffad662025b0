"""The Executor contract: the seam between the engine and where work runs.

The engine decides *what* happens to an item; an executor decides *where and how*
one attempt of one stage runs. ::

      engine (one StageRunner per stage)               executor (one per stage per run)
      ----------------------------------               --------------------------------
      await executor.start(spec, sink)      ─────►     start workers, ship the functions
      n = executor.capacity()               ◄─────     attempts it can take right now (credits)
      executor.submit([attempt, ...])       ─────►     never blocks; may batch, queue, send
      executor.flush()                      ─────►     (hint) no more submits for now: send
      sink.ok(attempt, value)               ◄─────     the attempt returned `value`
      sink.ok_many(attempts, values)        ◄─────     the same for a batch, in order (cheaper)
      sink.error(attempt, exc)              ◄─────     it raised / timed out / its worker died
      sink.lost(attempt, where)             ◄─────     its worker vanished (not the item's fault)
      await sink.emit(attempt, value)       ◄─────     a generator yielded (awaits downstream room)
      sink.capacity_changed()               ◄─────     credits grew without an outcome
      await executor.aclose()               ─────►     stop workers, close sockets; idempotent

The engine owns admission (the memory bound), queues, ordering, retries and backoff,
``retry_on``, ``max_lost``, fork/merge and fail-fast; one policy, one behaviour on
every backend. The executor owns workers, transport, batching, heartbeats, the
per-attempt ``timeout`` (only it can kill a process) and ``current_worker()``.

Rules an executor follows (the contract suite in ``tests/contract`` checks them):

1. ``submit`` is given at most ``capacity()`` attempts; it never blocks and never
   calls the sink from inside ``submit`` (report from a task or a callback).
2. Every submitted attempt gets exactly one terminal report (``ok``, ``error`` or
   ``lost``) unless ``aclose()`` comes first. The engine ignores reports for
   attempts it no longer waits for, so late or duplicate reports are harmless —
   that is what makes "at-least-once execution, exactly-once delivery" work.
3. Capacity is counted in attempts and returns when the terminal report is made
   (make the slot free *before* calling the sink: the sink may ``submit`` and
   ``flush`` at once, from inside the report; with a sync source, ``ok_many``
   refills the first stage that way).
4. ``attempt.worker`` is ``None`` (any worker) or a worker index that must run it
   (fork mode). ``attempt.number`` counts from 1; set ``current_worker()`` to
   ``WorkerInfo(spec.name, worker_index, attempt.number)`` around the call.
5. Sink methods are called on the event loop's thread.
6. A timed-out attempt is reported as ``error(attempt, TimeoutError(...))``; a
   worker process that died as ``error(attempt, WorkerDied(...))``; an agent that
   vanished as ``lost(attempt, "host:port")``.
7. A ``CancelledError`` raised by the stage's own code is an outcome like any other
   exception: report ``error(attempt, exc)`` (the exception itself, or a
   ``RemoteError`` naming it when it comes from elsewhere) and keep serving. The
   engine turns it into ``StageCancelled``, retried per ``retry_on``. Only ``aclose()``
   cancels an executor's own tasks; a worker must tell the two apart (e.g. a flag set
   by ``aclose()`` before it cancels), never let the user's ``CancelledError`` end a
   worker, and never report its own cancellation as an outcome.
8. ``spec.setup`` (when set) runs once in each worker, where its calls will run, before
   its first call, inside ``start``: ``pypline.lowlevel.run_setup`` (in a thread or
   process) or ``arun_setup`` (on a loop). Its return value is the ``state`` of the
   ``WorkerInfo`` set around that worker's calls. If it raises, ``start`` tears down the
   workers already set up and raises ``setup_failed(...)`` (a ``StageStartError``).
   ``spec.teardown`` runs with the state when the worker stops, in ``aclose`` too, within
   ``TEARDOWN_TIMEOUT_S`` (``run_teardown``/``arun_teardown`` log a failure, never raise).
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping, Sequence

from ._context import WorkerInfo, worker_context
from ._errors import RemoteError, RemoteTraceback, StageCancelled, StageStartError, WorkerDied, WorkerLost
from ._stage import FnKind, StageSpec, WorkerFn

__all__ = [
    "Attempt",
    "Backend",
    "Executor",
    "ExecutorStatistics",
    "FnKind",
    "OutcomeSink",
    "RemoteError",
    "RemoteTraceback",
    "StageCancelled",
    "StageSpec",
    "StageStartError",
    "WorkerDied",
    "WorkerFn",
    "WorkerInfo",
    "WorkerLost",
    "worker_context",
]


class Attempt:
    """One try of one item in one stage.

    ``item`` is the value to process, ``worker`` the worker that must run it (or
    ``None`` for any) and ``number`` the attempt number, from 1. ``lost`` counts how
    often this item was already lost with a worker or agent in this stage: a lost
    attempt is re-dispatched with the same ``number`` (losing it was not the item's
    fault) and ``lost`` one higher. Attempts carry no wire id: a backend that sends
    them elsewhere numbers them itself and keeps its own id -> attempt table. The
    engine hands executors instances of a subclass with bookkeeping of its own;
    executors report back the very object they were given.
    """

    __slots__ = ("item", "worker", "number", "lost")

    def __init__(self, item: Any, worker: int | None, number: int, lost: int = 0) -> None:
        self.item = item
        self.worker = worker
        self.number = number
        self.lost = lost

    def __repr__(self) -> str:
        lost = f" lost={self.lost}" if self.lost else ""
        return f"<Attempt item={self.item!r} worker={self.worker} number={self.number}{lost}>"


class OutcomeSink(abc.ABC):
    """Where an executor reports how attempts ended. Implemented by the engine.

    Call these on the event loop's thread; ``ok``/``error``/``lost`` never block.
    """

    __slots__ = ()

    #: Whether the run wants attempt durations sampled for its statistics
    #: (``run(stats=False)`` turns it off). Executors read it once, in ``start``.
    timing: bool = True

    @abc.abstractmethod
    def ok(self, attempt: Attempt, value: Any) -> None:
        """The attempt finished with ``value`` (a generator's return value is ignored)."""

    def ok_many(self, attempts: Sequence[Attempt], values: Sequence[Any]) -> None:
        """``ok(a, v)`` for each pair, in order: one call for a batch of finished attempts.

        The engine's fast path for backends that receive outcomes in batches (free
        every slot first, then call it once). ``values`` matches ``attempts`` one
        to one; stale or duplicate attempts in the batch are ignored like in ``ok``.
        """
        for a, v in zip(attempts, values):
            self.ok(a, v)

    @abc.abstractmethod
    def error(self, attempt: Attempt, exc: BaseException) -> None:
        """The attempt failed with ``exc``; the engine applies ``retries`` and ``retry_on``."""

    @abc.abstractmethod
    def lost(self, attempt: Attempt, where: str) -> None:
        """The attempt's worker vanished; the engine re-dispatches it (up to ``max_lost``)."""

    @abc.abstractmethod
    async def emit(self, attempt: Attempt, value: Any) -> None:
        """A generator attempt yielded ``value``; returns when the engine has room for it."""

    @abc.abstractmethod
    def capacity_changed(self) -> None:
        """``capacity()`` grew for a reason other than a terminal report (e.g. an agent joined)."""


@dataclass(frozen=True)
class ExecutorStatistics:
    """A snapshot of an executor's state, for run statistics and progress displays.

    ``running`` is how many attempts run right now, ``busy_seconds`` the (estimated)
    total time workers spent on attempts and ``latencies`` a bounded sample of
    attempt durations in seconds (time one attempt in
    ``pypline.lowlevel.LATENCY_SAMPLE_EVERY``). ``None``/empty means unknown.
    ``details`` holds backend-specific figures (e.g. per-agent credits).
    ``cpu_share`` is the share of its calls' time that their workers spent on a CPU
    (thread CPU time over wall time, measured around the calls), when the backend
    measures it: a low share means the calls mostly waited (for I/O, or for the
    interpreter's lock).
    """

    backend: str
    workers: int
    capacity: int
    submitted: int
    completed: int
    workers_replaced: int = 0
    running: int | None = None
    busy_seconds: float | None = None
    latencies: tuple[float, ...] = ()
    details: Mapping[str, Any] = field(default_factory=dict)
    cpu_share: float | None = None


class Executor(abc.ABC):
    """Runs the workers of one stage for one run. See the module docstring for the rules."""

    @abc.abstractmethod
    async def start(self, spec: StageSpec, sink: OutcomeSink) -> None:
        """Start the workers. Raise ``StageStartError`` if the stage cannot run here."""

    @abc.abstractmethod
    def capacity(self) -> int:
        """How many more attempts ``submit`` may be given now."""

    @abc.abstractmethod
    def submit(self, attempts: Sequence[Attempt]) -> None:
        """Take these attempts (at most ``capacity()``). Never blocks, never calls the sink."""

    def submit_one(self, attempt: Attempt) -> None:
        """``submit([attempt])``; the engine's hot path. Override only to make it cheaper."""
        self.submit((attempt,))

    def flush(self) -> None:  # noqa: B027 - optional hook
        """A hint: the engine's burst of submits is over (the source is out of permits or room).

        A backend that gathers submits into one send per loop tick may send now,
        one tick sooner. Never required for correctness; never calls the sink.
        """

    @abc.abstractmethod
    async def aclose(self) -> None:
        """Stop every worker and release every resource. Idempotent; pending attempts are dropped."""

    def statistics(self) -> ExecutorStatistics:
        """A snapshot for progress displays; backends override to say more."""
        return ExecutorStatistics(
            backend=type(self).__name__, workers=0, capacity=self.capacity(), submitted=0, completed=0
       )


class Backend(abc.ABC):
    """Makes executors for the stages of one run; may share resources between them.

    Registered by name under the entry-point group ``pypline.backends``; the entry
    point names a ``Backend`` subclass constructible with no arguments. A backend
    instance can also be passed as ``run(executor=...)``.
    """

    name: ClassVar[str] = "unnamed"

    async def open(self) -> None:  # noqa: B027 - optional hook
        """Called once per run before the first ``executor()``."""

    @abc.abstractmethod
    def executor(self, spec: StageSpec) -> Executor:
        """A new, not yet started executor for ``spec``."""

    async def aclose(self) -> None:  # noqa: B027 - optional hook
        """Called once per run after every executor was closed."""
