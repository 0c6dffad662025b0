"""Core throughput benchmarks: pypline against raw asyncio, pypeln and aiostream.

Run it as a script (it is deliberately not a pytest module)::

    python tests/benchmarks/bench_core.py              # full size, 3 runs
    python tests/benchmarks/bench_core.py --quick --runs 1   # smoke run, < 60 s
    python tests/benchmarks/bench_core.py --json out.json    # also keep raw numbers

How a measurement flows::

    for each workload (W1, W2, W3):
        warm-up: every system once on a small input   (checked, not reported)
        for rep in 1..--runs:
            for each system, in an order rotated by rep:     (interleaved)
                fresh thread -> asyncio.run(one measurement)
                    gc.collect(); t0 = perf_counter()
                    out = await system(n)                 <- the only timed part
                    t1 = perf_counter()
                check `out` against the expected values   (outside the timing)
    print one markdown table per workload, of MEDIANS, with ratios

Every system builds its pipeline and collects every output into a list inside the
timed region; interpreter start-up, imports, event-loop creation and loop teardown
are outside it.

Each measurement runs its event loop in a fresh daemon thread so that a system that
hangs, or ignores cancellation, cannot take the whole benchmark down with it: the
measurement is cancelled after ``--timeout`` seconds (``asyncio.wait_for``); a
system that has not stopped ``HARD_GRACE_S`` later is abandoned and reported. A system
that fails once (error, wrong output, timeout) is not measured again in that workload.

Ratios are ``time(reference) / time(row)``: above 1 means the row is faster than
the reference. The exit status is 1 when any available system failed its
correctness check, raised, or timed out, else 0. Progress goes to stderr, the
report to stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import importlib
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
import traceback
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable, Iterable, Optional

# --------------------------------------------------------------------------- tuning

#: Seconds a hung measurement gets, after its cancellation, to stop before it is
#: abandoned. Long enough for a loop to unwind a few hundred cancelled tasks on a
#: busy 2-core machine; short enough that a broken system costs little.
HARD_GRACE_S = 10.0

#: Warm-up input size: ``max(WARMUP_MIN, n // WARMUP_DIV)``. Big enough to import
#: lazily-loaded modules and touch every code path (start, steady state, shutdown);
#: small enough to cost well under a second per system.
WARMUP_DIV = 50
WARMUP_MIN = 500

#: Warm-up measurements are cut off after this many seconds: they are small, so
#: a system that needs longer is hung, and the quick smoke run must stay < 60 s.
WARMUP_TIMEOUT_S = 10.0

#: Item counts at full size; ``--quick`` divides them by QUICK_DIV.
QUICK_DIV = 10
W1_ITEMS = 200_000
W2_ITEMS = 20_000
W3_ITEMS = 20_000

W1_STAGES, W1_WORKERS, W1_BUFFER = 3, 4, 64
W2_WORKERS, W2_BUFFER, W2_SLEEP_S = 100, 100, 0.01
W3_WORKERS, W3_BUFFER = 4, 64  # W3's buffer is not set by the issue; 64 as in W1


#: A system under test: given n, build the pipeline over range(n), run it, return its outputs.
Runner = Callable[[int], Awaitable[list[Any]]]


class Unavailable(Exception):
    """The system's library is not installed: its row says "skipped"."""


class WrongOutput(AssertionError):
    """A system produced output that is not what the workload must produce."""


# ------------------------------------------------------------------ worker functions


async def inc(x: int) -> int:
    return x + 1


async def sleepy(x: int) -> int:
    await asyncio.sleep(W2_SLEEP_S)
    return x


def inc_sync(x: int) -> int:
    return x + 1


# ------------------------------------------------------------------- raw asyncio


_STOP = object()  # sentinel: "no more items" (one per consumer)


async def _raw_worker(
    fn: Callable[[Any], Awaitable[Any]], q_in: asyncio.Queue[Any], q_out: asyncio.Queue[Any]
) -> None:
    while True:
        x = await q_in.get()
        if x is _STOP:
            return
        await q_out.put(await fn(x))


async def raw_asyncio_pipeline(
    source: Iterable[Any],
    fns: list[Callable[[Any], Awaitable[Any]]],
    workers: int,
    maxsize: int,
) -> list[Any]:
    """The hand-written baseline: a bounded queue per stage, N worker tasks per
    stage, a feeder, a collector, and sentinel shutdown (a stage whose workers have
    all stopped sends one sentinel per downstream consumer)."""
    queues: list[asyncio.Queue[Any]] = [asyncio.Queue(maxsize) for _ in range(len(fns) + 1)]
    out: list[Any] = []

    async def feed() -> None:
        for x in source:
            await queues[0].put(x)
        for _ in range(workers):
            await queues[0].put(_STOP)

    async def stage(i: int, fn: Callable[[Any], Awaitable[Any]]) -> None:
        await asyncio.gather(*(_raw_worker(fn, queues[i], queues[i + 1]) for _ in range(workers)))
        for _ in range(workers if i + 1 < len(fns) else 1):
            await queues[i + 1].put(_STOP)

    async def collect() -> None:
        q = queues[-1]
        while True:
            x = await q.get()
            if x is _STOP:
                return
            out.append(x)

    tasks = [
        asyncio.ensure_future(c)
        for c in (feed(), *(stage(i, fn) for i, fn in enumerate(fns)), collect())
    ]
    try:
        await asyncio.gather(*tasks)
    finally:
        for t in tasks:
            t.cancel()
    return out


async def raw_to_thread(source: Iterable[Any], fn: Callable[[Any], Any], workers: int) -> list[Any]:
    """W3 baseline: ``workers`` asyncio tasks share one iterator and each calls
    ``await asyncio.to_thread(fn, x)`` per item."""
    it = iter(source)
    out: list[Any] = []

    async def worker() -> None:
        for x in it:
            out.append(await asyncio.to_thread(fn, x))

    await asyncio.gather(*(worker() for _ in range(workers)))
    return out


# ------------------------------------------------------------ optional libraries


def _need(module: str) -> Any:
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        # Only "this library is absent" is a skip; a library that is present but
        # breaks on import is a failure and propagates.
        if exc.name is not None and module.split(".")[0] == exc.name.split(".")[0]:
            raise Unavailable(f"{module} not installed") from None
        raise


def _pypeln_chain(fn: Callable[..., Any], stages: int, workers: int, maxsize: int) -> Runner:
    pl = _need("pypeln")

    async def run(n: int) -> list[Any]:
        stage: Any = range(n)
        for _ in range(stages):
            stage = pl.task.map(fn, stage, workers=workers, maxsize=maxsize)
        return list(await stage)

    return run


def _aiostream_chain(fn: Callable[..., Any], stages: int, task_limit: int) -> Runner:
    _need("aiostream")
    from aiostream import stream

    async def run(n: int) -> list[Any]:
        xs: Any = stream.iterate(range(n))
        for _ in range(stages):
            xs = stream.map(xs, fn, task_limit=task_limit)
        async with xs.stream() as streamer:
            return [x async for x in streamer]

    return run


class PyplineErr(Exception):
    """``run()`` returned ``Err``: the pipeline reported failed items."""

    detail = ""

    @classmethod
    def from_err(cls, err: Any) -> PyplineErr:
        first_line = (str(err).splitlines() or [""])[0]
        exc = cls(f"run() returned Err({type(err).__name__}): {first_line}"[:500])
        parts = [f"str(err):\n{err}"]
        failures = list(getattr(err, "failures", None) or [])
        parts.append(f"{len(failures)} failure(s); the first ones:")
        for f in failures[:3]:
            parts.append(f"  {f!r}"[:600])
            error = getattr(f, "error", None)
            if isinstance(error, BaseException):
                parts.append("".join(traceback.format_exception(type(error), error, error.__traceback__)))
        cause = getattr(err, "cause", None)
        if isinstance(cause, BaseException):
            parts.append("cause:\n" + "".join(traceback.format_exception(type(cause), cause, cause.__traceback__)))
        exc.detail = "\n".join(parts)
        return exc


def _pypline_chain(
    fn: Callable[..., Any], stages: int, workers: int, buffer: int, ordered: bool
) -> Runner:
    pypline = _need("pypline")
    util = _need("pypline.util")
    # Stages are defined (and validated) once, outside the timed region. Each is a
    # copy of `fn` (same code object, so no wrapper call per item) with its own
    # name, so every stage has a distinct default name as a user's would.
    defined = []
    for i in range(stages):
        copy = types.FunctionType(
            fn.__code__, fn.__globals__, f"{fn.__name__}_{i + 1}", fn.__defaults__, fn.__closure__
        )
        copy.__qualname__ = copy.__name__
        defined.append(pypline.work_pool(num_workers=workers, buffer=buffer)(copy))

    async def run(n: int) -> list[Any]:
        pipeline = pypline.Pipeline(range(n))
        for st in defined:
            pipeline = pipeline >> st
        result = await pipeline.run(ordered=ordered)
        if not util.is_ok(result):
            raise PyplineErr.from_err(util.unwrap_err(result))
        outputs: list[Any] = util.unwrap(result)
        return outputs

    return run


# ---------------------------------------------------------------- workload table

@dataclass
class System:
    key: str
    label: str
    make: Callable[[], Runner]  # may raise Unavailable
    ordered: bool = False  # True: output must follow source order exactly


@dataclass
class Workload:
    key: str
    title: str
    describe: str
    n: int
    expected: Callable[[int], list[int]]  # sorted expected output for n items
    systems: list[System]
    kind: str  # "throughput" | "efficiency"
    ideal_s: Optional[Callable[[int], float]] = None
    refs: tuple[str, ...] = ("raw",)  # ratio columns, first is the baseline


def build_workloads(quick: bool) -> list[Workload]:
    div = QUICK_DIV if quick else 1
    w1 = Workload(
        key="W1",
        title="W1 async hop",
        describe=(
            f"{W1_STAGES} chained stages `async def f(x): return x + 1`, "
            f"{W1_WORKERS} workers each, buffer {W1_BUFFER}"
        ),
        n=W1_ITEMS // div,
        expected=lambda n: list(range(W1_STAGES, n + W1_STAGES)),
        kind="throughput",
        refs=("raw", "pypeln", "aiostream"),
        systems=[
            System(
                "raw",
                "raw asyncio (baseline)",
                lambda: lambda n: raw_asyncio_pipeline(
                    range(n), [inc] * W1_STAGES, W1_WORKERS, W1_BUFFER
                ),
            ),
            System("pypeln", "pypeln.task", lambda: _pypeln_chain(inc, W1_STAGES, W1_WORKERS, W1_BUFFER)),
            System(
                "aiostream",
                "aiostream (ordered map)",
                lambda: _aiostream_chain(inc, W1_STAGES, W1_WORKERS),
                ordered=True,
            ),
            System(
                "pypline",
                "pypline ordered=False",
                lambda: _pypline_chain(inc, W1_STAGES, W1_WORKERS, W1_BUFFER, ordered=False),
            ),
            System(
                "pypline_ordered",
                "pypline ordered=True",
                lambda: _pypline_chain(inc, W1_STAGES, W1_WORKERS, W1_BUFFER, ordered=True),
                ordered=True,
            ),
        ],
    )
    w2 = Workload(
        key="W2",
        title="W2 async I/O",
        describe=(
            f"1 stage, {W2_WORKERS} workers, `await asyncio.sleep({W2_SLEEP_S})`, "
            f"buffer {W2_BUFFER}"
        ),
        n=W2_ITEMS // div,
        expected=lambda n: list(range(n)),
        kind="efficiency",
        ideal_s=lambda n: n * W2_SLEEP_S / W2_WORKERS,
        refs=("raw", "pypeln", "aiostream"),
        systems=[
            System(
                "raw",
                "raw asyncio (baseline)",
                lambda: lambda n: raw_asyncio_pipeline(range(n), [sleepy], W2_WORKERS, W2_BUFFER),
            ),
            System("pypeln", "pypeln.task", lambda: _pypeln_chain(sleepy, 1, W2_WORKERS, W2_BUFFER)),
            System(
                "aiostream",
                "aiostream (ordered map)",
                lambda: _aiostream_chain(sleepy, 1, W2_WORKERS),
                ordered=True,
            ),
            System(
                "pypline",
                "pypline ordered=False",
                lambda: _pypline_chain(sleepy, 1, W2_WORKERS, W2_BUFFER, ordered=False),
            ),
        ],
    )
    w3 = Workload(
        key="W3",
        title="W3 threads",
        describe=(
            f"1 stage, {W3_WORKERS} workers, sync `def f(x): return x + 1` run in threads "
            f"(pypline buffer {W3_BUFFER})"
        ),
        n=W3_ITEMS // div,
        expected=lambda n: list(range(1, n + 1)),
        kind="throughput",
        refs=("raw",),
        systems=[
            System(
                "raw",
                f"asyncio.to_thread x{W3_WORKERS} tasks (baseline)",
                lambda: lambda n: raw_to_thread(range(n), inc_sync, W3_WORKERS),
            ),
            System(
                "pypline",
                "pypline ordered=False",
                lambda: _pypline_chain(inc_sync, 1, W3_WORKERS, W3_BUFFER, ordered=False),
            ),
        ],
    )
    return [w1, w2, w3]


# --------------------------------------------------------------------- harness


@dataclass
class Outcome:
    elapsed: Optional[float] = None
    output: Any = None
    error: Optional[str] = None
    detail: str = ""  # traceback of an exception, for the stderr report
    abandoned: bool = False  # the measurement's thread did not stop


def measure_once(runner: Runner, n: int, timeout: float) -> Outcome:
    """Run ``runner(n)`` on a fresh event loop in a fresh thread; time it."""
    box: dict[str, Any] = {}

    async def timed() -> tuple[float, Any]:
        gc.collect()
        t0 = time.perf_counter()
        out = await asyncio.wait_for(runner(n), timeout)
        t1 = time.perf_counter()
        return t1 - t0, out

    def target() -> None:
        try:
            box["value"] = asyncio.run(timed())
        except asyncio.TimeoutError:
            box["error"] = f"timed out after {timeout:.0f} s (cancelled cleanly)"
        except BaseException as exc:  # noqa: BLE001 - reported, never swallowed silently
            box["error"] = f"{type(exc).__name__}: {exc}"[:800]
            box["detail"] = traceback.format_exc() + getattr(exc, "detail", "")

    th = threading.Thread(target=target, name="bench-measurement", daemon=True)
    th.start()
    th.join(timeout + HARD_GRACE_S)
    if th.is_alive():
        return Outcome(
            error=(
                f"did not finish within {timeout:.0f} s and did not stop within "
                f"{HARD_GRACE_S:.0f} s of being cancelled; abandoned"
            ),
            abandoned=True,
        )
    if "error" in box:
        return Outcome(error=box["error"], detail=box.get("detail", ""))
    elapsed, out = box["value"]
    return Outcome(elapsed=elapsed, output=out)


def check_output(out: Any, expected_sorted: list[int], ordered: bool) -> None:
    if not isinstance(out, list):
        raise WrongOutput(f"expected a list, got {type(out).__name__}")
    if ordered:
        if out != expected_sorted:
            raise WrongOutput("not in source order / wrong values: " + _diff(out, expected_sorted))
        return
    got = sorted(out)
    if got != expected_sorted:
        raise WrongOutput(_diff(got, expected_sorted))


def _diff(got: list[Any], want: list[int]) -> str:
    msg = f"len {len(got)} (want {len(want)})"
    if len(got) == len(want):
        for i, (a, b) in enumerate(zip(got, want)):
            if a != b:
                return msg + f"; first difference at [{i}]: {a!r} != {b!r}"
    try:
        missing = set(want) - set(got)
        extra = len(got) - (len(want) - len(missing))
        msg += f"; {len(missing)} expected values missing"
        if missing:
            msg += f" (e.g. {sorted(missing)[:5]})"
        msg += f"; {extra} unexpected/duplicate values"
    except TypeError:
        msg += f"; first items {got[:5]!r}"
    return msg


@dataclass
class SystemResult:
    key: str
    label: str
    status: str = "ok"  # ok | skipped | failed
    reason: str = ""
    detail: str = ""
    times: list[float] = field(default_factory=list)
    warmup_s: Optional[float] = None

    @property
    def median(self) -> Optional[float]:
        return statistics.median(self.times) if self.times else None


def loud(msg: str) -> None:
    bar = "!" * 78
    print(f"\n{bar}\n{msg}\n{bar}\n", file=sys.stderr, flush=True)


def progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run_workload(wl: Workload, runs: int, timeout: float) -> dict[str, SystemResult]:
    results: dict[str, SystemResult] = {}
    runners: dict[str, Runner] = {}
    expected = wl.expected(wl.n)

    def fail(sys_: System, res: SystemResult, why: str, detail: str = "") -> None:
        res.status, res.reason, res.detail = "failed", why, detail
        loud(f"{wl.key} / {sys_.label}: FAILED\n{why}" + (f"\n\n{detail}" if detail else ""))

    for s in wl.systems:
        res = results[s.key] = SystemResult(s.key, s.label)
        try:
            runners[s.key] = s.make()
        except Unavailable as exc:
            res.status, res.reason = "skipped", "skipped (not installed)"
            progress(f"{wl.key} {s.label}: {res.reason}: {exc}")
        except Exception as exc:  # noqa: BLE001
            fail(s, res, f"set-up raised {type(exc).__name__}: {exc}", traceback.format_exc())

    def attempt(s: System, n: int, exp: list[int], limit: float) -> Optional[float]:
        res = results[s.key]
        out = measure_once(runners[s.key], n, limit)
        if out.error is not None:
            fail(s, res, out.error, out.detail)
            return None
        try:
            check_output(out.output, exp, s.ordered)
        except WrongOutput as exc:
            fail(s, res, f"WRONG OUTPUT for n={n}: {exc}")
            return None
        return out.elapsed

    warm_n = min(wl.n, max(WARMUP_MIN, wl.n // WARMUP_DIV))
    warm_exp = wl.expected(warm_n)
    for s in wl.systems:
        if results[s.key].status != "ok":
            continue
        t = attempt(s, warm_n, warm_exp, min(timeout, WARMUP_TIMEOUT_S))
        if t is not None:
            results[s.key].warmup_s = t
            progress(f"{wl.key} warm-up n={warm_n} {s.label}: {t:.3f} s")

    for rep in range(runs):
        k = rep % len(wl.systems)
        order = wl.systems[k:] + wl.systems[:k]  # rotate: nobody always goes first
        for s in order:
            if results[s.key].status != "ok":
                continue
            t = attempt(s, wl.n, expected, timeout)
            if t is not None:
                results[s.key].times.append(t)
                progress(
                    f"{wl.key} run {rep + 1}/{runs} {s.label}: {t:.3f} s "
                    f"({t / wl.n * 1e6:.2f} us/item)"
                )
    return results


# -------------------------------------------------------------------- reporting


def _fmt_ratio(ref: Optional[float], t: Optional[float]) -> str:
    if ref is None or t is None:
        return "n/a"
    return f"{ref / t:.2f}x"


def _row_head(r: SystemResult) -> Optional[list[str]]:
    if r.status == "skipped":
        return [r.label, r.reason]
    if r.status == "failed":
        return [r.label, "FAILED: " + r.reason.splitlines()[0][:160]]
    return None


def render(wl: Workload, results: dict[str, SystemResult]) -> str:
    lines = [f"### {wl.title} — {wl.describe}; {wl.n:,} items", ""]
    ref_cols = [f"vs {results[k].label.split(' (')[0]}" for k in wl.refs if k in results]
    refs = {k: results[k].median for k in wl.refs if k in results}
    if wl.kind == "efficiency":
        assert wl.ideal_s is not None
        ideal = wl.ideal_s(wl.n)
        head = ["system", "median s", "min–max s", "ideal s", "efficiency", *ref_cols]
    else:
        head = ["system", "median s", "min–max s", "µs/item", "items/s", *ref_cols]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|")
    for r in results.values():
        special = _row_head(r)
        if special is not None:
            cells = special + [""] * (len(head) - 2)
        else:
            m = r.median
            assert m is not None
            spread = f"{min(r.times):.3f}–{max(r.times):.3f}"
            if wl.kind == "efficiency":
                cells = [r.label, f"{m:.3f}", spread, f"{ideal:.3f}", f"{ideal / m:.1%}"]
            else:
                cells = [r.label, f"{m:.3f}", spread, f"{m / wl.n * 1e6:.2f}", f"{wl.n / m:,.0f}"]
            cells += [_fmt_ratio(refs[k], m) for k in wl.refs if k in results]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    return "\n".join(lines)


def _version(dist: str) -> str:
    try:
        from importlib.metadata import version

        return version(dist)
    except Exception:  # noqa: BLE001
        return "not installed"


def _git_rev() -> str:
    root = Path(__file__).resolve().parents[2]
    try:
        rev = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip()
        return rev + ("+dirty" if dirty else "")
    except Exception:  # noqa: BLE001
        return "unknown"


def environment() -> dict[str, Any]:
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = None
    try:
        load = os.getloadavg()
    except (AttributeError, OSError):
        load = None
    return {
        "python": sys.version.split()[0],
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": usable,
        "loadavg_at_start": load,
        "pypline": _version("pypline"),
        "pypeln": _version("pypeln"),
        "aiostream": _version("aiostream"),
        "git": _git_rev(),
    }


# ------------------------------------------------------------------------- main


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", type=int, default=3, help="repetitions per system (default 3)")
    p.add_argument("--quick", action="store_true", help=f"item counts / {QUICK_DIV} (smoke run)")
    p.add_argument("--json", metavar="PATH", help="also write the raw numbers as JSON")
    p.add_argument(
        "--only", metavar="W1,W2,...", help="run only these workloads (default: all)"
    )
    p.add_argument(
        "--timeout", type=float, default=None,
        help="seconds before one measurement is cancelled (default 120, --quick 20)",
    )
    a = p.parse_args(argv)
    if a.runs < 1:
        p.error("--runs must be >= 1")
    if a.timeout is None:
        a.timeout = 20.0 if a.quick else 120.0
    return a


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    env = environment()
    workloads = build_workloads(args.quick)
    if args.only:
        wanted = {w.strip().upper() for w in args.only.split(",")}
        unknown = wanted - {w.key for w in workloads}
        if unknown:
            print(f"unknown workload(s): {sorted(unknown)}", file=sys.stderr)
            return 2
        workloads = [w for w in workloads if w.key in wanted]

    started = time.perf_counter()
    all_results: dict[str, dict[str, SystemResult]] = {}
    for wl in workloads:
        progress(f"== {wl.title}: {wl.n:,} items, {args.runs} run(s)")
        all_results[wl.key] = run_workload(wl, args.runs, args.timeout)
    total = time.perf_counter() - started

    out = [
        f"## pypline core benchmarks{' (--quick)' if args.quick else ''}",
        "",
        f"Python {env['python']} ({env['implementation']}) on {env['platform']}; "
        f"CPU count {env['cpu_count']} (usable {env['cpus_usable']}); "
        f"load average at start {env['loadavg_at_start']}",
        f"pypline {env['pypline']} (git {env['git']}), pypeln {env['pypeln']}, "
        f"aiostream {env['aiostream']}",
        f"Medians of {args.runs} run(s), systems interleaved in each run; "
        f"ratio = time(reference) / time(row), > 1 means the row is faster. "
        f"Total wall time {total:.1f} s.",
        "",
    ]
    for wl in workloads:
        out.append(render(wl, all_results[wl.key]))
    print("\n".join(out), flush=True)

    failed = [
        f"{wk}/{r.key}" for wk, rs in all_results.items() for r in rs.values() if r.status == "failed"
    ]
    abandoned = any("abandoned" in r.reason for rs in all_results.values() for r in rs.values())

    if args.json:
        payload = {
            "env": env,
            "args": {"runs": args.runs, "quick": args.quick, "timeout": args.timeout},
            "total_s": total,
            "workloads": {
                wl.key: {
                    "title": wl.title,
                    "describe": wl.describe,
                    "n": wl.n,
                    "ideal_s": wl.ideal_s(wl.n) if wl.ideal_s else None,
                    "systems": {
                        r.key: {
                            "label": r.label,
                            "status": r.status,
                            "reason": r.reason,
                            "detail": r.detail,
                            "times_s": r.times,
                            "median_s": r.median,
                            "warmup_s": r.warmup_s,
                        }
                        for r in all_results[wl.key].values()
                    },
                }
                for wl in workloads
            },
        }
        Path(args.json).write_text(json.dumps(payload, indent=2) + "\n")

    if failed:
        print(f"\nFAILED: {', '.join(failed)} (see stderr)", file=sys.stderr, flush=True)
    if abandoned:
        # A hung measurement thread may be stuck in a thread pool that the
        # interpreter would join at exit; do not wait for it.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
