"""Write docs/performance.md from benchmark outputs: no hand-edited numbers.

Each benchmark script prints markdown tables. This script puts them on one page, each
under the command that produced it, the machine (CPU model, cores, Python) and the
date, after a section that defines the workloads::

    python tests/benchmarks/bench_core.py --runs 3 > core.md
    python tests/benchmarks/bench_process.py --runs 3 > process.md
    python tests/benchmarks/contended.py --bench process --only W3 --runs 3 > contended-W3.md
    python tests/benchmarks/performance_page.py --out docs/performance.md \\
        --table "python tests/benchmarks/bench_core.py --runs 3" core.md \\
        --table "python tests/benchmarks/bench_process.py --runs 3" process.md \\
        --table "python tests/benchmarks/contended.py --bench process --only W3 --runs 3" contended-W3.md
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
from pathlib import Path

WORKLOADS = """\
## The workloads

- **W1** engine overhead: 200,000 items through 3 chained `async def f(x): return x + 1`
  stages, against a hand-written asyncio pipeline, pypeln and aiostream (`bench_core.py`).
- **W2** I/O-bound: 20,000 items through one stage of 100 workers that each
  `await asyncio.sleep(0.01)`: how close to the ideal time (`bench_core.py`).
- **W3** CPU-bound: a pure-Python loop per item on 2 worker processes, against the same
  calls made sequentially and the standard library's process pools (`bench_process.py`),
  or through one agent (`bench_remote.py`); in `bench_core.py`, plain `def` stages in
  threads.
- **W4** per-item overhead of the process backend: `f(x) = x`, 100,000 items, 2 workers
  (`bench_process.py`).
- **W5** per-item overhead through an agent: `f(x) = x` through one `pypline-agent` with
  2 workers, against a raw pyzmq echo (`bench_remote.py`).
- **W6** bounded memory: 10 KB items to a slow consumer; items read ahead and peak RSS
  (`bench_process.py`).
- **W7** payload: 200 items of 4 MiB, the worker returns their length (`bench_process.py`,
  and through an agent in `bench_remote.py`).
- **Batch stages**: a function costing 2 ms per call plus 10 µs per item, called per item
  and with `batch=64` (`bench_batch.py`).
- **Rate limits**: `rate=(100, 1.0)` for 10 s on 8 workers: the rate achieved, and the most
  starts the workers saw in any one-second window (`bench_rate.py`).
- **Journal**: W1 with `run(collect=False)`, with and without `journal=` (`bench_journal.py`).

Ratios compare systems measured in the same run, on the same machine: compare ratios,
not absolute times across tables. "Contended" tables run each system once quietly and
once beside one extra busy-looping process, alternately, and give each one's slowdown.
"""


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--date", default=datetime.date.today().isoformat(), help="the day the tables were measured")
    ap.add_argument("--table", nargs=2, action="append", metavar=("COMMAND", "FILE"), default=[])
    args = ap.parse_args()
    machine = f"{_cpu_model()}, {os.cpu_count()} cores, Linux, Python {platform.python_version()}"
    parts = ["# Performance", "", WORKLOADS]
    for command, file in args.table:
        text = Path(file).read_text().strip()
        body = "\n".join(
            line.replace("### ", "#### ", 1) if line.startswith("### ") else line
            for line in text.splitlines()
            if not line.startswith(("# ", "## "))
        )
        parts += [f"## `{command}`", "", f"Machine: {machine}. Date: {args.date}.", "", body, ""]
    args.out.write_text("\n".join(parts).rstrip() + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
