"""Errors as values: per-item failures, graceful degradation, fail_fast, ``match``.

``run()`` does not raise when items fail. It returns ``Err(PipelineError)``,
which lists every failed item (``ItemFailure``: source index, stage, the item
the stage received, the last error, attempts used) and still carries every
output that succeeded. ``fail_fast=True`` stops at the first failure instead.
"""

import asyncio
from collections import Counter

from pypline import ItemFailure, Pipeline, PipelineError, work_pool
from pypline.util import Err, Ok, Result, is_err, is_ok, unwrap, unwrap_err

data = range(20)
calls: Counter = Counter()


def should_fail(item: int) -> bool:
    """7 and 14 are bad input (always fail); 3 and 11 fail only on their first try."""
    calls[item] += 1
    if item in (7, 14):
        return True
    return item in (3, 11) and calls[item] == 1


@work_pool(retries=3)
async def might_fail(item):
    if should_fail(item):
        raise ValueError(f"Processing failed for {item}")
    return item * 2


# Only ConnectionError is worth retrying here: a ValueError fails at once.
@work_pool(retries=3, retry_on=(ConnectionError,))
async def parse_record(item):
    if item % 5 == 4:
        raise ValueError(f"malformed record {item}")
    return item


@work_pool(num_workers=2)
async def slow_step(item):
    await asyncio.sleep(0.02)
    if item == 5:
        raise RuntimeError("disk full")
    return item


def describe(result: Result) -> str:
    match result:
        case Ok(outputs):
            return f"Ok: {len(outputs)} outputs"
        case Err(PipelineError(failures=failures, outputs=outputs)):
            return f"Err: {len(failures)} failed, {len(outputs)} succeeded"
        case _:
            return "unexpected"


def print_failure(failure: ItemFailure) -> None:
    print(f"  index={failure.index} stage={failure.stage} item={failure.item} "
          f"attempts={failure.attempts} error={failure.error!r}")


def broken_source():
    yield 1
    yield 2
    raise OSError("disk read failed")


async def main() -> None:
    # Pipeline automatically handles errors and retries
    pipeline = Pipeline(data) >> might_fail
    result = await pipeline.run()

    if is_err(result):
        print(f"Pipeline failed: {unwrap_err(result)}")  # str() summarises the failures
    else:
        print("Pipeline completed successfully")

    error = unwrap_err(result)
    print(f"failures ({len(error.failures)}):")
    for failure in error.failures:
        print_failure(failure)
    print(f"outputs kept despite failures: {len(error.outputs)} -> {error.outputs[:6]}...")
    print(f"items 3 and 11 recovered on a retry: {6 in error.outputs and 22 in error.outputs}")

    try:
        unwrap(result)
    except Exception as exc:  # unwrap() on an Err raises
        print(f"unwrap(Err) raised {type(exc).__name__}")

    ok = await (Pipeline([1, 2, 5]) >> might_fail).run()
    print(f"clean input: is_ok={is_ok(ok)} value={unwrap(ok)}")

    print(f"match on a clean run  -> {describe(ok)}")
    print(f"match on a failed run -> {describe(result)}")

    strict = unwrap_err(await (Pipeline(range(10)) >> parse_record).run())
    print("retry_on=(ConnectionError,): a ValueError is not retried")
    for failure in strict.failures:
        print_failure(failure)

    degraded = await (Pipeline(range(40)) >> slow_step).run()
    fast = await (Pipeline(range(40)) >> slow_step).run(fail_fast=True)
    print(f"graceful degradation: {describe(degraded)}")
    print(f"fail_fast=True:       {describe(fast)} (the rest was cancelled)")

    source_err = unwrap_err(await (Pipeline(broken_source()) >> might_fail).run())
    print(f"source failed: cause={source_err.cause!r}; outputs kept: {source_err.outputs}")


if __name__ == "__main__":
    asyncio.run(main())
