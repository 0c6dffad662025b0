"""Shared test helpers: running coroutines with a deadline, and leak checks.

Tests are plain pytest (no asyncio plugin): ``arun(coro)`` runs a coroutine in a
fresh event loop with a hard deadline, so a hang fails the test instead of CI.
"""

from __future__ import annotations

import asyncio
import gc
import threading
import time
from typing import Any, Awaitable, Callable, Iterator, TypeVar

import pytest

T = TypeVar("T")


def arun(coro: Awaitable[T], timeout: float = 20.0) -> T:
    """Run ``coro`` in a new event loop; fail (not hang) after ``timeout`` seconds."""

    async def main() -> T:
        return await asyncio.wait_for(coro, timeout)

    return asyncio.run(main())


def pypline_threads() -> list[threading.Thread]:
    """Live threads started by pypline (they are all named ``pypline-...``)."""
    return [t for t in threading.enumerate() if t.name.startswith("pypline-") and t.is_alive()]


def wait_until(predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
    """Poll ``predicate`` until true or ``timeout``; for clean-up that happens in other threads."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.005)
    return predicate()


@pytest.fixture
def no_thread_leaks() -> Iterator[None]:
    """Fail if a test leaves a pypline thread running (abandoned ones must finish by themselves)."""
    before = set(pypline_threads())
    yield
    gc.collect()
    assert wait_until(lambda: not (set(pypline_threads()) - before)), (
        f"leaked threads: {sorted(t.name for t in set(pypline_threads()) - before)}"
    )


def all_tasks_done(loop_tasks: Any) -> bool:
    return all(t.done() for t in loop_tasks)


@pytest.fixture(name="arun")
def arun_fixture() -> Callable[..., Any]:
    """``arun(coro, timeout=20)``: run a coroutine in a fresh loop with a deadline."""
    return arun
