"""What a type checker knows about a pipeline: checked by mypy (strict) in CI, never run.

Each ``assert_type`` states the type a user's code gets; each ``# type: ignore[...]``
marks a line that must be a type error (with ``warn_unused_ignores`` on, a line that
stops being an error fails the check).
"""

from __future__ import annotations

from typing import Any, AsyncIterator, Callable, Iterator

from typing_extensions import assert_type

from pypline import Flow, ItemFailure, Pipeline, PipelineError, Stage, mix_pool, work_pool
from pypline.util import Err, Ok, Result, is_ok, unwrap


@work_pool
async def parse(line: str) -> int:
    return int(line)


@work_pool(num_workers=4, retries=3)
def double(x: int) -> float:
    return x * 2.0


@work_pool
def words(text: str) -> Iterator[str]:
    yield from text.split()


@work_pool(buffer=4)
async def chars(word: str) -> AsyncIterator[str]:
    for c in word:
        yield c


def count(outs: list[Any]) -> int:
    return len(outs)


@work_pool(fork_merge=count, num_workers=3)
def vote(x: float) -> float:
    return x


@mix_pool
def mixed() -> list[Callable[[int], int]]:
    return [abs, abs]


def connect() -> dict[str, int]:
    return {}


async def disconnect(state: dict[str, int]) -> None:
    state.clear()


@work_pool(num_workers=2, setup=connect, teardown=disconnect)
def with_setup(x: int) -> int:
    return x


assert_type(with_setup, Stage[int, int])


assert_type(parse, Stage[str, int])
assert_type(double, Stage[int, float])
assert_type(words, Stage[str, str])
assert_type(chars, Stage[str, str])
assert_type(vote, Stage[float, int])  # the output is what fork_merge returns
assert_type(mixed, Stage[Any, Any])  # a mix_pool's workers may differ: its types are left open

# Chaining carries the item type from the source through every stage.
p = Pipeline(["1", "2"]) >> parse >> double
assert_type(p, Pipeline[float])
assert_type(Pipeline(["a b"]) >> words >> chars, Pipeline[str])
assert_type(Pipeline([1.0]) >> vote, Pipeline[int])


async def gen() -> AsyncIterator[bytes]:
    yield b"x"


assert_type(Pipeline(gen()) >> len, Pipeline[int])  # a plain callable is a stage too

# A reusable flow is typed end to end.
flow = parse >> double
assert_type(flow, Flow[str, float])
assert_type(Pipeline(["3"]) >> flow, Pipeline[float])

# Mis-chained stages are errors: double takes an int, the source gives str.
Pipeline(["1"]) >> double  # type: ignore[arg-type]
Pipeline(["1"]) >> parse >> words  # type: ignore[arg-type]
parse >> words  # type: ignore[operator]


async def results() -> None:
    run = await p.run()
    assert_type(run, Result[list[float], PipelineError])
    match run:
        case Ok(values):
            assert_type(values, list[float])
        case Err(error):
            assert_type(error, PipelineError)
    async for r in p.stream():
        assert_type(r, Result[float, ItemFailure])
        if is_ok(r):
            assert_type(r.value, float)
        else:
            assert_type(r.error, ItemFailure)
    for item in p.iter():
        assert_type(item, Result[float, ItemFailure])
        assert_type(unwrap(item), float)
    assert_type(p.run_sync(), Result[list[float], PipelineError])
    assert_type(await p.run(collect=False), Result[int, PipelineError])  # counts, keeps nothing
    assert_type(p.run_sync(collect=False), Result[int, PipelineError])
