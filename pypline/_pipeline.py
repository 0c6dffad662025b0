"""Pipelines and flows: immutable compositions of stages.

``Pipeline(source) >> a >> b`` and ``a >> b`` (a reusable ``Flow``) only build
tuples; nothing runs until ``run()``, ``run_sync()`` or ``stream()``.
"""

from __future__ import annotations

import asyncio
import os
import sys
from types import TracebackType
from typing import (
    Any,
    AsyncIterable,
    AsyncIterator,
    Awaitable,
    Callable,
    Generic,
    Iterable,
    Iterator,
    Literal,
    TypeVar,
    overload,
)

from ._errors import ItemFailure, PipelineError
from ._deadletter import DeadLetters
from ._journal import Journal
from ._progress import ProgressChoice, check_progress
from ._sync import LoopThread, PipelineIterator, run_in_thread
from ._run import Run
from ._stage import Stage, as_stage
from ._stats import RunStatistics
from .executor import Backend
from .util import Result

__all__ = ["Pipeline", "Flow", "PipelineStream"]

T = TypeVar("T")
T_co = TypeVar("T_co", covariant=True)
In = TypeVar("In", contravariant=True)
U = TypeVar("U")


def _stages_of(x: Any) -> tuple[Stage[Any, Any], ...]:
    if isinstance(x, Flow):
        return x.stages
    if isinstance(x, Pipeline):
        raise TypeError("a Pipeline cannot be added to another pipeline; compose stages or a Flow instead")
    return (as_stage(x),)


class Flow(Generic[In, T_co]):
    """A reusable sequence of stages with no source: ``Pipeline(src) >> flow``.

    ``Flow[In, Out]`` takes items of type ``In`` and gives outputs of type ``Out``.
    """

    __slots__ = ("_stages",)

    def __init__(self, stages: tuple[Stage[Any, Any], ...] = ()) -> None:
        self._stages = tuple(as_stage(s) for s in stages)

    @property
    def stages(self) -> tuple[Stage[Any, Any], ...]:
        return self._stages

    @overload
    def stage(self, x: Stage[T_co, U] | Flow[T_co, U]) -> Flow[In, U]: ...
    @overload
    def stage(self, x: Callable[[T_co], Awaitable[U]]) -> Flow[In, U]: ...
    @overload
    def stage(self, x: Callable[[T_co], AsyncIterator[U]]) -> Flow[In, U]: ...
    @overload
    def stage(self, x: Callable[[T_co], Iterator[U]]) -> Flow[In, U]: ...
    @overload
    def stage(self, x: Callable[[T_co], U]) -> Flow[In, U]: ...
    def stage(self, x: Any) -> Flow[In, Any]:
        """A new flow with ``x`` appended (a Stage, a plain callable or a Flow)."""
        return Flow(self._stages + _stages_of(x))

    __rshift__ = stage

    def __repr__(self) -> str:
        return f"Flow({' >> '.join(s.name for s in self._stages)})"


def _check_journal(journal: Any, key: Any) -> None:
    if journal is None:
        if key is not None:
            raise ValueError("key= goes with journal=: it says which source items a journal has seen")
        return
    if not isinstance(journal, (str, os.PathLike)):
        raise TypeError(f"journal must be a file path, got {journal!r}")
    if key is not None and not callable(key):
        raise TypeError(f"key must be callable (item -> a JSON value), got {key!r}")


def _open_journal(journal: Any, key: Any) -> Journal | None:
    _check_journal(journal, key)
    if journal is None:
        return None
    book = Journal(journal, key)
    book.open()
    return book


def _check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {value!r}")


_Reporting = tuple["ProgressChoice", "Callable[[RunStatistics], None] | None", float, bool]


def _check_executor(executor: Any) -> None:
    """``executor`` names a known backend or is a Backend: checked when a run is asked for,
    whether or not a stage will use it (a typo must not pass silently)."""
    if executor is None or isinstance(executor, Backend):
        return
    if not isinstance(executor, str):
        raise TypeError(f"executor must be a backend name or a pypline.executor.Backend, got {executor!r}")
    from ._registry import known_backends, load_backend

    if executor not in known_backends():
        load_backend(executor)  # raises ValueError listing the known backends


def _check_reporting(progress: Any, on_stats: Any, interval: Any, stats: Any) -> None:
    check_progress(progress)
    _check_bool("stats", stats)
    if not stats and (progress or on_stats is not None):
        raise ValueError("progress and on_stats need statistics; they cannot be used with stats=False")
    if on_stats is not None and not callable(on_stats):
        raise TypeError(f"on_stats must be callable or None, got {on_stats!r}")
    if isinstance(interval, bool) or not isinstance(interval, (int, float)):
        raise TypeError(f"stats_interval must be a number, got {interval!r}")
    if not interval > 0:
        raise ValueError(f"stats_interval must be > 0, got {interval!r}")


class Pipeline(Generic[T_co]):
    """A source and the stages its items go through. Immutable: ``>>`` returns a new one.

    ``Pipeline[T]`` gives outputs of type ``T``: ``Pipeline(range(3))`` is a ``Pipeline[int]``,
    and ``>> stage`` with a ``Stage[int, str]`` makes a ``Pipeline[str]``. A stage whose input
    type does not accept ``T`` is a type error.
    """

    __slots__ = ("_source", "_stages", "_last_stats")

    @overload
    def __init__(self: Pipeline[T], source: AsyncIterable[T], _stages: tuple[Stage[Any, Any], ...] = ()) -> None: ...
    @overload
    def __init__(self: Pipeline[T], source: Iterable[T], _stages: tuple[Stage[Any, Any], ...] = ()) -> None: ...
    def __init__(self, source: Any, _stages: tuple[Stage[Any, Any], ...] = ()) -> None:
        if not (hasattr(source, "__aiter__") or hasattr(source, "__iter__")):
            raise TypeError(
                f"Pipeline source must be an iterable or async iterable, got {source!r} ({type(source).__name__})"
           )
        self._source = source
        self._stages = _stages
        self._last_stats: RunStatistics | None = None

    @property
    def stages(self) -> tuple[Stage[Any, Any], ...]:
        return self._stages

    @property
    def source(self) -> Any:
        return self._source

    @property
    def last_stats(self) -> RunStatistics | None:
        """Statistics of this pipeline's last finished run or stream (``None`` before one)."""
        return self._last_stats

    @overload
    def stage(self, x: Stage[T_co, U] | Flow[T_co, U]) -> Pipeline[U]: ...
    @overload
    def stage(self, x: Callable[[T_co], Awaitable[U]]) -> Pipeline[U]: ...
    @overload
    def stage(self, x: Callable[[T_co], AsyncIterator[U]]) -> Pipeline[U]: ...
    @overload
    def stage(self, x: Callable[[T_co], Iterator[U]]) -> Pipeline[U]: ...
    @overload
    def stage(self, x: Callable[[T_co], U]) -> Pipeline[U]: ...
    def stage(self, x: Any) -> Pipeline[Any]:
        """A new pipeline with ``x`` appended (a Stage, a plain callable or a Flow)."""
        return Pipeline(self._source, self._stages + _stages_of(x))

    __rshift__ = stage

    def __repr__(self) -> str:
        names = "".join(f" >> {s.name}" for s in self._stages)
        return f"Pipeline({type(self._source).__name__}{names})"

    @overload
    async def run(
        self,
        *,
        ordered: bool = True,
        fail_fast: bool = False,
        executor: str | Backend | None = None,
        progress: ProgressChoice = False,
        on_stats: Callable[[RunStatistics], None] | None = None,
        stats_interval: float = 0.5,
        stats: bool = True,
        collect: Literal[True] = True,
        journal: str | os.PathLike[str] | None = None,
        key: Callable[[Any], Any] | None = None,
        on_failure: Callable[[ItemFailure], Any] | str | os.PathLike[str] | None = None,
    ) -> Result[list[T_co], PipelineError]: ...
    @overload
    async def run(
        self,
        *,
        ordered: bool = True,
        fail_fast: bool = False,
        executor: str | Backend | None = None,
        progress: ProgressChoice = False,
        on_stats: Callable[[RunStatistics], None] | None = None,
        stats_interval: float = 0.5,
        stats: bool = True,
        collect: Literal[False],
        journal: str | os.PathLike[str] | None = None,
        key: Callable[[Any], Any] | None = None,
        on_failure: Callable[[ItemFailure], Any] | str | os.PathLike[str] | None = None,
    ) -> Result[int, PipelineError]: ...
    async def run(
        self,
        *,
        ordered: bool = True,
        fail_fast: bool = False,
        executor: str | Backend | None = None,
        progress: ProgressChoice = False,
        on_stats: Callable[[RunStatistics], None] | None = None,
        stats_interval: float = 0.5,
        stats: bool = True,
        collect: bool = True,
        journal: str | os.PathLike[str] | None = None,
        key: Callable[[Any], Any] | None = None,
        on_failure: Callable[[ItemFailure], Any] | str | os.PathLike[str] | None = None,
    ) -> Result[list[T_co], PipelineError] | Result[int, PipelineError]:
        """Run every item through every stage; ``Ok(outputs)`` or ``Err(PipelineError)``.

        Never raises for a failing item or source. ``ordered=True`` returns outputs in
        source order. ``fail_fast=True`` stops at the first failure. ``executor``
        names the backend (or is a ``Backend``) for ``multi_proc=True`` stages.
        Cancelling the awaiting task stops every stage and re-raises ``CancelledError``.

        ``progress=True`` draws one live line per stage: on stderr when it is a
        terminal, in the cell's output in a Jupyter notebook; ``progress="tqdm"`` or
        ``"rich"`` draws a bar per stage with that library. ``on_stats(RunStatistics)`` is called every ``stats_interval``
        seconds and once more at the end; ``pipeline.last_stats`` keeps the final one.
        ``stats=False`` skips timing samples and the final snapshot (the engine's
        counters are its own bookkeeping and are always kept).

        ``collect=False`` keeps no output: for a pipeline whose last stage writes its
        results somewhere, the run returns ``Ok(number of outputs)``, or an ``Err`` whose
        ``PipelineError`` has the failures and ``delivered`` (its ``outputs`` stay empty).

        ``journal=PATH`` makes the run durable: the ``key(item)`` of every item the run
        finished is appended to PATH, and a later run with the same journal skips the source
        items whose key is there, so a killed run resumes where it stopped (``key`` defaults
        to the item itself; keys are JSON values). A failed item is not recorded, and is
        tried again next time. See ``pypline._journal`` for what "finished" means and the
        fsync policy.

        ``on_failure`` takes each failed item's ``ItemFailure`` as it happens: a callable,
        or a path of a JSON-lines file to append it to (a dead-letter file). The
        ``PipelineError`` then keeps only the first 100 in ``failures`` and counts them
        all in ``failed``, so a long run's failures do not pile up in memory.
        """
        _check_bool("ordered", ordered)
        _check_bool("fail_fast", fail_fast)
        _check_bool("collect", collect)
        _check_executor(executor)
        _check_reporting(progress, on_stats, stats_interval, stats)
        letters = DeadLetters(on_failure) if on_failure is not None else None
        book = _open_journal(journal, key)
        try:
            run = Run(
                self._stages,
                self._source,
                ordered=ordered,
                fail_fast=fail_fast,
                streaming=False,
                executor=executor,
                timing=stats,
                journal=book,
                dead_letters=letters,
            )
            if not collect:
                run.discard_outputs()
            try:
                if await run.start():
                    run.start_reporting(on_stats, progress, stats_interval, sys.stderr)
                    await run.finished
            finally:
                try:
                    await run.shutdown()
                finally:
                    self._last_stats = await run.finish_reporting() if stats else None
        finally:
            if book is not None:
                book.close()
            if letters is not None:
                letters.close()
        return run.result()

    @overload
    def run_sync(self, *, collect: Literal[True] = True, **kwargs: Any) -> Result[list[T_co], PipelineError]: ...
    @overload
    def run_sync(self, *, collect: Literal[False], **kwargs: Any) -> Result[int, PipelineError]: ...
    def run_sync(self, **kwargs: Any) -> Result[Any, PipelineError]:
        """``run(**kwargs)`` from synchronous code (starts and closes its own event loop).

        Inside a running event loop (a Jupyter notebook, say) the run gets an event loop
        on a private thread, and this call waits for it there: the caller's loop is
        blocked meanwhile, as any synchronous call blocks it.
        """
        # The result leaves through a box, not as the main task's result: asyncio.run()
        # (3.11) formats that task's repr twice while restoring the SIGINT handler,
        # and so the repr of every output (13 ms per 100,000 ints).
        box: list[Result[Any, PipelineError]] = []

        async def main() -> None:
            box.append(await self.run(**kwargs))

        try:
            asyncio.get_running_loop()
        except RuntimeError:
            asyncio.run(main())
        else:
            run_in_thread(main())
        return box[0]

    def iter(
        self,
        *,
        ordered: bool = False,
        executor: str | Backend | None = None,
        progress: ProgressChoice = False,
        on_stats: Callable[[RunStatistics], None] | None = None,
        stats_interval: float = 0.5,
        stats: bool = True,
        journal: str | os.PathLike[str] | None = None,
        key: Callable[[Any], Any] | None = None,
    ) -> PipelineIterator[T_co]:
        """The synchronous twin of ``stream()``: ``for r in pipeline.iter():`` yields one ``Result``
        per output, from plain code (a script, a notebook cell, a thread).

        The engine runs on a private event-loop thread; the next result is computed only as
        far as the memory bound allows while the loop body runs, so a slow consumer slows
        the source. Leaving early (``break``, an exception in the loop body, ``close()``, the
        end of ``with pipeline.iter() as results:``) stops every stage and joins the thread.
        Arguments are those of ``stream()``.
        """
        stream = self.stream(
            ordered=ordered,
            executor=executor,
            progress=progress,
            on_stats=on_stats,
            stats_interval=stats_interval,
            stats=stats,
            journal=journal,
            key=key,
        )
        return PipelineIterator(stream, LoopThread())

    def stream(
        self,
        *,
        ordered: bool = False,
        executor: str | Backend | None = None,
        progress: ProgressChoice = False,
        on_stats: Callable[[RunStatistics], None] | None = None,
        stats_interval: float = 0.5,
        stats: bool = True,
        journal: str | os.PathLike[str] | None = None,
        key: Callable[[Any], Any] | None = None,
   ) -> PipelineStream[T_co]:
        """An async iterator of one ``Result`` per output: ``Ok(value)`` or ``Err(ItemFailure)``.

        A slow consumer slows the whole pipeline (the memory bound holds).
        ``ordered=True`` yields in source order through a bounded reorder window.
        Leave early with ``break`` or ``aclose()``; ``async with pipeline.stream() as s``
        closes deterministically. ``journal`` and ``key`` as for ``run()``: an item's key is
        written before its last output is handed to you.
        """
        _check_bool("ordered", ordered)
        _check_executor(executor)
        _check_reporting(progress, on_stats, stats_interval, stats)
        _check_journal(journal, key)
        return PipelineStream(self, ordered, executor, (progress, on_stats, stats_interval, stats), (journal, key))


class PipelineStream(Generic[T_co]):
    """The async iterator returned by ``Pipeline.stream()``; also an async context manager."""

    def __init__(
        self,
        pipeline: Pipeline[T_co],
        ordered: bool,
        executor: str | Backend | None,
        reporting: _Reporting,
        journal: tuple[Any, Any] = (None, None),
   ) -> None:
        self._agen = self._results(pipeline, ordered, executor, reporting, journal)

    @staticmethod
    async def _results(
        pipeline: Pipeline[T_co],
        ordered: bool,
        executor: str | Backend | None,
        reporting: _Reporting,
        journal: tuple[Any, Any],
   ) -> AsyncIterator[Result[T_co, ItemFailure]]:
        book = _open_journal(*journal)
        inner = PipelineStream._run(pipeline, ordered, executor, reporting, book)
        try:
            async for result in inner:
                yield result
        finally:
            try:
                await inner.aclose()  # type: ignore[attr-defined]  # the run shuts down first
            finally:
                if book is not None:
                    book.close()

    @staticmethod
    async def _run(
        pipeline: Pipeline[T_co],
        ordered: bool,
        executor: str | Backend | None,
        reporting: _Reporting,
        book: Journal | None,
   ) -> AsyncIterator[Result[T_co, ItemFailure]]:
        progress, on_stats, interval, stats = reporting
        run = Run(
            pipeline.stages,
            pipeline.source,
            ordered=ordered,
            fail_fast=False,
            streaming=True,
            executor=executor,
            timing=stats,
            journal=book,
       )
        try:
            if not await run.start():
                raise PipelineError(cause=run.cause)
            run.start_reporting(on_stats, progress, interval, sys.stderr)
            while True:
                result = await run.next_result()
                if result is None:
                    return
                yield result
        finally:
            try:
                await run.shutdown()
            finally:
                pipeline._last_stats = await run.finish_reporting() if stats else None

    def __aiter__(self) -> PipelineStream[T_co]:
        return self

    async def __anext__(self) -> Result[T_co, ItemFailure]:
        return await self._agen.__anext__()

    async def aclose(self) -> None:
        """Stop every stage and release everything the stream holds."""
        await self._agen.aclose()  # type: ignore[attr-defined]

    async def __aenter__(self) -> PipelineStream[T_co]:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
   ) -> None:
        await self.aclose()
