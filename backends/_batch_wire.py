"""What travels between the client and a Dask worker or Ray actor, and what runs there.

::

    client                                            worker process (Dask task / Ray actor)
    ------                                            --------------------------------------
    pickle_function(spec) ── once per worker ──────►  StageWorker.load(blob): [(kind, fn), ...], setup,
                                                      teardown; start(): state = setup()
    dumps(item) per attempt ── in a batch ─────────►  run_batch(): for each attempt, in order:
                                                        pickle.loads(item); set current_worker();
                                                        invoke(kind, fn, item) (generators listed;
                                                        async on this thread's own loop; with a
                                                        timeout, in a daemon thread it may abandon)
    decode_error / pickle.loads(value) ◄── outcomes ──  (OK, value) | (GEN, [values]) | (ERR, ...)
                                                        each pickled alone: one bad value fails
                                                        one attempt, never the batch

Both sides pickle with ``pickle`` first (fast) and ``cloudpickle`` for what plain
pickle refuses (lambdas, closures, classes defined in ``__main__``). Exceptions take
the one error path of every backend (``wire/errors.py``): pickled when they can be,
always with their type name, message and traceback text; the client recreates them
with a ``RemoteTraceback`` as ``__cause__``, or a ``RemoteError`` when their type does
not exist there. A ``CancelledError`` from the stage's own code is reported like any
other error; the engine turns it into ``StageCancelled``.

Workers import this module by name, so ``pypline`` must be installed there.
"""

from __future__ import annotations

import asyncio
import pickle
import threading
import time
from typing import Any, Callable, Sequence

from pypline.executor import StageSpec, StageStartError
from pypline.lowlevel import WorkerInfo, run_setup, run_teardown, set_worker_info

from ._procpool import ship_unimportable_by_value  # one rule for "ship by value" in every backend
from .wire.errors import describe, pickled, rebuild, unpickled  # the one error path

__all__ = [
    "ERR",
    "GEN",
    "OK",
    "decode_error",
    "dumps",
    "invoke",
    "StageWorker",
    "pickle_function",
    "run_batch",
]

# --- outcome codes (worker -> client) ---------------------------------------------------------

OK = 0  # (OK, pickled value)
GEN = 1  # (GEN, pickled list of yielded values)
ERR = 2  # (ERR, pickled exception or None, type name, message, traceback text)


# --- shipping functions ------------------------------------------------------------------------






def pickle_function(spec: StageSpec) -> bytes:
    """The stage's worker functions, by worker index, and its setup and teardown, as one blob.

    A function from a module a worker could not import by name (``__main__``, a test
    module pytest imported from a path) is pickled by value: its module is registered
    with ``cloudpickle.register_pickle_by_value`` (process-wide, and harmless: by
    reference could not have worked for it). A function used by several workers is
    pickled once (pickle's memo). Raises ``StageStartError`` if it cannot be pickled.
    """
    import cloudpickle  # type: ignore[import-untyped,unused-ignore]

    hooks = [h for h in (spec.setup, spec.teardown) if h is not None]
    for fn in [*(wf.fn for wf in spec.workers), *hooks]:
        ship_unimportable_by_value(fn)
    try:
        fns = [(wf.kind.value, wf.fn) for wf in spec.workers]
        return cloudpickle.dumps((fns, spec.setup, spec.teardown), protocol=5)  # type: ignore[no-any-return]
    except Exception as exc:
        raise StageStartError(
            spec.name, f"its function cannot be pickled to run on another process: {type(exc).__name__}: {exc}"
        ) from exc


class StageWorker:
    """Where a stage's calls run (a Dask worker process, a Ray actor): its functions, and the
    state its ``setup`` made there. ``start`` and ``stop`` run the setup and the teardown."""

    def __init__(
        self,
        fns: list[tuple[str, Callable[..., Any]]],
        setup: Callable[[], Any] | None,
        teardown: Callable[[Any], Any] | None,
        stage: str,
    ) -> None:
        self.fns, self.setup, self.teardown = fns, setup, teardown
        self.stage = stage
        self.state: Any = None
        self.started = self.setup is None  # torn down at stop once started

    @classmethod
    def load(cls, blob: bytes, stage: str) -> StageWorker:
        """From ``pickle_function``'s blob."""
        fns, setup, teardown = pickle.loads(blob)
        return cls(fns, setup, teardown, stage)

    def start(self, index: int) -> None:
        if self.setup is not None:
            self.state = run_setup(self.setup, self.stage, index, _run_coroutine)
        self.started = True

    def stop(self, index: int) -> str | None:
        """Run the teardown once, if the worker was started; how it failed, or None."""
        if not (self.started and self.teardown is not None):
            return None
        self.started = False
        return run_teardown(self.teardown, self.state, self.stage, index, _run_coroutine)


def dumps(value: Any) -> bytes:
    """Pickle one value: the C pickler first (fast), cloudpickle for lambdas and the like."""
    try:
        return pickle.dumps(value, protocol=5)
    except Exception:  # noqa: BLE001 - retried with cloudpickle, which raises if it cannot either
        import cloudpickle  # type: ignore[import-untyped,unused-ignore]

        return cloudpickle.dumps(value, protocol=5)  # type: ignore[no-any-return]


# --- the worker side ---------------------------------------------------------------------------

_local = threading.local()


def _run_coroutine(coro: Any) -> Any:
    """Run a coroutine on this thread's own event loop (kept for the thread's lifetime)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        pass
    else:  # a loop already runs in this thread (an async actor): run it beside, in a thread
        box: list[Any] = []
        t = threading.Thread(target=lambda: box.append(_capture(asyncio.run, coro)), name="pypline-coro")
        t.start()
        t.join()
        return _unwrap(box[0])
    loop = getattr(_local, "loop", None)
    if loop is None or loop.is_closed():
        loop = _local.loop = asyncio.new_event_loop()
    return loop.run_until_complete(coro)


def _capture(fn: Callable[..., Any], *args: Any) -> tuple[bool, Any]:
    try:
        return True, fn(*args)
    except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
        return False, exc


def _unwrap(box: tuple[bool, Any]) -> Any:
    ok, value = box
    if ok:
        return value
    raise value


async def _collect(agen: Any) -> list[Any]:
    return [v async for v in agen]


def invoke(kind: str, fn: Callable[..., Any], item: Any, run: Callable[[Any], Any] = _run_coroutine) -> Any:
    """Call a worker function the way its kind says; generators are materialised to a list."""
    if kind == "sync":
        value = fn(item)
        if asyncio.iscoroutine(value):  # a def that returned a coroutine: await it here
            value = run(value)
        return value
    if kind == "async":
        return run(fn(item))
    if kind == "gen":
        return list(fn(item))
    return run(_collect(fn(item)))


def _invoke_with_deadline(
    kind: str, fn: Callable[..., Any], item: Any, info: WorkerInfo, timeout: float, where: str
) -> Any:
    """Run one call in a fresh daemon thread and wait at most ``timeout`` for it.

    A call that does not finish in time is abandoned: Python cannot kill a thread,
    so it runs on until it returns and its result is dropped; the caller's thread
    is free at once for the next call.
    """
    box: list[tuple[bool, Any]] = []
    done = threading.Event()

    def target() -> None:
        set_worker_info(info)
        box.append(_capture(invoke, kind, fn, item, asyncio.run))
        done.set()

    thread = threading.Thread(target=target, name=f"pypline-{info.stage}-{info.index}-call", daemon=True)
    thread.start()
    if not done.wait(timeout):
        raise TimeoutError(
            f"attempt {info.attempt} of stage {info.stage!r} timed out after {timeout:g} s "
            f"(abandoned in a thread of {where}; it runs on until it returns)"
        )
    return _unwrap(box[0])




def encode_error(exc: BaseException) -> tuple[Any, ...]:
    """An ERR outcome: (ERR, pickled exception or None, type name, message, traceback text)."""
    return (ERR, pickled(exc, dumps), *describe(exc))


def run_batch(
    worker: StageWorker,
    index: int,
    numbers: Sequence[int],
    payloads: Sequence[bytes],
    timeout: float | None,
    timing: bool,
    where: str,
) -> tuple[list[tuple[Any, ...]], float, list[float] | None]:
    """Run one batch of attempts of worker ``index``, in order. Never raises.

    Returns the outcomes (one per attempt), the seconds spent on them, and each
    attempt's duration when ``timing``. With a ``timeout`` each call runs in a
    fresh daemon thread that is abandoned when it overruns (see
    ``_invoke_with_deadline``).
    """
    kind, fn = worker.fns[index]
    stage, state = worker.stage, worker.state
    out: list[tuple[Any, ...]] = []
    durations: list[float] | None = [] if timing else None
    clock = time.perf_counter
    start = clock()
    info: WorkerInfo | None = None
    for number, payload in zip(numbers, payloads):
        t0 = clock()
        try:
            item = pickle.loads(payload)
            if info is None or info.attempt != number:
                info = WorkerInfo(stage, index, number, state)
            if timeout is None:
                set_worker_info(info)
                value = invoke(kind, fn, item)
            else:
                value = _invoke_with_deadline(kind, fn, item, info, timeout, where)
            out.append((GEN if kind in ("gen", "async_gen") else OK, dumps(value)))
        except BaseException as exc:  # noqa: BLE001 - every failure is the item's outcome
            out.append(encode_error(exc))
        finally:
            if durations is not None:
                durations.append(clock() - t0)
    set_worker_info(None)
    return out, clock() - start, durations


# --- back on the client --------------------------------------------------------------------------


def decode_error(fields: tuple[Any, ...]) -> BaseException:
    """The exception an ERR outcome stands for (its own type when it unpickles here)."""
    _, blob, name, message, tb = fields
    return rebuild(name, message, tb, unpickled(blob))