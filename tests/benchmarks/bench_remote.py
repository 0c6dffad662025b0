"""Remote-agent benchmarks (issue 4): pypline through a local ``pypline-agent`` vs raw pyzmq.

Run it as a script (not a pytest module)::

    python tests/benchmarks/bench_remote.py               # full size, 3 runs
    python tests/benchmarks/bench_remote.py --quick       # smoke run (fewer items)
    python tests/benchmarks/bench_remote.py --runs 5 --json out.json --only W5,W7

How a run flows::

    start one agent: python -m pypline.worker_agent serve --workers 2 (127.0.0.1, free port)
    start one raw echo server (a sync pyzmq ROUTER that sends every message back)
    for each workload (W5, W3, W7):
        warm-up: every system once on a small input   (checked, not reported; the agent keeps
                                                         its stage's worker processes warm)
        for rep in 1..--runs: every system once, order rotated per rep
    markdown table of MEDIANS (min-max), with ratios, to stdout

Workloads (targets from issue 4):

- **W5** per-item overhead: ``def f(x): return x`` through one agent with 2 workers, 20,000
  items (``--quick``: 5,000), ``run()`` with ``buffer=4096``. Baselines: a raw pyzmq
  DEALER->ROUTER echo of 8-byte messages, unbatched with a window of 1,000 in flight,
  and batched 100 items per message. Target: pypline <= 10 us/item.
- **W3** CPU-bound: 64 calls of a ~25 ms pure-Python loop through one agent with 2
  workers, against the same calls made sequentially in this process. Target: >= 1.8x.
- **W7** payload: 200 x 4 MiB ``bytes`` through an agent to ``f(x) = len(x)`` (the payload goes
  one way, 8 bytes come back), against raw pyzmq sending the same messages zero-copy, 4 in
  flight, each answered with its length. Rows for an agent with process workers (the
  default: each payload crosses two more process boundaries inside the agent) and with
  ``--backend asyncio`` (the call runs in the agent). Target: >= 0.7x raw.

Each measurement brackets building the pipeline, running it and collecting the outputs
(for pypline this includes the per-run handshake and stage declaration with the agent),
with ``time.perf_counter()``; outputs are checked after timing. Exit status 0 when every
system produced correct output, 1 otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zmq

ROOT = Path(__file__).resolve().parents[2]

ECHO_SERVER = r"""
import sys, zmq
ctx = zmq.Context()
s = ctx.socket(zmq.ROUTER)
s.setsockopt(zmq.SNDHWM, 0); s.setsockopt(zmq.RCVHWM, 0)
s.bind(sys.argv[1])
print("ready", flush=True)
while True:
    msg = s.recv_multipart(copy=False)
    if len(msg) == 2 and len(msg[1]) >= 65536:  # a big payload: answer with its length only
        s.send_multipart([msg[0], len(msg[1]).to_bytes(8, "little")])
    else:
        s.send_multipart(msg, copy=False)
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- functions run by the agent (defined in __main__: shipped by value) -----------------------


def identity(x: Any) -> Any:
    return x


def size_of(x: bytes) -> int:
    return len(x)


def spin(n: int) -> int:
    acc = 0
    for i in range(n):
        acc = (acc + i * i) % 1_000_003
    return acc


# --- systems -------------------------------------------------------------------------------


def pypline_run(endpoint: str, items: list[Any], fn: Callable[[Any], Any], buffer: int) -> list[Any]:
    from pypline import Pipeline, configure, work_pool
    from pypline.util import unwrap

    configure(agents=[endpoint], fallback="error")
    stage = work_pool(fn, multi_proc=True, num_workers=2, buffer=buffer)
    return unwrap(asyncio.run((Pipeline(items) >> stage).run()))  # type: ignore[no-any-return]


def raw_echo_window(endpoint: str, n: int, window: int) -> list[int]:
    """n 8-byte messages round-tripped, at most ``window`` in flight (no batching)."""
    ctx = zmq.Context.instance()
    s = ctx.socket(zmq.DEALER)
    s.linger = 0
    s.setsockopt(zmq.SNDHWM, 0)
    s.setsockopt(zmq.RCVHWM, 0)
    s.connect(endpoint)
    out: list[int] = []
    try:
        sent = 0
        while len(out) < n:
            while sent < n and sent - len(out) < window:
                s.send(sent.to_bytes(8, "little"))
                sent += 1
            out.append(int.from_bytes(s.recv(), "little"))
    finally:
        s.close(0)
    return out


def raw_echo_batched(endpoint: str, n: int, per_msg: int, window: int = 10) -> list[int]:
    """n 8-byte items round-tripped, ``per_msg`` packed per message, ``window`` messages in flight."""
    import array

    ctx = zmq.Context.instance()
    s = ctx.socket(zmq.DEALER)
    s.linger = 0
    s.connect(endpoint)
    out: list[int] = []
    try:
        sent = 0
        inflight = 0
        while len(out) < n:
            while sent < n and inflight < window:
                k = min(per_msg, n - sent)
                s.send(array.array("q", range(sent, sent + k)).tobytes())
                sent += k
                inflight += 1
            got = array.array("q")
            got.frombytes(s.recv())
            out.extend(got)
            inflight -= 1
    finally:
        s.close(0)
    return out


def raw_send_big(endpoint: str, payloads: list[bytes], window: int = 4) -> list[int]:
    """Big messages sent zero-copy, each answered with its length (8 bytes); ``window`` in flight."""
    ctx = zmq.Context.instance()
    s = ctx.socket(zmq.DEALER)
    s.linger = 0
    s.connect(endpoint)
    out: list[int] = []
    try:
        sent = 0
        while len(out) < len(payloads):
            while sent < len(payloads) and sent - len(out) < window:
                s.send(payloads[sent], copy=False)
                sent += 1
            out.append(int.from_bytes(s.recv(), "little"))
    finally:
        s.close(0)
    return out


# --- harness -------------------------------------------------------------------------------


@dataclass
class Row:
    name: str
    run: Callable[[], Any]
    check: Callable[[Any], bool]
    times: list[float] = field(default_factory=list)
    failed: str | None = None


def measure(rows: list[Row], runs: int, label: str) -> None:
    for r in rows:  # warm-up
        try:
            if not r.check(r.run()):
                r.failed = "wrong output in warm-up"
        except Exception as exc:  # noqa: BLE001 - reported, the others go on
            r.failed = f"{type(exc).__name__}: {exc}"
    for rep in range(runs):
        order = rows[rep % len(rows) :] + rows[: rep % len(rows)]
        for r in order:
            if r.failed:
                continue
            gc.collect()
            t0 = time.perf_counter()
            try:
                out = r.run()
            except Exception as exc:  # noqa: BLE001
                r.failed = f"{type(exc).__name__}: {exc}"
                continue
            dt = time.perf_counter() - t0
            if not r.check(out):
                r.failed = "wrong output"
                continue
            r.times.append(dt)
        print(f"  {label} rep {rep + 1}/{runs} done", file=sys.stderr)


def med(r: Row) -> float:
    return statistics.median(r.times) if r.times else float("nan")


def spread(r: Row) -> str:
    return f"{min(r.times):.3f}–{max(r.times):.3f}" if r.times else "-"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--only", default="W5,W3,W7")
    args = ap.parse_args()
    only = {w.strip().upper() for w in args.only.split(",")}
    n5 = 5_000 if args.quick else 20_000
    n7 = 50 if args.quick else 200
    n3, spin_n = (24, 150_000) if args.quick else (64, 400_000)

    agent_ep = f"tcp://127.0.0.1:{_free_port()}"
    echo_ep = f"tcp://127.0.0.1:{_free_port()}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYPLINE_")}
    agent2_ep = f"tcp://127.0.0.1:{_free_port()}"
    agent = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pypline.worker_agent",
            "serve",
            "--bind",
            agent_ep,
            "--workers",
            "2",
            "--log-level",
            "WARNING",
        ],
        stdout=subprocess.PIPE,
        env=env,
    )
    agent2 = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pypline.worker_agent",
            "serve",
            "--bind",
            agent2_ep,
            "--workers",
            "2",
            "--backend",
            "asyncio",
            "--log-level",
            "WARNING",
        ],
        stdout=subprocess.PIPE,
        env=env,
    )
    echo = subprocess.Popen([sys.executable, "-c", ECHO_SERVER, echo_ep], stdout=subprocess.PIPE)
    tables: list[str] = []
    results: dict[str, Any] = {}
    ok = True
    try:
        assert agent.stdout is not None and echo.stdout is not None and agent2.stdout is not None
        for a in (agent, agent2):
            if not a.stdout.readline().startswith(b"pypline-agent ready"):  # type: ignore[union-attr]
                raise SystemExit("an agent did not start")
        echo.stdout.readline()

        if "W5" in only:
            xs = list(range(n5))
            rows = [
                Row(
                    "pypline via agent (2 workers)",
                    lambda: pypline_run(agent_ep, xs, identity, 4096),
                    lambda out: out == xs,
                ),
                Row(
                    "raw pyzmq echo, unbatched, window 1000",
                    lambda: raw_echo_window(echo_ep, n5, 1000),
                    lambda out: out == xs,
                ),
                Row(
                    "raw pyzmq echo, batched 100/msg", lambda: raw_echo_batched(echo_ep, n5, 100), lambda out: out == xs
                ),
            ]
            measure(rows, args.runs, "W5")
            base = med(rows[1])
            lines = [
                f"### W5 per-item overhead ({n5:,} items, `def f(x): return x`)",
                "",
                "| system | median s | min–max s | µs/item | vs raw unbatched |",
                "|---|---|---|---|---|",
            ]
            for r in rows:
                lines.append(
                    f"| {r.name} | {med(r):.3f} | {spread(r)} | {med(r) / n5 * 1e6:.2f} | {base / med(r):.2f}x |"
                    if not r.failed
                    else f"| {r.name} | FAILED: {r.failed} |||"
                )
            tables.append("\n".join(lines))
            results["W5"] = {r.name: {"times": r.times, "failed": r.failed} for r in rows}
            ok &= not any(r.failed for r in rows)

        if "W3" in only:
            xs3 = [spin_n] * n3
            expect = [spin(spin_n)] * n3
            rows = [
                Row("sequential (this process)", lambda: [spin(x) for x in xs3], lambda out: out == expect),
                Row(
                    "pypline via agent (2 workers)",
                    lambda: pypline_run(agent_ep, xs3, spin, 16),
                    lambda out: out == expect,
                ),
            ]
            measure(rows, args.runs, "W3")
            lines = [
                f"### W3 CPU-bound ({n3} calls of a ~{spin_n // 16_000} ms loop)",
                "",
                "| system | median s | min–max s | speedup vs sequential |",
                "|---|---|---|---|",
            ]
            for r in rows:
                lines.append(
                    f"| {r.name} | {med(r):.3f} | {spread(r)} | {med(rows[0]) / med(r):.2f}x |"
                    if not r.failed
                    else f"| {r.name} | FAILED: {r.failed} |||"
                )
            tables.append("\n".join(lines))
            results["W3"] = {r.name: {"times": r.times, "failed": r.failed} for r in rows}
            ok &= not any(r.failed for r in rows)

        if "W7" in only:
            size = 4 * 1024 * 1024
            blobs = [os.urandom(64) * (size // 64) for _ in range(4)]
            payloads = [blobs[i % 4] for i in range(n7)]
            mib = n7 * size / 2**20
            sizes = [size] * n7
            rows = [
                Row(
                    "pypline via agent, process workers",
                    lambda: pypline_run(agent_ep, payloads, size_of, 8),
                    lambda out: out == sizes,
                ),
                Row(
                    "pypline via agent, --backend asyncio",
                    lambda: pypline_run(agent2_ep, payloads, size_of, 8),
                    lambda out: out == sizes,
                ),
                Row(
                    "raw pyzmq, zero-copy, 4 in flight",
                    lambda: raw_send_big(echo_ep, payloads),
                    lambda out: out == sizes,
                ),
            ]
            measure(rows, args.runs, "W7")
            raw = med(rows[-1])
            lines = [
                f"### W7 payload ({n7} x 4 MiB to the agent; `f(x) = len(x)`, 8 bytes back)",
                "",
                "| system | median s | min–max s | MiB/s | vs raw pyzmq |",
                "|---|---|---|---|---|",
            ]
            for r in rows:
                lines.append(
                    f"| {r.name} | {med(r):.3f} | {spread(r)} | {mib / med(r):,.0f} | {raw / med(r):.2f}x |"
                    if not r.failed
                    else f"| {r.name} | FAILED: {r.failed} |||"
                )
            tables.append("\n".join(lines))
            results["W7"] = {r.name: {"times": r.times, "failed": r.failed} for r in rows}
            ok &= not any(r.failed for r in rows)
    finally:
        for p in (agent, agent2, echo):
            p.terminate()
            try:
                p.wait(35)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
    head = (
        f"# pypline remote benchmarks\n\nPython {platform.python_version()}, pyzmq {zmq.__version__}, "
        f"libzmq {zmq.zmq_version()}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}, "
        f"runs {args.runs}{' (quick)' if args.quick else ''}; medians.\n"
    )
    print(head + "\n" + "\n\n".join(tables))
    for name, rs in results.items():
        for sysname, r in rs.items():
            if r["failed"]:
                print(f"{name} {sysname} FAILED: {r['failed']}", file=sys.stderr)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
