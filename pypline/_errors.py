"""The exceptions pypline reports, each saying whose fault it is.

- ``PipelineError``: a run finished with failed items or a failing source. It is
  returned inside ``Err``, never raised by ``run()``; it keeps every output computed.
- ``ItemFailure``: one item that failed after its attempts. Your function raised
  ``error`` (or its worker died / was lost); the other items were not affected.
- ``WorkerDied``: the process running the item died mid-item (exit code or signal).
  The item may be what killed it, so it costs the item one attempt.
- ``WorkerLost``: the agent holding the item vanished (crash, partition). Not the
  item's fault: it is re-dispatched without using up ``retries``; this error appears
  only once an item was lost more than ``max_lost`` times.
- ``RemoteError``: an exception from another process whose type could not be
  recreated here; it keeps the type name, message and remote traceback text.
- ``StageStartError``: a stage could not be started (e.g. its function cannot be
  pickled for a process backend). Reported as the ``cause`` of a ``PipelineError``.
- ``StageCancelled``: the stage's own code raised ``CancelledError`` (it awaited a
  task or future that something else cancelled) while the run was not being
  cancelled. An item error like any other, on every backend: retried per
  ``retry_on``, then an ``ItemFailure``. It is not a ``CancelledError``, so it can
  never be mistaken for the cancellation of the task awaiting ``run()``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "PipelineError",
    "ItemFailure",
    "RemoteError",
    "RemoteTraceback",
    "WorkerDied",
    "WorkerLost",
    "StageStartError",
    "StageCancelled",
]

_SHOW_FAILURES = 3


def _short(value: Any, limit: int = 60) -> str:
    try:
        text = repr(value)
    except Exception:  # a user's broken __repr__ must not hide the failure itself
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _rebuild(cls: type[Exception], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Exception:
    return cls(*args, **kwargs)


class RemoteError(Exception):
    """An exception raised in another process whose type could not be unpickled here."""

    def __init__(self, type_name: str, message: str, traceback_text: str = "") -> None:
        super().__init__(type_name, message, traceback_text)
        self.type_name = type_name
        self.message = message
        self.traceback_text = traceback_text

    def __str__(self) -> str:
        return f"{self.type_name}: {self.message}"


class RemoteTraceback(RemoteError):
    """The ``__cause__`` of an exception recreated from another process: its traceback there.

    Backends attach it (``pypline.backends.wire.errors.rebuild``); ``str()`` shows the
    remote traceback, and ``ItemFailure`` prints it under the error.
    """

    def __str__(self) -> str:
        return f"{self.type_name}: {self.message}\n\nRemote traceback:\n{self.traceback_text}"


class WorkerDied(Exception):
    """The worker process died while running the item (its fault or the item's)."""

    def __init__(self, message: str, *, exitcode: int | None = None, signal: int | None = None) -> None:
        super().__init__(message)
        self.exitcode = exitcode
        self.signal = signal

    def __reduce__(self) -> Any:
        return (_rebuild, (WorkerDied, self.args, {"exitcode": self.exitcode, "signal": self.signal}))


class WorkerLost(Exception):
    """The item was lost with its agent more than ``max_lost`` times (the network's fault)."""

    def __init__(self, message: str, *, agents: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.agents = agents

    def __reduce__(self) -> Any:
        return (_rebuild, (WorkerLost, self.args, {"agents": self.agents}))


class StageStartError(Exception):
    """A stage's executor could not start (the stage's configuration is at fault)."""

    def __init__(self, stage: str, message: str) -> None:
        super().__init__(f"stage {stage!r} could not start: {message}")
        self.stage = stage
        self.message = message

    def __reduce__(self) -> Any:
        return (StageStartError, (self.stage, self.message))


class StageCancelled(Exception):
    """The stage's own code raised ``CancelledError`` while the run itself was not cancelled.

    Typically the function awaited a task or future that something else cancelled. The
    original ``CancelledError`` (or, from another process, its ``RemoteError``) is the
    ``__cause__``. It is an ordinary ``Exception``: ``retry_on=(Exception,)`` retries it.
    """

    def __init__(self, stage: str, detail: str = "") -> None:
        super().__init__(stage, detail)
        self.stage = stage
        self.detail = detail

    def __str__(self) -> str:
        extra = f" ({self.detail})" if self.detail else ""
        return (
            f"the code of stage {self.stage!r} raised CancelledError{extra}; the run was not cancelled, "
            "so this is an item error (did it await a task that was cancelled?)"
        )


def is_cancellation(exc: BaseException) -> bool:
    """Is ``exc`` a ``CancelledError``, here or recreated from another process?"""
    import asyncio

    if isinstance(exc, asyncio.CancelledError):
        return True
    return isinstance(exc, RemoteError) and exc.type_name.rsplit(".", 1)[-1] == "CancelledError"


@dataclass(eq=False)
class ItemFailure(Exception):
    """One item that failed in one stage after its attempts.

    ``index`` is the item's position in the source, ``stage`` the failing stage's
    name, ``item`` the value that stage received, ``error`` the last exception and
    ``attempts`` how many attempts were made (of ``max_attempts``, the stage's
    ``retries``, when known). ``history`` says how each earlier attempt of this item in
    this stage failed, as (exception type name, message) pairs, oldest first: only the
    last error is kept whole, with its traceback.
    """

    index: int
    stage: str
    item: Any
    error: BaseException
    attempts: int
    max_attempts: int | None = None
    history: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        Exception.__init__(self, self.index, self.stage, self.item, self.error, self.attempts, self.max_attempts)

    def __reduce__(self) -> Any:
        return (
            ItemFailure,
            (self.index, self.stage, self.item, self.error, self.attempts, self.max_attempts, self.history),
        )

    def __repr__(self) -> str:  # bounded: a big item is shortened
        return (
            f"ItemFailure(index={self.index}, stage={self.stage!r}, item={_short(self.item)}, "
            f"error={_short(self.error, 120)}, attempts={self.attempts}, max_attempts={self.max_attempts})"
        )

    def __str__(self) -> str:
        err = f"{type(self.error).__name__}: {self.error}" if str(self.error) else type(self.error).__name__
        of = f"/{self.max_attempts}" if self.max_attempts is not None else ""
        text = (
            f"stage {self.stage!r} failed item #{self.index} ({_short(self.item)}) "
            f"after {self.attempts}{of} attempt{'s' if (self.max_attempts or self.attempts) != 1 else ''}: {err}"
        )
        remote = _remote_traceback(self.error)
        if remote:
            text += "\n  remote traceback:\n    " + remote.rstrip().replace("\n", "\n    ")
        return text


def _remote_traceback(error: BaseException) -> str:
    """The traceback text of a failure elsewhere (the error or its cause), if it carries one."""
    for e in (error, error.__cause__):
        text = getattr(e, "traceback_text", None)
        if isinstance(text, str) and text:
            return text
    return ""


@dataclass(eq=False)
class PipelineError(Exception):
    """A run that finished with failed items, or whose source raised.

    ``failures`` lists every ``ItemFailure`` (in source order), ``outputs`` every
    successful output (nothing computed is lost), and ``cause`` the exception that
    stopped the source or a stage from starting, if any.

    After ``fail_fast=True`` stopped a run, ``failures[0]`` is the failure that stopped
    it (the rest follow in source order) and ``cancelled`` counts the items that were
    still in flight and were interrupted by the stop: they did not fail, and they are
    not in ``failures`` (an error that would have been retried counts here too).

    ``delivered`` counts the outputs: ``len(outputs)``, or after ``run(collect=False)``
    (which keeps no output, so ``outputs`` is empty) how many there were. ``failed``
    counts the failed items: ``len(failures)``, or after ``run(on_failure=...)`` (which
    sends them elsewhere and keeps only the first few here) how many there were.
    """

    failures: list[ItemFailure] = field(default_factory=list)
    outputs: list[Any] = field(default_factory=list)
    cause: BaseException | None = None
    cancelled: int = 0
    delivered: int = -1
    failed: int = -1

    def __post_init__(self) -> None:
        if self.delivered < 0:
            self.delivered = len(self.outputs)
        if self.failed < 0:
            self.failed = len(self.failures)
        Exception.__init__(self, str(self))
        if self.cause is not None:
            self.__cause__ = self.cause

    def __reduce__(self) -> Any:
        return (
            PipelineError,
            (self.failures, self.outputs, self.cause, self.cancelled, self.delivered, self.failed),
        )

    def __repr__(self) -> str:
        # Bounded, whatever the run's size: the outputs are counted, not shown.
        first = f", first={self.failures[0]!r}" if self.failures else ""
        cause = f", cause={self.cause!r}" if self.cause is not None else ""
        cancelled = f", cancelled={self.cancelled}" if self.cancelled else ""
        return (
            f"PipelineError(failures={self.failed}, outputs={self.delivered}"
            f"{cancelled}{cause}{first})"
        )

    def __str__(self) -> str:
        parts: list[str] = []
        if self.cause is not None:
            parts.append(f"run stopped early: {type(self.cause).__name__}: {self.cause}")
        if self.failures:
            per_stage: dict[str, int] = {}
            for f in self.failures:
                per_stage[f.stage] = per_stage.get(f.stage, 0) + 1
            counts = ", ".join(f"{n} in {s!r}" for s, n in per_stage.items())
            kept = f" (the first {len(self.failures)} shown by stage)" if self.failed > len(self.failures) else ""
            parts.append(f"{self.failed} item(s) failed{kept} ({counts}); {self.delivered} output(s) succeeded")
            parts.extend(f"  - {f}" for f in self.failures[:_SHOW_FAILURES])
            if len(self.failures) > _SHOW_FAILURES:
                parts.append(f"  ... and {len(self.failures) - _SHOW_FAILURES} more")
        if self.cancelled:
            parts.append(f"{self.cancelled} item(s) in flight were cancelled when fail_fast stopped the run")
        return "\n".join(parts) if parts else "pipeline failed"
