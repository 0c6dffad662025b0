"""Plain ``def`` stages and generator stages.

* A plain ``def`` worker runs in a worker thread, so a blocking call in it
  (``time.sleep``, a blocking client, file I/O) never blocks the event loop.
* A generator (or async generator) worker is a flat map: each ``yield`` is one
  output. Yielding several values splits an item; yielding nothing drops it.
  With ``ordered=True`` outputs follow source order, and one item's outputs
  keep their yield order.
* ``run_sync()`` runs a pipeline from synchronous code; inside a running event
  loop use ``await pipeline.run()`` instead.
"""

import asyncio
import threading
import time

from pypline import Pipeline, work_pool
from pypline.util import unwrap

LINES = [
    "The quick brown fox",
    "jumps over the lazy dog.",
    "",
    "Pipelines: small, composable stages!",
]


def split_words(line: str):
    """Generator: one line in, one output per word (an empty line yields nothing)."""
    for word in line.split():
        yield word.strip(".,:!?").lower()


def keep_long(word: str):
    """Generator used as a filter: yield the word, or nothing to drop it."""
    if len(word) > 4:
        yield word


async def with_length(word: str):
    """An async generator works the same way."""
    yield f"{word}:{len(word)}"


@work_pool(num_workers=4)
def lookup(word: str) -> tuple[str, bool]:
    """A blocking call: fine in a plain def stage, it runs in a worker thread."""
    time.sleep(0.2)
    return word, threading.current_thread() is not threading.main_thread()


def run_from_sync_code() -> None:
    # Plain functions can be composed directly: >> wraps them with work_pool defaults.
    pipeline = Pipeline(LINES) >> split_words >> keep_long >> with_length
    words = unwrap(pipeline.run_sync())
    print(f"flat-mapped and filtered, in source order: {words}")


async def heartbeat(stop: asyncio.Event, gaps: list[float]) -> None:
    last = time.perf_counter()
    while not stop.is_set():
        await asyncio.sleep(0.01)
        now = time.perf_counter()
        gaps.append(now - last)
        last = now


async def run_from_async_code() -> None:
    words = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel"]
    stop, gaps = asyncio.Event(), []
    ticker = asyncio.create_task(heartbeat(stop, gaps))
    started = time.perf_counter()
    results = unwrap(await (Pipeline(words) >> lookup).run())
    elapsed = time.perf_counter() - started
    stop.set()
    await ticker

    print(f"{len(results)} blocking calls of 0.2 s with 4 workers took {elapsed:.2f} s")
    print(f"ran in worker threads: {all(in_thread for _, in_thread in results)}")
    print(f"event loop kept ticking meanwhile: {len(gaps)} heartbeats, "
          f"longest gap {max(gaps) * 1000:.0f} ms (a blocked loop would show >= 200 ms)")

    # run_sync() works here too (as in a notebook cell): the pipeline gets an event loop on
    # a private thread, and this loop waits for it meanwhile.
    again = unwrap((Pipeline(words) >> lookup).run_sync())
    print(f"run_sync() inside a running loop works too: {len(again)} results")


if __name__ == "__main__":
    run_from_sync_code()
    asyncio.run(run_from_async_code())
