"""``pypline.testing``: its documented examples run as written, and a bug in a test's own
code (``fate``) or in the sink surfaces instead of hanging the run."""

from __future__ import annotations

import asyncio
import re
import textwrap
from pathlib import Path
from typing import Any

import pytest

import pypline.testing
from pypline import Pipeline, work_pool
from pypline.executor import Attempt
from pypline.testing import Hold, Lose, MockBackend
from pypline.util import is_err, unwrap, unwrap_err

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.timeout(30)


def _literal_block_after(text: str, marker: str) -> str:
    """The indented ``::`` block that follows ``marker`` in a docstring."""
    start = text.index(marker)
    body = text[text.index("::\n", start) + 3 :]
    lines = []
    for line in body.splitlines():
        if line and not line.startswith("    "):
            break
        lines.append(line)
    return textwrap.dedent("\n".join(lines)).strip() + "\n"


def _markdown_block_under(text: str, heading: str) -> str:
    section = text[text.index(heading) :]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, f"no python block under {heading!r}"
    return match.group(1)


def test_module_docstring_example_runs() -> None:
    """The MockBackend example in ``pypline.testing``'s docstring runs and its asserts hold."""
    code = _literal_block_after(pypline.testing.__doc__ or "", "answered once)")
    assert "attempt.lost" in code and "assert unwrap(result)" in code
    exec(compile(code, "pypline.testing docstring", "exec"), {})


def test_readme_testing_snippet_runs() -> None:
    """The guide's "Testing your pipelines" block runs as written."""
    text = (ROOT / "docs" / "guide.md").read_text()
    code = _markdown_block_under(text, "Testing your pipelines")
    assert "MockBackend" in code
    exec(compile(code, "README testing snippet", "exec"), {})


def test_lost_count_tells_a_redispatch_apart() -> None:
    """A lost attempt comes back with the same number and ``lost`` one higher; ``fate``
    sees both, so "lose it once" is expressible and the run succeeds."""
    seen: list[tuple[int, int]] = []

    def fate(a: Attempt) -> Any:
        if a.item == 1:
            seen.append((a.number, a.lost))
            if a.lost < 2:
                return Lose("agent-x")
        return None

    stage = work_pool(lambda x: x * 10, multi_proc=True)
    result = (Pipeline(range(3)) >> stage).run_sync(executor=MockBackend(fate=fate))
    assert unwrap(result) == [0, 10, 20]
    assert seen == [(1, 0), (1, 1), (1, 2)]


def test_a_fate_that_raises_fails_the_item_visibly() -> None:
    """A bug in the test's fate is that attempt's error: retried, then an ItemFailure
    carrying it; the other items succeed and the run returns (no hang)."""

    def fate(a: Attempt) -> Any:
        if a.item == 2:
            raise KeyError("typo in the test's fate")
        return None

    stage = work_pool(lambda x: x, multi_proc=True, retries=2)
    err = unwrap_err((Pipeline(range(4)) >> stage).run_sync(executor=MockBackend(fate=fate)))
    [failure] = err.failures
    assert failure.index == 2 and failure.attempts == 2 and isinstance(failure.error, KeyError)
    assert err.outputs == [0, 1, 3]


def test_a_sink_that_raises_surfaces_instead_of_hanging(arun: Any) -> None:
    """The executor's sink raising while taking a report (a bug in the code under test)
    fails the attempts it held with that exception: the run ends, showing it."""
    from pypline._stage_runner import StageRunner

    class Boom(RuntimeError):
        pass

    original = StageRunner.ok_many
    calls = {"n": 0}

    def flaky_ok_many(self: Any, attempts: Any, values: Any) -> None:
        calls["n"] += 1
        if calls["n"] == 1:
            raise Boom("the sink broke")
        original(self, attempts, values)

    mp = pytest.MonkeyPatch()
    mp.setattr(StageRunner, "ok_many", flaky_ok_many)
    try:
        stage = work_pool(lambda x: x, multi_proc=True, num_workers=4)
        result = arun((Pipeline(range(6)) >> stage).run(executor=MockBackend()), timeout=10)
    finally:
        mp.undo()
    assert is_err(result)
    errors = {type(f.error) for f in unwrap_err(result).failures}
    assert errors == {Boom}


def test_held_attempts_release_and_user_cancellation_is_an_item_error() -> None:
    """Hold keeps an attempt until released; a CancelledError from the stage's own code is
    an item error (StageCancelled) on the mock backend too."""
    from pypline import StageCancelled

    release = asyncio.Event()

    def fate(a: Attempt) -> Any:
        return Hold(release) if a.item == 0 else None

    async def stage_fn(x: int) -> int:
        if x == 1:
            raise asyncio.CancelledError()
        return x

    async def main() -> Any:
        task = asyncio.ensure_future(
            (Pipeline(range(3)) >> work_pool(stage_fn, multi_proc=True, num_workers=3)).run(
                executor=MockBackend(fate=fate)
            )
        )
        await asyncio.sleep(0.05)
        assert not task.done()
        release.set()
        return await task

    err = unwrap_err(asyncio.run(main()))
    assert err.outputs == [0, 2]
    assert isinstance(err.failures[0].error, StageCancelled)
