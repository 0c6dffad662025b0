"""Live progress: one line per stage on a terminal, redrawn in place.

A small renderer of our own instead of a dependency: it needs ANSI "cursor up"
and "clear line" only, and pypline's runtime dependencies are fixed (cloudpickle, pyzmq, click).
It draws only when the stream is a terminal; otherwise it stays silent during
the run and prints nothing (the statistics remain available as ``last_stats``).
"""

from __future__ import annotations

from typing import TextIO

from ._stats import RunStatistics, StageStatistics

__all__ = ["ProgressRenderer", "REFRESH_SECONDS"]

# At most ten redraws a second: smooth to the eye, negligible for the loop.
REFRESH_SECONDS = 0.1

_BAR = 10


def _rate(v: float) -> str:
    if v >= 10_000:
        return f"{v / 1000:,.0f}k"
    if v >= 1000:
        return f"{v / 1000:.1f}k"
    return f"{v:.0f}" if v >= 10 else f"{v:.1f}"


def _eta(seconds: float | None) -> str:
    if seconds is None:
        return ""
    s = int(seconds + 0.5)
    return f"  ETA {s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"  ETA {s // 60}:{s % 60:02d}"


def stage_line(s: StageStatistics, width: int, total: int | None) -> str:
    fill = round(_BAR * s.queue_depth / s.capacity) if s.capacity else 0
    bar = "#" * fill + "." * (_BAR - fill)
    done = s.succeeded + s.failed
    eta = None
    if total is not None and s.throughput > 0 and done <= total:
        eta = (total - done) / s.throughput
    of = f"/{total}" if total is not None else ""
    return (
        f"{s.name:<{width}}  {done:>7}{of} done  {s.failed:>4} failed  "
        f"queue [{bar}] {s.queue_depth:>3}/{s.capacity:<3}  {_rate(s.throughput):>6}/s{_eta(eta)}"
   )


def render_lines(stats: RunStatistics) -> list[str]:
    width = max((len(s.name) for s in stats.stages), default=5)
    lines = [stage_line(s, width, stats.source_length) for s in stats.stages]
    state = "done" if stats.finished else "running"
    lines.append(f"{state}: {stats.delivered} delivered, {stats.failed} failed, {stats.elapsed:.1f} s")
    return lines


class ProgressRenderer:
    """Redraws the stage lines in place on ``stream`` (a terminal)."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.drawn = 0

    def draw(self, stats: RunStatistics) -> None:
        lines = render_lines(stats)
        out = []
        if self.drawn:
            out.append(f"\x1b[{self.drawn}F")  # back to the first line we drew
        out.extend(f"\x1b[2K{line}\n" for line in lines)
        self.stream.write("".join(out))
        self.stream.flush()
        self.drawn = len(lines)

    def finish(self, stats: RunStatistics) -> None:
        self.draw(stats)
        if stats.hint:
            self.stream.write(stats.hint + "\n")
            self.stream.flush()
