"""CPU-bound work in worker processes: ``multi_proc=True``.

A plain ``def`` stage with ``multi_proc=True`` runs in local worker processes
(the "process" backend), so pure-Python number crunching is not serialised by
the GIL. Functions and items travel with cloudpickle, so functions defined in
this script work. No ``if __name__ == "__main__":`` guard is needed: worker
processes are fresh interpreters that never import this script (its functions are
sent by value). The one at the bottom is only the usual style for a script.

The workload is deliberately tiny (it runs in well under a second).
"""

import os
import time

from pypline import Pipeline, work_pool
from pypline.util import is_ok, unwrap, unwrap_err

# One worker per core is the usual choice for CPU-bound work (the original
# README uses 8); capped so a big machine does not start dozens of processes.
NUM_WORKERS = min(8, os.cpu_count() or 1)


def complex_calculation(limit: int) -> int:
    """Count the primes below ``limit`` by trial division (deliberately naive)."""
    count = 0
    for n in range(2, limit):
        d = 2
        while d * d <= n:
            if n % d == 0:
                break
            d += 1
        else:
            count += 1
    return count


@work_pool(multi_proc=True, num_workers=NUM_WORKERS, buffer=50)
def cpu_intensive(data):
    # CPU-bound work runs in separate processes
    return complex_calculation(data), os.getpid()


def main() -> None:
    limits = [2_000 + 250 * i for i in range(16)]

    started = time.perf_counter()
    result = (Pipeline(limits) >> cpu_intensive).run_sync()
    elapsed = time.perf_counter() - started
    if not is_ok(result):
        print(f"pipeline failed: {unwrap_err(result)}")
        raise SystemExit(1)

    outputs = unwrap(result)
    counts = [count for count, _pid in outputs]
    pids = {pid for _count, pid in outputs}
    print(f"primes below {limits[0]}..{limits[-1]}: {counts}")
    print(f"computed {len(outputs)} items in {elapsed:.2f} s with up to {NUM_WORKERS} worker processes")
    print(f"work ran outside the main process: {os.getpid() not in pids} ({len(pids)} distinct worker pids)")
    print(f"all results match a sequential run: {counts == [complex_calculation(n) for n in limits]}")


if __name__ == "__main__":
    main()
