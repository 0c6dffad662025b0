"""Run statistics: what each stage did, and which one limited the run.

Collecting them costs next to nothing on the hot path: the engine's counters are
the ones it keeps anyway (items in and out of each stage), rare events (retries,
losses, failures, a full queue) are counted where they happen, and executors
time one attempt in ``LATENCY_SAMPLE_EVERY`` instead of all of them. A snapshot
is computed only when asked for (``on_stats``, ``progress``, ``last_stats``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping, Sequence

__all__ = ["StageStatistics", "RunStatistics", "LATENCY_SAMPLE_EVERY", "percentile", "bottleneck"]

# Executors time one attempt in this many: 1/32 keeps the cost of two clock reads
# off almost every item, and a few hundred items already give usable percentiles.
LATENCY_SAMPLE_EVERY = 32

# A stage busier than this fraction of the time is called saturated.
_SATURATED = 0.7


def percentile(sorted_values: Sequence[float], q: float) -> float | None:
    """The ``q`` quantile (0..1) of already sorted values, nearest-rank; None if empty."""
    if not sorted_values:
        return None
    k = max(0, min(len(sorted_values) - 1, math.ceil(q * len(sorted_values)) - 1))
    return sorted_values[k]


@dataclass(frozen=True)
class StageStatistics:
    """One stage's counters and measurements, for ``Ok`` and ``Err`` runs alike.

    ``kind`` is how its functions run (``async``, ``sync``, ``gen``, ``async_gen``
    or ``mixed``). ``received`` items came in, ``succeeded`` went on (a flat-map stage's parent
    counts once; ``outputs`` counts what it yielded), ``failed`` failed for good.
    ``attempts`` counts every try, ``retries`` the tries after a failure,
    ``lost`` the attempts lost with a worker or agent (re-dispatched, not failed).
    ``busy_seconds`` and ``utilisation`` are estimated from sampled attempt
    durations; latencies are per attempt, in seconds, sampled (``None`` until an
    attempt was timed). ``queue_depth`` is what the stage holds now (queued,
    running, retrying, waiting for room downstream) out of ``capacity`` =
    ``buffer + workers``; ``queue_max`` the most it held; ``times_full`` how often
    the producer before it found it full. ``details`` is what the backend adds
    (the ``zmq`` backend: per-agent state, workers, items in flight and credits).
    ``retries_by_error`` counts the retries by the exception type that caused them.
    ``cpu_share`` is the share of the calls' time spent on a CPU (plain functions in
    threads: thread CPU time over wall time), ``None`` where the backend does not measure it.
    """

    name: str
    backend: str
    kind: str
    workers: int
    buffer: int
    received: int
    succeeded: int
    failed: int
    outputs: int
    attempts: int
    retries: int
    lost: int
    workers_replaced: int
    busy_seconds: float | None
    utilisation: float | None
    latency_mean: float | None
    latency_p50: float | None
    latency_p95: float | None
    latency_max: float | None
    queue_depth: int
    queue_max: int
    capacity: int
    times_full: int
    throughput: float
    details: Mapping[str, Any] = field(default_factory=dict)
    cpu_share: float | None = None
    retries_by_error: Mapping[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["details"] = dict(self.details)
        d["retries_by_error"] = dict(self.retries_by_error)
        return d


@dataclass(frozen=True)
class RunStatistics:
    """A snapshot of a whole run (live while ``finished`` is False)."""

    elapsed: float
    pulled: int
    delivered: int
    failed: int
    finished: bool
    source_length: int | None
    stages: tuple[StageStatistics, ...]
    bottleneck: str | None
    hint: str | None
    # Share of the run the event loop's thread spent on a CPU. On a machine busy with other
    # work it reads low (the loop waited for a CPU, not for work): the hint then falls back
    # to its general advice.
    loop_busy: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        return render_table(self)


def _ms(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v * 1000:.1f}" if v < 10 else f"{v:.0f}s"


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{v:.0%}"


def render_table(stats: RunStatistics) -> str:
    """A fixed-width table, one row per stage, then the bottleneck hint."""
    head = ("stage", "in", "ok", "failed", "retries", "lost", "busy", "p50 ms", "p95 ms", "queue max", "items/s")
    rows = [head]
    for s in stats.stages:
        rows.append(
            (
                s.name,
                str(s.received),
                str(s.succeeded),
                str(s.failed),
                str(s.retries),
                str(s.lost),
                _pct(s.utilisation),
                _ms(s.latency_p50),
                _ms(s.latency_p95),
                f"{s.queue_max}/{s.capacity}",
                f"{s.throughput:,.0f}",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    state = "finished" if stats.finished else "running"
    lines.append(
        f"{state} in {stats.elapsed:.2f} s: {stats.pulled} pulled, {stats.delivered} delivered, {stats.failed} failed"
    )
    if stats.hint:
        lines.append(stats.hint)
    return "\n".join(lines)


def bottleneck(
    stages: Sequence[StageStatistics], *, consumer_waited: bool, loop_busy: float | None = None
) -> tuple[str | None, str | None]:
    """Name what limited throughput and say what to change, advising only what was measured.

    A stage whose workers were busy most of the time is the bottleneck. More workers help
    only when its calls spend their time waiting for something outside the interpreter
    (I/O). They do not when the calls are CPU-bound in threads (one core under the GIL),
    nor when the calls mostly waited while the event loop was itself busy (they wait for
    the interpreter behind the loop: a thread's wall time then says nothing about its
    work). ``loop_busy`` is the share of the run the loop's thread spent on a CPU.
    """
    measured = [s for s in stages if s.utilisation is not None and s.received]
    if not measured:
        return None, None
    top = max(measured, key=lambda s: s.utilisation or 0.0)
    u = top.utilisation or 0.0
    if u >= _SATURATED:
        i = list(stages).index(top)
        why = f"its {top.workers} worker(s) were busy {u:.0%} of the time"
        if stages[i].times_full > 0:
            why += f" and its queue was full {top.times_full} time(s)"
        loop_saturated = loop_busy is not None and loop_busy >= _SATURATED and top.backend == "asyncio"
        threads = top.backend == "asyncio" and top.kind in ("sync", "gen")
        if threads and top.cpu_share is not None and top.cpu_share >= _SATURATED:
            advice = (
                f"its calls are CPU-bound ({top.cpu_share:.0%} of their time on a CPU): threads share one core "
                "under the GIL, so more of them will not help; use multi_proc=True"
            )
        elif loop_saturated:
            share = top.cpu_share
            on_cpu = ""
            if threads and share is not None:
                on_cpu = f" (only {'under 1%' if share < 0.01 else f'{share:.0%}'} of their time on a CPU)"
            advice = (
                f"but the event loop itself was busy {loop_busy:.0%} of the time, so its calls mostly waited for "
                f"the interpreter{on_cpu}: more workers will not help; take CPU work off the loop "
                "(async stages that compute, or the code awaiting results), e.g. with multi_proc=True"
            )
        else:
            advice = f"try num_workers={top.workers * 2}"
            if threads and top.cpu_share is None:
                advice += ", or multi_proc=True if its work is CPU-bound (threads share one core under the GIL)"
        return top.name, f"bottleneck: stage {top.name!r} — {why}; {advice}."
    if consumer_waited:
        return "<consumer>", "bottleneck: the consumer of stream() — stages waited for it to take results."
    return "<source>", (
        f"bottleneck: the source — the busiest stage ({top.name!r}) was busy only {u:.0%} of the time; "
        "a faster source (or more of them) would speed the run up."
    )
