"""Which configured agents did not answer lately: so a run does not wait for them again.

How it is used (by the ``zmq`` backend, once per run)::

    open():  due = [ep for ep in agents if memo.due(ep)]     <- only these are waited for
             wait up to connect_timeout for the due ones
             ep answered      -> memo.answered(ep)           (forgotten: waited for again)
             ep did not answer -> memo.silent(ep)            (next try after a backoff)
    mid-run: every agent is still asked in the background; one that answers joins the run
             and memo.answered(ep) forgets it at once

An agent that did not answer makes the next runs fall back at once instead of each
paying ``connect_timeout``; after ``FIRST_BACKOFF_S``, then twice as long each time up to
``MAX_BACKOFF_S``, one run waits for it again. The memo is per process; the clock is
injected so the policy is tested without sleeping.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["Reachability", "FIRST_BACKOFF_S", "MAX_BACKOFF_S"]

# How long after a silent handshake the next run waits for that agent again. 30 s: a restart
# or a short partition is usually over by then, and a run every few seconds pays the wait
# at most once per 30 s instead of every time.
FIRST_BACKOFF_S = 30.0
# The longest pause between waits for an agent that stays silent: a host down for hours
# costs one connect_timeout per 5 minutes (runs in between still ask it in the background).
MAX_BACKOFF_S = 300.0


@dataclass
class _Silence:
    times: int
    next_try: float


class Reachability:
    """``due`` / ``silent`` / ``answered`` per endpoint, on an injected monotonic clock."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock: Callable[[], float] = clock
        self._silent: dict[str, _Silence] = {}

    def due(self, endpoint: str) -> bool:
        """Should this run wait for ``endpoint``'s handshake? (Yes unless it is backing off.)"""
        s = self._silent.get(endpoint)
        return s is None or self.clock() >= s.next_try

    def silent(self, endpoint: str) -> float:
        """``endpoint`` did not answer within connect_timeout; returns seconds until the next wait."""
        s = self._silent.get(endpoint)
        times = 1 if s is None else s.times + 1
        delay: float = min(FIRST_BACKOFF_S * 2.0 ** (times - 1), MAX_BACKOFF_S)
        self._silent[endpoint] = _Silence(times, self.clock() + delay)
        return delay

    def answered(self, endpoint: str) -> None:
        """``endpoint`` completed a handshake: forget its silence."""
        self._silent.pop(endpoint, None)

    def retry_in(self, endpoint: str) -> float | None:
        """Seconds until ``endpoint`` is waited for again (None: it is not backing off)."""
        s = self._silent.get(endpoint)
        return None if s is None else max(0.0, s.next_try - self.clock())

    def forget(self) -> None:
        """Wait for every agent again on the next run (e.g. after restarting them)."""
        self._silent.clear()
