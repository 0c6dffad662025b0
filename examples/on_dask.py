"""Running a pipeline on a Dask cluster: the same stages, one argument changed.

Starts a tiny ``LocalCluster`` (two single-threaded worker processes), runs a
CPU-bound ``multi_proc=True`` stage on it with ``run(executor=DaskBackend(client))``
(the plain async stage after it stays on the local event loop), prints what came
back and closes the cluster. With a real cluster you would write
``Client("tcp://scheduler:8786")`` instead of starting one.

Needs ``pip install 'pypline-async[dask]'``; without it the example says so and exits 0.
The ``if __name__ == "__main__":`` guard is required: Dask's worker processes
import this file again.

Run it with:  python examples/on_dask.py
"""

import importlib.util
import os

from pypline import Pipeline, current_worker, work_pool
from pypline.util import is_ok, unwrap, unwrap_err


def count_primes(limit: int) -> int:
    """Count the primes below ``limit`` by trial division (deliberately naive)."""
    return sum(1 for n in range(2, limit) if all(n % d for d in range(2, int(n**0.5) + 1)))


@work_pool(multi_proc=True, num_workers=2)
def primes_below(limit):
    # Runs in a Dask worker process; current_worker() works there too.
    return limit, count_primes(limit), current_worker().index, os.getpid()


@work_pool(num_workers=4)
async def describe(row):
    limit, count, worker, _pid = row
    return f"{count:4d} primes below {limit:5d} (worker {worker})"


def main() -> None:
    if importlib.util.find_spec("distributed") is None:
        print("dask[distributed] is not installed; pip install 'pypline-async[dask]' to run this example (skipped)")
        return
    from distributed import Client, LocalCluster

    from pypline.backends.on_dask import DaskBackend

    limits = [1_000 + 500 * i for i in range(12)]
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster:
        with Client(cluster) as client:
            pipeline = Pipeline(limits) >> primes_below
            result = pipeline.run_sync(executor=DaskBackend(client))
            if not is_ok(result):
                print(f"pipeline failed: {unwrap_err(result)}")
                raise SystemExit(1)
            rows = unwrap(result)
            lines = unwrap((Pipeline(rows) >> describe).run_sync())
            stats = pipeline.last_stats

    for line in lines[:4]:
        print(line)
    print(f"... {len(lines)} items in all")
    print(f"stage backend: {stats.stages[0].backend if stats else '?'}")
    print(f"computed in Dask worker processes: {os.getpid() not in {pid for *_, pid in rows}}")
    print(f"dask results match a local run: {[c for _, c, _, _ in rows] == [count_primes(n) for n in limits]}")
    print("cluster closed")


if __name__ == "__main__":
    main()
