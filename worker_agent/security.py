"""CURVE keys and who may connect: the agent's side (key files: ``pypline.backends.wire.keys``).

Unpickling network input is code execution, so an agent only lets authenticated
clients talk to it::

    serve --keys DIR:  ROUTER.curve_server = True with DIR/agent.key_secret (this host's own pair);
                       our ZAP handler (ZapServer, a thread) admits exactly the public keys in
                       DIR/clients/*.key (and, from older set-ups, DIR/*.key other than agent.key),
                       read again whenever the folder changes: `keys allow` / `keys revoke` apply
                       to the next connection, and a revoked client's session is refused at its
                       next message. A peer without CURVE, or with another key, never completes
                       the ZMTP handshake: no frame it sends reaches the agent's code. Each refusal
                       is reported with the peer's address (rate-limited per peer by the agent).
    client --keys DIR: its own pair, and the agent's public key pinned in DIR/known_agents.

Without keys the agent binds only loopback (or ``ipc://``) addresses, unless
``--insecure`` is given, which logs a loud warning.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq

from pypline.backends.wire.keys import AGENT_NAME, CLIENTS_DIR, KeyError_, keygen, load_key_file, load_key_pair

__all__ = [
    "AllowedClients",
    "KeyError_",
    "ServerKeys",
    "ZapServer",
    "is_local_endpoint",
    "keygen",
    "load_server_keys",
]

log = logging.getLogger("pypline.agent")


class AllowedClients:
    """The client public keys an agent admits, read from its key folder again when it changes."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._lock = threading.Lock()
        self._stamp: tuple[float, ...] | None = None
        self._keys: frozenset[bytes] = frozenset()
        self.current()

    def _files(self) -> list[Path]:
        files = [p for p in self.directory.glob("*.key") if p.name != f"{AGENT_NAME}.key"]
        return sorted(files + list((self.directory / CLIENTS_DIR).glob("*.key")))

    def current(self) -> frozenset[bytes]:
        clients_dir = self.directory / CLIENTS_DIR
        stamp = (self.directory.stat().st_mtime, clients_dir.stat().st_mtime if clients_dir.is_dir() else 0.0)
        with self._lock:
            if stamp != self._stamp:
                keys = set()
                for p in self._files():
                    try:
                        keys.add(load_key_file(p, False)[0])
                    except KeyError_ as exc:
                        log.warning("ignoring client key: %s", exc)
                self._keys, self._stamp = frozenset(keys), stamp
            return self._keys

    def admits(self, user: str | None) -> bool:
        return user is not None and user.encode() in self.current()


@dataclass(frozen=True)
class ServerKeys:
    public: bytes
    secret: bytes
    clients: AllowedClients  # authorised client public keys (z85), kept current


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


def load_server_keys(directory: str | os.PathLike[str]) -> ServerKeys:
    """The agent's key pair and the client public keys it admits (``directory/clients/*.key``)."""
    d, public, secret = load_key_pair(directory, AGENT_NAME)
    clients = AllowedClients(d)
    if not clients.current():
        raise KeyError_(
            f"no client public key in {d / CLIENTS_DIR}; nobody could connect. Admit a client with: "
            f"pypline-agent keys allow {d} CLIENT-KEY-FILE NAME"
        )
    return ServerKeys(public, secret, clients)


class ZapServer:
    """The ZAP handler (RFC 27) for one context: admits CURVE keys ``allowed`` admits.

    Runs in a thread of its own (libzmq asks it synchronously during each handshake);
    ``on_refusal(peer address, reason)`` is called from that thread for every refusal.
    """

    def __init__(self, ctx: Any, allowed: AllowedClients, on_refusal: Callable[[str, str], object]) -> None:
        self.ctx = ctx
        self.allowed = allowed
        self.on_refusal = on_refusal
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="pypline-agent-zap", daemon=True)

    def start(self) -> None:
        self._thread.start()
        self._ready.wait(10)
        if self._error is not None:
            raise self._error

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        try:
            # A synchronous view of the same libzmq context (inproc needs the same one).
            sock: zmq.Socket[bytes] = zmq.Context.shadow(self.ctx.underlying).socket(zmq.REP)
            sock.linger = 0
            sock.bind("inproc://zeromq.zap.01")
        except BaseException as exc:  # noqa: BLE001 - reported by start()
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        try:
            while not self._stop.is_set():
                if sock.poll(100):
                    sock.send_multipart(self._answer(sock.recv_multipart()))
        finally:
            sock.close(linger=0)

    def _answer(self, frames: list[bytes]) -> list[bytes]:
        if len(frames) < 6:
            return [b"1.0", frames[1] if len(frames) > 1 else b"", b"500", b"malformed request", b"", b""]
        _version, request_id, _domain, address, _identity, mechanism, *credentials = frames
        peer = address.decode("utf-8", "replace")
        if mechanism == b"CURVE" and len(credentials) == 1 and len(credentials[0]) == 32:
            key = zmq.utils.z85.encode(credentials[0])
            if key in self.allowed.current():
                return [b"1.0", request_id, b"200", b"OK", key, b""]
            reason = f"unknown CURVE key {key.decode()[:8]}..."
        else:
            reason = f"mechanism {mechanism.decode('ascii', 'replace')!r} is not allowed"
        try:
            self.on_refusal(peer, reason)
        except Exception:  # noqa: BLE001 - reporting must not stop authentication
            log.exception("reporting a refused connection failed")
        return [b"1.0", request_id, b"400", reason.encode(), b"", b""]
