"""``pypline.util``: the ``Result = Ok[T] | Err`` type and its helpers.

``run()`` and ``stream()`` report through these values, so they must be frozen
(a result cannot be edited after the fact), pattern-matchable, and the helpers
must behave identically as functions and as methods.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any

import pytest

from pypline.util import Err, Ok, Result, is_err, is_ok, unwrap, unwrap_err, unwrap_or


def describe(r: Result[Any]) -> str:
    """What a user's ``match`` over a Result would do."""
    match r:
        case Ok(v):
            return f"ok:{v!r}"
        case Err(e):
            return f"err:{type(e).__name__}:{e}"
    return "neither"  # pragma: no cover - only reached if matching is broken


# --- shape ------------------------------------------------------------------------------


@pytest.mark.parametrize("r", [Ok(1), Err(ValueError("x"))], ids=["Ok", "Err"])
def test_results_are_frozen(r: Result[Any]) -> None:
    """Assigning to (or adding) an attribute of Ok/Err raises: a result cannot be edited."""
    field = "value" if isinstance(r, Ok) else "error"
    before = getattr(r, field)
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(r, field, 2)
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.extra = 1  # type: ignore[union-attr]
    assert getattr(r, field) is before


def test_result_types_are_subscriptable() -> None:
    """Ok[T], Err[E] and Result[T] are generic aliases; Result[T] is Ok[T] | Err[BaseException]
    and Result[T, E] keeps the error type."""
    assert typing.get_origin(Ok[int]) is Ok
    assert typing.get_origin(Err[KeyError]) is Err
    args = typing.get_args(Result[int])
    assert set(args) == {Ok[int], Err[BaseException]}
    assert set(typing.get_args(Result[int, KeyError])) == {Ok[int], Err[KeyError]}
    with pytest.raises(TypeError, match=r"Result takes \[T\] or \[T, E\], got 3"):
        Result[int, KeyError, str]  # type: ignore[misc]


def test_generic_alias_instantiation() -> None:
    """Ok[int](3) and Err[KeyError](exc) build ordinary Ok / Err values (no slots/frozen clash)."""
    ok = Ok[int](3)
    assert isinstance(ok, Ok) and ok.value == 3 and ok == Ok(3)
    exc = KeyError("k")
    err = Err[KeyError](exc)
    assert isinstance(err, Err) and err.error is exc


def test_pattern_matching_binds_value_and_error() -> None:
    """`case Ok(v)` binds the value and `case Err(e)` binds the exception."""
    assert describe(Ok(5)) == "ok:5"
    assert describe(Ok(None)) == "ok:None"
    assert describe(Err(ValueError("boom"))) == "err:ValueError:boom"
    # An Ok holding an exception is still an Ok.
    assert describe(Ok(KeyError("k"))) == "ok:KeyError('k')"


def test_keyword_pattern_matching() -> None:
    """`case Ok(value=v)` and `case Err(error=e)` match on the field names too."""
    match Ok(7):
        case Ok(value=v):
            assert v == 7
        case _:
            pytest.fail("Ok(7) did not match Ok(value=v)")
    match Err(OSError("io")):
        case Err(error=OSError() as e):
            assert str(e) == "io"
        case _:
            pytest.fail("Err(OSError) did not match Err(error=OSError())")


# --- helpers ------------------------------------------------------------------------------


def test_is_ok_is_err_functions_and_methods() -> None:
    """is_ok/is_err give the same answer as functions and as methods."""
    ok, err = Ok(0), Err(RuntimeError())
    assert is_ok(ok) is True and ok.is_ok() is True
    assert is_err(ok) is False and ok.is_err() is False
    assert is_ok(err) is False and err.is_ok() is False
    assert is_err(err) is True and err.is_err() is True


def test_unwrap_ok_returns_the_value_itself() -> None:
    """unwrap(Ok(v)) and Ok(v).unwrap() return v (the same object, not a copy)."""
    payload = [1, 2, 3]
    assert unwrap(Ok(payload)) is payload
    assert Ok(payload).unwrap() is payload


def test_unwrap_err_function_raises_the_very_exception() -> None:
    """unwrap(Err(exc)) raises exc itself (same object), not a wrapper or a copy."""
    exc = ValueError("original")
    with pytest.raises(ValueError) as info:
        unwrap(Err(exc))
    assert info.value is exc


def test_unwrap_err_method_raises_the_very_exception() -> None:
    """Err(exc).unwrap() raises exc itself (same object), even for a custom exception class."""

    class Custom(Exception):
        pass

    exc = Custom("mine")
    with pytest.raises(Custom) as info:
        Err(exc).unwrap()
    assert info.value is exc


def test_unwrap_err_returns_the_exception() -> None:
    """unwrap_err(Err(e)) and Err(e).unwrap_err() return e itself."""
    exc = KeyError("k")
    assert unwrap_err(Err(exc)) is exc
    assert Err(exc).unwrap_err() is exc


def test_unwrap_err_of_ok_raises_value_error() -> None:
    """unwrap_err on an Ok raises ValueError, as a function and as a method."""
    with pytest.raises(ValueError):
        unwrap_err(Ok(1))
    with pytest.raises(ValueError):
        Ok(1).unwrap_err()


def test_unwrap_or() -> None:
    """unwrap_or gives the Ok's value, or the default for an Err (function and method)."""
    sentinel = object()
    assert unwrap_or(Ok(3), sentinel) == 3
    assert Ok(3).unwrap_or(sentinel) == 3
    assert unwrap_or(Err(ValueError()), sentinel) is sentinel
    assert Err(ValueError()).unwrap_or(sentinel) is sentinel
    # A falsy Ok value is still the value, not the default.
    assert unwrap_or(Ok(0), sentinel) == 0
    assert unwrap_or(Ok(None), sentinel) is None


# --- construction, equality ---------------------------------------------------------------


@pytest.mark.parametrize("bad", ["not an exception", 42, None, ValueError], ids=["str", "int", "None", "class"])
def test_err_of_a_non_exception_is_type_error(bad: Any) -> None:
    """Err() takes an exception instance; anything else (including an exception class) is TypeError."""
    with pytest.raises(TypeError):
        Err(bad)


def test_err_accepts_base_exceptions() -> None:
    """Err() accepts any BaseException instance, not only Exception subclasses."""
    exc = KeyboardInterrupt()
    assert Err(exc).error is exc


def test_ok_equality_and_hash() -> None:
    """Ok compares and hashes by value, so equal Oks dedupe in sets and work as dict keys."""
    assert Ok(1) == Ok(1)
    assert hash(Ok(1)) == hash(Ok(1))
    assert Ok(1) != Ok(2)
    assert Ok("a") == Ok("a") and hash(Ok("a")) == hash(Ok("a"))
    assert len({Ok(1), Ok(1), Ok(2)}) == 2
    assert {Ok((1, 2)): "x"}[Ok((1, 2))] == "x"
    # A Result is not the bare value, and Ok is never equal to Err.
    assert Ok(1) != 1
    exc = ValueError("v")
    assert Ok(exc) != Err(exc)


def test_ok_of_unhashable_value_is_unhashable() -> None:
    """hash(Ok([..])) raises TypeError like the list would (no silent identity hash)."""
    assert Ok([1]) == Ok([1])
    with pytest.raises(TypeError):
        hash(Ok([1]))


def test_err_equality_follows_the_exception() -> None:
    """Err values are equal when they hold the same exception object."""
    exc = ValueError("v")
    assert Err(exc) == Err(exc)
    assert hash(Err(exc)) == hash(Err(exc))
    assert Err(exc) != Err(ValueError("v"))  # exceptions compare by identity
