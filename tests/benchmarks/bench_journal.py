"""What a journal costs per item on W1: 3 chained ``async def f(x): return x + 1`` stages of
4 workers, ``run(collect=False)`` with and without ``journal=``, interleaved.

    python tests/benchmarks/bench_journal.py [--items 200000] [--runs 7]

Prints the median µs per item of each and the journal's cost in percent.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time

from pypline import Pipeline, work_pool
from pypline.util import unwrap


@work_pool(num_workers=4, buffer=64)
async def step(x: int) -> int:
    return x + 1


def once(n: int, journal: str | None) -> float:
    p = Pipeline(range(n)) >> step >> step >> step
    t0 = time.perf_counter()
    assert unwrap(p.run_sync(ordered=False, collect=False, journal=journal)) == n
    return (time.perf_counter() - t0) / n * 1e6


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--items", type=int, default=200_000)
    ap.add_argument("--runs", type=int, default=7)
    args = ap.parse_args()
    plain, journaled = [], []
    for _ in range(args.runs):
        plain.append(once(args.items, None))
        journaled.append(once(args.items, os.path.join(tempfile.mkdtemp(), "w1.journal")))
    a, b = statistics.median(plain), statistics.median(journaled)
    print(f"`python tests/benchmarks/bench_journal.py --items {args.items} --runs {args.runs}`, "
          f"{time.strftime('%Y-%m-%d')}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs\n")
    print("| W1, collect=False | µs/item (median) |")
    print("|---|---|")
    print(f"| no journal | {a:.2f} |")
    print(f"| journal | {b:.2f} (+{(b / a - 1) * 100:.0f} %) |")


if __name__ == "__main__":
    main()
