"""A worker's set-up and teardown (``work_pool(setup=..., teardown=...)``), for every backend.

::

    worker starts ─► state = setup()            current_worker(): attempt 0, state None;
          │                                     an ``async def`` setup is awaited where the
          │ raises ─► StageStartError            worker's async calls run
          ▼           (the stage, the worker, the exception): the run fails at start
    each call ─► current_worker().state is that state
          ▼
    worker stops ─► teardown(state)             end of run, fail_fast, cancellation; a
                                                failure is logged, never the run's outcome

A backend calls ``run_setup`` where the worker's calls will run (its thread, its process,
its actor) and ``run_teardown`` there when the worker stops. The ``process`` backend's
worker processes do the same in ``_procworker`` without importing pypline.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Callable

from ._context import WorkerInfo, set_worker_info
from ._errors import StageStartError

__all__ = ["SETUP_TIMEOUT_S", "TEARDOWN_TIMEOUT_S", "arun_setup", "arun_teardown", "run_setup", "run_teardown", "setup_failed"]

log = logging.getLogger("pypline")

#: How long a worker's ``setup`` may take before the stage fails to start (a minute:
#: loading a model or opening a pool of connections fits; a setup that hangs does not
#: hang the run).
SETUP_TIMEOUT_S = 60.0

#: How long a stopping worker waits for its ``teardown``; after that the worker stops
#: without it (and says so in the log).
TEARDOWN_TIMEOUT_S = 10.0

Runner = Callable[[Any], Any]  # runs a coroutine to its end, from a thread with no running loop


def setup_failed(stage: str, where: str, exc: BaseException, error: str = "") -> StageStartError:
    """The error that fails a stage whose ``setup`` raised ``exc`` in ``where`` ("worker 2").

    ``error`` describes the exception when it happened elsewhere (``exc`` then carries it)."""
    err = StageStartError(stage, f"setup() raised in {where}: {error or f'{type(exc).__name__}: {exc}'}")
    err.__cause__ = exc
    return err


def run_setup(setup: Callable[[], Any], stage: str, index: int, run: Runner = asyncio.run) -> Any:
    """Call ``setup`` in this thread (``run`` awaits an ``async def`` one) and return the state."""
    set_worker_info(WorkerInfo(stage, index, 0))
    try:
        state = setup()
        if asyncio.iscoroutine(state):
            state = run(state)
        return state
    finally:
        set_worker_info(None)


def run_teardown(
    teardown: Callable[[Any], Any], state: Any, stage: str, index: int, run: Runner = asyncio.run
) -> str | None:
    """Call ``teardown(state)`` in this thread. A failure is logged (here) and described in
    the return value (for a caller in another process to log), never raised."""
    set_worker_info(WorkerInfo(stage, index, 0, state))
    try:
        done = teardown(state)
        if asyncio.iscoroutine(done):
            run(done)
    except Exception as exc:  # noqa: BLE001 - the run's outcome is decided; say what went wrong
        log.warning("stage %r worker %d: teardown() raised %s: %s", stage, index, type(exc).__name__, exc, exc_info=exc)
        return f"{type(exc).__name__}: {exc}"
    finally:
        set_worker_info(None)
    return None


async def arun_setup(setup: Callable[[], Any], stage: str, index: int) -> Any:
    """``run_setup`` on the running loop (for workers whose calls run on it)."""
    set_worker_info(WorkerInfo(stage, index, 0))
    try:
        state = setup()
        if asyncio.iscoroutine(state):
            state = await state
        return state
    finally:
        set_worker_info(None)


async def arun_teardown(teardown: Callable[[Any], Any], state: Any, stage: str, index: int) -> None:
    """``run_teardown`` on the running loop."""
    set_worker_info(WorkerInfo(stage, index, 0, state))
    try:
        done = teardown(state)
        if asyncio.iscoroutine(done):
            await done
    except Exception as exc:  # noqa: BLE001 - the run's outcome is decided; say what went wrong
        log.warning("stage %r worker %d: teardown() raised %s: %s", stage, index, type(exc).__name__, exc, exc_info=exc)
    finally:
        set_worker_info(None)
