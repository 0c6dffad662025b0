"""Watching a pipeline: live progress, statistics and the bottleneck hint.

Run it in a terminal to see one live line per stage; in a pipe or a file the
progress display stays silent and only the final table is printed.
"""

import asyncio
import hashlib
import json

from pypline import Pipeline, RunStatistics, work_pool


@work_pool(num_workers=8, buffer=32)
async def fetch(n: int) -> bytes:
    await asyncio.sleep(0.002)  # stands in for a network call
    return str(n).encode() * 200


@work_pool(num_workers=1, buffer=8, retries=2)
def digest(blob: bytes) -> str:  # CPU work in one thread: the slow stage here
    h = blob
    for _ in range(4000):
        h = hashlib.sha256(h).digest()
    return h.hex()[:12]


@work_pool(buffer=8)
async def store(d: str) -> str:
    return d


snapshots: list[RunStatistics] = []  # on_stats gets live snapshots; printing them would garble the display


async def main() -> None:
    pipeline = Pipeline(range(600)) >> fetch >> digest >> store
    result = await pipeline.run(progress=True, on_stats=snapshots.append, stats_interval=0.25)
    stats = pipeline.last_stats
    assert stats is not None
    print(f"{len(result.unwrap())} outputs; digest stage over time:")
    for snap in snapshots:
        s = snap.stages[1]
        print(f"  [{snap.elapsed:5.2f} s] {s.succeeded:4} done, queue {s.queue_depth}/{s.capacity}")
    print(stats)  # a table per stage, then the bottleneck hint
    print(json.dumps(stats.stages[1].to_dict())[:80] + " ...")


if __name__ == "__main__":
    asyncio.run(main())
