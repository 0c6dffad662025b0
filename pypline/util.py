"""Result types: a value that is either ``Ok(value)`` or ``Err(error)``.

``pipeline.run()`` returns a ``Result`` instead of raising, and ``pipeline.stream()``
yields one ``Result`` per output, so one bad item degrades a run instead of killing it.

Both classes are frozen, generic and pattern-matchable::

    match await pipeline.run():
        case Ok(outputs):
            ...
        case Err(error):
            ...

The helpers exist both as functions (``is_ok(r)``) and as methods (``r.is_ok()``).
``unwrap(Err(exc))`` raises ``exc`` itself, so the original traceback is kept.

Cancellation is never captured into a ``Result``: pypline lets ``CancelledError``
propagate, and so should code that builds Results with these helpers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, NoReturn, TypeVar, Union, final

__all__ = ["Result", "Ok", "Err", "is_ok", "is_err", "unwrap", "unwrap_err", "unwrap_or"]

T = TypeVar("T")
U = TypeVar("U")
E = TypeVar("E", bound=BaseException)
T_co = TypeVar("T_co", covariant=True)
E_co = TypeVar("E_co", bound=BaseException, covariant=True)


@final
@dataclass(frozen=True)
class Ok(Generic[T_co]):
    """A successful result holding ``value``."""

    value: T_co

    __match_args__ = ("value",)

    def is_ok(self) -> bool:
        return True

    def is_err(self) -> bool:
        return False

    def unwrap(self) -> T_co:
        return self.value

    def unwrap_err(self) -> NoReturn:
        raise ValueError(f"unwrap_err() called on {self!r}")

    def unwrap_or(self, default: object) -> T_co:
        return self.value


@final
@dataclass(frozen=True)
class Err(Generic[E_co]):
    """A failed result holding the exception ``error``."""

    error: E_co

    __match_args__ = ("error",)

    def __post_init__(self) -> None:
        if not isinstance(self.error, BaseException):
            raise TypeError(f"Err() takes an exception, got {self.error!r}")

    def is_ok(self) -> bool:
        return False

    def is_err(self) -> bool:
        return True

    def unwrap(self) -> NoReturn:
        """Raise the held exception (the caller asked for a value that is not there)."""
        raise self.error

    def unwrap_err(self) -> E_co:
        return self.error

    def unwrap_or(self, default: U) -> U:
        return default


if TYPE_CHECKING:
    from typing_extensions import TypeAlias, TypeIs
    from typing_extensions import TypeVar as DefaultTypeVar

    _E = DefaultTypeVar("_E", bound=BaseException, default=BaseException)
    Result: TypeAlias = Union[Ok[T], Err[_E]]
else:

    class _ResultAlias:
        """``Result[T]`` and ``Result[T, E]`` at run time: ``Union[Ok[T], Err[E]]``.

        A stand-in because a type alias whose error parameter has a default cannot be
        subscripted at run time on every supported Python; type checkers see the alias.
        """

        def __getitem__(self, params: Any) -> Any:
            params = params if isinstance(params, tuple) else (params,)
            if len(params) not in (1, 2):
                raise TypeError(f"Result takes [T] or [T, E], got {len(params)} parameters")
            error = params[1] if len(params) == 2 else BaseException
            return Union[Ok[params[0]], Err[error]]

        def __repr__(self) -> str:
            return "pypline.Result"

    Result = _ResultAlias()
"""``Ok[T] | Err[E]``: what a run or a streamed item turned out to be.

``Result[T]`` leaves the error type open (``BaseException``); ``pipeline.run()`` returns
``Result[list[T], PipelineError]`` and ``stream()`` / ``iter()`` yield ``Result[T, ItemFailure]``.
"""


def is_ok(result: Result[T, BaseException]) -> TypeIs[Ok[T]]:
    """True for ``Ok`` (a type checker then knows ``result`` is an ``Ok``)."""
    return isinstance(result, Ok)


def is_err(result: Result[Any, E]) -> TypeIs[Err[E]]:
    """True for ``Err`` (a type checker then knows ``result`` is an ``Err``)."""
    return isinstance(result, Err)


def unwrap(result: Result[T, BaseException]) -> T:
    """The value of an ``Ok``; raises the exception held by an ``Err``."""
    if isinstance(result, Ok):
        return result.value
    if isinstance(result, Err):
        raise result.error
    raise TypeError(f"unwrap() takes an Ok or Err, got {result!r}")


def unwrap_err(result: Result[Any, E]) -> E:
    """The exception of an ``Err``; ``ValueError`` for an ``Ok``."""
    if isinstance(result, Err):
        error: E = result.error
        return error
    if isinstance(result, Ok):
        raise ValueError(f"unwrap_err() called on {result!r}")
    raise TypeError(f"unwrap_err() takes an Ok or Err, got {result!r}")


def unwrap_or(result: Result[T, BaseException], default: U) -> T | U:
    """The value of an ``Ok``, else ``default``."""
    if isinstance(result, Ok):
        return result.value
    if isinstance(result, Err):
        return default
    raise TypeError(f"unwrap_or() takes an Ok or Err, got {result!r}")
