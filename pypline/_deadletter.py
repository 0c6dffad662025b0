"""Failures that go somewhere else: ``run(on_failure=...)`` hands each ``ItemFailure`` to a
callable, or appends it to a JSON-lines file, instead of keeping them all in memory.

::

    an item fails for good ─► on_failure(failure)  or  one JSON line in the file
                          └─► PipelineError.failures keeps the first FAILURES_KEPT only;
                              PipelineError.failed counts them all

A JSON line holds what a person or a script needs to look into or replay the item:
``index``, ``stage``, ``item`` (as JSON, or its ``repr`` when it is not JSON),
``error_type``, ``error``, ``attempts`` and ``history``. The file is flushed after every
line and fsynced when the run ends. A callable that raises is logged and the run goes
on; that failure is then kept in ``PipelineError.failures`` whatever the bound (never lost).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from typing import Any

from ._errors import ItemFailure

__all__ = ["FAILURES_KEPT", "DeadLetters"]

#: Failures a PipelineError keeps in memory when they also go to ``on_failure``.
FAILURES_KEPT = 100

log = logging.getLogger("pypline.engine")


def _json_item(item: Any) -> Any:
    try:
        json.dumps(item)
        return item
    except (TypeError, ValueError):
        return repr(item)[:1000]


class DeadLetters:
    """Where a run's failures go (``run(on_failure=...)``)."""

    def __init__(self, target: Callable[[ItemFailure], Any] | str | os.PathLike[str]) -> None:
        self.call: Callable[[ItemFailure], Any] | None = None
        self.file: Any = None
        if callable(target):
            self.call = target
        elif isinstance(target, (str, os.PathLike)):
            self.file = open(target, "a", encoding="utf-8")  # noqa: SIM115 - closed by close()
        else:
            raise TypeError(f"on_failure must be a callable or a file path, got {target!r}")

    def send(self, failure: ItemFailure) -> bool:
        """Hand ``failure`` on; False if that failed (the caller keeps it)."""
        try:
            if self.call is not None:
                self.call(failure)
            else:
                line = {
                    "index": failure.index,
                    "stage": failure.stage,
                    "item": _json_item(failure.item),
                    "error_type": type(failure.error).__name__,
                    "error": str(failure.error)[:2000],
                    "attempts": failure.attempts,
                    "history": [list(h) for h in failure.history],
                }
                self.file.write(json.dumps(line) + "\n")
                self.file.flush()
        except Exception:
            log.exception("on_failure could not take the failure of item #%d; it is kept instead", failure.index)
            return False
        return True

    def close(self) -> None:
        if self.file is not None:
            self.file.flush()
            os.fsync(self.file.fileno())
            self.file.close()
            self.file = None
