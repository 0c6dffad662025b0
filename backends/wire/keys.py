"""CURVE key files, and the client's side of CURVE: its own key pair and the agents it trusts.

Each host has its own key pair; no secret key is ever copied to another host::

    agent host   KEYDIR/agent.key, agent.key_secret     the agent's own pair
                 KEYDIR/clients/NAME.key                the public keys of the clients it admits
    client host  KEYDIR/client.key, client.key_secret   the client's own pair
                 KEYDIR/known_agents                    "ENDPOINT PUBLIC-KEY" per line: the agents
                                                        it trusts, each pinned to its key

``pypline-agent keys agent|client DIR`` makes a pair, ``keys allow`` / ``keys revoke`` add
or remove a client on an agent, ``keys trust`` pins an agent on a client. A client talks
only to an agent holding the secret key that matches the pinned public key: a changed
agent key is refused (the handshake fails, and the client says so). A client key
directory that has an ``agent.key`` and no ``known_agents`` (what ``pypline-agent keygen``
writes for a single machine) pins every agent to that one key.

The agent's side (which client keys it admits) is ``pypline.worker_agent.security``.
"""

from __future__ import annotations

import os
import shutil
import stat
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "AGENT_NAME",
    "CLIENT_NAME",
    "CLIENTS_DIR",
    "KNOWN_AGENTS",
    "ClientKeys",
    "KeyError_",
    "allow_client",
    "handshake_failure",
    "keygen",
    "keygen_pair",
    "load_client_keys",
    "load_key_file",
    "load_key_pair",
    "revoke_client",
    "trust_agent",
]

AGENT_NAME = "agent"
CLIENT_NAME = "client"
CLIENTS_DIR = "clients"
KNOWN_AGENTS = "known_agents"


class KeyError_(Exception):
    """The key directory is missing, incomplete or unreadable (the user's set-up is at fault)."""


@dataclass(frozen=True)
class ClientKeys:
    """A client's pair and the agent public keys it trusts (by endpoint; ``any_agent`` for all)."""

    public: bytes
    secret: bytes
    pins: dict[str, bytes] = field(default_factory=dict)
    any_agent: bytes | None = None
    directory: str = ""

    def server_key(self, endpoint: str) -> bytes:
        """The pinned public key of the agent at ``endpoint``; ``KeyError_`` naming the fix if none."""
        from pypline.lowlevel import normalize_endpoint

        key = self.pins.get(normalize_endpoint(endpoint), self.any_agent)
        if key is None:
            raise KeyError_(
                f"no key is pinned for agent {endpoint} in {Path(self.directory) / KNOWN_AGENTS}: copy the agent's "
                f"public key (agent.key) here and run: pypline-agent keys trust {self.directory} {endpoint} agent.key"
            )
        return key


def load_key_file(path: Path, want_secret: bool) -> tuple[bytes, bytes | None]:
    """(public, secret or None) from a key file ``keygen`` wrote."""
    import zmq.auth

    if not path.is_file():
        raise KeyError_(f"key file {path} does not exist (create keys with: pypline-agent keys --help)")
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
        raise KeyError_(f"key directory {d} does not exist (create it with: pypline-agent keys {name} {d})")
    public, secret = load_key_file(d / f"{name}.key_secret", True)
    assert secret is not None
    return d, public, secret


def _read_pins(path: Path) -> dict[str, bytes]:
    from pypline.lowlevel import normalize_endpoint

    pins: dict[str, bytes] = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        if len(parts) != 2 or len(parts[1]) != 40:
            raise KeyError_(f"{path}, line {n}: expected 'ENDPOINT PUBLIC-KEY' (a 40-character Z85 key), got {line!r}")
        try:
            endpoint = normalize_endpoint(parts[0])
        except ValueError as exc:
            raise KeyError_(f"{path}, line {n}: {exc}") from None
        pins[endpoint] = parts[1].encode()
    return pins


def load_client_keys(directory: str | os.PathLike[str]) -> ClientKeys:
    """The client's key pair and the agents it trusts, from ``directory``."""
    d, public, secret = load_key_pair(directory, CLIENT_NAME)
    known = d / KNOWN_AGENTS
    pins = _read_pins(known) if known.is_file() else {}
    any_agent = None
    if not known.is_file():
        if not (d / f"{AGENT_NAME}.key").is_file():
            raise KeyError_(
                f"{d} trusts no agent: pin each one with: pypline-agent keys trust {d} ENDPOINT AGENT-KEY-FILE"
            )
        any_agent, _ = load_key_file(d / f"{AGENT_NAME}.key", False)
    return ClientKeys(public, secret, pins, any_agent, str(d))


def _private_dir(d: Path) -> None:
    d.mkdir(parents=True, exist_ok=True)
    os.chmod(d, stat.S_IRWXU)


def keygen_pair(directory: str | os.PathLike[str], name: str, *, force: bool = False) -> list[Path]:
    """Write the key pair ``name`` (``agent`` or ``client``) into ``directory`` (0700; secret 0600)."""
    import zmq.auth

    d = Path(directory)
    files = [d / f"{name}.key", d / f"{name}.key_secret"]
    existing = [p.name for p in files if p.exists()]
    if existing and not force:
        raise KeyError_(f"{d} already holds {', '.join(existing)}; use --force to replace them")
    _private_dir(d)
    for p in files:
        if p.exists():
            p.unlink()
    pub, sec = zmq.auth.create_certificates(str(d), name)
    os.chmod(sec, stat.S_IRUSR | stat.S_IWUSR)
    if name == AGENT_NAME:
        _private_dir(d / CLIENTS_DIR)
    return [Path(pub), Path(sec)]


def keygen(directory: str | os.PathLike[str], *, force: bool = False) -> list[Path]:
    """Both pairs in one directory, the client admitted: for an agent and its clients on ONE host
    (tests, a workstation). Across hosts, give each host its own pair (``keygen_pair``)."""
    written = keygen_pair(directory, AGENT_NAME, force=force) + keygen_pair(directory, CLIENT_NAME, force=force)
    allow_client(directory, Path(directory) / f"{CLIENT_NAME}.key", "local")
    return written


def allow_client(agent_dir: str | os.PathLike[str], client_key_file: str | os.PathLike[str], name: str) -> Path:
    """Admit a client: copy its public key file to ``agent_dir/clients/NAME.key``."""
    if not name or "/" in name or name.startswith("."):
        raise KeyError_(f"a client's name must be a plain file name, got {name!r}")
    src = Path(client_key_file)
    load_key_file(src, False)  # a readable public key
    if src.name.endswith(".key_secret"):
        raise KeyError_(f"{src} is a secret key; give the client's public key file (client.key)")
    d = Path(agent_dir) / CLIENTS_DIR
    _private_dir(d)
    dest = d / f"{name}.key"
    shutil.copyfile(src, dest)
    return dest


def revoke_client(agent_dir: str | os.PathLike[str], name: str) -> Path:
    """Stop admitting the client ``name``: remove ``agent_dir/clients/NAME.key``."""
    p = Path(agent_dir) / CLIENTS_DIR / f"{name}.key"
    if not p.is_file():
        known = sorted(x.stem for x in (Path(agent_dir) / CLIENTS_DIR).glob("*.key"))
        raise KeyError_(f"no client {name!r} in {p.parent} (known: {', '.join(known) or 'none'})")
    p.unlink()
    return p


def trust_agent(client_dir: str | os.PathLike[str], endpoint: str, agent_key_file: str | os.PathLike[str]) -> Path:
    """Pin the agent at ``endpoint`` to the public key in ``agent_key_file`` (replacing an old pin)."""
    from pypline.lowlevel import normalize_endpoint

    public, _ = load_key_file(Path(agent_key_file), False)
    try:
        ep = normalize_endpoint(endpoint)
    except ValueError as exc:
        raise KeyError_(str(exc)) from None
    d = Path(client_dir)
    if not d.is_dir():
        raise KeyError_(f"key directory {d} does not exist (create it with: pypline-agent keys client {d})")
    path = d / KNOWN_AGENTS
    pins = _read_pins(path) if path.is_file() else {}
    pins[ep] = public
    lines = ["# pypline: agents this client trusts, each pinned to its public key (pypline-agent keys trust)"]
    lines += [f"{e} {k.decode()}" for e, k in sorted(pins.items())]
    path.write_text("\n".join(lines) + "\n")
    os.chmod(path, stat.S_IRUSR | stat.S_IWUSR)
    return path


def handshake_failure(event: int, directory: str, endpoint: str) -> str | None:
    """What a failed CURVE handshake (a ZMQ monitor event on the client's socket) means, or None."""
    import zmq

    if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
        return (
            f"the agent refused our key (the agent admits clients listed in its clients/ folder: "
            f"run there `pypline-agent keys allow AGENT-KEYDIR {Path(directory) / (CLIENT_NAME + '.key')} NAME`)"
        )
    if event in (zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL, zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL):
        return (
            f"the agent's key does not match the one pinned for it in {Path(directory) / KNOWN_AGENTS} "
            f"(or it does not use CURVE); if its keys were replaced on purpose, pin the new one with: "
            f"pypline-agent keys trust {directory} {endpoint} AGENT-KEY-FILE"
        )
    return None
