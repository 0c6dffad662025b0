"""Process-wide settings: ``configure()`` and the environment variables it overrides.

Settings are one frozen record swapped atomically; a run reads them once, when it
starts. ``PYPLINE_AGENTS`` / ``PYPLINE_KEYS`` apply only where ``configure()`` has
not set ``agents`` / ``keys``.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any

__all__ = ["Settings", "configure", "current_settings", "effective_agents", "effective_keys", "normalize_endpoint"]

_FALLBACKS = ("local", "error")


@dataclass(frozen=True)
class Settings:
    """Every option of ``configure()``. ``agents``/``keys`` are ``None`` when not set.

    ``configure(previous)`` restores a snapshot exactly, unset options included.
    """

    agents: tuple[str, ...] | None = None
    keys: str | None = None
    backend: Any = None  # a backend name or a pypline.executor.Backend, for multi_proc stages
    fallback: str = "local"
    connect_timeout: float = 5.0
    heartbeat_timeout: float = 3.0
    max_lost: int = 3



_settings = Settings()


def _positive(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {value!r}")
    if not value > 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")
    return float(value)


def configure(
    restore: Settings | None = None,
    /,
    *,
    agents: list[str] | tuple[str, ...] | None = None,
    keys: str | os.PathLike[str] | None = None,
    backend: Any = None,
    fallback: str | None = None,
    connect_timeout: float | None = None,
    heartbeat_timeout: float | None = None,
    max_lost: int | None = None,
) -> Settings:
    """Set process-wide options; only those given change. Returns the previous settings.

    ``configure()`` with no arguments resets every option to its default;
    ``configure(previous)`` puts back a snapshot that an earlier call returned.
    ``agents=[]`` means local execution even if ``PYPLINE_AGENTS`` is set.
    ``backend`` (a name such as ``"dask"``, or a ``Backend`` instance carrying its
    own options, e.g. an address) runs every ``multi_proc`` stage there, as
    ``run(executor=...)`` does for one run; ``run(executor=...)`` wins over it,
    and it wins over ``agents``.
    """
    global _settings
    previous = _settings
    if restore is not None:
        if not isinstance(restore, Settings):
            raise TypeError(f"configure() takes a Settings snapshot or keyword options, got {restore!r}")
        _settings = restore
        return previous
    changes: dict[str, Any] = {}
    if agents is not None:
        if isinstance(agents, str) or not isinstance(agents, (list, tuple)):
            raise TypeError(f"agents must be a list of endpoints, got {agents!r}")
        for a in agents:
            if not isinstance(a, str) or not a:
                raise TypeError(f"agents must be endpoint strings like 'tcp://127.0.0.1:5555', got {a!r}")
        changes["agents"] = tuple(normalize_endpoint(a) for a in agents)
    if backend is not None:
        from .executor import Backend

        if not isinstance(backend, (str, Backend)):
            raise TypeError(f"backend must be a backend name or a pypline.executor.Backend, got {backend!r}")
        changes["backend"] = backend
    if keys is not None:
        if not isinstance(keys, (str, os.PathLike)):
            raise TypeError(f"keys must be a directory path, got {keys!r}")
        changes["keys"] = os.fspath(keys)
    if fallback is not None:
        if fallback not in _FALLBACKS:
            raise ValueError(f"fallback must be one of {_FALLBACKS}, got {fallback!r}")
        changes["fallback"] = fallback
    if connect_timeout is not None:
        changes["connect_timeout"] = _positive("connect_timeout", connect_timeout)
    if heartbeat_timeout is not None:
        changes["heartbeat_timeout"] = _positive("heartbeat_timeout", heartbeat_timeout)
    if max_lost is not None:
        if isinstance(max_lost, bool) or not isinstance(max_lost, int):
            raise TypeError(f"max_lost must be an int, got {max_lost!r}")
        if max_lost < 0:
            raise ValueError(f"max_lost must be >= 0, got {max_lost!r}")
        changes["max_lost"] = max_lost
    _settings = dataclasses.replace(previous, **changes) if changes else Settings()
    return previous


def current_settings() -> Settings:
    """The settings in force now (environment variables not applied)."""
    return _settings


def normalize_endpoint(text: str) -> str:
    """An agent endpoint as ZeroMQ wants it: ``tcp://HOST:PORT`` (``HOST:PORT`` gets the
    ``tcp://``), ``ipc://PATH`` or ``inproc://NAME``. Anything else is a ``ValueError``
    naming what was given and the form expected."""
    value = text.strip()
    scheme, sep, rest = value.partition("://")
    if sep and scheme in ("ipc", "inproc") and rest:
        return value
    if not sep:
        scheme, rest = "tcp", value
    host, colon, port = rest.rpartition(":")
    if scheme == "tcp" and colon and host and port.isdigit() and 0 < int(port) < 65536:
        return f"tcp://{rest}"
    raise ValueError(f"agent endpoint {text!r} is not of the form tcp://HOST:PORT (or HOST:PORT, ipc://PATH)")


def effective_agents(settings: Settings) -> tuple[str, ...]:
    """Agents from ``configure()``, else from ``PYPLINE_AGENTS`` (read now; each checked)."""
    if settings.agents is not None:
        return settings.agents
    raw = os.environ.get("PYPLINE_AGENTS", "")
    try:
        return tuple(normalize_endpoint(a) for a in raw.split(",") if a.strip())
    except ValueError as exc:
        raise ValueError(f"PYPLINE_AGENTS: {exc}") from None


def effective_keys(settings: Settings) -> str | None:
    """The key directory from ``configure()``, else from ``PYPLINE_KEYS`` (read now)."""
    if settings.keys is not None:
        return settings.keys
    return os.environ.get("PYPLINE_KEYS") or None
