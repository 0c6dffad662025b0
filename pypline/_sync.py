"""Pipelines from synchronous code: ``Pipeline.iter()`` and ``run_sync()`` inside a running loop.

::

    caller's thread                               private thread "pypline-sync"
    ---------------                               -----------------------------
    it = pipeline.iter()          ── start ──►    new event loop, run_forever()
    next(it)                      ── submit ─►    await stream.__anext__()      (one result)
       blocks until it is back    ◄─ result ──
    break / close() / with-exit   ── submit ─►    await stream.aclose()         (every stage stops)
                                  ── stop ───►    loop closed, thread joined

The stream advances only when the caller asks for the next result, so a slow consumer
slows the source exactly as with ``async for r in pipeline.stream()``: the same memory
bound holds. Nothing outlives ``close()``: the stream is closed on the engine's loop (its
stages, workers and sockets stop), then the loop is closed and the thread joined.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine, Iterator
from types import TracebackType
from typing import Any, Generic, TypeVar

from ._errors import ItemFailure
from .util import Result

T = TypeVar("T")
T_co = TypeVar("T_co", covariant=True)

__all__ = ["LoopThread", "PipelineIterator"]


class LoopThread:
    """An event loop running in a thread of its own, for calls from synchronous code."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._serve, name="pypline-sync", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def call(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the loop and wait for its result (its exception is raised here)."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def close(self) -> None:
        """Cancel what is left on the loop, stop it, join the thread, close the loop."""
        if self.loop.is_closed():
            return

        async def finish() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self.loop.shutdown_asyncgens()

        try:
            self.call(finish())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join()
            self.loop.close()


def run_in_thread(coro: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run(coro)`` on a private thread, waiting here (for callers inside a running loop)."""
    worker = LoopThread()
    try:
        return worker.call(coro)
    finally:
        worker.close()


class PipelineIterator(Generic[T_co]):
    """What ``Pipeline.iter()`` returns: an iterator of ``Result``s, also a context manager.

    ``close()`` (also at the end of a ``with`` block, when the iteration ends, and when
    the iterator is garbage collected after a ``break``) stops every stage and joins the
    private thread. Safe to call more than once.
    """

    def __init__(self, stream: Any, worker: LoopThread) -> None:
        self._stream = stream
        self._worker: LoopThread | None = worker

    def __iter__(self) -> Iterator[Result[T_co, ItemFailure]]:
        return self

    def __next__(self) -> Result[T_co, ItemFailure]:
        worker = self._worker
        if worker is None:
            raise StopIteration
        try:
            result: Result[T_co, ItemFailure] = worker.call(self._stream.__anext__())
        except StopAsyncIteration:
            self.close()
            raise StopIteration from None
        except BaseException:
            self.close()
            raise
        return result

    def close(self) -> None:
        """Stop every stage of the stream and release the private thread and loop."""
        worker, self._worker = self._worker, None
        if worker is None:
            return
        try:
            worker.call(self._stream.aclose())
        finally:
            worker.close()

    def __enter__(self) -> PipelineIterator[T_co]:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __del__(self) -> None:
        if self._worker is not None:  # a `break` left it: stop the stages now, not at exit
            self.close()
