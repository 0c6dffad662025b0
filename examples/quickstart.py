"""Quick start: the first example of the original README, run end to end.

Doubles the numbers 0..99 in a stage of four async workers, checks them in a
second stage, then inspects the ``Result`` that ``Pipeline.run()`` returns:
``Ok(outputs)`` when every item succeeded, ``Err(PipelineError)`` otherwise.

Run it with:  python examples/quickstart.py
"""

import asyncio

from pypline import Pipeline, work_pool
from pypline.util import is_ok, unwrap, unwrap_err


@work_pool(buffer=10, retries=3, num_workers=4)
async def process_data(item):
    # Your processing logic here
    return item * 2


@work_pool(buffer=5, retries=1)
async def validate_data(item):
    if item < 0:
        raise ValueError("Negative values not allowed")
    return item


async def main() -> None:
    # Create and run pipeline
    pipeline = Pipeline(range(100)) >> process_data >> validate_data
    result = await pipeline.run()

    if is_ok(result):
        outputs = unwrap(result)  # a list, in source order (ordered=True is the default)
        print(f"processed {len(outputs)} items")
        print(f"first outputs: {outputs[:5]}")
        print(f"last output: {outputs[-1]}")
    else:
        error = unwrap_err(result)  # a PipelineError listing every failed item
        print(f"pipeline failed: {error}")
        raise SystemExit(1)

    # A decorated function is still an ordinary function when called directly.
    print(f"process_data(21) called directly: {await process_data(21)}")


if __name__ == "__main__":
    asyncio.run(main())
