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


class HTTPError(Exception):
    def __init__(self, code: int) -> None:
        super().__init__(f"HTTP {code}")
        self.code = code


def test_retry_on_a_predicate_decides_from_the_exception() -> None:
    policy = RetryPolicy(3, lambda e: getattr(e, "code", None) in (429, 503))
    assert policy.decide(1, HTTPError(503)) == 0.0
    assert policy.decide(1, HTTPError(404)) is None
    assert policy.decide(3, HTTPError(503)) is None  # attempts used up


def test_a_predicate_that_raises_means_do_not_retry(caplog: pytest.LogCaptureFixture) -> None:
    policy = RetryPolicy(3, lambda e: e.missing_attribute)  # type: ignore[attr-defined]
    assert policy.decide(1, ValueError("x")) is None
    assert "retry_on predicate" in caplog.text


def test_retry_on_predicate_in_a_run() -> None:
    from pypline import Pipeline, work_pool

    calls: dict[int, int] = {}

    @work_pool(retries=3, retry_on=lambda e: isinstance(e, HTTPError) and e.code == 503)
    def fetch(code: int) -> int:
        calls[code] = calls.get(code, 0) + 1
        raise HTTPError(code)

    error = (Pipeline([503, 404]) >> fetch).run_sync().unwrap_err()
    assert {f.item: f.attempts for f in error.failures} == {503: 3, 404: 1}
    assert calls == {503: 3, 404: 1}


def test_retry_on_rejects_what_is_neither_classes_nor_a_predicate() -> None:
    from pypline import work_pool

    with pytest.raises(TypeError, match="or a predicate taking the exception"):
        work_pool(retry_on=(ValueError, 3))  # type: ignore[arg-type]
