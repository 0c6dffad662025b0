"""The session's orphan check sees every process the tests started, even re-parented ones."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from typing import Any, Callable

import pytest


def test_the_session_marker_is_inherited() -> None:
    """Every child of the test session carries the marker the orphan check looks for."""
    marker = os.environ.get("PYPLINE_TEST_SESSION")
    assert marker
    out = subprocess.run(
        [sys.executable, "-c", "import os; print(os.environ['PYPLINE_TEST_SESSION'])"],
        capture_output=True, text=True, timeout=30, check=True,
    )
    assert out.stdout.strip() == marker


@pytest.mark.timeout(30)
def test_a_double_forked_process_is_found(tagged_processes: Callable[[str], list[tuple[int, str]]]) -> None:
    """A process that left our process tree (double fork, new session: its parent is now
    init) is still found by its inherited marker, so it would fail the session."""
    marker = f"check-{os.getpid()}-{time.monotonic_ns()}"
    code = (
        "import os, sys, time\n"
        "if os.fork(): os._exit(0)\n"
        "os.setsid()\n"
        "if os.fork(): os._exit(0)\n"
        "print(os.getpid(), flush=True)\n"
        "null = os.open(os.devnull, os.O_RDWR); os.dup2(null, 1); os.dup2(null, 2)\n"
        "time.sleep(60)\n"
    )
    env = dict(os.environ, PYPLINE_TEST_SESSION=marker)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=30)
    pid = int(out.stdout.split()[0])
    try:
        deadline = time.monotonic() + 10
        while True:
            found: Any = tagged_processes(marker)
            if found or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert [p for p, _ in found] == [pid]
        assert os.getppid() != pid and "time.sleep(60)" in found[0][1]
    finally:
        os.kill(pid, signal.SIGKILL)  # the grandchild we started, by pid
    deadline = time.monotonic() + 10
    while tagged_processes(marker) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert tagged_processes(marker) == []
