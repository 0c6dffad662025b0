"""Process-backend benchmarks: pypline ``multi_proc=True`` against the stdlib process pools.

Run it as a script (it is deliberately not a pytest module)::

    python tests/benchmarks/bench_process.py                 # full size, 3 runs
    python tests/benchmarks/bench_process.py --quick --runs 1 # smoke run, 1/10 of the items
    python tests/benchmarks/bench_process.py --only W4,W7     # a subset

How a measurement flows::

    for each workload (W3, W4, W6, W7):
        warm-up: every system once on a small input       (checked, not reported)
        for rep in 1..--runs:
            for each system, in an order rotated by rep:   (interleaved: noise hits all)
                gc.collect(); t0 = perf_counter()
                out = system(n)          <- timed: INCLUDING starting and stopping the
                t1 = perf_counter()         workers (a pool's or pypline's), as a user sees it
                check `out`                                 (outside the timing)
    print one markdown table per workload: MEDIANS, and ratios against the reference

Workloads (the benchmark workloads):

- **W3 CPU-bound**: a pure-Python loop calibrated to ~2.8 ms per item, 2,000 items,
  2 workers. Speedup = time(sequential, in this process) / time(system).
- **W4 per-item overhead**: ``def f(x): return x``, 100,000 items, 2 workers. Shown
  as µs/item of the whole call, and "steady" µs/item = (time(n) - time(1 item)) / n,
  which takes the workers' start-up out (a fresh interpreter per pypline worker;
  the stdlib pools fork). pypline runs with the default ``buffer=16`` and with
  ``buffer=1024``: the memory bound caps what can be in flight, so a small buffer
  makes every round trip carry at most ``buffer + workers`` items. The last row runs
  the same pipeline on an executor that answers at once, in process: the engine's
  own per-item cost, a floor for any backend.
- **W6 bounded memory**: 200,000 items of 10 KB through a 2-worker stage that returns
  the item's length, to a slow consumer (it sleeps 1 ms every 500 items). Reports
  the most items read from the source ahead of the consumer and the peak RSS of the
  parent plus its worker processes (psutil, sampled every 10 ms in a thread).
- **W7 payload**: 200 items of 4 MiB ``bytes``, 2 workers returning ``len(item)``;
  MiB/s of items moved.

The machine this runs on may be shared: compare ratios from one run, not absolute
times across runs. The exit status is 1 if any system produced a wrong output.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import functools
import gc
import json
import multiprocessing
import os
import platform
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

# --------------------------------------------------------------------------- workloads

W3_ITEMS, W3_MS = 2_000, 2.8
W4_ITEMS = 100_000
W6_ITEMS, W6_SIZE = 200_000, 10_000
W7_ITEMS, W7_SIZE = 200, 4 * 1024 * 1024
WORKERS = 2
SAMPLE_S = 0.01  # RSS sampling period for W6

_BURN_LOOPS = 0  # set by calibrate(); module level so forked/spawned pool workers see it


def burn(loops: int) -> int:
    s = 0
    for i in range(loops):
        s += i * i % 7
    return s


def cpu_item(x: int) -> int:
    return burn(_BURN_LOOPS) + x


def identity(x: Any) -> Any:
    return x


def length(x: bytes) -> int:
    return len(x)


def calibrate(target_ms: float) -> int:
    n = 20_000
    while True:
        t = time.perf_counter()
        burn(n)
        dt = time.perf_counter() - t
        if dt > 0.05:
            break
        n *= 2
    best = min(_timed(lambda: burn(n)) for _ in range(5))
    return max(1, int(n * (target_ms / 1000) / best))


def _timed(fn: Callable[[], Any]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


# --------------------------------------------------------------------------- systems


def pypline_run(fn: Callable[..., Any], items: Any, buffer: int = 16) -> list[Any]:
    from pypline import Pipeline, work_pool
    from pypline.util import unwrap

    stage = work_pool(fn, multi_proc=True, num_workers=WORKERS, buffer=buffer)
    return unwrap((Pipeline(items) >> stage).run_sync())  # type: ignore[no-any-return]


def _null_backend() -> Any:
    """A backend whose executor answers every attempt at once, in process: the engine's own cost."""
    from pypline.executor import Backend, Executor

    class NullExecutor(Executor):
        async def start(self, spec: Any, sink: Any) -> None:
            self.sink, self.held, self.queue, self.scheduled = sink, 0, [], False
            self.loop = asyncio.get_running_loop()

        def capacity(self) -> int:
            return 2048 - self.held

        def submit(self, attempts: Any) -> None:
            self.held += len(attempts)
            self.queue.extend(attempts)
            if not self.scheduled:
                self.scheduled = True
                self.loop.call_soon(self.answer)

        def answer(self) -> None:
            self.scheduled = False
            queue, self.queue = self.queue, []
            self.held -= len(queue)  # every slot freed, then one report for the batch
            self.sink.ok_many(queue, [a.item for a in queue])

        async def aclose(self) -> None:
            pass

    class NullBackend(Backend):
        name = "null"

        def executor(self, spec: Any) -> Executor:
            return NullExecutor()

    return NullBackend()


def engine_floor(items: Any, buffer: int) -> list[Any]:
    from pypline import Pipeline, work_pool
    from pypline.util import unwrap

    stage = work_pool(identity, multi_proc=True, num_workers=WORKERS, buffer=buffer)
    return unwrap((Pipeline(items) >> stage).run_sync(executor=_null_backend()))  # type: ignore[no-any-return]


def _recv_msg(sock: Any) -> bytes:
    """One length-prefixed message (4-byte little-endian length, then the bytes)."""
    head = b""
    while len(head) < 4:
        chunk = sock.recv(4 - len(head))
        if not chunk:
            raise EOFError
        head += chunk
    size = int.from_bytes(head, "little")
    buf = bytearray(size)
    view, got = memoryview(buf), 0
    while got < size:
        n = sock.recv_into(view[got:])
        if not n:
            raise EOFError
        got += n
    return bytes(buf)


def _send_msg(sock: Any, data: bytes) -> None:
    sock.sendall(len(data).to_bytes(4, "little") + data)


def _echo_worker(sock: Any, inherited: list[Any]) -> None:
    import pickle

    for other in inherited:  # the parent's ends, copied by fork: else no worker would see EOF
        other.close()
    try:
        while True:
            items = pickle.loads(_recv_msg(sock))
            _send_msg(sock, pickle.dumps(items, protocol=5))
    except (EOFError, OSError):
        pass


def raw_in_flight(items: Any, in_flight: int) -> list[Any]:
    """The floor for a bounded window: pickled lists over socketpairs to WORKERS echo
    processes, never more than ``in_flight`` items out (no engine, no functions,
    ordering or fault handling). Each worker gets ``in_flight // WORKERS`` at a time."""
    import pickle
    import selectors
    import socket

    items = list(items)
    k = max(1, in_flight // WORKERS)
    ctx = multiprocessing.get_context("fork")
    pairs = [socket.socketpair() for _ in range(WORKERS)]
    socks = [parent for parent, _ in pairs]
    procs = [ctx.Process(target=_echo_worker, args=(child, socks), daemon=True) for _, child in pairs]
    for p in procs:
        p.start()
    for _, child in pairs:
        child.close()
    sel = selectors.DefaultSelector()
    out: list[Any] = []
    nxt = 0
    try:
        for s in socks:
            _send_msg(s, pickle.dumps(items[nxt : nxt + k], protocol=5))
            nxt += k
            sel.register(s, selectors.EVENT_READ)
        while len(out) < len(items):
            for key, _ in sel.select():
                s = key.fileobj
                out.extend(pickle.loads(_recv_msg(s)))
                if nxt < len(items):
                    _send_msg(s, pickle.dumps(items[nxt : nxt + k], protocol=5))
                    nxt += k
    finally:
        for s in socks:
            s.close()
        for p in procs:
            p.join(5)
    return out


def pool_map(fn: Callable[..., Any], items: Any, chunksize: int | None = None) -> list[Any]:
    with multiprocessing.Pool(WORKERS) as pool:
        return pool.map(fn, items, chunksize)


def pool_imap(fn: Callable[..., Any], items: Any, chunksize: int = 1) -> list[Any]:
    with multiprocessing.Pool(WORKERS) as pool:
        return list(pool.imap(fn, items, chunksize))


def ppe_map(fn: Callable[..., Any], items: Any, chunksize: int = 1) -> list[Any]:
    with concurrent.futures.ProcessPoolExecutor(WORKERS) as ex:
        return list(ex.map(fn, items, chunksize=chunksize))


def sequential(fn: Callable[..., Any], items: Any) -> list[Any]:
    return [fn(x) for x in items]


# --------------------------------------------------------------------------- measuring


class Row:
    def __init__(self, name: str, run: Callable[[int], Any], check: Callable[[Any, int], bool]) -> None:
        self.name = name
        self.run = run
        self.check = check
        self.times: list[float] = []
        self.extra: dict[str, list[float]] = {}
        self.failed: str | None = None


def measure(rows: list[Row], n: int, runs: int, warm_n: int) -> None:
    for row in rows:  # warm-up: imports, first pool; checked, not reported
        try:
            out = row.run(warm_n)
            if not row.check(out, warm_n):
                row.failed = "wrong output (warm-up)"
        except Exception as exc:  # noqa: BLE001 - reported in the table
            row.failed = f"{type(exc).__name__}: {exc}"
    for rep in range(runs):
        order = rows[rep % len(rows) :] + rows[: rep % len(rows)]
        for row in order:
            if row.failed:
                continue
            gc.collect()
            try:
                t = time.perf_counter()
                out = row.run(n)
                dt = time.perf_counter() - t
            except Exception as exc:  # noqa: BLE001
                row.failed = f"{type(exc).__name__}: {exc}"
                continue
            if not row.check(out, n):
                row.failed = "wrong output"
                continue
            row.times.append(dt)
            print(f"  {row.name}: {dt:.3f} s", file=sys.stderr)


def med(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def spread(xs: list[float]) -> str:
    return f"{min(xs):.3f}–{max(xs):.3f}" if xs else "-"


# --------------------------------------------------------------------------- W3


def w3(runs: int, quick: bool) -> list[str]:
    global _BURN_LOOPS
    _BURN_LOOPS = calibrate(W3_MS)
    n = W3_ITEMS // (10 if quick else 1)
    expected = lambda k: [burn(_BURN_LOOPS) + x for x in range(k)]
    base = burn(_BURN_LOOPS)
    check = lambda out, k: list(out) == [base + x for x in range(k)]
    rows = [
        Row("sequential (reference)", lambda k: sequential(cpu_item, range(k)), check),
        Row("pypline multi_proc", lambda k: pypline_run(cpu_item, range(k)), check),
        Row("multiprocessing.Pool.map", lambda k: pool_map(cpu_item, range(k)), check),
        Row("ProcessPoolExecutor.map", lambda k: ppe_map(cpu_item, range(k)), check),
        Row("Pool.imap(chunksize=1)", lambda k: pool_imap(cpu_item, range(k)), check),
    ]
    del expected
    print(f"W3: {n} items, {_BURN_LOOPS} loops/item (~{W3_MS} ms)", file=sys.stderr)
    measure(rows, n, runs, warm_n=20)
    ref = med(rows[0].times)
    lines = [
        f"### W3 CPU-bound: {n} items × ~{W3_MS} ms, {WORKERS} workers",
        "",
        "| system | median s | min–max | speedup vs sequential |",
        "|---|---:|---:|---:|",
    ]
    for r in rows:
        if r.failed:
            lines.append(f"| {r.name} | FAILED: {r.failed} | | |")
        else:
            lines.append(f"| {r.name} | {med(r.times):.3f} | {spread(r.times)} | {ref / med(r.times):.2f}× |")
    return lines


# --------------------------------------------------------------------------- W4


def w4(runs: int, quick: bool) -> list[str]:
    n = W4_ITEMS // (10 if quick else 1)
    check = lambda out, k: list(out) == list(range(k))
    rows = [
        Row("pypline multi_proc (buffer=16, default)", lambda k: pypline_run(identity, range(k)), check),
        Row("pypline multi_proc (buffer=1024)", lambda k: pypline_run(identity, range(k), buffer=1024), check),
        Row("Pool.imap(chunksize=1) (reference)", lambda k: pool_imap(identity, range(k), 1), check),
        Row("Pool.imap(chunksize=256)", lambda k: pool_imap(identity, range(k), 256), check),
        Row("ProcessPoolExecutor.map(chunksize=256)", lambda k: ppe_map(identity, range(k), 256), check),
        Row("engine alone: null executor, no processes (buffer=1024)", lambda k: engine_floor(range(k), 1024), check),
        Row(
            "floor at the default buffer: raw socketpair echo, 20 items in flight (no engine)",
            lambda k: raw_in_flight(range(k), 20),
            lambda out, k: sorted(out) == list(range(k)),
       ),
    ]
    print(f"W4: {n} items", file=sys.stderr)
    measure(rows, n, runs, warm_n=100)
    # Start-up cost of each system (one item), to report the steady per-item cost too.
    startup: dict[str, float] = {}
    for r in rows:
        if not r.failed:
            startup[r.name] = med([_timed(functools.partial(r.run, 1)) for _ in range(max(3, runs))])
    ref = med(rows[2].times)
    lines = [
        f"### W4 per-item overhead: `f(x) = x`, {n} items, {WORKERS} workers",
        "",
        "| system | median s | µs/item (whole call) | start-up s | µs/item (steady) | speed vs Pool.imap(cs=1) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if r.failed:
            lines.append(f"| {r.name} | FAILED: {r.failed} | | | | |")
            continue
        t = med(r.times)
        s = startup[r.name]
        lines.append(
            f"| {r.name} | {t:.3f} | {t / n * 1e6:.2f} | {s:.3f} | {max(t - s, 0) / n * 1e6:.2f} | {ref / t:.1f}× |"
       )
    return lines


# --------------------------------------------------------------------------- W6


class _Rss:
    """Samples the RSS of this process plus all its descendants, in a thread."""

    def __init__(self) -> None:
        import psutil

        self.me = psutil.Process()
        self.peak = 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> int:
        total = self.me.memory_info().rss
        for c in self.me.children(recursive=True):
            try:
                total += c.memory_info().rss
            except Exception:  # noqa: BLE001, S110 - a child that just exited
                pass
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._sample())
            self._stop.wait(SAMPLE_S)

    def __enter__(self) -> _Rss:  # noqa: PYI034 - Self needs 3.11
        self.peak = self._sample()
        self._t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join()


def w6(runs: int, quick: bool) -> list[str]:
    n = W6_ITEMS // (10 if quick else 1)
    payload = b"x" * W6_SIZE
    results: dict[str, dict[str, list[float]]] = {}

    def source(state: dict[str, int], k: int) -> Iterator[bytes]:
        for _ in range(k):
            state["ahead"] = max(state["ahead"], state["pulled"] - state["consumed"])
            state["pulled"] += 1
            yield payload

    def consume(state: dict[str, int]) -> None:
        state["consumed"] += 1
        if state["consumed"] % 500 == 0:
            time.sleep(0.001)

    def run_pypline(k: int) -> dict[str, int]:
        from pypline import Pipeline, work_pool
        from pypline.util import unwrap

        state = {"pulled": 0, "consumed": 0, "ahead": 0}

        async def main() -> None:
            stage = work_pool(length, multi_proc=True, num_workers=WORKERS)
            async for r in (Pipeline(source(state, k)) >> stage).stream():
                assert unwrap(r) == W6_SIZE
                state["consumed"] += 1
                if state["consumed"] % 500 == 0:
                    await asyncio.sleep(0.001)

        asyncio.run(main())
        return state

    def run_imap(k: int) -> dict[str, int]:
        state = {"pulled": 0, "consumed": 0, "ahead": 0}
        with multiprocessing.Pool(WORKERS) as pool:
            for r in pool.imap(length, source(state, k)):
                assert r == W6_SIZE
                consume(state)
        return state

    systems = [("pypline multi_proc (buffer=16)", run_pypline), ("Pool.imap(chunksize=1)", run_imap)]
    from pypline import work_pool
    from pypline.lowlevel import admission_bound

    bound = admission_bound([work_pool(length, multi_proc=True, num_workers=WORKERS).spec])
    print(f"W6: {n} items of {W6_SIZE} bytes", file=sys.stderr)
    for rep in range(runs):
        for name, fn in systems[rep % 2 :] + systems[: rep % 2]:
            gc.collect()
            with _Rss() as rss:
                t = time.perf_counter()
                state = fn(n)
                dt = time.perf_counter() - t
            ok = state["consumed"] == n
            r = results.setdefault(name, {"s": [], "ahead": [], "rss": [], "ok": []})
            r["s"].append(dt)
            r["ahead"].append(state["ahead"])
            r["rss"].append(rss.peak / 2**20)
            r["ok"].append(float(ok))
            print(f"  {name}: {dt:.2f} s, ahead {state['ahead']}, peak RSS {rss.peak / 2**20:.0f} MiB", file=sys.stderr)
    lines = [
        f"### W6 bounded memory: {n} items × {W6_SIZE // 1000} KB, {WORKERS} workers, slow consumer",
        "",
        f"The memory bound for this pipeline is {bound} items.",
        "",
        "| system | median s | max items read ahead | peak RSS parent+workers (MiB) |",
        "|---|---:|---:|---:|",
    ]
    for name, r in results.items():
        lines.append(f"| {name} | {med(r['s']):.2f} | {max(r['ahead']):.0f} | {med(r['rss']):.0f} |")
    return lines


# --------------------------------------------------------------------------- W7


def w7(runs: int, quick: bool) -> list[str]:
    n = W7_ITEMS // (10 if quick else 1)
    payload = bytes(range(256)) * (W7_SIZE // 256)
    items = lambda k: (payload for _ in range(k))
    check = lambda out, k: list(out) == [W7_SIZE] * k
    rows = [
        Row("Pool.imap(chunksize=1) (reference)", lambda k: pool_imap(length, items(k), 1), check),
        Row("pypline multi_proc", lambda k: pypline_run(length, items(k)), check),
        Row("ProcessPoolExecutor.map", lambda k: ppe_map(length, items(k), 1), check),
    ]
    print(f"W7: {n} items of {W7_SIZE >> 20} MiB", file=sys.stderr)
    measure(rows, n, runs, warm_n=4)
    mib = n * W7_SIZE / 2**20
    ref = mib / med(rows[0].times)
    lines = [
        f"### W7 payload: {n} × {W7_SIZE >> 20} MiB bytes, {WORKERS} workers returning len(item)",
        "",
        "| system | median s | MiB/s | vs Pool.imap(cs=1) |",
        "|---|---:|---:|---:|",
    ]
    for r in rows:
        if r.failed:
            lines.append(f"| {r.name} | FAILED: {r.failed} | | |")
        else:
            rate = mib / med(r.times)
            lines.append(f"| {r.name} | {med(r.times):.3f} | {rate:.0f} | {rate / ref:.2f}× |")
    return lines


# --------------------------------------------------------------------------- main

WORKLOADS = {"W3": w3, "W4": w4, "W6": w6, "W7": w7}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="1/10 of the items (a smoke run)")
    ap.add_argument("--only", default="", help="comma-separated workloads, e.g. W3,W7")
    ap.add_argument("--json", default="", help="also write the report lines to this file")
    args = ap.parse_args()
    names = [w.strip().upper() for w in args.only.split(",") if w.strip()] or list(WORKLOADS)
    bad = [w for w in names if w not in WORKLOADS]
    if bad:
        print(f"unknown workload(s): {', '.join(bad)}; known: {', '.join(WORKLOADS)}", file=sys.stderr)
        return 2
    import cloudpickle

    header = [
        "## pypline process backend benchmarks",
        "",
        f"`python tests/benchmarks/bench_process.py --runs {args.runs}{' --quick' if args.quick else ''}`"  # noqa: ISC004
        f" · Python {platform.python_version()} · {os.cpu_count()} CPUs · load {os.getloadavg()[0]:.2f}"
        f" · multiprocessing start method {multiprocessing.get_start_method()} · cloudpickle {cloudpickle.__version__}"
        f" · medians of {args.runs}",
        "",
    ]
    out = list(header)
    for name in names:
        out.extend(WORKLOADS[name](args.runs, args.quick))
        out.append("")
    text = "\n".join(out)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"report": text}, f)
    return 1 if "FAILED" in text else 0


if __name__ == "__main__":
    sys.exit(main())
