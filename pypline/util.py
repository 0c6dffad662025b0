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
from typing import Any, Generic, TypeVar, Union, final

__all__ = ["Result", "Ok", "Err", "is_ok", "is_err", "unwrap", "unwrap_err", "unwrap_or"]

T = TypeVar("T")
U = TypeVar("U")
E = TypeVar("E", bound=BaseException)


@final
@dataclass(frozen=True)
class Ok(Generic[T]):
    """A successful result holding ``value``."""

    value: T

    __match_args__ = ("value",)

    def is_ok(self) -> bool:
        return True

    def is_err(self) -> bool:
        return False

    def unwrap(self) -> T:
        return self.value

    def unwrap_err(self) -> BaseException:
        raise ValueError(f"unwrap_err() called on {self!r}")

    def unwrap_or(self, default: object) -> T:
        return self.value


@final
@dataclass(frozen=True)
class Err(Generic[E]):
    """A failed result holding the exception ``error``."""

    error: E

    __match_args__ = ("error",)

    def __post_init__(self) -> None:
        if not isinstance(self.error, BaseException):
            raise TypeError(f"Err() takes an exception, got {self.error!r}")

    def is_ok(self) -> bool:
        return False

    def is_err(self) -> bool:
        return True

    def unwrap(self) -> Any:
        """Raise the held exception (the caller asked for a value that is not there)."""
        raise self.error

    def unwrap_err(self) -> E:
        return self.error

    def unwrap_or(self, default: U) -> U:
        return default


Result = Union[Ok[T], Err[Any]]
"""``Ok[T] | Err``: what a run or a streamed item turned out to be."""


def is_ok(result: Result[T]) -> bool:
    """True for ``Ok``."""
    return isinstance(result, Ok)


def is_err(result: Result[T]) -> bool:
    """True for ``Err``."""
    return isinstance(result, Err)


def unwrap(result: Result[T]) -> T:
    """The value of an ``Ok``; raises the exception held by an ``Err``."""
    if isinstance(result, Ok):
        return result.value
    if isinstance(result, Err):
        raise result.error
    raise TypeError(f"unwrap() takes an Ok or Err, got {result!r}")


def unwrap_err(result: Result[T]) -> BaseException:
    """The exception of an ``Err``; ``ValueError`` for an ``Ok``."""
    if isinstance(result, Err):
        error: BaseException = result.error
        return error
    if isinstance(result, Ok):
        raise ValueError(f"unwrap_err() called on {result!r}")
    raise TypeError(f"unwrap_err() takes an Ok or Err, got {result!r}")


def unwrap_or(result: Result[T], default: U) -> T | U:
    """The value of an ``Ok``, else ``default``."""
    if isinstance(result, Ok):
        return result.value
    if isinstance(result, Err):
        return default
    raise TypeError(f"unwrap_or() takes an Ok or Err, got {result!r}")
