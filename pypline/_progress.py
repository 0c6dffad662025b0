"""Live progress: one line (or bar) per stage, redrawn from statistics snapshots.

    run(progress=...) ─► make_display() ─► Display
    the run's reporter task, every REFRESH_SECONDS:   display.draw(snapshot)
    the end of the run:                               display.finish(final snapshot)

``progress=True`` picks what the place the run was started from can show: a terminal
(ANSI "cursor up" and "clear line", our own small renderer) when stderr is one, else an
IPython display that updates in place when the run is inside a Jupyter kernel, else
nothing (the statistics remain available as ``last_stats``). ``progress="tqdm"`` and
``progress="rich"`` draw with those libraries (optional extras), one bar per stage.
Every display is fed the same snapshots as ``on_stats``; none runs a thread of its own.
"""

from __future__ import annotations

import html
import importlib.util
import sys
from typing import Any, Literal, Protocol, TextIO, Union

from ._stats import RunStatistics, StageStatistics

__all__ = ["Display", "ProgressChoice", "ProgressRenderer", "REFRESH_SECONDS", "check_progress", "make_display"]

_LIBRARIES = ("tqdm", "rich")

ProgressChoice = Union[bool, Literal["tqdm", "rich"]]
"""What ``progress=`` takes: ``True`` (whatever can be shown here), ``False``, ``"tqdm"``, ``"rich"``."""

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


class Display(Protocol):
    """Where live progress goes: ``draw`` a snapshot, then ``finish`` with the final one."""

    def draw(self, stats: RunStatistics) -> None: ...

    def finish(self, stats: RunStatistics) -> None: ...


def check_progress(progress: Any) -> None:
    """``progress`` is a bool, ``"tqdm"`` or ``"rich"``, and a named library is installed."""
    if isinstance(progress, bool):
        return
    if progress not in _LIBRARIES:
        raise ValueError(f"progress must be True, False, 'tqdm' or 'rich', got {progress!r}")
    if importlib.util.find_spec(progress) is None:
        raise ImportError(f"progress={progress!r} needs {progress}: pip install 'pypline-async[{progress}]'")


def in_notebook() -> bool:
    """True inside a Jupyter kernel (IPython is never imported here just to find out)."""
    ipython = sys.modules.get("IPython")
    if ipython is None:
        return False
    shell = ipython.get_ipython()
    return shell is not None and getattr(shell, "kernel", None) is not None


def make_display(progress: ProgressChoice, stream: TextIO) -> Display | None:
    if progress == "tqdm":
        return TqdmDisplay()
    if progress == "rich":
        return RichDisplay(stream)
    if not progress:
        return None
    if stream.isatty():
        return ProgressRenderer(stream)
    if in_notebook():
        return NotebookDisplay()
    return None


class NotebookDisplay:
    """The stage lines in one notebook output, replaced in place on every draw."""

    def __init__(self) -> None:
        from IPython.display import display  # type: ignore[import-not-found, unused-ignore]

        self._handle = display(_Lines([]), display_id=True)  # type: ignore[no-untyped-call, unused-ignore]

    def draw(self, stats: RunStatistics) -> None:
        self._handle.update(_Lines(render_lines(stats)))

    def finish(self, stats: RunStatistics) -> None:
        lines = render_lines(stats)
        self._handle.update(_Lines([*lines, stats.hint] if stats.hint else lines))


class _Lines:
    """What a notebook shows: text for any front end, HTML where it renders HTML."""

    def __init__(self, lines: list[str]) -> None:
        self.lines = lines

    def __repr__(self) -> str:
        return "\n".join(self.lines)

    def _repr_html_(self) -> str:
        return f"<pre>{html.escape(chr(10).join(self.lines))}</pre>"


def _done(s: StageStatistics) -> int:
    return s.succeeded + s.failed


class TqdmDisplay:
    """One tqdm bar per stage (``tqdm.auto``: a widget in a notebook, text elsewhere)."""

    def __init__(self) -> None:
        self._bars: list[Any] = []

    def draw(self, stats: RunStatistics) -> None:
        if not self._bars:
            from tqdm.auto import tqdm  # type: ignore[import-untyped, import-not-found, unused-ignore]

            width = max((len(s.name) for s in stats.stages), default=5)
            self._bars = [
                tqdm(total=stats.source_length, desc=s.name.ljust(width), unit="item", position=i, leave=True)
                for i, s in enumerate(stats.stages)
            ]
        for bar, s in zip(self._bars, stats.stages):
            bar.n = _done(s)
            bar.set_postfix(failed=s.failed, queue=f"{s.queue_depth}/{s.capacity}", refresh=False)
            bar.refresh()

    def finish(self, stats: RunStatistics) -> None:
        self.draw(stats)
        for bar in self._bars:
            bar.close()


class RichDisplay:
    """One rich progress bar per stage, on ``stream``; refreshed by draw, no refresh thread."""

    def __init__(self, stream: TextIO) -> None:
        from rich.console import Console  # type: ignore[import-not-found, unused-ignore]
        from rich.progress import (  # type: ignore[import-not-found, unused-ignore]
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
        )

        self._progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[failed]} failed  queue {task.fields[queue]}"),
            TimeRemainingColumn(),
            console=Console(file=stream),
            auto_refresh=False,
        )
        self._tasks: list[Any] = []

    def draw(self, stats: RunStatistics) -> None:
        if not self._tasks:
            self._progress.start()
            self._tasks = [
                self._progress.add_task(s.name, total=stats.source_length, failed=0, queue="")
                for s in stats.stages
            ]
        for task, s in zip(self._tasks, stats.stages):
            self._progress.update(task, completed=_done(s), failed=s.failed, queue=f"{s.queue_depth}/{s.capacity}")
        self._progress.refresh()

    def finish(self, stats: RunStatistics) -> None:
        self.draw(stats)
        self._progress.stop()
