"""Streaming results with ``pipeline.stream()``: backpressure and ordering.

``stream()`` yields one ``Result`` per output as soon as it is ready:
``Ok(value)``, or ``Err(ItemFailure)`` for an item that failed, so one bad item
does not end the stream. When the consumer is slow, the whole pipeline slows
down with it: the source is never read more than

    sum(buffer + num_workers for each stage) + len(stages) + 1

items ahead of what the consumer has received. This script measures that.
``ordered=True`` yields results in source order.

Use ``contextlib.aclosing`` (or call ``aclose()``) when you may leave the loop
early: it stops every stage at once, even for an endless source.
"""

import asyncio
import itertools
from contextlib import aclosing

from pypline import Pipeline, work_pool
from pypline.util import Err, Ok, is_ok, unwrap

N_READINGS = 60


class ReadAhead:
    """Counts items taken from the source vs results handed to the consumer."""

    def __init__(self) -> None:
        self.pulled = 0
        self.delivered = 0
        self.max_ahead = 0

    def on_pull(self) -> None:
        self.pulled += 1
        self.max_ahead = max(self.max_ahead, self.pulled - self.delivered)


meter = ReadAhead()


async def sensor_readings(n: int):
    """An async source that records how far ahead of the consumer it is read."""
    for i in range(n):
        meter.on_pull()
        yield i


@work_pool(buffer=4, num_workers=2)
async def parse(i: int) -> dict:
    await asyncio.sleep(0.001 * (i % 5))  # uneven latency: results finish out of order
    if i == 13:
        raise ValueError(f"corrupt reading #{i}")
    return {"index": i, "sensor": f"s{i % 3}", "raw": 100 + 7 * i % 23}


@work_pool(buffer=4, num_workers=2)
def calibrate(reading: dict) -> dict:  # a plain def: runs in a worker thread
    return {**reading, "value": round(reading["raw"] * 0.98 - 1.5, 2)}


@work_pool
async def square(n: int) -> int:
    return n * n


async def main() -> None:
    stages = [(4, 2), (4, 2)]  # (buffer, num_workers) of parse and calibrate
    bound = sum(b + w for b, w in stages) + len(stages) + 1

    pipeline = Pipeline(sensor_readings(N_READINGS)) >> parse >> calibrate
    order: list[int] = []
    async with aclosing(pipeline.stream(ordered=True)) as results:
        async for result in results:
            meter.delivered += 1
            match result:
                case Ok(reading):
                    order.append(reading["index"])
                    if reading["index"] < 3:
                        print(f"ok   #{reading['index']}: {reading}")
                case Err(failure):
                    order.append(failure.index)
                    print(f"err  #{failure.index}: stage={failure.stage} error={failure.error!r}")
            await asyncio.sleep(0.005)  # a slow consumer

    print(f"received {meter.delivered} results for {N_READINGS} readings")
    print(f"results arrived in source order: {order == list(range(N_READINGS))}")
    print(f"max read-ahead {meter.max_ahead} <= bound {bound}: {meter.max_ahead <= bound}")

    # Leaving early: the source is endless, aclosing() stops the pipeline cleanly.
    first: list[int] = []
    async with aclosing((Pipeline(itertools.count()) >> square).stream(ordered=True)) as results:
        async for result in results:
            if is_ok(result):
                first.append(unwrap(result))
            if len(first) == 5:
                break
    print(f"stopped an endless stream after {len(first)} results: {first}")


if __name__ == "__main__":
    asyncio.run(main())
