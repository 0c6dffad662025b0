"""What a journal costs per item on W1: 3 chained ``async def f(x): return x + 1`` stages of
4 workers, ``run(collect=False)`` with and without ``journal=``.

    python tests/benchmarks/bench_journal.py [--items 300000] [--processes 5] [--pairs 4]

Runs in one interpreter differ less from each other than runs in different interpreters
do (each process has its own luck with memory layout), so the runs are spread over
``--processes`` fresh interpreters. Each does one warm-up run (not counted), then
``--pairs`` pairs of runs, with and without a journal, alternating which goes first.
Prints the median µs per item of each and the journal's cost: the median of all the
pairs' ratios (a pair's ratio cancels the machine's drift between pairs).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

ONE_PROCESS = """
import json, os, sys, tempfile, time
from pypline import Pipeline, work_pool

@work_pool(num_workers=4, buffer=64)
async def step(x):
    return x + 1

def once(n, journal):
    p = Pipeline(range(n)) >> step >> step >> step
    t0 = time.perf_counter()
    assert p.run_sync(ordered=False, collect=False, journal=journal).unwrap() == n
    return (time.perf_counter() - t0) / n * 1e6

n, pairs = int(sys.argv[1]), int(sys.argv[2])
with tempfile.TemporaryDirectory() as folder:
    once(n, None)  # warm-up
    out = []
    for i in range(pairs):
        path = os.path.join(folder, f"w1-{i}.journal")
        if i % 2 == 0:
            p = once(n, None); j = once(n, path)
        else:
            j = once(n, path); p = once(n, None)
        out.append((p, j))
print(json.dumps(out))
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--items", type=int, default=300_000)
    ap.add_argument("--processes", type=int, default=5)
    ap.add_argument("--pairs", type=int, default=4)
    args = ap.parse_args()
    pairs: list[tuple[float, float]] = []
    for _ in range(args.processes):
        argv = [sys.executable, "-c", ONE_PROCESS, str(args.items), str(args.pairs)]
        pairs += [tuple(p) for p in json.loads(subprocess.run(argv, check=True, capture_output=True, text=True).stdout)]
    a = statistics.median(p for p, _ in pairs)
    b = statistics.median(j for _, j in pairs)
    cost = statistics.median(j / p for p, j in pairs) - 1
    print(f"`python tests/benchmarks/bench_journal.py --items {args.items} --processes {args.processes} "
          f"--pairs {args.pairs}`, {time.strftime('%Y-%m-%d')}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs\n")
    print("| W1, collect=False | µs/item (median) |")
    print("|---|---|")
    print(f"| no journal | {a:.2f} |")
    print(f"| journal | {b:.2f} |")
    print(f"\nThe journal's cost: {cost * 100:+.1f} % (the median of {len(pairs)} pairs' ratios, "
          f"from {args.processes} interpreters).")


if __name__ == "__main__":
    main()
