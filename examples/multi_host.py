"""Remote agents: run ``multi_proc`` stages on ``pypline-agent`` daemons.

On a real cluster each worker host runs ``pypline-agent serve --keys DIR`` and the
client points ``PYPLINE_AGENTS`` (or ``configure(agents=[...])``) at them. This script
does the whole thing on one machine, as a demonstration:

1. ``pypline-agent keygen`` writes a key pair for the agent and one for the client;
2. it starts an agent on 127.0.0.1 (a free port) with those keys, as a subprocess;
3. it runs a pipeline whose CPU-bound stage executes on the agent's worker processes;
4. it stops the agent with SIGTERM (the agent drains and exits 0).

The ``if __name__ == "__main__":`` guard matters: stage functions defined in this
script are shipped to the agent by value and must not start another pipeline there.
"""

import os
import signal
import subprocess
import sys
import tempfile
import time

from pypline import Pipeline, configure, current_worker, work_pool
from pypline.util import is_ok, unwrap, unwrap_err


def count_primes(limit: int) -> int:
    """Primes below ``limit`` by trial division (deliberately naive CPU work)."""
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


@work_pool(multi_proc=True, num_workers=2, buffer=8)
def crunch(limit):
    # Runs in a worker process of the agent, not in this process.
    return count_primes(limit), os.getppid(), current_worker().stage


def start_agent(keys: str) -> tuple[subprocess.Popen, str]:
    """Start ``pypline-agent serve`` on a free loopback port; return it and its endpoint."""
    agent = subprocess.Popen(
        [sys.executable, "-m", "pypline.worker_agent", "serve", "--bind", "tcp://127.0.0.1:*",
         "--workers", "2", "--keys", keys, "--log-level", "WARNING"],
        stdout=subprocess.PIPE, text=True,
    )
    line = agent.stdout.readline()  # "pypline-agent ready endpoint=tcp://127.0.0.1:PORT ..."
    if not line.startswith("pypline-agent ready"):
        agent.kill()
        raise SystemExit(f"the agent did not start (exit status {agent.wait()})")
    endpoint = line.split("endpoint=")[1].split()[0]
    return agent, endpoint


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        keys = os.path.join(tmp, "keys")
        subprocess.run([sys.executable, "-m", "pypline.worker_agent", "keygen", keys],
                       check=True, stdout=subprocess.DEVNULL)
        agent, endpoint = start_agent(keys)
        try:
            print(f"agent listening on {endpoint} (pid {agent.pid}), CURVE keys in {keys}")
            # The same as PYPLINE_AGENTS=<endpoint> PYPLINE_KEYS=<keys> in the environment.
            configure(agents=[endpoint], keys=keys, fallback="error")

            limits = [3_000 + 500 * i for i in range(12)]
            started = time.perf_counter()
            result = (Pipeline(limits) >> crunch).run_sync()
            elapsed = time.perf_counter() - started
            if not is_ok(result):
                print(f"pipeline failed: {unwrap_err(result)}")
                raise SystemExit(1)
            outputs = unwrap(result)
            counts = [c for c, _, _ in outputs]
            print(f"primes below {limits[0]}..{limits[-1]}: {counts}")
            print(f"{len(outputs)} items in {elapsed:.2f} s, stage {outputs[0][2]!r}")
            print(f"every item ran on the agent's workers: {all(ppid == agent.pid for _, ppid, _ in outputs)}")
            print(f"all results match a local run: {counts == [count_primes(n) for n in limits]}")
        finally:
            configure()
            agent.send_signal(signal.SIGTERM)  # drain, then exit 0
            status = agent.wait(timeout=30)
            agent.stdout.close()
            print(f"agent drained and exited with status {status}")


if __name__ == "__main__":
    main()
