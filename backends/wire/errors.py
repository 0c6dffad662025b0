"""How an exception crosses a process boundary: one path for processes, agents, Dask and Ray.

::

    raising side (a worker process, an agent, a Dask or Ray worker)
        describe(exc) -> (type name, message, traceback text)      never raises
        pickled(exc, dumps) -> bytes | None                          None: it cannot be pickled
                      │ the transport carries the four fields its own way
                      ▼
    receiving side (the client's executor)
        unpickled(blob) -> exception | None                          None: its type does not exist here
        rebuild(name, message, tb, exc) -> exception
            exc given:  exc itself, its __cause__ a RemoteTraceback holding the remote traceback
            exc None:   RemoteError(name, message, tb)
    then sink.error(attempt, that exception)

So an exception keeps its type wherever it can be unpickled, and its remote traceback
text always travels (``ItemFailure`` prints it). A ``CancelledError`` raised by the
stage's own code travels like any other; the engine turns it into ``StageCancelled``.

This module imports nothing beyond the standard library at import time: a process
backend worker loads it by its path, without importing pypline (see ``_procworker``).
"""

from __future__ import annotations

import pickle
from collections.abc import Callable
from typing import Any

__all__ = ["describe", "pickled", "rebuild", "unpickled"]


def describe(exc: BaseException) -> tuple[str, str, str]:
    """(type name, message, traceback text) of ``exc``, never raising.

    The traceback text is the remote one when ``exc`` itself came from another process
    (its ``__cause__`` carries ``traceback_text``: an agent passing on a worker's error),
    else this process's.
    """
    cls = type(exc)
    mod = getattr(cls, "__module__", "") or ""
    name = cls.__qualname__ if mod in ("builtins", "") else f"{mod}.{cls.__qualname__}"
    try:
        message = str(exc)
    except Exception:  # noqa: BLE001 - a broken __str__ must not hide the error itself
        message = f"<{cls.__qualname__} with unprintable message>"
    remote = getattr(exc.__cause__, "traceback_text", None)
    if isinstance(remote, str) and remote:
        return name, message, remote
    try:
        import traceback  # only when an error is reported: not on every worker's start

        tb = "".join(traceback.format_exception(cls, exc, exc.__traceback__))
    except Exception:  # noqa: BLE001 - the message alone will do
        tb = f"{name}: {message}\n"
    return name, message, tb


def pickled(exc: BaseException, dumps: Callable[[Any], bytes]) -> bytes | None:
    """``dumps(exc)``, or None when it cannot be pickled (then the receiver gets a RemoteError)."""
    try:
        return dumps(exc)
    except Exception:  # noqa: BLE001 - any pickling failure: the fields alone will travel
        return None


def unpickled(blob: Any, loads: Callable[[Any], Any] = pickle.loads) -> BaseException | None:
    """The exception in ``blob``, or None when it cannot be unpickled here (or is not one)."""
    if blob is None:
        return None
    try:
        exc = loads(blob)
    except Exception:  # noqa: BLE001 - its type does not exist here: a RemoteError instead
        return None
    return exc if isinstance(exc, BaseException) else None


def rebuild(name: str, message: str, tb: str, exc: BaseException | None) -> BaseException:
    """The exception to report: ``exc`` with the remote traceback as its cause, else a RemoteError."""
    from pypline.executor import RemoteError, RemoteTraceback

    if exc is None:
        return RemoteError(name, message, tb)
    exc.__cause__ = RemoteTraceback(name, message, tb)
    return exc
