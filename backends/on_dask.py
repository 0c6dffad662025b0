"""The ``dask`` backend: ``multi_proc=True`` stages as tasks on a Dask cluster.

::

    DaskBackend.open()        an asynchronous Client on the run's event loop: the one you gave
          │                   (if it already is one), a new one to your client's / address's
          │                   scheduler, the default client's, or a LocalCluster made for the run
          ▼
    DaskExecutor.start()      the stage's functions, pickled once, go to every worker as a
          │                   WorkerPlugin (workers that join later get them too); its
          │                   setup runs there, once per Dask worker process, its teardown
          │                   when the stage closes
          ▼
    batches (see _batching)   client.submit(_dask_call, key, slot, items...): one call per
          │                   slot at a time, the next sent when it returns; batches carry
          │                   ~TARGET_CALL_S of work so the round trip stays a small share
          ▼
    Dask worker thread        run_batch(): current_worker() set per item, every outcome
                              pickled per item; awaited here with `await future`

**Configuration.** ``DaskBackend(client)`` uses your ``distributed.Client``
(synchronous or asynchronous); ``DaskBackend(address="tcp://scheduler:8786")``
connects to a scheduler; ``DaskBackend()`` (and the name ``"dask"``) uses the default
client if you made one, else the ``scheduler-address`` of the Dask configuration
(``DASK_SCHEDULER_ADDRESS``), else starts ``LocalCluster(**cluster_kwargs)`` for the
run (``threads_per_worker=1`` unless given) and closes it afterwards. Your own client
and cluster are never closed. Workers need ``pypline`` installed (same version).

**Latency.** With the default ``buffer`` a stage holds few items (the memory bound), so its
throughput is what it holds divided by one call's round trip. Two Dask defaults
would add to every round trip: the client writes to the scheduler at most every
10 ms, so a task submitted right after another message waits; and releasing a
result is such a message. So a client pypline makes writes every
``CLIENT_SEND_INTERVAL_S`` (a client you give keeps its setting), and results are
released together with the next submit (at the latest when the stage closes).

**Concurrency.** Stage worker ``i`` is a slot with one call outstanding at a time,
so a stage runs at most ``num_workers`` calls at once; the cluster decides where.
(Keeping a second call queued would hide the round trip, but Dask may then run both
at once on two workers, and ordering them by a data dependency makes Dask keep, and
after a worker death re-compute, results pypline already has.)

**Faults.**

- A Dask worker that dies while running a call is Dask's to handle first: it
  re-runs the task on another worker, up to ``distributed.scheduler.allowed-failures``
  times (default 3), then gives up with ``KilledWorker``. pypline maps
  ``KilledWorker`` to *the process died mid-item*. Dask fails every task that was
  *assigned* to the dying worker, queued ones too, and a batch does not say which
  item was running, so the attempts are first re-run one at a time with no other
  call of the stage anywhere (uncounted); one that kills its worker that way gets
  ``WorkerDied``, which costs it an attempt (see ``_batching``). A worker lost for
  a reason that is not the item's (a host gone) is absorbed by Dask's own re-runs.
  Set ``allowed-failures`` low (0 or 1) if items may kill their process, or every
  poisonous item costs that many worker restarts per attempt.
- A cluster with no worker makes the run wait, as Dask does.
- The scheduler or the connection to it going away (``FutureCancelledError`` not
  caused by pypline, ``CommClosedError``/``OSError``) is reported ``lost`` with the
  scheduler's address: not the item's fault, re-dispatched up to ``max_lost``.

**Timeouts.** Dask cannot stop a Python call running in a worker thread
(cancelling a running future only forgets its result; the thread stays busy). So
with ``timeout=t`` each call runs in a fresh daemon thread of the Dask worker,
which waits ``t`` seconds: an overrunning call is reported ``TimeoutError`` and
*abandoned* there (it runs on until it returns, like a timed-out thread on the
``asyncio`` backend), and the worker thread goes on with the next item. As a
backstop for a worker that cannot answer at all (e.g. C code holding the GIL),
the client waits ``t`` per attempt plus ``TIMEOUT_GRACE_S`` for a call once it is
its slot's oldest, then reports ``TimeoutError`` and cancels the future. Use the
``ray`` or ``process`` backends when a stuck call must be killed.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

import dask  # type: ignore[import-not-found,import-untyped,unused-ignore]
from distributed import Client, LocalCluster  # type: ignore[import-not-found,import-untyped,unused-ignore]
from distributed.client import FutureCancelledError  # type: ignore[import-not-found,import-untyped,unused-ignore]
from distributed.diagnostics.plugin import WorkerPlugin  # type: ignore[import-not-found,import-untyped,unused-ignore]
from distributed.scheduler import KilledWorker  # type: ignore[import-not-found,import-untyped,unused-ignore]

from pypline.executor import Attempt, Backend, Executor, StageSpec, StageStartError
from pypline.lowlevel import SETUP_TIMEOUT_S, setup_failed

from ._batch_wire import StageWorker, run_batch
from ._batching import DIED, ERROR, IGNORE, LOST, BatchingExecutor, Call

__all__ = ["DaskBackend", "DaskExecutor"]

log = logging.getLogger("pypline.dask")

#: Seconds of work one call should carry. A call costs a few milliseconds of
#: scheduler and network time; 50 ms of work keeps that under ~10 % while a
#: slot's batch is still small enough to balance over the workers.
TARGET_CALL_S = 0.05

#: Extra seconds the client waits, beyond ``timeout`` per attempt, before it gives a
#: call up (the worker's own watchdog normally answers first): room for scheduling.
TIMEOUT_GRACE_S = 5.0

#: Most bytes of items a call carries inside its task; a bigger batch is scattered to
#: a worker first and the task refers to it. Dask keeps its last messages to each
#: worker for debugging (``distributed.admin.low-level-log-length``, 1,000), so big
#: payloads inside tasks would stay in the scheduler's (and client's) memory; a
#: scatter costs one more round trip, small next to moving that much data.
INLINE_BYTES = 64 * 1024

#: Seconds ``aclose`` waits for the scheduler to forget a stage's functions.
UNREGISTER_TIMEOUT_S = 5.0

#: Seconds between two writes of a client's message stream to the scheduler, on the
#: clients pypline makes. Dask's default (10 ms) makes a task submitted right after
#: any other message (such as releasing the previous result) wait that long; a
#: pipeline submits one small task per slot per round trip, so the wait would be a
#: large part of each call's latency. Clients you give pypline keep their setting.
CLIENT_SEND_INTERVAL_S = 0.001

# --- the worker side --------------------------------------------------------------------------

#: On each Dask worker: plugin key -> the stage's functions and the state its setup made there.
_STAGES: dict[str, StageWorker] = {}


class _SetupRaised(Exception):
    """The stage's setup raised on a Dask worker (as opposed to its functions not loading)."""


class _StageFunctions(WorkerPlugin):  # type: ignore[misc,unused-ignore]
    """Carries one stage's pickled functions to every worker, once (late joiners included),
    and runs the stage's setup there (in a thread: the Dask worker's loop keeps serving)
    and its teardown when the plugin is removed or the worker closes."""

    def __init__(self, key: str, blob: bytes, stage: str) -> None:
        self.key = key
        self.blob = blob
        self.stage = stage

    async def setup(self, worker: Any) -> None:
        stage = StageWorker.load(self.blob, self.stage)
        if stage.setup is not None:
            try:
                await asyncio.to_thread(stage.start, -1)  # -1: this process serves any of the stage's workers
            except Exception as exc:
                raise _SetupRaised(f"{type(exc).__name__}: {exc}") from exc
        _STAGES[self.key] = stage

    async def teardown(self, worker: Any) -> None:
        stage = _STAGES.pop(self.key, None)
        if stage is not None and stage.teardown is not None:
            await asyncio.to_thread(stage.stop, -1)


def _dask_call(
    key: str, stage: str, index: int, numbers: list[int], payloads: list[bytes], timeout: float | None, timing: bool
) -> Any:
    """The task: one batch of attempts of worker ``index``."""
    worker = _STAGES.get(key)
    try:
        from distributed import get_worker  # type: ignore[import-not-found,import-untyped,unused-ignore]

        where = f"Dask worker {get_worker().address}"
    except Exception:  # noqa: BLE001 - only used in messages
        where = "a Dask worker"
    if worker is None:
        raise RuntimeError(f"stage {stage!r}: its functions are not installed on {where} (see that worker's log)")
    return run_batch(worker, index, numbers, payloads, timeout, timing, where)


# --- the client side ----------------------------------------------------------------------------


class DaskExecutor(BatchingExecutor):
    """Runs one stage's attempts as batched Dask tasks. See the module docstring."""

    backend_name = "dask"
    target_call_s = TARGET_CALL_S
    timeout_batches_of_one = False  # the worker's watchdog times each attempt
    blame_scope = "stage"
    calls_per_slot = 1

    def __init__(self, spec: StageSpec, backend: DaskBackend) -> None:
        super().__init__(spec)
        self._backend = backend
        self._key = ""
        self._registered = False
        self._spent: list[Any] = []  # futures whose results arrived, released with the next submit

    async def _start_slots(self, blob: bytes) -> None:
        self._client = self._backend._client_for_run()
        self._key = f"pypline-{self._spec.name}-{uuid.uuid4().hex[:10]}"
        try:
            await asyncio.wait_for(
                self._client.register_plugin(_StageFunctions(self._key, blob, self._spec.name), name=self._key),
                SETUP_TIMEOUT_S,
            )
        except Exception as exc:
            self._registered = True  # some workers may have it: _stop_slots removes it (and tears them down)
            await self._stop_slots()
            if isinstance(exc, _SetupRaised):
                raise setup_failed(self._spec.name, "a Dask worker", exc, str(exc)) from exc
            if isinstance(exc, asyncio.TimeoutError):
                raise StageStartError(
                    self._spec.name, f"its functions were not installed on the Dask workers within {SETUP_TIMEOUT_S:g} s"
                ) from None
            raise StageStartError(
                self._spec.name, f"its functions could not be loaded on the Dask workers: {type(exc).__name__}: {exc}"
           ) from exc
        self._registered = True

    def _send(self, call: Call, payloads: list[bytes]) -> Awaitable[Any]:
        call.key = f"{self._key}-{call.seq}"
        if sum(map(len, payloads)) <= INLINE_BYTES:
            fut = self._submit(call, payloads)
            return fut  # type: ignore[no-any-return]
        return self._send_scattered(call, payloads)

    def _submit(self, call: Call, payloads: Any) -> Any:
        spec = self._spec
        numbers = [a.number for a in call.attempts]
        fut = self._client.submit(
            _dask_call,
            self._key,
            spec.name,
            call.slot,
            numbers,
            payloads,
            spec.timeout,
            self._timing,
            key=call.key,
            pure=False,
       )
        call.handle = fut
        if self._spent:
            self._spent.clear()  # their release travels to the scheduler in the same write
        return fut

    def _release(self, call: Call) -> None:
        # Releasing a future is a message to the scheduler (and from it to the worker).
        # Sent alone right before the next submit, it makes that submit wait for the
        # client's and the scheduler's next write (see CLIENT_SEND_INTERVAL_S); kept
        # until then, both travel together. At most one result per slot waits so.
        if call.handle is not None:
            self._spent.append(call.handle)
        call.handle = None

    async def _send_scattered(self, call: Call, payloads: list[bytes]) -> Any:
        [data] = await self._client.scatter([payloads], hash=False)
        if call.settled:  # timed out or closed meanwhile
            return None
        return await self._submit(call, data)

    def _verdict(self, call: Call, exc: BaseException) -> tuple[str, Any]:
        if isinstance(exc, KilledWorker):
            last = getattr(exc, "last_worker", None)
            last = getattr(last, "address", last)
            failures = getattr(exc, "allowed_failures", None)
            tried = f"{failures + 1} worker(s)" if isinstance(failures, int) else "every worker"
            return DIED, (
                f"stage {self._spec.name!r}: the Dask worker process died while running it "
                f"({tried} died trying, the last one {last}; Dask gave up with KilledWorker)"
           )
        if isinstance(exc, FutureCancelledError):
            if call.settled or self._closed:
                return IGNORE, None
            return LOST, f"{self._scheduler_address()} ({exc})"
        if isinstance(exc, (OSError, asyncio.TimeoutError)):
            return LOST, f"{self._scheduler_address()} ({type(exc).__name__}: {exc})"
        return ERROR, exc

    def _scheduler_address(self) -> str:
        try:
            return str(self._client.scheduler.address)
        except Exception:  # noqa: BLE001 - only used in messages
            return "dask-scheduler"

    def _deadline(self, call: Call) -> float | None:
        t = self._spec.timeout
        return None if t is None else t * len(call.attempts) + TIMEOUT_GRACE_S

    def _timeout_error(self, call: Call, a: Attempt, waited: float) -> TimeoutError:
        return TimeoutError(
            f"attempt {a.number} of stage {self._spec.name!r}: no answer from Dask within {waited:g} s "
            f"(timeout {self._spec.timeout:g} s per attempt plus {TIMEOUT_GRACE_S:g} s); its future was cancelled"
       )

    def _abandon(self, calls: list[Call], why: str) -> None:
        futures = [c.handle for c in calls if c.handle is not None]
        if futures and not self._closed:
            self._spawn(self._cancel(futures, why), name=f"pypline-{self._spec.name}-cancel")

    async def _cancel(self, futures: list[Any], why: str) -> None:
        try:
            await self._client.cancel(futures, reason=f"pypline: {why}")
        except Exception as exc:  # noqa: BLE001 - best effort: the futures are dropped anyway
            log.debug("stage %r: cancelling %d Dask future(s) failed: %r", self._spec.name, len(futures), exc)

    async def _stop_slots(self) -> None:
        self._spent.clear()
        futures = [c.handle for s in self._slots for c in s.calls if c.handle is not None and not c.returned]
        for s in self._slots:
            s.calls.clear()
        if futures:
            await self._cancel(futures, "run closed")
        if self._registered:
            self._registered = False
            try:
                await asyncio.wait_for(self._client.unregister_worker_plugin(self._key), UNREGISTER_TIMEOUT_S)
            except Exception as exc:  # noqa: BLE001 - a closed client or cluster: nothing left to clean
                log.debug("stage %r: unregistering its Dask plugin failed: %r", self._spec.name, exc)

    def _details(self) -> dict[str, Any]:
        return {"scheduler": self._scheduler_address()}


def _quicken(client: Any) -> Any:
    """Shorten the write interval of a client pypline made (see CLIENT_SEND_INTERVAL_S)."""
    stream = getattr(client, "scheduler_comm", None)
    if stream is not None and isinstance(getattr(stream, "interval", None), (int, float)):
        stream.interval = min(stream.interval, CLIENT_SEND_INTERVAL_S)
    return client


@dataclass
class _Connection:
    """The asynchronous client one event loop uses, and what pypline made for it."""

    client: Any
    owned_client: bool
    cluster: Any = None
    users: int = 0


class DaskBackend(Backend):
    """Backend ``dask``: ``multi_proc`` stages as batched tasks on a Dask cluster.

    ``DaskBackend(client)``, ``DaskBackend(address="tcp://host:8786")`` or
    ``DaskBackend(**cluster_kwargs)`` (a ``LocalCluster`` for each run when no
    client, address, default client or configured scheduler address is found). Use
    it as ``run(executor=DaskBackend(client))`` or ``configure(backend=...)``; the
    name ``"dask"`` means ``DaskBackend()``. See the module docstring.
    """

    name = "dask"

    def __init__(self, client: Any = None, address: str | None = None, **cluster_kwargs: Any) -> None:
        if client is not None and address is not None:
            raise TypeError("DaskBackend takes a client or an address, not both")
        if client is not None and not hasattr(client, "submit"):
            raise TypeError(f"DaskBackend(client=...) takes a distributed.Client, got {client!r}")
        if address is not None and not isinstance(address, str):
            raise TypeError(f"DaskBackend(address=...) takes a scheduler address string, got {address!r}")
        self.client = client
        self.address = address
        self.cluster_kwargs = cluster_kwargs
        self._conns: dict[asyncio.AbstractEventLoop, _Connection] = {}

    def __repr__(self) -> str:
        where = self.address or (self.client and "client") or "local"
        return f"DaskBackend({where})"

    async def open(self) -> None:
        loop = asyncio.get_running_loop()
        conn = self._conns.get(loop)
        if conn is None:
            conn = await self._connect(loop)
            self._conns[loop] = conn
        conn.users += 1

    async def _connect(self, loop: asyncio.AbstractEventLoop) -> _Connection:
        client = self.client
        if client is not None:
            if getattr(client, "asynchronous", False) and getattr(client.loop, "asyncio_loop", None) is loop:
                return _Connection(client, owned_client=False)
            return _Connection(
                await self._client_to(client.scheduler.address, security=getattr(client, "security", None)), True
           )
        address = self.address
        if address is None:
            try:
                from distributed import default_client  # type: ignore[import-not-found,import-untyped,unused-ignore]

                default = default_client()  # type: ignore[no-untyped-call,unused-ignore]
            except ValueError:
                default = None
            if default is not None:
                if getattr(default, "asynchronous", False) and getattr(default.loop, "asyncio_loop", None) is loop:
                    return _Connection(default, owned_client=False)
                return _Connection(
                    await self._client_to(default.scheduler.address, getattr(default, "security", None)), True
               )
            address = dask.config.get("scheduler-address", None)
        if address is not None:
            return _Connection(await self._client_to(address), True)
        kwargs = {"processes": True, "threads_per_worker": 1, "dashboard_address": ":0", **self.cluster_kwargs}
        log.info("starting a Dask LocalCluster for this run (%s); pass a Client to reuse one", kwargs)
        cluster: Any = await LocalCluster(asynchronous=True, **kwargs)  # type: ignore[no-untyped-call,unused-ignore]
        try:
            new = await Client(cluster, asynchronous=True, set_as_default=False)  # type: ignore[no-untyped-call,unused-ignore]
        except BaseException:
            await cluster.close()
            raise
        return _Connection(_quicken(new), owned_client=True, cluster=cluster)

    @staticmethod
    async def _client_to(address: str, security: Any = None) -> Any:
        kwargs: dict[str, Any] = {"asynchronous": True, "set_as_default": False}
        if security is not None:
            kwargs["security"] = security
        return _quicken(await Client(address, **kwargs))  # type: ignore[no-untyped-call,unused-ignore]

    def _client_for_run(self) -> Any:
        conn = self._conns.get(asyncio.get_running_loop())
        if conn is None:
            raise RuntimeError("DaskBackend.executor() used before open() on this event loop")
        return conn.client

    def executor(self, spec: StageSpec) -> Executor:
        return DaskExecutor(spec, self)

    async def aclose(self) -> None:
        loop = asyncio.get_running_loop()
        conn = self._conns.get(loop)
        if conn is None:
            return
        conn.users -= 1
        if conn.users > 0:
            return
        del self._conns[loop]
        if conn.owned_client:
            try:
                await conn.client.close()
            except Exception as exc:  # noqa: BLE001 - closing is best effort
                log.debug("closing the Dask client failed: %r", exc)
        if conn.cluster is not None:
            await conn.cluster.close()
