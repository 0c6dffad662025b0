"""The key directory both sides read, and the client's side of CURVE.

``pypline-agent keygen DIR`` writes two CURVE key pairs::

    DIR/agent.key, DIR/agent.key_secret      the agent's pair
    DIR/client.key, DIR/client.key_secret    a client's pair

A client (``configure(keys=DIR)``) authenticates with ``client.key_secret`` and pins the
agent with ``agent.key``: it talks only to an agent holding the matching secret key.
The agent's side (which client keys it admits) is ``pypline.worker_agent.security``.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "AGENT_NAME",
    "CLIENT_NAME",
    "ClientKeys",
    "KeyError_",
    "keygen",
    "load_client_keys",
    "load_key_file",
    "load_key_pair",
]

AGENT_NAME = "agent"
CLIENT_NAME = "client"


class KeyError_(Exception):
    """The key directory is missing, incomplete or unreadable (the user's set-up is at fault)."""


@dataclass(frozen=True)
class ClientKeys:
    public: bytes
    secret: bytes
    server: bytes  # the agent's public key (z85)


def load_key_file(path: Path, want_secret: bool) -> tuple[bytes, bytes | None]:
    """(public, secret or None) from a key file ``keygen`` wrote."""
    import zmq.auth

    if not path.is_file():
        raise KeyError_(f"key file {path} does not exist (create keys with: pypline-agent keygen {path.parent})")
    try:
        public, secret = zmq.auth.load_certificate(str(path))
    except Exception as exc:
        raise KeyError_(f"key file {path} could not be read: {exc}") from exc
    if not public or (want_secret and not secret):
        raise KeyError_(f"key file {path} has no {'secret' if want_secret else 'public'} key")
    return public, secret


def load_key_pair(directory: str | os.PathLike[str], name: str) -> tuple[Path, bytes, bytes]:
    """(the directory, public key, secret key) of the pair ``name`` in ``directory``."""
    d = Path(directory)
    if not d.is_dir():
        raise KeyError_(f"key directory {d} does not exist (create it with: pypline-agent keygen {d})")
    public, secret = load_key_file(d / f"{name}.key_secret", True)
    assert secret is not None
    return d, public, secret


def load_client_keys(directory: str | os.PathLike[str]) -> ClientKeys:
    """The client's key pair and the agent's public key from ``directory``."""
    d, public, secret = load_key_pair(directory, CLIENT_NAME)
    server, _ = load_key_file(d / f"{AGENT_NAME}.key", False)
    return ClientKeys(public, secret, server)


def keygen(directory: str | os.PathLike[str], *, force: bool = False) -> list[Path]:
    """Write an agent and a client key pair into ``directory`` (mode 0700, secrets 0600)."""
    import zmq.auth

    d = Path(directory)
    names = [f"{n}.{ext}" for n in (AGENT_NAME, CLIENT_NAME) for ext in ("key", "key_secret")]
    existing = [n for n in names if (d / n).exists()]
    if existing and not force:
        raise KeyError_(f"{d} already holds {', '.join(existing)}; use --force to replace them")
    d.mkdir(parents=True, exist_ok=True)
    os.chmod(d, stat.S_IRWXU)
    written: list[Path] = []
    for name in (AGENT_NAME, CLIENT_NAME):
        for ext in ("key", "key_secret"):
            p = d / f"{name}.{ext}"
            if p.exists():
                p.unlink()
        pub, sec = zmq.auth.create_certificates(str(d), name)
        os.chmod(sec, stat.S_IRUSR | stat.S_IWUSR)
        written += [Path(pub), Path(sec)]
    return written
