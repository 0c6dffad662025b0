"""Run statistics, the bottleneck hint and the live progress display."""

from __future__ import annotations

import asyncio
import io
import json
import os
import pty
import select
import subprocess
import sys
import textwrap
import time
from typing import Any

import pytest

from pypline import Pipeline, RunStatistics, current_worker, work_pool
from pypline.util import Err, Ok, unwrap

pytestmark = pytest.mark.timeout(30)


def test_counts_match_a_hand_counted_run(arun: Any) -> None:
    """received/succeeded/failed/retries/attempts agree with what the functions saw."""
    calls: list[tuple[int, int]] = []

    @work_pool(num_workers=2, retries=3)
    async def flaky(x: int) -> int:
        calls.append((x, current_worker().attempt))
        if x % 5 == 0:
            raise ValueError("always")  # 0, 5: 3 attempts each, fail
        if x % 5 == 1 and current_worker().attempt == 1:
            raise ValueError("once")  # 1, 6: succeed on attempt 2
        return x

    @work_pool
    def keep(x: int) -> int:
        return x

    p = Pipeline(range(10)) >> flaky >> keep
    result = arun(p.run())
    assert isinstance(result, Err)
    stats = p.last_stats
    assert stats is not None and stats.finished
    a, b = stats.stages
    assert (a.name, a.received, a.succeeded, a.failed) == ("flaky", 10, 8, 2)
    assert a.retries == 2 * 2 + 2 and a.attempts == len(calls) == 10 + 6
    assert (b.received, b.succeeded, b.failed, b.retries) == (8, 8, 0, 0)
    assert (stats.pulled, stats.delivered, stats.failed) == (10, 8, 2)
    assert a.queue_depth == 0 and a.capacity == 16 + 2 and b.capacity == 16 + 1


def test_on_stats_is_live_then_final(arun: Any) -> None:
    """on_stats gets snapshots while the run is blocked, then exactly one final snapshot."""
    seen: list[RunStatistics] = []
    release = asyncio.Event()
    two_live = asyncio.Event()

    def on_stats(s: RunStatistics) -> None:
        seen.append(s)
        if sum(1 for x in seen if not x.finished) >= 2:
            two_live.set()

    @work_pool(buffer=2)
    async def gate(x: int) -> int:
        await release.wait()
        return x

    async def main() -> Any:
        task = asyncio.ensure_future((Pipeline(range(5)) >> gate).run(on_stats=on_stats, stats_interval=0.01))
        await asyncio.wait_for(two_live.wait(), 10)
        live = seen[-1]
        assert not live.finished and live.stages[0].queue_depth == 3 and live.delivered == 0
        release.set()
        return await task

    assert unwrap(arun(main())) == list(range(5))
    assert [s.finished for s in seen].count(True) == 1 and seen[-1].finished
    assert seen[-1].delivered == 5


def test_stats_off_and_bad_reporting_arguments(arun: Any) -> None:
    """stats=False leaves last_stats None; reporting without stats or with bad values is refused."""
    p = Pipeline([1, 2]) >> work_pool(abs)
    assert arun(p.run(stats=False)) == Ok([1, 2]) and p.last_stats is None
    with pytest.raises(ValueError, match="stats=False"):
        arun(p.run(stats=False, on_stats=print))
    with pytest.raises(ValueError, match="stats_interval"):
        arun(p.run(stats_interval=0))
    with pytest.raises(TypeError, match="on_stats"):
        arun(p.run(on_stats=3))  # type: ignore[arg-type]


def test_broken_on_stats_callback_does_not_break_the_run(arun: Any, caplog: pytest.LogCaptureFixture) -> None:
    """An exception in on_stats is logged on the pypline logger; the run's result is unaffected."""

    def broken(s: RunStatistics) -> None:
        raise RuntimeError("bad callback")

    p = Pipeline(range(3)) >> work_pool(abs)
    with caplog.at_level("ERROR", logger="pypline"):
        assert arun(p.run(on_stats=broken)) == Ok([0, 1, 2])
    assert any("on_stats" in r.message and r.name.startswith("pypline") for r in caplog.records)


def test_records_are_json_ready_and_print_as_a_table(arun: Any) -> None:
    """to_dict() is JSON-serialisable and str() is a table naming every stage."""

    @work_pool(name="first")
    async def a(x: int) -> int:
        return x

    @work_pool(name="second")
    def b(x: int) -> int:
        return x

    p = Pipeline(range(50)) >> a >> b
    arun(p.run())
    stats = p.last_stats
    assert stats is not None
    d = json.loads(json.dumps(stats.to_dict()))
    assert [s["name"] for s in d["stages"]] == ["first", "second"]
    table = str(stats)
    assert "first" in table and "second" in table and "50 delivered" in table


def test_bottleneck_names_the_busy_stage(arun: Any) -> None:
    """The hint names the stage whose single worker was busy nearly all the time, and says what to change."""

    @work_pool(num_workers=2)
    async def fast(x: int) -> int:
        return x

    @work_pool(num_workers=1, buffer=2)
    def slow(x: int) -> int:
        time.sleep(0.004)
        return x

    p = Pipeline(range(60)) >> fast >> slow
    arun(p.run())
    stats = p.last_stats
    assert stats is not None and stats.bottleneck == "slow"
    # Its calls sleep (off the CPU) and the loop is idle: waiting for I/O, so more workers help.
    assert stats.hint is not None and "num_workers=2" in stats.hint and "multi_proc" not in stats.hint
    assert stats.stages[1].cpu_share is not None and stats.stages[1].cpu_share < 0.5
    assert stats.stages[1].utilisation is not None and stats.stages[1].utilisation > 0.7
    assert stats.stages[1].times_full > 0


def test_stream_collects_stats_too(arun: Any) -> None:
    """A stream's statistics land on last_stats when it ends, early exit included."""
    p = Pipeline(range(100)) >> work_pool(abs)

    async def main() -> None:
        async with p.stream() as results:
            async for _ in results:
                break

    arun(main())
    assert p.last_stats is not None and p.last_stats.finished and p.last_stats.delivered == 1


class _FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_renderer_redraws_in_place() -> None:
    """Each redraw moves the cursor back over the lines it drew and clears them."""
    from pypline._progress import ProgressRenderer
    from pypline._stats import RunStatistics, StageStatistics

    def snap(done: int, finished: bool) -> RunStatistics:
        st = StageStatistics(
            "parse", "asyncio", "async", 2, 8, done, done, 0, done, done, 0, 0, 0, None, None, None, None, None, None,
            3, 5, 10, 0, 50.0,
        )
        return RunStatistics(1.0, done, done, 0, finished, 100, (st,), None, None)

    out = _FakeTTY()
    r = ProgressRenderer(out)
    r.draw(snap(10, False))
    first = out.getvalue()
    assert "parse" in first and "10/100 done" in first and "ETA" in first and "\x1b[" not in first.split("\x1b[2K")[0]
    r.finish(snap(100, True))
    assert "\x1b[2F" in out.getvalue()[len(first):]  # back over the stage line and the summary line


def test_progress_prints_nothing_when_stderr_is_not_a_terminal(arun: Any, capsys: pytest.CaptureFixture[str]) -> None:
    """progress=True on a pipe or file draws nothing."""
    p = Pipeline(range(20)) >> work_pool(abs)
    assert arun(p.run(progress=True)) == Ok(list(range(20)))
    captured = capsys.readouterr()
    assert captured.err == "" and captured.out == ""


def test_progress_in_a_real_pseudo_terminal(tmp_path: Any) -> None:
    """Under a real pty, progress=True draws each stage's line (done counts, queue bar, rate)."""
    script = tmp_path / "prog.py"
    script.write_text(
        textwrap.dedent(
            """
            import asyncio
            from pypline import Pipeline, work_pool

            @work_pool(num_workers=2, buffer=4)
            async def fetch(x):
                await asyncio.sleep(0.002)
                return x

            @work_pool(buffer=4)
            def parse(x):
                return x

            asyncio.run((Pipeline(range(150)) >> fetch >> parse).run(progress=True))
            """
        )
    )
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, str(script)], stdin=slave, stdout=slave, stderr=slave, close_fds=True)
    os.close(slave)
    chunks: list[bytes] = []
    deadline = time.monotonic() + 20
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.5)
            if not ready:
                if proc.poll() is not None:
                    break
                continue
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
    finally:
        status = proc.wait(timeout=20)
        os.close(master)
    text = b"".join(chunks).decode(errors="replace")
    assert status == 0, text
    assert "fetch" in text and "parse" in text and "150/150 done" in text and "queue [" in text
    assert "\x1b[2K" in text and "done: 150 delivered" in text


@pytest.mark.parametrize("library", ["tqdm", "rich"])
def test_progress_with_a_library_draws_a_bar_per_stage(
    library: str, arun: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """progress="tqdm" / "rich" draw each stage's bar with that library, ending at the item count."""

    @work_pool(num_workers=4)
    async def fetch(x: int) -> int:
        await asyncio.sleep(0.001)
        return x

    p = Pipeline(range(40)) >> fetch >> work_pool(abs)
    assert arun(p.run(progress=library)) == Ok(list(range(40)))  # type: ignore[arg-type]
    err = capsys.readouterr().err
    assert "fetch" in err and "abs" in err
    assert err.count("40/40") >= 2, err  # both stages' last draw: all 40 items done


def test_progress_takes_only_known_choices() -> None:
    p = Pipeline(range(3)) >> work_pool(abs)
    with pytest.raises(ValueError, match=r"progress must be True, False, 'tqdm' or 'rich', got 'bars'"):
        p.run_sync(progress="bars")
    with pytest.raises(ValueError, match="progress must be"):
        p.stream(progress=1)  # type: ignore[arg-type]


def test_progress_with_a_missing_library_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "rich" else real(name, *a))
    with pytest.raises(ImportError, match=r"progress='rich' needs rich: pip install 'pypline-async\[rich\]'"):
        (Pipeline(range(3)) >> work_pool(abs)).run_sync(progress="rich")
