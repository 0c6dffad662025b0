"""The retry policy as a pure decision: the schedule is checked without waiting.

``RetryPolicy.decide(n, exc)`` after attempt n failed: None (the item fails now) or the
seconds before attempt n+1. The random source for the jitter is injected.
"""

from __future__ import annotations

import pytest

from pypline._retry import JITTER, RetryPolicy


def test_retries_is_the_total_number_of_attempts() -> None:
    """retries=3: attempts 1 and 2 are followed by another, attempt 3 is the last."""
    policy = RetryPolicy(3, (ValueError,))
    assert [policy.decide(n, ValueError()) for n in (1, 2, 3)] == [0.0, 0.0, None]
    assert RetryPolicy(1, (Exception,)).decide(1, ValueError()) is None


def test_only_matching_exceptions_are_retried() -> None:
    """An exception outside retry_on fails at once, whatever attempts remain."""
    policy = RetryPolicy(5, (TimeoutError, ConnectionError))
    assert policy.decide(1, TimeoutError()) == 0.0
    assert policy.decide(1, ConnectionResetError()) == 0.0  # a subclass matches
    assert policy.decide(1, ValueError()) is None
    assert policy.decide(1, KeyboardInterrupt()) is None  # not an Exception at all


@pytest.mark.parametrize("draw", [0.0, 0.5, 1.0])
def test_backoff_doubles_with_bounded_jitter(draw: float) -> None:
    """backoff=b: b * 2**(n-1) before attempt n+1, plus draw * JITTER of that (never less)."""
    policy = RetryPolicy(5, (Exception,), backoff=0.2, random=lambda: draw)
    delays = [policy.decide(n, RuntimeError()) for n in (1, 2, 3, 4)]
    nominal = [0.2, 0.4, 0.8, 1.6]
    assert delays == pytest.approx([d * (1 + JITTER * draw) for d in nominal])
    assert all(d is not None and d >= n for d, n in zip(delays, nominal))
    assert policy.decide(5, RuntimeError()) is None
