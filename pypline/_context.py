"""``current_worker()``: which stage, worker and attempt the running call belongs to.

Every backend sets it around each call of a worker function (on the loop, in a
thread, in a worker process or on a remote agent), through ``worker_context``.
"""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Iterator

__all__ = ["WorkerInfo", "current_worker", "worker_context"]


@dataclass(frozen=True, slots=True)
class WorkerInfo:
    """The call in progress: ``stage`` name, worker ``index`` (0-based) and ``attempt`` (from 1).

    ``state`` is what the stage's ``setup`` returned in this worker (``None`` without one).
    Inside ``setup`` and ``teardown`` themselves, ``attempt`` is 0.
    """

    stage: str
    index: int
    attempt: int
    state: Any = field(default=None, compare=False)


_current: ContextVar[WorkerInfo | None] = ContextVar("pypline_current_worker", default=None)


def current_worker() -> WorkerInfo:
    """The ``WorkerInfo`` of the worker call in progress.

    Raises ``RuntimeError`` when called outside a worker function (e.g. when a
    decorated stage is called directly in a unit test).
    """
    info = _current.get()
    if info is None:
        raise RuntimeError("current_worker() was called outside a pipeline worker call")
    return info


@contextmanager
def worker_context(info: WorkerInfo) -> Iterator[None]:
    """Make ``current_worker()`` return ``info`` inside the block (for backend authors)."""
    token = _current.set(info)
    try:
        yield
    finally:
        _current.reset(token)


def set_worker_info(info: WorkerInfo | None) -> None:
    """Set ``current_worker()`` for the rest of the current context (a worker task or thread)."""
    _current.set(info)
