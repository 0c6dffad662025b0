"""Batch stage vs per-item calls on a function with a fixed cost per call.

    python tests/benchmarks/bench_batch.py [--items 2000] [--runs 3]

The function stands for a model or database call: 2 ms per call plus 10 µs per item
(``time.sleep``, so threads overlap as they would on I/O). Both stages have 4 workers;
the batch stage gets ``batch=64``. Runs alternate; medians and the ratio are printed.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

from pypline import Pipeline, work_pool
from pypline.util import unwrap


def one(x: int) -> int:
    time.sleep(0.002 + 0.00001)
    return x


def many(xs: list[int]) -> list[int]:
    time.sleep(0.002 + 0.00001 * len(xs))
    return xs


def timed(stage: object, n: int) -> float:
    t0 = time.perf_counter()
    out = unwrap((Pipeline(range(n)) >> stage).run_sync())  # type: ignore[operator]
    elapsed = time.perf_counter() - t0
    assert out == list(range(n))
    return elapsed


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--items", type=int, default=2000)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    per_item = work_pool(one, num_workers=4)
    batched = work_pool(many, num_workers=4, batch=64)
    times: dict[str, list[float]] = {"per item": [], "batch=64": []}
    for _ in range(args.runs):
        times["per item"].append(timed(per_item, args.items))
        times["batch=64"].append(timed(batched, args.items))
    print(f"`python tests/benchmarks/bench_batch.py --items {args.items} --runs {args.runs}`, "
          f"{time.strftime('%Y-%m-%d')}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs\n")
    print("| stage (4 workers; 2 ms per call + 10 µs per item) | median s | items/s | speed-up |")
    print("|---|---|---|---|")
    base = statistics.median(times["per item"])
    for name, ts in times.items():
        m = statistics.median(ts)
        print(f"| {name} | {m:.3f} | {args.items / m:,.0f} | {base / m:.1f}x |")


if __name__ == "__main__":
    main()
