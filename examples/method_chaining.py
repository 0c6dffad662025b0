"""Composing pipelines: ``.stage()`` chaining, the ``>>`` operator and reusable Flows.

Shows that both spellings build the same pipeline, that composing returns a NEW
pipeline (the original is unchanged), that ``stage_a >> stage_b`` without a
source gives a reusable ``Flow``, and that a plain function can be used as a
stage without decorating it.
"""

import asyncio

from pypline import Pipeline, work_pool
from pypline.util import unwrap

data_source = [
    "  Hello   World ",
    "Pipelines  are   just functions",
    "ASYNC first, threads when needed",
    "",
    "  bounded buffers keep memory flat  ",
]


@work_pool(num_workers=2)
async def preprocessing_stage(text: str) -> str:
    """Normalise whitespace and case."""
    await asyncio.sleep(0.001)  # stands in for a real await (I/O, a service call...)
    return " ".join(text.lower().split())


@work_pool(num_workers=2)
def analysis_stage(text: str) -> dict:
    """A plain ``def`` stage: it runs in a worker thread, never on the event loop."""
    words = text.split()
    return {"text": text, "words": len(words), "longest": max(words, key=len, default="")}


@work_pool
async def output_stage(record: dict) -> str:
    return f"{record['words']:>2} words | longest={record['longest']!r:14} | {record['text']!r}"


def shout(line: str) -> str:
    """Not decorated: ``>>`` wraps it with the ``work_pool`` defaults."""
    return line.upper()


async def main() -> None:
    # Method chaining
    chained = (Pipeline(data_source)
        .stage(preprocessing_stage)
        .stage(analysis_stage)
        .stage(output_stage))

    # Operator overloading
    operator = Pipeline(data_source) >> preprocessing_stage >> analysis_stage >> output_stage

    chained_out = unwrap(await chained.run())
    operator_out = unwrap(await operator.run())
    for line in chained_out:
        print(line)
    print(f"chained and operator forms agree: {chained_out == operator_out}")

    # Composition never mutates: `base` still has no stages and returns its source.
    base = Pipeline(data_source)
    _longer = base >> preprocessing_stage
    print(f"base pipeline unchanged: {unwrap(await base.run()) == data_source}")

    # A Flow is a reusable chain of stages without a source.
    clean_and_analyse = preprocessing_stage >> analysis_stage
    other = Pipeline(["One  TWO three", "four"]) >> clean_and_analyse >> output_stage >> shout
    for line in unwrap(await other.run()):
        print(line)

    # Stages stay unit-testable: calling one calls the original function.
    assert await preprocessing_stage("  A   b ") == "a b"
    assert analysis_stage("a bb")["longest"] == "bb"
    print("stages called directly behave like the plain functions")


if __name__ == "__main__":
    asyncio.run(main())
