"""The ``ray`` backend: ``multi_proc=True`` stages on Ray actors, one per stage worker.

::

    RayBackend.open()         Ray as you initialised it, or ray.init(address, **init_kwargs)
          │                   in a thread kept alive until the run's ray.shutdown()
          ▼
    RayExecutor.start()       ray.put(the stage's pickled functions), then one actor per
          │                   worker index: it unpickles its function once and answers ready(),
          │                   then runs the stage's setup (start()); stop() runs its teardown
          ▼
    batches (see _batching)   actor_i.run.remote(items...) -> object ref, awaited (`await ref`)
          │                   a slot's calls queue at its actor: one runs, the next waits there
          ▼
    actor process             run_batch(): current_worker() set per item, outcomes pickled per item

**Configuration.** ``RayBackend()`` (and the name ``"ray"``) uses Ray as already
initialised in this process, or calls ``ray.init(**init_kwargs)`` for the run
(``RAY_ADDRESS`` applies; a local instance otherwise, without dashboard) and
``ray.shutdown()`` after it. ``RayBackend(address="ray://head:10001")`` connects
to that cluster when Ray is not initialised yet. ``actor_options`` go to
``ActorClass.options()`` (e.g. ``{"num_cpus": 1}`` to reserve a CPU per worker;
by default actors hold no CPU while running and are spread over the nodes).
Initialise Ray once yourself when running many pipelines: starting it takes seconds.

**Concurrency.** Worker ``i`` is actor ``i``: its calls run one at a time, so a
stage runs at most ``num_workers`` calls at once, and targeted attempts (fork mode,
``mix_pool`` worker ``i``) simply go to actor ``i``.

**Faults.**

- ``ActorDiedError`` (the actor's process died: ``os._exit``, a segfault, the
  OOM killer, Ray's memory monitor), ``WorkerCrashedError``, ``OutOfMemoryError``:
  the process died mid-item. The actor is replaced. Its attempts (and those of a
  call queued behind: the reply of a call that had just finished may be what was
  lost) are re-run one per call with nothing else queued at their actor,
  uncounted; one that kills its actor that way gets ``WorkerDied``, which costs it
  an attempt (see ``_batching``).
- The actor's node died (``ActorDiedError`` saying so, or a preempted node),
  ``ActorUnavailableError``, ``NodeDiedError``, ``OwnerDiedError``,
  ``ObjectLostError``, ``RaySystemError``, ``LocalRayletDiedError``: the engine lost
  the worker, not the item's fault: ``lost`` with the node's address (re-dispatched
  up to ``max_lost``), and the actor is replaced.

**Timeouts.** With ``timeout=t`` a stage sends one attempt per call and one call at
a time per actor, so the clock starts when the attempt is sent to an idle actor.
When ``t`` passes, the attempt is reported ``TimeoutError`` and the actor is killed
(``ray.kill``: the process ends, whatever it was doing) and replaced; ``ray.cancel``
cannot interrupt a task running in an actor. Nothing of the stuck call survives.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from typing import Any, Awaitable

import ray  # type: ignore[import-not-found,import-untyped,unused-ignore]
from ray import exceptions as rx  # type: ignore[import-not-found,import-untyped,unused-ignore]

from pypline.executor import Attempt, Backend, Executor, StageSpec, StageStartError
from pypline.lowlevel import SETUP_TIMEOUT_S, TEARDOWN_TIMEOUT_S, setup_failed

from ._batch_wire import StageWorker, run_batch
from ._batching import DIED, ERROR, IGNORE, LOST, BatchingExecutor, Call

__all__ = ["RayBackend", "RayExecutor"]

log = logging.getLogger("pypline.ray")

#: Seconds of work one call should carry. An actor call costs well under a
#: millisecond and the next call already waits at the actor, so small batches do.
TARGET_CALL_S = 0.01

#: Seconds to wait for a stage's actors to be placed and load their function
#: (a cluster without room for them would otherwise wait forever).
START_TIMEOUT_S = 60.0

#: Replacements of one actor that may fail in a row before the attempts waiting
#: for it fail with ``WorkerDied``.
MAX_RESTART_FAILURES = 3

#: Defaults for the actors: spread over the nodes, never restarted by Ray (a dead
#: actor is replaced by pypline, which knows what it was running).
ACTOR_DEFAULTS: dict[str, Any] = {"scheduling_strategy": "SPREAD", "max_restarts": 0, "max_task_retries": 0}

#: Most bytes of items one call carries (see ``BatchingExecutor.max_call_bytes``).
#: Ray writes an argument bigger than its ``max_direct_call_object_size`` (100 KiB)
#: to the object store, a shared-memory file, and frees such objects in batches
#: (up to 100, or once a second): the store pages written meanwhile stay mapped,
#: and counted, in the driver and the actor. Bigger calls gain nothing once the
#: per-call cost is amortised, so a call carries at most this much: with 10 KB
#: items, about 25 (the store then keeps ~40 MB less, RSS ~100 MB less over the
#: driver and two actors). Arguments small enough to travel inline would avoid the
#: store, but grow the driver's heap instead (measured: worse).
MAX_CALL_BYTES = 256 * 1024

_TIMED_OUT = "timed out"


class _RayWorker:
    """One stage worker: holds its function, runs batches of attempts, one call at a time."""

    def __init__(self, blob: bytes, stage: str, index: int) -> None:
        self.worker = StageWorker.load(blob, stage)
        self.index = index
        self.where = f"Ray actor pid {os.getpid()}"

    def ready(self) -> tuple[int, str]:
        try:
            node = ray.util.get_node_ip_address()  # type: ignore[no-untyped-call,unused-ignore]
        except Exception:  # noqa: BLE001 - only used in messages
            node = "?"
        return os.getpid(), str(node)

    def start(self) -> None:
        """The stage's setup, here (its state serves this actor's calls)."""
        self.worker.start(self.index)

    def stop(self) -> str | None:
        """The stage's teardown, here; how it failed, or None."""
        return self.worker.stop(self.index)

    def run(self, numbers: list[int], payloads: list[bytes], timing: bool) -> Any:
        return run_batch(self.worker, self.index, numbers, payloads, None, timing, self.where)


_remote_worker: Any = None


def _actor_class() -> Any:
    global _remote_worker
    if _remote_worker is None:
        _remote_worker = ray.remote(_RayWorker)
    return _remote_worker


def _node_lost(exc: BaseException) -> bool:
    if isinstance(
        exc,
        (rx.ActorUnavailableError, rx.NodeDiedError, rx.OwnerDiedError, rx.ObjectLostError, rx.LocalRayletDiedError),
    ):
        return True
    if isinstance(exc, rx.RaySystemError):
        return True
    if isinstance(exc, rx.RayActorError):
        if getattr(exc, "preempted", False):
            return True
        text = str(exc)
        return "node has died" in text or "node died" in text
    return False


class RayExecutor(BatchingExecutor):
    """Runs one stage's attempts on one Ray actor per worker. See the module docstring."""

    backend_name = "ray"
    target_call_s = TARGET_CALL_S
    timeout_batches_of_one = True
    max_call_bytes = MAX_CALL_BYTES

    def __init__(self, spec: StageSpec, backend: RayBackend) -> None:
        super().__init__(spec)
        self._backend = backend
        self._actors: list[Any] = [None] * self._n
        self._where: list[str] = ["?"] * self._n
        self._gen = [0] * self._n
        self._starting: set[Any] = set()  # actors created and not yet ready (killed on close)
        self._blob_ref: Any = None

    async def _new_actor(self, i: int) -> tuple[Any, str]:
        options = {**ACTOR_DEFAULTS, **self._backend.actor_options}
        actor = _actor_class().options(**options).remote(self._blob_ref, self._spec.name, i)
        self._starting.add(actor)
        try:
            _, node = await asyncio.wait_for(_awaitable(actor.ready.remote()), START_TIMEOUT_S)
            if self._spec.setup is not None:
                try:
                    await asyncio.wait_for(_awaitable(actor.start.remote()), SETUP_TIMEOUT_S)
                except Exception as exc:
                    cause = getattr(exc, "cause", None) if isinstance(exc, rx.RayTaskError) else None
                    raise _SetupFailed(i, cause if isinstance(cause, BaseException) else exc) from exc
        except BaseException:
            self._starting.discard(actor)
            _kill(actor)
            raise
        self._starting.discard(actor)
        return actor, node

    async def _start_slots(self, blob: bytes) -> None:
        self._blob_ref = ray.put(blob)
        results = await asyncio.gather(*(self._new_actor(i) for i in range(self._n)), return_exceptions=True)
        failed = next((r for r in results if isinstance(r, BaseException)), None)
        for i, r in enumerate(results):
            if isinstance(r, BaseException):
                continue
            self._actors[i], self._where[i] = r
        if failed is not None:
            if self._spec.teardown is not None:
                await self._teardown()  # the actors whose setup ran
            for a in self._actors:
                _kill(a)
            if isinstance(failed, asyncio.CancelledError):
                raise failed
            if isinstance(failed, _SetupFailed):
                raise setup_failed(self._spec.name, f"worker {failed.index} (a Ray actor)", failed.error)
            why = (
                "not placed in time (does the cluster have the resources actor_options asks for?)"
                if isinstance(failed, asyncio.TimeoutError)
                else f"{type(failed).__name__}: {failed}"
            )
            raise StageStartError(self._spec.name, f"its Ray actors could not start: {why}") from failed

    def _send(self, call: Call, payloads: list[bytes]) -> Awaitable[Any]:
        i = call.slot
        call.generation = self._gen[i]
        ref = self._actors[i].run.remote([a.number for a in call.attempts], payloads, self._timing)
        call.handle = ref
        return _awaitable(ref)

    def _verdict(self, call: Call, exc: BaseException) -> tuple[str, Any]:
        where = self._where[call.slot]
        if isinstance(exc, rx.TaskCancelledError):
            return (IGNORE, None) if self._closed else (LOST, where)
        if _node_lost(exc):
            return LOST, f"ray node {where}"
        if isinstance(exc, (rx.RayActorError, rx.WorkerCrashedError, rx.OutOfMemoryError)):
            return DIED, (
                f"stage {self._spec.name!r}: the process of its Ray actor (worker {call.slot}, node {where}) "
                f"died while running the attempt: {_summary(exc)}"
            )
        if isinstance(exc, rx.RayTaskError):
            cause = getattr(exc, "cause", None)
            return ERROR, cause if isinstance(cause, BaseException) else exc
        return ERROR, exc

    def _deadline(self, call: Call) -> float | None:
        return self._spec.timeout

    def _timeout_error(self, call: Call, a: Attempt, waited: float) -> TimeoutError:
        return TimeoutError(
            f"attempt {a.number} of stage {self._spec.name!r} timed out after {waited:g} s "
            "(its Ray actor was killed and a new one started)"
        )

    def _abandon(self, calls: list[Call], why: str) -> None:
        if why == _TIMED_OUT and calls:
            self._repair(calls[0].slot, why)

    def _repair(self, slot: int, why: str) -> None:
        s = self._slots[slot]
        if not s.ready or self._closed:
            return  # a replacement is already on its way
        s.ready = False
        _kill(self._actors[slot])
        self._actors[slot] = None
        self._gen[slot] += 1
        log.warning("stage %r worker %d: replacing its Ray actor (%s)", self._spec.name, slot, why.splitlines()[0])
        self._spawn(self._restart(slot), name=f"pypline-{self._spec.name}-{slot}-restart")

    async def _restart(self, slot: int) -> None:
        s = self._slots[slot]
        for failures in range(MAX_RESTART_FAILURES):
            try:
                actor, node = await self._new_actor(slot)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - retried, then the slot is given up
                log.warning("stage %r worker %d: a new Ray actor failed to start: %r", self._spec.name, slot, exc)
                await asyncio.sleep(0.2 * 2**failures)
                continue
            if self._closed:
                _kill(actor)
                return
            self._actors[slot], self._where[slot] = actor, node
            self._replaced += 1
            s.ready = True
            self._schedule()
            return
        s.dead = True
        self._schedule()

    async def _stop_slots(self) -> None:
        if self._spec.teardown is not None:
            await self._teardown()
        for a in [*self._actors, *self._starting]:
            _kill(a)
        self._actors = [None] * self._n
        self._starting.clear()
        for s in self._slots:
            s.calls.clear()
        self._blob_ref = None

    async def _teardown(self) -> None:
        """Each live actor runs the stage's teardown (after the call it runs, if any), within
        TEARDOWN_TIMEOUT_S; an actor that does not answer in time is killed without it."""
        live = [(i, a) for i, a in enumerate(self._actors) if a is not None]
        waits = [asyncio.ensure_future(_awaitable(a.stop.remote())) for _, a in live]
        if not waits:
            return
        await asyncio.wait(waits, timeout=TEARDOWN_TIMEOUT_S)
        for (i, _), w in zip(live, waits):
            if not w.done():
                w.cancel()
                log.warning("stage %r worker %d: teardown() did not end within %g s", self._spec.name, i, TEARDOWN_TIMEOUT_S)
            elif w.exception() is not None or w.result() is not None:
                why = w.result() if w.exception() is None else repr(w.exception())
                log.warning("stage %r worker %d (a Ray actor): teardown() raised %s", self._spec.name, i, why)

    def _details(self) -> dict[str, Any]:
        return {"nodes": list(self._where)}


class _SetupFailed(Exception):
    """The stage's setup raised in worker ``index``'s new actor."""

    def __init__(self, index: int, error: BaseException) -> None:
        super().__init__(index, error)
        self.index = index
        self.error = error


def _summary(exc: BaseException) -> str:
    """The first line of a Ray error and the line saying why the process ended, if any."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    why = [line for line in lines[1:] if "dead because" in line or "exit type" in line.lower()]
    return " ".join([f"{type(exc).__name__}: {lines[0] if lines else ''}", *why[:1]])[:600]


def _awaitable(ref: Any) -> Awaitable[Any]:
    async def wait() -> Any:
        return await ref

    return wait()


def _kill(actor: Any) -> None:
    if actor is None:
        return
    try:
        ray.kill(actor, no_restart=True)
    except Exception as exc:  # noqa: BLE001 - already dead, or Ray is shutting down
        log.debug("ray.kill failed: %r", exc)


class _RayOwner:
    """A thread that starts Ray, stays alive while it runs, then shuts it down.

    Ray ties its daemons (GCS, raylet) to the *thread* that started them (Linux's
    parent-death signal follows the creating thread), so ``ray.init`` cannot run in
    a short-lived thread, and must not block the event loop: this thread lives
    from ``ray.init`` to ``ray.shutdown``. It is a daemon, so an interpreter that
    exits without ``aclose`` still takes Ray's processes down with it.
    """

    def __init__(self, init_kwargs: dict[str, Any]) -> None:
        self.init_kwargs = init_kwargs
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._main, name="pypline-ray-owner", daemon=True)
        self._started: asyncio.Future[None] | None = None
        self._stopped: asyncio.Future[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._started = self._loop.create_future()
        self._stopped = self._loop.create_future()
        self._thread.start()
        await asyncio.shield(self._started)

    async def stop(self) -> None:
        self._stop.set()
        if self._stopped is not None:
            await asyncio.shield(self._stopped)
        self._thread.join()

    def _post(self, fut: asyncio.Future[None] | None, exc: BaseException | None) -> None:
        def settle() -> None:
            if fut is not None and not fut.done():
                if exc is None:
                    fut.set_result(None)
                else:
                    fut.set_exception(exc)

        if self._loop is not None:
            try:
                self._loop.call_soon_threadsafe(settle)
            except RuntimeError:  # the loop is closed: nobody waits any more
                pass

    def _main(self) -> None:
        try:
            ray.init(**self.init_kwargs)
        except BaseException as exc:  # noqa: BLE001 - handed to the awaiting open()
            self._post(self._started, exc)
            self._post(self._stopped, None)
            return
        self._post(self._started, None)
        self._stop.wait()
        try:
            ray.shutdown()
        finally:
            self._post(self._stopped, None)


class RayBackend(Backend):
    """Backend ``ray``: ``multi_proc`` stages on Ray actors, one per stage worker.

    ``RayBackend()`` uses an already initialised Ray or starts one for each run;
    ``RayBackend(address=..., **init_kwargs)`` connects there when Ray is not
    initialised; ``actor_options`` are passed to the actors' ``options()``. Use it as
    ``run(executor=RayBackend())`` or ``configure(backend=...)``; the name ``"ray"``
    means ``RayBackend()``. See the module docstring.
    """

    name = "ray"

    def __init__(
        self, address: str | None = None, *, actor_options: dict[str, Any] | None = None, **init_kwargs: Any
    ) -> None:
        if address is not None and not isinstance(address, str):
            raise TypeError(f"RayBackend(address=...) takes a cluster address string, got {address!r}")
        if actor_options is not None and not isinstance(actor_options, dict):
            raise TypeError(f"RayBackend(actor_options=...) takes a dict of actor options, got {actor_options!r}")
        self.address = address
        self.actor_options: dict[str, Any] = dict(actor_options or {})
        self.init_kwargs = init_kwargs
        self._owner: _RayOwner | None = None
        self._users = 0

    def __repr__(self) -> str:
        return f"RayBackend({self.address or 'local'})"

    async def open(self) -> None:
        if self._owner is None and not ray.is_initialized():
            kwargs: dict[str, Any] = dict(self.init_kwargs)
            if self.address is not None:
                kwargs["address"] = self.address
            else:
                kwargs.setdefault("include_dashboard", False)
            log.info("starting Ray for this run (ray.init(%s)); initialise Ray yourself to reuse it", kwargs)
            owner = _RayOwner(kwargs)
            self._owner = owner
            try:
                await owner.start()
            except BaseException:
                self._owner = None
                raise
        self._users += 1

    def executor(self, spec: StageSpec) -> Executor:
        return RayExecutor(spec, self)

    async def aclose(self) -> None:
        if self._users == 0:
            return
        self._users -= 1
        if self._users == 0 and self._owner is not None:
            owner, self._owner = self._owner, None
            await owner.stop()
