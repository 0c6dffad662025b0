"""Batch stages: the function takes lists, every item keeps its own Result and attempts."""

from __future__ import annotations

import time
from typing import Any

import pytest

from pypline import Pipeline, work_pool
from pypline.util import Ok, unwrap

pytestmark = pytest.mark.timeout(60)


def test_outputs_in_order_and_calls_of_at_most_batch_items() -> None:
    calls: list[int] = []

    @work_pool(batch=10, num_workers=2)
    def square(xs: list[int]) -> list[int]:
        calls.append(len(xs))
        return [x * x for x in xs]

    assert (Pipeline(range(95)) >> square).run_sync() == Ok([x * x for x in range(95)])
    assert max(calls) == 10 and sum(calls) == 95 and len(calls) < 20


def test_only_the_items_that_fail_alone_fail_each_with_its_own_attempts() -> None:
    calls: list[list[int]] = []

    @work_pool(batch=16, retries=3)
    def check(xs: list[int]) -> list[int]:
        calls.append(list(xs))
        if any(x % 10 == 7 for x in xs):
            raise ValueError("a 7")
        return xs

    error = (Pipeline(range(40)) >> check).run_sync().unwrap_err()
    assert sorted(error.outputs) == [x for x in range(40) if x % 10 != 7]
    assert [(f.item, f.attempts, type(f.error)) for f in error.failures] == [
        (7, 3, ValueError), (17, 3, ValueError), (27, 3, ValueError), (37, 3, ValueError)
    ]
    # Each bad item was called alone exactly `retries` times; good items were never retried alone
    # once their half succeeded.
    alone = [c[0] for c in calls if len(c) == 1]
    assert sorted(x for x in alone if x % 10 == 7) == sorted([7, 17, 27, 37] * 3)


def test_a_partial_batch_goes_after_batch_wait() -> None:
    calls: list[int] = []

    @work_pool(batch=64, batch_wait=0.02)
    def ident(xs: list[int]) -> list[int]:
        calls.append(len(xs))
        return xs

    start = time.monotonic()
    assert unwrap((Pipeline(range(5)) >> ident).run_sync()) == [0, 1, 2, 3, 4]
    assert calls == [5] and time.monotonic() - start < 5


def test_a_list_of_the_wrong_length_fails_that_calls_items() -> None:
    @work_pool(batch=4)
    def short(xs: list[int]) -> list[int]:
        return xs[:-1]

    error = (Pipeline(range(4)) >> short).run_sync().unwrap_err()
    assert len(error.failures) == 4
    assert "must return a list of one output per item: 4 items, 3 outputs" in str(error.failures[0].error)


def test_the_memory_bound_holds() -> None:
    """Items read from the source and not yet delivered never exceed the bound (the buffer is
    raised to batch x num_workers so that batches can fill)."""
    pulled = [0]
    delivered = [0]
    worst = [0]

    def source() -> Any:
        for i in range(300):
            pulled[0] += 1
            worst[0] = max(worst[0], pulled[0] - delivered[0])
            yield i

    stage = work_pool(lambda xs: (time.sleep(0.001), xs)[1], batch=8, num_workers=2)
    assert stage.spec.buffer == 16

    async def main() -> None:
        async for r in (Pipeline(source()) >> stage).stream():
            delivered[0] += 1
            unwrap(r)

    import asyncio

    asyncio.run(main())
    assert delivered[0] == 300
    assert worst[0] <= (16 + 2) + 1 + 1


def test_batch_is_checked() -> None:
    with pytest.raises(ValueError, match="batch must be >= 1"):
        work_pool(batch=0)
    with pytest.raises(ValueError, match="do not go together"):
        work_pool(batch=4, fork_merge=sum)

    def gen(xs: list[int]) -> Any:
        yield from xs

    with pytest.raises(ValueError, match="is a generator"):
        work_pool(batch=4)(gen)
