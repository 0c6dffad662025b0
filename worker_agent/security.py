"""CURVE keys and who may connect: the agent's and the client's side of security.

Unpickling network input is code execution, so an agent only lets authenticated
clients talk to it (SPEC §2.8)::

    keygen DIR ─► DIR/agent.key, DIR/agent.key_secret      the agent's pair
                  DIR/client.key, DIR/client.key_secret    the client's pair (copy DIR anywhere)

    serve --keys DIR:  ROUTER.curve_server = True with agent.key_secret;
                       a ZAP handler (zmq.auth ThreadAuthenticator, its own thread) admits
                       exactly the public keys of DIR/*.key except agent.key.
                       A peer without CURVE, or with another key, never completes the
                       ZMTP handshake: no frame it sends reaches the agent's code.
    client --keys DIR: DEALER.curve_serverkey = agent.key (pins the agent),
                       its own pair from client.key_secret (mutual authentication).

Without keys the agent binds only loopback (or ``ipc://``) addresses, unless
``--insecure`` is given, which logs a loud warning.
"""

from __future__ import annotations

import ipaddress
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "ClientKeys",
    "KeyError_",
    "ServerKeys",
    "is_local_endpoint",
    "keygen",
    "load_client_keys",
    "load_server_keys",
]

AGENT_NAME = "agent"
CLIENT_NAME = "client"


class KeyError_(Exception):
    """The key directory is missing, incomplete or unreadable (the user's set-up is at fault)."""


@dataclass(frozen=True)
class ServerKeys:
    public: bytes
    secret: bytes
    clients: frozenset[bytes]  # authorised client public keys (z85)


@dataclass(frozen=True)
class ClientKeys:
    public: bytes
    secret: bytes
    server: bytes  # the agent's public key (z85)


def is_local_endpoint(endpoint: str) -> bool:
    """True for ``ipc://``/``inproc://`` and for TCP on a loopback address."""
    scheme, _, rest = endpoint.partition("://")
    if scheme in ("ipc", "inproc"):
        return True
    if scheme != "tcp":
        return False
    host = rest.rsplit(":", 1)[0] if ":" in rest else rest
    host = host.strip("[]")
    if ";" in host:  # tcp://source;dest form: the bind address is the last part
        host = host.rsplit(";", 1)[-1]
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # "*", an interface or host name: not provably loopback
        return False


def _load(path: Path, want_secret: bool) -> tuple[bytes, bytes | None]:
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


def load_server_keys(directory: str | os.PathLike[str]) -> ServerKeys:
    """The agent's key pair and every authorised client public key in ``directory``."""
    d = Path(directory)
    if not d.is_dir():
        raise KeyError_(f"key directory {d} does not exist (create it with: pypline-agent keygen {d})")
    public, secret = _load(d / f"{AGENT_NAME}.key_secret", True)
    assert secret is not None
    clients = set()
    for p in sorted(d.glob("*.key")):
        if p.name == f"{AGENT_NAME}.key":
            continue
        key, _ = _load(p, False)
        clients.add(key)
    if not clients:
        raise KeyError_(f"no client public key (*.key other than {AGENT_NAME}.key) in {d}; nobody could connect")
    return ServerKeys(public, secret, frozenset(clients))


def load_client_keys(directory: str | os.PathLike[str]) -> ClientKeys:
    """The client's key pair and the agent's public key from ``directory``."""
    d = Path(directory)
    if not d.is_dir():
        raise KeyError_(f"key directory {d} does not exist (create it with: pypline-agent keygen {d})")
    public, secret = _load(d / f"{CLIENT_NAME}.key_secret", True)
    assert secret is not None
    server, _ = _load(d / f"{AGENT_NAME}.key", False)
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


def client_key_provider(keys: ServerKeys) -> Any:
    """A ZAP credentials provider admitting exactly ``keys.clients``."""

    class _Provider:
        def callback(self, domain: str, key: bytes) -> bool:
            return key in keys.clients

    return _Provider()
