"""What statistics and progress reporting cost on W1 (3 async stages, 200,000 items).

Runs, interleaved in one process: ``run(stats=False)`` (no timing samples, no
snapshot; the engine's own counters stay), the default ``run()`` (statistics on),
and ``run(on_stats=...)`` with a reporter task taking a snapshot every 0.5 s.
Prints medians and the cost of each against "off". Usage:

    python tests/benchmarks/bench_stats.py [--runs 7] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from typing import Any

from pypline import Pipeline, work_pool
from pypline.util import unwrap


async def one(n: int, **kw: Any) -> float:
    @work_pool(num_workers=4, buffer=64)
    async def s(x: int) -> int:
        return x + 1

    start = time.perf_counter()
    out = unwrap(await (Pipeline(range(n)) >> s >> s >> s).run(ordered=False, **kw))
    elapsed = time.perf_counter() - start
    if len(out) != n or sum(out) != sum(range(n)) + 3 * n:
        raise SystemExit(f"wrong output with {kw}")
    return elapsed


async def main(runs: int, n: int) -> None:
    rows: dict[str, list[float]] = {"stats off": [], "stats on (default)": [], "stats on + on_stats every 0.5 s": []}
    for _ in range(runs):
        rows["stats off"].append(await one(n, stats=False))
        rows["stats on (default)"].append(await one(n))
        rows["stats on + on_stats every 0.5 s"].append(await one(n, on_stats=lambda s: None))
    base = statistics.median(rows["stats off"])
    print(f"W1, {n:,} items, medians of {runs} interleaved runs\n")
    print("| mode | µs/item | cost vs off |\n|---|---:|---:|")
    for name, times in rows.items():
        m = statistics.median(times)
        print(f"| {name} | {m / n * 1e6:.2f} | {100 * (m / base - 1):+.1f} % |")


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--quick", action="store_true", help="20,000 items instead of 200,000")
    a = ap.parse_args()
    asyncio.run(main(a.runs, 20_000 if a.quick else 200_000))
