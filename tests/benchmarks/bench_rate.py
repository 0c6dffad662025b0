"""Rate-limit accuracy: achieved vs requested rate over a steady stretch.

    python tests/benchmarks/bench_rate.py [--seconds 10] [--rate 100]

One stage of 8 workers doing nothing but stamping the time, ``rate=(RATE, 1.0)``, fed
``RATE * SECONDS`` items, on the asyncio backend (threads) and the process backend.
Reports the achieved rate (starts after the first, over the span from the first start to
the last), its ratio to the requested one, and the most starts the workers saw in any
1-second window.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

from pypline import Pipeline, work_pool
from pypline.util import unwrap


def stamp(x: int) -> float:
    return time.monotonic()


def most_in_window(starts: list[float], per: float) -> int:
    starts = sorted(starts)
    j = best = 0
    for i, t in enumerate(starts):
        while t - starts[j] >= per:
            j += 1
        best = max(best, i - j + 1)
    return best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--rate", type=int, default=100)
    args = ap.parse_args()
    n = int(args.rate * args.seconds)
    print(f"`python tests/benchmarks/bench_rate.py --seconds {args.seconds:g} --rate {args.rate}`, "
          f"{time.strftime('%Y-%m-%d')}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs\n")
    print("| backend | requested /s | achieved /s | ratio | most starts in any 1 s |")
    print("|---|---|---|---|---|")
    for multi_proc in (False, True):
        stage = work_pool(stamp, num_workers=8, multi_proc=multi_proc, rate=(args.rate, 1.0))
        starts = sorted(unwrap((Pipeline(range(n)) >> stage).run_sync()))
        achieved = (len(starts) - 1) / (starts[-1] - starts[0])
        print(f"| {'process' if multi_proc else 'asyncio'} | {args.rate} | {achieved:.1f} | {achieved / args.rate:.3f} | "
              f"{most_in_window(starts, 1.0)} |")


if __name__ == "__main__":
    main()
