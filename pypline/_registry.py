"""Backend names -> ``Backend`` classes, resolved lazily.

Built-in backends are named here as import strings, so ``import pypline`` imports
no backend (no zmq, no multiprocessing). Third-party backends register under the
entry-point group ``pypline.backends``; the entry point names a ``Backend``
subclass constructible with no arguments.
"""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .executor import Backend

__all__ = ["known_backends", "load_backend"]

ENTRY_POINT_GROUP = "pypline.backends"

_BUILTIN = {
    "asyncio": "pypline.backends.local:AsyncioBackend",
    "process": "pypline.backends.process:ProcessBackend",
    "zmq": "pypline.backends.remote:ZmqBackend",
}


def _entry_points() -> dict[str, str]:
    return {ep.name: ep.value for ep in entry_points(group=ENTRY_POINT_GROUP)}


def known_backends() -> list[str]:
    """Every backend name that can be asked for (built-in and registered)."""
    return sorted(set(_BUILTIN) | set(_entry_points()))


def load_backend(name: str) -> type[Backend]:
    """The ``Backend`` class registered as ``name``.

    Raises ``ValueError`` for an unknown name (listing the known ones) and
    ``ImportError`` when the backend is known but its module cannot be imported.
    """
    from .executor import Backend

    target = _BUILTIN.get(name) or _entry_points().get(name)
    if target is None:
        raise ValueError(
            f"unknown pypline backend {name!r}; known backends: {', '.join(known_backends())}. "
            f"Third-party backends register under the entry-point group {ENTRY_POINT_GROUP!r} "
            "(install the package that provides it, e.g. pip install 'pypline-async[dask]')."
        )
    module_name, _, attr = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ImportError(f"pypline backend {name!r} could not be imported from {module_name!r}: {exc}") from exc
    cls = getattr(module, attr, None)
    if not (isinstance(cls, type) and issubclass(cls, Backend)):
        raise TypeError(f"pypline backend {name!r} ({target}) is not a pypline.executor.Backend subclass")
    return cls
