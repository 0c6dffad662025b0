"""run(on_failure=...): failures go to a callable or a JSON-lines file; memory keeps a few."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from pypline import ItemFailure, Pipeline, work_pool


def odd_fails(x: int) -> int:
    if x % 2:
        raise ValueError(f"odd {x}")
    return x


def test_failures_go_to_a_callable_and_memory_keeps_the_first_hundred() -> None:
    got: list[ItemFailure] = []
    error = (Pipeline(range(1000)) >> work_pool(odd_fails)).run_sync(on_failure=got.append).unwrap_err()
    assert len(got) == 500 and sorted(f.item for f in got) == list(range(1, 1000, 2))
    assert error.failed == 500 and len(error.failures) == 100
    assert error.delivered == 500
    assert "500 item(s) failed (the first 100 shown by stage)" in str(error)


def test_failures_go_to_a_jsonl_file(tmp_path: Path) -> None:
    path = tmp_path / "dead.jsonl"
    stage = work_pool(odd_fails, retries=2)
    error = (Pipeline([{"id": 1}, 2, 3]) >> work_pool(lambda x: x if isinstance(x, int) else 1) >> stage).run_sync(
        on_failure=str(path)
    ).unwrap_err()
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [(d["index"], d["item"], d["error_type"], d["attempts"]) for d in lines] == [
        (0, 1, "ValueError", 2),
        (2, 3, "ValueError", 2),
    ]
    assert lines[0]["history"] == [["ValueError", "odd 1"]] and lines[0]["stage"] == "odd_fails"
    assert error.failed == 2


def test_a_callable_that_raises_keeps_the_failure(caplog: pytest.LogCaptureFixture) -> None:
    def broken(f: Any) -> None:
        raise RuntimeError("dead-letter queue down")

    error = (Pipeline(range(4)) >> work_pool(odd_fails)).run_sync(on_failure=broken).unwrap_err()
    assert sorted(f.item for f in error.failures) == [1, 3]  # nothing lost
    assert "on_failure could not take the failure" in caplog.text


def test_on_failure_is_checked() -> None:
    with pytest.raises(TypeError, match="on_failure must be a callable or a file path"):
        (Pipeline(range(2)) >> work_pool(abs)).run_sync(on_failure=3)
