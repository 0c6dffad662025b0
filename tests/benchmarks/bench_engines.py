"""Dask and Ray backend benchmarks: pypline on each engine against the same work written
directly against that engine (issue 5).

Run it as a script (it is deliberately not a pytest module)::

    python tests/benchmarks/bench_engines.py                    # full size, 3 runs (~15 min)
    python tests/benchmarks/bench_engines.py --quick --runs 1   # smoke run, ~1/10 of the items
    python tests/benchmarks/bench_engines.py --only W5 --engines ray

How a measurement flows::

    for each engine (dask, then ray; never both running at once):
        start it once: LocalCluster(n_workers=2, threads_per_worker=1, processes=True)
                       + Client, or ray.init(num_cpus=2)              (not timed)
        for each workload (W3, W5, W6):
            warm-up: every system once on a small input              (checked, not reported)
            for rep in 1..--runs:
                for each system, in an order rotated by rep:          (noise hits all alike)
                    gc.collect(); t0 = perf_counter()
                    out = system(n)       <- timed, as a user sees it: pypline's time includes
                    t1 = perf_counter()      shipping the function and starting its actors
                    check `out`                                       (outside the timing)
        stop the engine
    print one markdown table per workload and engine: MEDIANS, and ratios

Workloads:

- **W3 CPU-bound**: a pure-Python loop calibrated to ~2.8 ms per item, 2,000 items
  (400 with ``--quick``), 2 workers. Speed = time(sequential, in this process) /
  time(system); the target is pypline ≥ 0.9× the engine used directly
  (``client.map`` + ``gather``; Ray tasks + ``ray.get``).
- **W5 per-item overhead**: ``def f(x): return x``, 20,000 items (2,000 with
  ``--quick``): µs per item of the whole call. Direct: ``client.map`` + ``gather``;
  Ray tasks; Ray ``ActorPool.map`` over 2 actors. pypline with the default
  ``buffer=16`` and with ``buffer=1024``: the memory bound caps what a stage holds, so
  the buffer caps how many items one remote call can carry. Target: pypline ≤ 0.5×
  the direct engine's µs/item.
- **W6 bounded memory**: 200,000 items of 10 KB (a 2 GB stream; 20,000 with
  ``--quick``) through a 2-worker stage returning the item's length, to a consumer
  that sleeps 1 ms every 500 results. Reports the peak RSS of this process plus
  every descendant (the engine's scheduler, workers, daemons; psutil, sampled every
  10 ms in a thread), the same before the run (the idle engine) and the growth over
  it, the same three for PSS (sampled every 50 ms), the RSS of the engine as started
  (before the warm-up), and the most items read from the source ahead of the
  consumer against the memory bound. The engine used directly needs the whole input
  as a list, so it runs on 20,000 items (4,000 with ``--quick``): its memory grows
  with the input, pypline's does not.

  Why both RSS and PSS: the target is stated in RSS (the sum over the processes),
  but RSS counts a shared page once per process mapping it. Shared libraries are
  counted in every Python process, and on Ray the object store is a shared-memory
  file the driver, the raylet and the actors map, so its pages count two or three
  times. PSS divides each shared page among its mappers: the PSS sum is the memory
  the processes take together. Neither removes the idle engine (on Ray ~550 MB
  RSS of daemons here, over the target on its own); "growth" is what the run adds.

The machine may be shared: compare ratios from one run, not absolute times across
runs. The exit status is 1 if any system produced a wrong output.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import importlib.metadata
import importlib.util
import json
import os
import platform
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

W3_ITEMS, W3_MS = 2_000, 2.8
W5_ITEMS = 20_000
W6_ITEMS, W6_DIRECT_ITEMS, W6_SIZE = 200_000, 20_000, 10_000
WORKERS = 2
SAMPLE_S = 0.01  # RSS sampling period (W6)
W6_BUFFER = 256  # pypline's buffer in W6: bounds read-ahead to ~260 items (~2.6 MB)

_BURN_LOOPS = 0  # set by calibrate(); module level so workers get it with the function


# --------------------------------------------------------------------------- work


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
        if time.perf_counter() - t > 0.05:
            break
        n *= 2
    best = min(_timed(lambda: burn(n)) for _ in range(5))
    return max(1, int(n * (target_ms / 1000) / best))


def _timed(fn: Callable[[], Any]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def payloads(k: int, state: dict[str, int] | None = None) -> Iterator[bytes]:
    """``k`` fresh 10 KB items; counts pulls and the read-ahead into ``state``."""
    for i in range(k):
        if state is not None:
            state["pulled"] += 1
            state["ahead"] = max(state["ahead"], state["pulled"] - state["consumed"])
        yield i.to_bytes(4, "little") * (W6_SIZE // 4)


# --------------------------------------------------------------------------- pypline


class _Recorder:
    """Wraps a backend to count the remote calls its executors made (items per call)."""

    def __init__(self, backend: Any) -> None:
        self.backend = backend
        self.calls = 0
        made: list[Any] = []
        inner = backend.executor

        def executor(spec: Any) -> Any:
            ex = inner(spec)
            made.append(ex)
            return ex

        backend.executor = executor
        self.made = made

    def take_calls(self) -> int:
        calls = sum(ex.statistics().details.get("calls_sent", 0) for ex in self.made)
        self.made.clear()
        return calls


def pypline_run(backend: Any, fn: Callable[..., Any], items: Any, buffer: int = 16) -> list[Any]:
    from pypline import Pipeline, work_pool
    from pypline.util import unwrap

    stage = work_pool(fn, multi_proc=True, num_workers=WORKERS, buffer=buffer)
    return unwrap((Pipeline(items) >> stage).run_sync(executor=backend))  # type: ignore[no-any-return]


def pypline_stream(backend: Any, k: int, buffer: int) -> dict[str, int]:
    from pypline import Pipeline, work_pool
    from pypline.util import unwrap

    state = {"pulled": 0, "consumed": 0, "ahead": 0}

    async def main() -> None:
        stage = work_pool(length, multi_proc=True, num_workers=WORKERS, buffer=buffer)
        async with (Pipeline(payloads(k, state)) >> stage).stream(executor=backend) as results:
            async for r in results:
                assert unwrap(r) == W6_SIZE
                state["consumed"] += 1
                if state["consumed"] % 500 == 0:
                    await asyncio.sleep(0.001)

    asyncio.run(main())
    return state


# --------------------------------------------------------------------------- engines


class DaskEngine:
    name = "dask"

    def __init__(self) -> None:
        import distributed

        self.cluster = distributed.LocalCluster(
            n_workers=WORKERS, threads_per_worker=1, processes=True, dashboard_address=":0"
       )
        self.client = distributed.Client(self.cluster)
        from pypline.backends.on_dask import DaskBackend

        self.rec = _Recorder(DaskBackend(self.client))

    def directs(self, fn: Callable[..., Any]) -> list[tuple[str, Callable[[Any], list[Any]]]]:
        client = self.client

        def map_gather(items: Any) -> list[Any]:
            return client.gather(client.map(fn, list(items), pure=False))  # type: ignore[no-any-return]

        return [("Dask client.map + gather", map_gather)]

    def close(self) -> None:
        self.client.close()
        self.cluster.close()


class RayEngine:
    name = "ray"

    def __init__(self) -> None:
        import ray

        ray.init(num_cpus=WORKERS, include_dashboard=False, log_to_driver=False)
        from pypline.backends.on_ray import RayBackend

        self.rec = _Recorder(RayBackend())

    def directs(self, fn: Callable[..., Any]) -> list[tuple[str, Callable[[Any], list[Any]]]]:
        import ray
        from ray.util import ActorPool

        remote_fn = ray.remote(fn)

        def tasks(items: Any) -> list[Any]:
            return ray.get([remote_fn.remote(x) for x in items])  # type: ignore[no-any-return]

        class Holder:
            def call(self, x: Any) -> Any:
                return fn(x)

        def actor_pool(items: Any) -> list[Any]:
            actors = [ray.remote(Holder).remote() for _ in range(WORKERS)]
            try:
                return list(ActorPool(actors).map(lambda a, x: a.call.remote(x), list(items)))
            finally:
                for a in actors:
                    ray.kill(a)

        return [("Ray tasks + ray.get", tasks), ("Ray ActorPool.map (2 actors)", actor_pool)]

    def close(self) -> None:
        import ray

        ray.shutdown()


# --------------------------------------------------------------------------- measuring


class Row:
    def __init__(self, name: str, run: Callable[[int], Any], check: Callable[[Any, int], bool]) -> None:
        self.name = name
        self.run = run
        self.check = check
        self.times: list[float] = []
        self.extra: dict[str, list[float]] = {}
        self.failed: str | None = None


def measure(rows: list[Row], n: int, runs: int, warm_n: int, on_done: Callable[[Row, Any], None] | None = None) -> None:
    for row in rows:  # warm-up: imports, first actors and tasks; checked, not reported
        try:
            if not row.check(row.run(warm_n), warm_n):
                row.failed = "wrong output (warm-up)"
        except Exception as exc:  # noqa: BLE001 - reported in the table, the others go on
            row.failed = f"{type(exc).__name__}: {exc}"
    for rep in range(runs):
        order = rows[rep % len(rows) :] + rows[: rep % len(rows)]
        for row in order:
            if row.failed:
                continue
            gc.collect()
            t = time.perf_counter()
            try:
                out = row.run(n)
            except Exception as exc:  # noqa: BLE001
                row.failed = f"{type(exc).__name__}: {exc}"
                continue
            row.times.append(time.perf_counter() - t)
            if not row.check(out, n):
                row.failed = "wrong output"
            elif on_done is not None:
                on_done(row, out)
            print(f"  {row.name}: {row.times[-1]:.2f} s", file=sys.stderr)


def med(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def spread(xs: list[float]) -> str:
    return f"{min(xs):.2f}–{max(xs):.2f}" if xs else "-"


FAILED: list[str] = []


def _failed(row: Row, engine: str, workload: str) -> str:
    FAILED.append(f"{workload} {engine} {row.name}: {row.failed}")
    return f"| {row.name} | FAILED: {row.failed} | | | |"


# --------------------------------------------------------------------------- workloads


def w3(engine: Any, runs: int, quick: bool) -> list[str]:
    n = W3_ITEMS // 5 if quick else W3_ITEMS
    base = burn(_BURN_LOOPS)
    expected = [base + x for x in range(n)]

    def check(out: Any, k: int) -> bool:
        return sorted(out) == expected[:k] if k <= n else False

    rows = [Row("sequential (this process)", lambda k: [cpu_item(x) for x in range(k)], check)]
    rows += [Row(name, lambda k, f=f: f(range(k)), check) for name, f in engine.directs(cpu_item)[:1]]
    rows.append(Row(f"pypline on {engine.name}", lambda k: pypline_run(engine.rec.backend, cpu_item, range(k)), check))
    print(f"W3 on {engine.name}: {n} items of ~{W3_MS} ms", file=sys.stderr)
    measure(rows, n, runs, warm_n=20)
    seq, direct, ours = rows[0], rows[1], rows[2]
    out = [
        f"### W3 CPU-bound on {engine.name} — {n} items × ~{W3_MS} ms, {WORKERS} workers",
        "",
        "| system | median s | min–max | speed vs sequential | vs engine direct |",
        "|---|---:|---:|---:|---:|",
    ]
    for row in rows:
        if row.failed:
            out.append(_failed(row, engine.name, "W3"))
            continue
        vs_seq = med(seq.times) / med(row.times) if seq.times else float("nan")
        vs_direct = med(direct.times) / med(row.times) if direct.times else float("nan")
        out.append(f"| {row.name} | {med(row.times):.2f} | {spread(row.times)} | {vs_seq:.2f}× | {vs_direct:.2f}× |")
    if ours.times and direct.times:
        ratio = med(direct.times) / med(ours.times)
        out += ["", f"pypline on {engine.name} = **{ratio:.2f}×** the speed of {direct.name} (target ≥ 0.9×)."]
    return out


def w5(engine: Any, runs: int, quick: bool) -> list[str]:
    n = W5_ITEMS // 10 if quick else W5_ITEMS

    def check(out: Any, k: int) -> bool:
        return sorted(out) == list(range(k))

    rows = [Row(name, lambda k, f=f: f(range(k)), check) for name, f in engine.directs(identity)]
    for buffer in (16, 1024):
        rows.append(
            Row(
                f"pypline on {engine.name} (buffer={buffer})",
                lambda k, b=buffer: pypline_run(engine.rec.backend, identity, range(k), buffer=b),
                check,
           )
       )

    def on_done(row: Row, out: Any) -> None:
        if row.name.startswith("pypline"):
            calls = engine.rec.take_calls()
            row.extra.setdefault("per_call", []).append(len(out) / calls if calls else float("nan"))

    print(f"W5 on {engine.name}: {n} items, f(x) = x", file=sys.stderr)
    engine.rec.take_calls()
    measure(rows, n, runs, warm_n=200, on_done=on_done)
    engine.rec.take_calls()
    directs = [r for r in rows if not r.name.startswith("pypline") and r.times]
    best_direct = min(directs, key=lambda r: med(r.times)) if directs else None
    out = [
        f"### W5 per-item overhead on {engine.name} — {n} items, `def f(x): return x`, {WORKERS} workers",
        "",
        "| system | median µs/item | min–max s | items per remote call | vs fastest direct |",
        "|---|---:|---:|---:|---:|",
    ]
    for row in rows:
        if row.failed:
            out.append(_failed(row, engine.name, "W5"))
            continue
        us = med(row.times) / n * 1e6
        per_call = f"{med(row.extra['per_call']):.0f}" if row.extra.get("per_call") else "1"
        ratio = (med(row.times) / med(best_direct.times)) if best_direct else float("nan")
        out.append(f"| {row.name} | {us:,.0f} | {spread(row.times)} | {per_call} | {ratio:.2f}× |")
    if best_direct is not None:
        out += ["", f"Ratios are µs/item against the fastest direct way ({best_direct.name}); target ≤ 0.5×."]
    return out


class _Rss:
    """Peak memory of this process plus every descendant, sampled in a thread.

    RSS (every 10 ms) counts a shared page once per process that maps it: shared
    libraries, and on Ray the object store's shared-memory file, which the driver, the
    raylet and each actor map. PSS (every 50 ms; reading it costs more) divides each
    shared page among the processes mapping it, so its sum over the processes is the
    memory they really take together.
    """

    PSS_EVERY = 5  # samples

    def __init__(self) -> None:
        import psutil

        self.me = psutil.Process()
        self.peak = 0
        self.pss_peak = 0
        self.own_peak = 0  # this process alone
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def _procs(self) -> list[Any]:
        return [self.me, *self.me.children(recursive=True)]

    def sample(self) -> int:
        import psutil

        own = self.me.memory_info().rss
        self.own_peak = max(self.own_peak, own)
        total = own
        for p in self._procs()[1:]:
            try:
                total += p.memory_info().rss
            except psutil.Error:  # gone meanwhile
                pass
        return total

    def sample_pss(self) -> int:
        import psutil

        total = 0
        for p in self._procs():
            try:
                total += p.memory_full_info().pss
            except psutil.Error:  # gone meanwhile
                pass
        return total

    def _run(self) -> None:
        i = 0
        while not self._stop.is_set():
            self.peak = max(self.peak, self.sample())
            if i % self.PSS_EVERY == 0:
                self.pss_peak = max(self.pss_peak, self.sample_pss())
            i += 1
            self._stop.wait(SAMPLE_S)

    def __enter__(self) -> _Rss:  # noqa: PYI034 - Self needs 3.11
        self.own_before = self.me.memory_info().rss
        self.before = self.sample()
        self.pss_before = self.sample_pss()
        self.own_peak = self.own_before
        self.peak = self.before
        self.pss_peak = self.pss_before
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.sample())
        self.pss_peak = max(self.pss_peak, self.sample_pss())


def _w6_system(engine: Any, system: str) -> Callable[[int], dict[str, int]]:
    if system == "pypline":
        return lambda k: pypline_stream(engine.rec.backend, k, W6_BUFFER)
    [(_, f)] = engine.directs(length)[:1]

    def direct(k: int) -> dict[str, int]:
        state = {"pulled": 0, "consumed": 0, "ahead": 0}
        items = list(payloads(k, state))  # the engine wants the whole input
        for r in f(items):
            assert r == W6_SIZE
            state["consumed"] += 1
        return state

    return direct


def w6_child(spec: str) -> dict[str, Any]:
    """One W6 measurement in a fresh process with a fresh engine (RSS is not shared with other runs)."""
    engine_name, system, k = spec.split(":")
    engine = ENGINES[engine_name][1]()
    try:
        started = _Rss()
        started_rss = started.sample()  # the engine as started (Ray: with its prestarted idle workers)
        run = _w6_system(engine, system)
        run(500)  # warm-up: imports, first calls
        gc.collect()
        time.sleep(0.5)
        with _Rss() as rss:
            t = time.perf_counter()
            state = run(int(k))
            dt = time.perf_counter() - t
        mb = 2**20
        own = (rss.own_peak - rss.own_before) / mb
        return {
            "time": dt,
            "peak": rss.peak / mb,
            "idle": rss.before / mb,
            "started": started_rss / mb,
            "pss_peak": rss.pss_peak / mb,
            "pss_idle": rss.pss_before / mb,
            "own": own,
            **state,
        }
    finally:
        engine.close()


def w6(engine_name: str, runs: int, quick: bool) -> list[str]:
    import subprocess

    from pypline import work_pool
    from pypline.lowlevel import admission_bound

    n = W6_ITEMS // 10 if quick else W6_ITEMS
    n_direct = W6_DIRECT_ITEMS // 5 if quick else W6_DIRECT_ITEMS
    bound = admission_bound([work_pool(length, multi_proc=True, num_workers=WORKERS, buffer=W6_BUFFER).spec])
    direct_name = {"dask": "Dask client.map + gather", "ray": "Ray tasks + ray.get"}[engine_name]
    ours = f"pypline on {engine_name} (buffer={W6_BUFFER})"
    systems = [
        (ours, "pypline", n),
        (f"{ours}, input as small as direct's", "pypline", n_direct),
        (f"{direct_name} (whole input as a list)", "direct", n_direct),
    ]
    print(f"W6 on {engine_name}: {n} items of {W6_SIZE} bytes through pypline, {n_direct} directly", file=sys.stderr)
    results: dict[str, dict[str, list[float]]] = {name: {} for name, _, _ in systems}
    failed: dict[str, str] = {}
    for rep in range(runs):
        for name, system, k in systems[rep % len(systems) :] + systems[: rep % len(systems)]:
            if name in failed:
                continue
            proc = subprocess.run(
                [sys.executable, os.path.abspath(__file__), "--w6-child", f"{engine_name}:{system}:{k}"],
                capture_output=True,
                text=True,
                timeout=1800,
           )
            lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
            if proc.returncode != 0 or not lines:
                failed[name] = f"exit {proc.returncode}: {proc.stderr.strip().splitlines()[-1:] or ''}"
                continue
            got = json.loads(lines[-1])
            if got["consumed"] != k:
                failed[name] = f"consumed {got['consumed']} of {k}"
                continue
            r = results[name]
            for key in ("time", "peak", "idle", "started", "pss_peak", "pss_idle", "own", "ahead"):
                r.setdefault(key, []).append(got[key])
            print(
                f"  {name}: {got['time']:.2f} s, peak {got['peak']:.0f} MB (idle {got['idle']:.0f} MB)", file=sys.stderr
           )
    out = [
        f"### W6 bounded memory on {engine_name} — items of {W6_SIZE // 1000} KB, {WORKERS} workers, slow consumer",
        "",
        (
            "| system | items (input MB) | median s | peak RSS MB | idle engine MB | growth MB | of which this process "
            "| peak PSS MB | idle PSS MB | PSS growth MB | engine as started, RSS MB | most read ahead |"
       ),
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, system, k in systems:
        if name in failed:
            FAILED.append(f"W6 {engine_name} {name}: {failed[name]}")
            out.append(f"| {name} | FAILED: {failed[name]} | | | | | | | | | | |")
            continue
        r = results[name]
        ahead = max(r["ahead"])
        note = f" (bound {bound})" if system == "pypline" else " (all of it)"
        out.append(
            f"| {name} | {k:,} ({k * W6_SIZE / 1e6:,.0f}) | {med(r['time']):.2f} | {med(r['peak']):.0f} | "
            f"{med(r['idle']):.0f} | {med(r['peak']) - med(r['idle']):.0f} | {med(r['own']):.0f} | "
            f"{med(r['pss_peak']):.0f} | {med(r['pss_idle']):.0f} | {med(r['pss_peak']) - med(r['pss_idle']):.0f} | "
            f"{med(r['started']):.0f} | {ahead:.0f}{note} |"
       )
        if system == "pypline" and ahead > bound:
            FAILED.append(f"W6 {engine_name} {name}: read {ahead:.0f} items ahead, bound {bound}")
    out += [
        "",
        "Each measurement runs in a fresh process with a fresh engine. RSS counts that process and all its "
        "descendants (scheduler, workers, daemons, and on Ray the actors a pypline run starts); 'idle engine' "
        "is the same sum just before the run (engine started, warmed up), 'growth' the difference, 'of which "
        "this process' the growth of the driver alone. A page shared by several processes (libraries; Ray's "
        "object store) counts once per process in RSS; PSS shares it out, so the PSS sum is what the processes "
        "really take together. 'Engine as started' is the RSS sum right after the engine started, before the "
        "warm-up (on Ray it includes the worker processes Ray prestarts; the warm-up's actors use them and they "
        "are not started again, so 'idle engine' is lower). Target: peak RSS < 300 MB with read-ahead within "
        "the memory bound; pypline's memory does not grow with the input, the direct engine's does.",
    ]
    return out


WORKLOADS: dict[str, Callable[[Any, int, bool], list[str]]] = {"W3": w3, "W5": w5}  # W6: w6(), in subprocesses
ENGINES = {"dask": ("distributed", DaskEngine), "ray": ("ray", RayEngine)}


def main() -> int:
    global _BURN_LOOPS
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="~1/10 of the items (a smoke run)")
    ap.add_argument("--only", default="", help="comma-separated workloads, e.g. W3,W6")
    ap.add_argument("--engines", default="dask,ray", help="comma-separated engines (default: dask,ray)")
    ap.add_argument("--json", default="", help="also write the report lines to this file")
    ap.add_argument("--w6-child", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.w6_child:
        print(json.dumps(w6_child(args.w6_child)))
        return 0
    known = [*WORKLOADS, "W6"]
    names = [w.strip().upper() for w in args.only.split(",") if w.strip()] or known
    engines = [e.strip().lower() for e in args.engines.split(",") if e.strip()]
    bad = [w for w in names if w not in known] + [e for e in engines if e not in ENGINES]
    if bad:
        print(f"unknown: {', '.join(bad)}; workloads {', '.join(known)}, engines {', '.join(ENGINES)}", file=sys.stderr)
        return 2
    _BURN_LOOPS = calibrate(W3_MS)
    out = [
        "## pypline on Dask and Ray",
        "",
        f"`python tests/benchmarks/bench_engines.py --runs {args.runs}{' --quick' if args.quick else ''}`"
        f" · Python {platform.python_version()} · {os.cpu_count()} CPUs · load {os.getloadavg()[0]:.2f}"
        f" · medians of {args.runs}",
        "",
    ]
    versions = []
    for engine_name in engines:
        module, cls = ENGINES[engine_name]
        if importlib.util.find_spec(module) is None:
            out += [f"### {engine_name}: skipped ({module} is not installed)", ""]
            continue
        versions.append(f"{engine_name} {importlib.metadata.version(engine_name)}")
        in_process = [w for w in names if w in WORKLOADS]
        if in_process:
            engine = cls()
            try:
                for name in in_process:
                    out.extend(WORKLOADS[name](engine, args.runs, args.quick))
                    out.append("")
            finally:
                engine.close()
        if "W6" in names:  # after the engine above is closed: nothing else running meanwhile
            out.extend(w6(engine_name, args.runs, args.quick))
            out.append("")
    out[2] += "".join(f" · {v}" for v in versions)
    if FAILED:
        out += ["**Failures:**", *(f"- {f}" for f in FAILED)]
    text = "\n".join(out)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"report": out, "failed": FAILED}, f, indent=1)
    return 1 if FAILED else 0


if __name__ == "__main__":
    sys.exit(main())
