"""Durable runs: a journal of delivered keys; a later run skips them; kill -9 and resume."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from pypline import Pipeline, work_pool
from pypline.util import unwrap

pytestmark = pytest.mark.timeout(120)


def keys_in(path: Path) -> list[Any]:
    lines = path.read_text().splitlines()
    assert lines[0] == "# pypline journal 1"
    return [json.loads(line) for line in lines[1:]]


def test_a_second_run_does_only_what_the_first_did_not(tmp_path: Path) -> None:
    journal = tmp_path / "j"
    broken = {3, 7}
    seen: list[int] = []

    def work(x: int) -> int:
        seen.append(x)
        if x in broken:
            raise ValueError(x)
        return x * 10

    p = Pipeline(range(10)) >> work_pool(work)
    first = p.run_sync(journal=journal).unwrap_err()
    assert first.outputs == [0, 10, 20, 40, 50, 60, 80, 90]
    assert sorted(keys_in(journal)) == [0, 1, 2, 4, 5, 6, 8, 9]  # failed items are not recorded
    broken.clear()
    seen.clear()
    assert unwrap(p.run_sync(journal=journal)) == [30, 70]  # only the two that failed
    assert sorted(seen) == [3, 7]
    assert sorted(keys_in(journal)) == list(range(10))
    assert unwrap(p.run_sync(journal=journal)) == []  # nothing left to do


def test_a_stream_left_early_resumes_after_what_it_delivered(tmp_path: Path) -> None:
    journal = tmp_path / "j"
    items = [{"url": f"/page/{i}"} for i in range(20)]
    p = Pipeline(items) >> work_pool(lambda d: d["url"].upper())
    first = []
    for r in p.iter(ordered=True, journal=journal, key=lambda d: d["url"]):
        first.append(unwrap(r))
        if len(first) == 5:
            break
    assert first == [f"/PAGE/{i}" for i in range(5)]
    assert keys_in(journal) == [f"/page/{i}" for i in range(5)]
    rest = [unwrap(r) for r in p.iter(ordered=True, journal=journal, key=lambda d: d["url"])]
    assert rest == [f"/PAGE/{i}" for i in range(5, 20)]


def test_journal_file_problems_are_clear(tmp_path: Path) -> None:
    p = Pipeline([1, 2]) >> work_pool(abs)
    bad = tmp_path / "notes.txt"
    bad.write_text("hello\n")
    with pytest.raises(ValueError, match="is not a pypline journal"):
        p.run_sync(journal=bad)
    torn = tmp_path / "torn"
    torn.write_text('# pypline journal 1\n1\n"hal')  # the last line torn by a crash
    assert unwrap(p.run_sync(journal=torn)) == [2]
    assert keys_in(torn) == [1, 2]
    with pytest.raises(ValueError, match="key= goes with journal="):
        p.run_sync(key=str)
    error = (Pipeline([object()]) >> work_pool(id)).run_sync(journal=tmp_path / "k").unwrap_err()
    assert "a journal key must be JSON" in str(error.cause)


KILLED_RUN = r"""
import os, sys, time
from pypline import Pipeline, work_pool

out = open(sys.argv[2], "a")

def work(x):
    time.sleep(0.004)
    return x

with (Pipeline(range(1000)) >> work_pool(work, num_workers=8)).iter(journal=sys.argv[1]) as results:
    for r in results:
        out.write(f"{r.unwrap()}\n")
        out.flush()
print("DONE", flush=True)
"""


def test_killed_and_resumed_runs_deliver_every_item_once_20_times(tmp_path: Path) -> None:
    """SIGKILL at random moments, then run again, until a run completes; 20 rounds. Across the
    runs of a round, the journal holds every item exactly once, and the consumer never got
    an item twice (an item is recorded just before it is handed over, so one killed in that
    instant is recorded and not handed over: at most one per kill)."""
    script = tmp_path / "run.py"
    script.write_text(KILLED_RUN)
    rng = random.Random(7)
    total_kills = 0
    for round_ in range(20):
        journal, seen = tmp_path / f"j{round_}", tmp_path / f"seen{round_}"
        kills = 0
        while True:
            proc = subprocess.Popen([sys.executable, str(script), str(journal), str(seen)],
                                    stdout=subprocess.PIPE, text=True, cwd=tmp_path)
            try:
                out, _ = proc.communicate(timeout=rng.uniform(0.3, 0.8))
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.communicate()
                kills += 1
                continue
            assert proc.returncode == 0 and "DONE" in out
            break
        journaled = keys_in(journal)
        consumed = [int(x) for x in seen.read_text().split()] if seen.exists() else []
        assert sorted(journaled) == list(range(1000)), round_
        assert len(consumed) == len(set(consumed)), f"round {round_}: an item reached the consumer twice"
        assert len(set(range(1000)) - set(consumed)) <= kills, round_
        total_kills += kills
    assert total_kills >= 10  # the runs were killed mid-way, not just run to the end


def test_run_writes_a_key_moments_after_its_item_finished(tmp_path: Path) -> None:
    """run() hands nothing over until it ends, yet a finished item's key is in the file
    within WRITE_SECONDS (10 ms), so a run killed mid-way redoes almost nothing."""
    import asyncio

    from pypline._journal import WRITE_SECONDS

    journal = tmp_path / "j"
    journal_seen: dict[int, list[Any]] = {}

    async def slow_source() -> Any:
        for i in range(6):
            yield i
            await asyncio.sleep(WRITE_SECONDS * 10)  # the previous item finished long before the next

    def work(x: int) -> int:
        journal_seen[x] = sorted(keys_in(journal)) if journal.exists() else []
        return x

    assert unwrap((Pipeline(slow_source()) >> work_pool(work)).run_sync(journal=journal)) == list(range(6))
    for x in range(1, 6):
        assert journal_seen[x] == list(range(x)), (x, journal_seen[x])
