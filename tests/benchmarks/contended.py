"""Quiet vs contended: how much each system slows down when the machine is busy.

Users run pipelines on machines that are doing other things. This script runs a workload
of ``bench_process.py`` or ``bench_remote.py`` alternately on a quiet machine and with one
extra CPU-bound process busy-looping beside it, and reports, per system, the median time
of each and the slowdown (contended / quiet) side by side: pypline's next to its
baseline's, from the same runs::

    for rep in 1..--runs:
        bench_X.py --only W --runs 1          quiet        (one process per measurement)
        start one busy-looping process
        bench_X.py --only W --runs 1          contended
        stop it (by pid)

    python tests/benchmarks/contended.py --bench process --only W3 --runs 3 [--quick]
    python tests/benchmarks/contended.py --bench remote --only W5 --runs 3
    ... --markdown docs/performance/contended-W3.md   (the table with command, machine, date)

``--python`` and ``--bench-dir`` run another checkout's scripts (e.g. the previous release)
with its own interpreter, for a before/after comparison in one sitting. The exit status is
1 when a run failed.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

BUSY = "while True: pass"


def _rows(report: str, workload: str) -> dict[str, float]:
    """system name -> median seconds, from the markdown table of ``workload`` in a report."""
    out: dict[str, float] = {}
    section = report.split(f"### {workload}", 1)
    if len(section) < 2:
        return out
    for line in section[1].split("\n###", 1)[0].splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 2 and re.fullmatch(r"[0-9.]+", cells[1]):
            out[cells[0].replace(" (reference)", "")] = float(cells[1])
    return out


def _run_once(python: str, script: Path, workload: str, quick: bool) -> dict[str, float]:
    cmd = [python, str(script), "--only", workload, "--runs", "1"] + (["--quick"] if quick else [])
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, cwd=HERE)
    rows = _rows(proc.stdout, workload)
    if proc.returncode != 0 or not rows:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bench", choices=["process", "remote"], required=True)
    ap.add_argument("--only", required=True, help="one workload, e.g. W3")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--python", default=sys.executable, help="the interpreter to run the benchmark with")
    ap.add_argument("--bench-dir", type=Path, default=HERE, help="where the bench_*.py scripts are")
    ap.add_argument("--markdown", type=Path, help="also write the table here")
    args = ap.parse_args()
    script = args.bench_dir / f"bench_{args.bench}.py"
    quiet: dict[str, list[float]] = {}
    busy_t: dict[str, list[float]] = {}
    for rep in range(args.runs):
        for name, t in _run_once(args.python, script, args.only, args.quick).items():
            quiet.setdefault(name, []).append(t)
        busy = subprocess.Popen([sys.executable, "-c", BUSY])
        try:
            for name, t in _run_once(args.python, script, args.only, args.quick).items():
                busy_t.setdefault(name, []).append(t)
        finally:
            busy.send_signal(signal.SIGKILL)  # the one process this script started
            busy.wait()
        print(f"run {rep + 1}/{args.runs} done", file=sys.stderr)
    cmd = " ".join(["python", "tests/benchmarks/contended.py", *sys.argv[1:]])
    lines = [
        f"### {args.only} quiet vs contended (one extra busy-looping process)",
        "",
        f"`{cmd}` · {platform.processor() or platform.machine()} · {os.cpu_count()} CPUs · "
        f"Python {platform.python_version()} · {datetime.date.today().isoformat()} · medians of {args.runs}",
        "",
        "| system | quiet median s | contended median s | slowdown |",
        "|---|---:|---:|---:|",
    ]
    for name in quiet:
        q, c = statistics.median(quiet[name]), statistics.median(busy_t.get(name, [float("nan")]))
        lines.append(f"| {name} | {q:.3f} | {c:.3f} | {c / q:.2f}x |")
    text = "\n".join(lines)
    print(text)
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
