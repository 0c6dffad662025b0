"""Running a pipeline on Ray: the same stages, one argument changed.

Starts a small local Ray (two CPUs, no dashboard), runs a CPU-bound
``multi_proc=True`` stage on it with ``run(executor=RayBackend())`` (one Ray actor
per stage worker), prints what came back and shuts Ray down. With a real cluster
you would call ``ray.init(address="ray://head:10001")`` (or pass
``RayBackend(address=...)``) instead.

Needs ``pip install 'pypline-async[ray]'``; without it the example says so and exits 0.

Run it with:  python examples/on_ray.py
"""

import importlib.util
import os

from pypline import Pipeline, configure, current_worker, work_pool
from pypline.util import is_ok, unwrap, unwrap_err


def count_primes(limit: int) -> int:
    """Count the primes below ``limit`` by trial division (deliberately naive)."""
    return sum(1 for n in range(2, limit) if all(n % d for d in range(2, int(n**0.5) + 1)))


@work_pool(multi_proc=True, num_workers=2)
def primes_below(limit):
    # Runs in Ray actor `current_worker().index`; each worker is one actor process.
    return limit, count_primes(limit), current_worker().index, os.getpid()


def main() -> None:
    if importlib.util.find_spec("ray") is None:
        print("ray is not installed; pip install 'pypline-async[ray]' to run this example (skipped)")
        return
    import ray

    from pypline.backends.on_ray import RayBackend

    limits = [1_000 + 500 * i for i in range(12)]
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        pipeline = Pipeline(limits) >> primes_below
        result = pipeline.run_sync(executor=RayBackend())
        # The same, for every multi_proc stage of every run in this process:
        previous = configure(backend=RayBackend())
        again = pipeline.run_sync()
        configure(previous)
    finally:
        ray.shutdown()

    if not (is_ok(result) and is_ok(again)):
        print(f"pipeline failed: {unwrap_err(result) if not is_ok(result) else unwrap_err(again)}")
        raise SystemExit(1)
    rows = unwrap(result)
    for limit, count, worker, _pid in rows[:4]:
        print(f"{count:4d} primes below {limit:5d} (worker {worker})")
    print(f"... {len(rows)} items in all")
    pids = {}
    for _, _, worker, pid in rows:
        pids.setdefault(worker, set()).add(pid)
    print(f"one actor process per worker: {all(len(p) == 1 for p in pids.values())}")
    print(f"ray results match a local run: {[c for _, c, _, _ in rows] == [count_primes(n) for n in limits]}")
    print(f"configure(backend=RayBackend()) gives the same: {[r[1] for r in unwrap(again)] == [r[1] for r in rows]}")
    print(f"ray shut down: {not ray.is_initialized()}")


if __name__ == "__main__":
    main()
