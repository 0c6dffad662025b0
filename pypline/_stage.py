"""Stages: ``work_pool`` and ``mix_pool`` turn functions into validated, frozen ``StageSpec``s.

Everything about a stage is checked here, at decoration time, so a bad argument
fails where it is written and never halfway through a run. The ``Stage`` object
stays callable as the original function (``await process_data(3) == 6``).
"""

from __future__ import annotations

import enum
import functools
import inspect
import numbers
from dataclasses import dataclass
from typing import (
    TYPE_CHECKING,
    Any,
    AsyncIterator,
    Awaitable,
    Callable,
    Generic,
    Iterator,
    Protocol,
    Sequence,
    TypeVar,
    Union,
    overload,
)

if TYPE_CHECKING:
    from ._pipeline import Flow

__all__ = ["FnKind", "WorkerFn", "StageSpec", "Stage", "work_pool", "mix_pool", "as_stage"]

In = TypeVar("In", contravariant=True)
Out = TypeVar("Out", covariant=True)
A = TypeVar("A")
B = TypeVar("B")
U = TypeVar("U")
M = TypeVar("M")

RetryOn = Union[type[BaseException], tuple[type[BaseException], ...], Callable[[BaseException], bool]]
"""What ``retry_on`` takes: exception classes, or a predicate deciding from the exception."""

M_co = TypeVar("M_co", covariant=True)


class FnKind(enum.Enum):
    """How a worker function is called."""

    ASYNC = "async"  # async def: awaited
    SYNC = "sync"  # def: run in a thread (or a process)
    GEN = "gen"  # def with yield: flat map, iterated in a thread (or a process)
    ASYNC_GEN = "async_gen"  # async def with yield: flat map, iterated on a loop

    @property
    def is_generator(self) -> bool:
        return self in (FnKind.GEN, FnKind.ASYNC_GEN)


def fn_kind(fn: Callable[..., Any]) -> FnKind:
    """Classify ``fn`` (functions, methods, partials and callable objects)."""
    target: Any = fn
    while isinstance(target, functools.partial):
        target = target.func
    if not (inspect.isfunction(target) or inspect.ismethod(target)) and callable(target):
        call = getattr(type(target), "__call__", None)
        if call is not None and (inspect.isfunction(call) or inspect.ismethod(call)):
            target = call
    if inspect.isasyncgenfunction(target):
        return FnKind.ASYNC_GEN
    if inspect.iscoroutinefunction(target):
        return FnKind.ASYNC
    if inspect.isgeneratorfunction(target):
        return FnKind.GEN
    return FnKind.SYNC


@dataclass(frozen=True)
class WorkerFn:
    """One worker: the function it runs and how to call it."""

    fn: Callable[..., Any]
    kind: FnKind


@dataclass(frozen=True)
class StageSpec:
    """Everything an executor needs to run one stage's workers. Frozen and validated.

    ``workers[i]`` is worker ``i``'s function: ``num_workers`` copies of one function
    for a ``work_pool``, the factory's list for a ``mix_pool``.
    """

    name: str
    workers: tuple[WorkerFn, ...]
    buffer: int
    retries: int
    multi_proc: bool
    fork_merge: Callable[[list[Any]], Any] | None
    timeout: float | None
    backoff: float
    retry_on: tuple[type[BaseException], ...] | Callable[[BaseException], bool]
    rate: tuple[int, float] | None = None  # at most rate[0] attempts started per rate[1] seconds
    batch: int | None = None  # the function takes lists of up to this many items (_batch.py)
    batch_wait: float = 0.05  # seconds a partial batch waits for more items
    pause_after: int | None = None  # retryable failures in a row that pause dispatch (_breaker.py)
    max_backoff: float = 60.0  # longest wait between attempts, and longest pause
    setup: Callable[[], Any] | None = None  # run once per worker before its first item: the worker's state
    teardown: Callable[[Any], Any] | None = None  # run with that state when the worker stops

    @property
    def num_workers(self) -> int:
        return len(self.workers)

    @property
    def is_fork(self) -> bool:
        return self.fork_merge is not None


class Stage(Generic[In, Out]):
    """A pipeline stage taking items of type ``In`` and giving outputs of type ``Out``.

    Calling it calls the decorated function (or a mix_pool's factory). For type checkers,
    ``work_pool`` reads ``In`` and ``Out`` from the function: ``async def f(x: int) -> str``
    and ``def f(x: int) -> str`` make a ``Stage[int, str]``; a generator (sync or async)
    yielding ``str`` makes a ``Stage[int, str]`` too, as each yielded value is an output.
    """

    def __init__(self, spec: StageSpec, call: Callable[..., Any]) -> None:
        self.spec = spec
        self._call = call
        self.__wrapped__ = call
        functools.update_wrapper(self, call, updated=())

    @overload
    def __call__(self, item: In, /, *args: Any, **kwargs: Any) -> Any: ...
    @overload
    def __call__(self) -> Any: ...  # a mix_pool's factory
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._call(*args, **kwargs)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def buffer(self) -> int:
        return self.spec.buffer

    @property
    def retries(self) -> int:
        return self.spec.retries

    @property
    def num_workers(self) -> int:
        return self.spec.num_workers

    @property
    def multi_proc(self) -> bool:
        return self.spec.multi_proc

    @property
    def fork_merge(self) -> Callable[[list[Any]], Any] | None:
        return self.spec.fork_merge

    @property
    def timeout(self) -> float | None:
        return self.spec.timeout

    @property
    def backoff(self) -> float:
        return self.spec.backoff

    @property
    def retry_on(self) -> tuple[type[BaseException], ...] | Callable[[BaseException], bool]:
        return self.spec.retry_on

    @property
    def rate(self) -> tuple[int, float] | None:
        return self.spec.rate

    @property
    def batch(self) -> int | None:
        return self.spec.batch

    @property
    def workers(self) -> tuple[Callable[..., Any], ...]:
        """Each worker's function (``num_workers`` copies of one for a ``work_pool``)."""
        return tuple(w.fn for w in self.spec.workers)

    @overload
    def __rshift__(self, other: Stage[Out, U] | Flow[Out, U]) -> Flow[In, U]: ...
    @overload
    def __rshift__(self, other: Callable[[Out], Awaitable[U]]) -> Flow[In, U]: ...
    @overload
    def __rshift__(self, other: Callable[[Out], AsyncIterator[U]]) -> Flow[In, U]: ...
    @overload
    def __rshift__(self, other: Callable[[Out], Iterator[U]]) -> Flow[In, U]: ...
    @overload
    def __rshift__(self, other: Callable[[Out], U]) -> Flow[In, U]: ...
    def __rshift__(self, other: Any) -> Flow[In, Any]:
        from ._pipeline import Flow

        flow: Flow[In, Any] = Flow((self,)) >> other
        return flow

    def __repr__(self) -> str:
        s = self.spec
        mode = "fork" if s.is_fork else "pool"
        return f"<Stage {s.name!r} workers={s.num_workers} buffer={s.buffer} {mode}{' multi_proc' if s.multi_proc else ''}>"


# --- validation -------------------------------------------------------------------------


def _check_int(param: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{param} must be an int, got {value!r} ({type(value).__name__})")
    if value < minimum:
        raise ValueError(f"{param} must be >= {minimum}, got {value!r}")
    return value


def _check_number(param: str, value: Any, *, allow_none: bool, positive: bool) -> float | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{param} must be a number{' or None' if allow_none else ''}, got {value!r}")
    v = float(value)
    if v != v or v in (float("inf"), float("-inf")):
        raise ValueError(f"{param} must be finite, got {value!r}")
    if positive and v <= 0:
        raise ValueError(f"{param} must be > 0, got {value!r}")
    if not positive and v < 0:
        raise ValueError(f"{param} must be >= 0, got {value!r}")
    return v


def _check_retry_on(value: Any) -> tuple[type[BaseException], ...] | Callable[[BaseException], bool]:
    if callable(value) and not isinstance(value, type):
        predicate: Callable[[BaseException], bool] = value  # retry_on=lambda e: e.code in (429, 503)
        return predicate
    classes = value if isinstance(value, tuple) else (value,)
    if not classes:
        raise ValueError("retry_on must name at least one exception class, got ()")
    for c in classes:
        if not (isinstance(c, type) and issubclass(c, BaseException)):
            raise TypeError(
                f"retry_on must be an exception class, a tuple of them, or a predicate taking the exception, got {value!r}"
            )
    return classes


def _check_rate(value: Any) -> tuple[int, float] | None:
    if value is None:
        return None
    if not (isinstance(value, tuple) and len(value) == 2):
        raise TypeError(f"rate must be (attempts, seconds), e.g. rate=(100, 1.0), got {value!r}")
    n = _check_int("rate[0] (attempts)", value[0], 1)
    per = _check_number("rate[1] (seconds)", value[1], allow_none=False, positive=True)
    assert per is not None
    return (n, per)


def _check_common(
    *,
    buffer: Any,
    retries: Any,
    multi_proc: Any,
    fork_merge: Any,
    timeout: Any,
    backoff: Any,
    retry_on: Any,
    name: Any,
    rate: Any = None,
    pause_after: Any = None,
    max_backoff: Any = 60.0,
    setup: Any = None,
    teardown: Any = None,
) -> dict[str, Any]:
    if not isinstance(multi_proc, bool):
        raise TypeError(f"multi_proc must be a bool, got {multi_proc!r}")
    if fork_merge is not None and not callable(fork_merge):
        raise TypeError(f"fork_merge must be callable or None, got {fork_merge!r}")
    if name is not None and not isinstance(name, str):
        raise TypeError(f"name must be a str or None, got {name!r}")
    if name is not None and not name:
        raise ValueError("name must not be empty, got ''")
    for what, hook in (("setup", setup), ("teardown", teardown)):
        if hook is not None and not callable(hook):
            raise TypeError(f"{what} must be callable or None, got {hook!r}")
        if hook is not None and fn_kind(hook).is_generator:
            raise TypeError(f"{what} must be a function, not a generator: {_callable_name(hook)!r}")
    return {
        "setup": setup,
        "teardown": teardown,
        "buffer": _check_int("buffer", buffer, 1),
        "retries": _check_int("retries", retries, 1),
        "multi_proc": multi_proc,
        "fork_merge": fork_merge,
        "timeout": _check_number("timeout", timeout, allow_none=True, positive=True),
        "backoff": _check_number("backoff", backoff, allow_none=False, positive=False),
        "retry_on": _check_retry_on(retry_on),
        "rate": _check_rate(rate),
        "pause_after": None if pause_after is None else _check_int("pause_after", pause_after, 1),
        "max_backoff": _check_number("max_backoff", max_backoff, allow_none=False, positive=True),
    }


def _callable_name(fn: Any) -> str:
    name = getattr(fn, "__name__", None) or type(fn).__name__
    return str(name)


# --- decorators ---------------------------------------------------------------------------


class StageDecorator(Protocol):
    """What ``@work_pool(...)`` (without ``fork_merge``) returns: it types the stage from the function."""

    @overload
    def __call__(self, fn: Callable[[A], Awaitable[B]], /) -> Stage[A, B]: ...
    @overload
    def __call__(self, fn: Callable[[A], AsyncIterator[B]], /) -> Stage[A, B]: ...
    @overload
    def __call__(self, fn: Callable[[A], Iterator[B]], /) -> Stage[A, B]: ...
    @overload
    def __call__(self, fn: Callable[[A], B], /) -> Stage[A, B]: ...


class ForkDecorator(Protocol[M_co]):
    """What ``@work_pool(fork_merge=f)`` returns: the stage's output is what ``f`` returns."""

    def __call__(self, fn: Callable[[A], Any], /) -> Stage[A, M_co]: ...


@overload
def work_pool(fn: Callable[[A], Awaitable[B]], /) -> Stage[A, B]: ...
@overload
def work_pool(fn: Callable[[A], AsyncIterator[B]], /) -> Stage[A, B]: ...
@overload
def work_pool(fn: Callable[[A], Iterator[B]], /) -> Stage[A, B]: ...
@overload
def work_pool(fn: Callable[[A], B], /) -> Stage[A, B]: ...
@overload
def work_pool(
    fn: None = None,
    /,
    *,
    buffer: int = 16,
    retries: int = 1,
    num_workers: int = 1,
    multi_proc: bool = False,
    fork_merge: None = None,
    timeout: float | None = None,
    backoff: float = 0.0,
    retry_on: RetryOn = (Exception,),
    name: str | None = None,
    rate: tuple[int, float] | None = None,
    pause_after: int | None = None,
    max_backoff: float = 60.0,
    batch: int | None = None,
    batch_wait: float = 0.05,
    setup: Callable[[], Any] | None = None,
    teardown: Callable[[Any], Any] | None = None,
) -> StageDecorator: ...
@overload
def work_pool(
    fn: None = None,
    /,
    *,
    buffer: int = 16,
    retries: int = 1,
    num_workers: int = 1,
    multi_proc: bool = False,
    fork_merge: Callable[[list[Any]], M],
    timeout: float | None = None,
    backoff: float = 0.0,
    retry_on: RetryOn = (Exception,),
    name: str | None = None,
    rate: tuple[int, float] | None = None,
    pause_after: int | None = None,
    max_backoff: float = 60.0,
    batch: int | None = None,
    batch_wait: float = 0.05,
    setup: Callable[[], Any] | None = None,
    teardown: Callable[[Any], Any] | None = None,
) -> ForkDecorator[M]: ...


def work_pool(
    fn: Callable[..., Any] | None = None,
    /,
    *,
    buffer: int = 16,
    retries: int = 1,
    num_workers: int = 1,
    multi_proc: bool = False,
    fork_merge: Callable[[list[Any]], Any] | None = None,
    timeout: float | None = None,
    backoff: float = 0.0,
    retry_on: RetryOn = (Exception,),
    name: str | None = None,
    rate: tuple[int, float] | None = None,
    pause_after: int | None = None,
    max_backoff: float = 60.0,
    batch: int | None = None,
    batch_wait: float = 0.05,
    setup: Callable[[], Any] | None = None,
    teardown: Callable[[Any], Any] | None = None,
) -> Stage[Any, Any] | Callable[[Callable[..., Any]], Stage[Any, Any]]:
    """Make a stage of ``num_workers`` identical workers running ``fn``.

    Pool mode: each item goes to one free worker. With ``fork_merge=f``: each item
    goes to every worker and ``f([result_0, ..., result_n-1])`` is the output.
    ``buffer`` is the stage's input queue capacity, ``retries`` the TOTAL number of
    attempts per item, ``timeout`` bounds each attempt, ``backoff`` sleeps
    ``backoff * 2**(attempt-1)`` seconds between attempts, and only exceptions
    matching ``retry_on`` are retried: exception classes, or a predicate taking the exception
    (``retry_on=lambda e: getattr(e, "code", None) in (429, 503)`` retries those HTTP
    statuses and not a 404). ``rate=(n, seconds)`` starts at most ``n`` attempts (retries
    included) in any ``seconds``-long window, for the stage as a whole, on every backend.
    ``batch=n`` makes a batch stage: ``fn`` takes a list of up to ``n`` items (fewer once
    ``batch_wait`` seconds passed without more) and returns a list of one output per item;
    each item keeps its own Result and attempts (a failing call is split in halves until
    only the items that fail alone fail). Its buffer is at least ``n x num_workers``.
    ``setup`` (no arguments, plain or ``async def``) runs once in each worker before its
    first item; what it returns is that worker's ``current_worker().state`` (a database
    connection, a loaded model, an HTTP client). ``teardown(state)`` runs when the worker
    stops: at the end of the run, on ``fail_fast``, on cancellation. A ``setup`` that raises
    fails the stage at start (``run()`` returns a ``PipelineError``).
    Works bare (``@work_pool``) or called.
    """
    opts = _check_common(
        buffer=buffer,
        retries=retries,
        multi_proc=multi_proc,
        fork_merge=fork_merge,
        timeout=timeout,
        backoff=backoff,
        retry_on=retry_on,
        name=name,
        rate=rate,
        pause_after=pause_after,
        max_backoff=max_backoff,
        setup=setup,
        teardown=teardown,
    )
    workers = _check_int("num_workers", num_workers, 1)
    if batch is not None:
        _check_int("batch", batch, 1)
        wait = _check_number("batch_wait", batch_wait, allow_none=False, positive=True)
        if fork_merge is not None:
            raise ValueError("batch= and fork_merge= do not go together: a batch stage runs in pool mode")
        opts.update(batch=batch, batch_wait=wait, buffer=max(opts["buffer"], batch * workers))

    def decorate(f: Callable[..., Any]) -> Stage[Any, Any]:
        if isinstance(f, Stage):
            raise TypeError(f"work_pool() was given a Stage ({f.name!r}); decorate the plain function instead")
        if not callable(f):
            raise TypeError(f"work_pool() decorates a callable, got {f!r}")
        wf = WorkerFn(f, fn_kind(f))
        if batch is not None and wf.kind.is_generator:
            raise ValueError(f"batch= needs a function returning a list of outputs; {_callable_name(f)!r} is a generator")
        spec = StageSpec(name=name or _callable_name(f), workers=(wf,) * workers, **opts)
        return Stage(spec, f)

    if fn is None:
        return decorate
    return decorate(fn)


@overload
def mix_pool(factory: Callable[[], Sequence[Callable[..., Any]]], /) -> Stage[Any, Any]: ...
@overload
def mix_pool(
    factory: None = None,
    /,
    *,
    buffer: int = 16,
    retries: int = 1,
    multi_proc: bool = False,
    fork_merge: None = None,
    timeout: float | None = None,
    backoff: float = 0.0,
    retry_on: RetryOn = (Exception,),
    name: str | None = None,
    rate: tuple[int, float] | None = None,
    pause_after: int | None = None,
    max_backoff: float = 60.0,
    setup: Callable[[], Any] | None = None,
    teardown: Callable[[Any], Any] | None = None,
) -> Callable[[Callable[[], Sequence[Callable[..., Any]]]], Stage[Any, Any]]: ...
@overload
def mix_pool(
    factory: None = None,
    /,
    *,
    buffer: int = 16,
    retries: int = 1,
    multi_proc: bool = False,
    fork_merge: Callable[[list[Any]], M],
    timeout: float | None = None,
    backoff: float = 0.0,
    retry_on: RetryOn = (Exception,),
    name: str | None = None,
    rate: tuple[int, float] | None = None,
    pause_after: int | None = None,
    max_backoff: float = 60.0,
    setup: Callable[[], Any] | None = None,
    teardown: Callable[[Any], Any] | None = None,
) -> Callable[[Callable[[], Sequence[Callable[..., Any]]]], Stage[Any, M]]: ...


def mix_pool(
    factory: Callable[[], Sequence[Callable[..., Any]]] | None = None,
    /,
    *,
    buffer: int = 16,
    retries: int = 1,
    multi_proc: bool = False,
    fork_merge: Callable[[list[Any]], Any] | None = None,
    timeout: float | None = None,
    backoff: float = 0.0,
    retry_on: RetryOn = (Exception,),
    name: str | None = None,
    rate: tuple[int, float] | None = None,
    pause_after: int | None = None,
    max_backoff: float = 60.0,
    setup: Callable[[], Any] | None = None,
    teardown: Callable[[Any], Any] | None = None,
) -> Stage[Any, Any] | Callable[[Callable[[], Sequence[Callable[..., Any]]]], Stage[Any, Any]]:
    """Make a stage whose workers are different functions.

    Decorates a zero-argument factory returning a non-empty list of callables; each
    callable is one worker. The factory is called once, now, and its list checked.
    Other parameters as for ``work_pool``.
    """
    opts = _check_common(
        buffer=buffer,
        retries=retries,
        multi_proc=multi_proc,
        fork_merge=fork_merge,
        timeout=timeout,
        backoff=backoff,
        retry_on=retry_on,
        name=name,
        rate=rate,
        pause_after=pause_after,
        max_backoff=max_backoff,
        setup=setup,
        teardown=teardown,
    )

    def decorate(f: Callable[[], Sequence[Callable[..., Any]]]) -> Stage[Any, Any]:
        if not callable(f):
            raise TypeError(f"mix_pool() decorates a zero-argument factory, got {f!r}")
        fns = f()
        if isinstance(fns, (str, bytes)) or not isinstance(fns, (list, tuple)):
            raise TypeError(f"mix_pool factory {_callable_name(f)!r} must return a list of callables, got {fns!r}")
        if not fns:
            raise ValueError(f"mix_pool factory {_callable_name(f)!r} returned an empty list; give it at least one worker")
        for i, w in enumerate(fns):
            if not callable(w):
                raise TypeError(f"mix_pool factory {_callable_name(f)!r}: worker {i} is not callable: {w!r}")
        workers = tuple(WorkerFn(w, fn_kind(w)) for w in fns)
        if opts["fork_merge"] is None and len({w.kind.is_generator for w in workers}) > 1:
            kinds = ", ".join(f"{i}: {'generator' if w.kind.is_generator else 'function'}" for i, w in enumerate(workers))
            raise ValueError(
                f"mix_pool factory {_callable_name(f)!r} mixes generator and plain workers ({kinds}); "
                "in pool mode an item's output must not depend on which worker takes it"
            )
        spec = StageSpec(name=name or _callable_name(f), workers=workers, **opts)
        return Stage(spec, f)

    if factory is None:
        return decorate
    return decorate(factory)


def as_stage(x: Any) -> Stage[Any, Any]:
    """A ``Stage`` as is; a plain callable wrapped with ``work_pool`` defaults."""
    if isinstance(x, Stage):
        return x
    if callable(x):
        stage: Stage[Any, Any] = work_pool(x)
        return stage
    raise TypeError(f"a pipeline stage must be a Stage, a callable or a Flow, got {x!r} ({type(x).__name__})")
