"""CURVE keys and who may connect: the agent's side (the key files: ``pypline.backends.wire.keys``).

Unpickling network input is code execution, so an agent only lets authenticated
clients talk to it::

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
from dataclasses import dataclass
from typing import Any

from pypline.backends.wire.keys import AGENT_NAME, KeyError_, keygen, load_key_file, load_key_pair

__all__ = [
    "KeyError_",
    "ServerKeys",
    "client_key_provider",
    "is_local_endpoint",
    "keygen",
    "load_server_keys",
]

@dataclass(frozen=True)
class ServerKeys:
    public: bytes
    secret: bytes
    clients: frozenset[bytes]  # authorised client public keys (z85)


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
    """The agent's key pair and every authorised client public key in ``directory``."""
    d, public, secret = load_key_pair(directory, AGENT_NAME)
    clients = set()
    for p in sorted(d.glob("*.key")):
        if p.name == f"{AGENT_NAME}.key":
            continue
        key, _ = load_key_file(p, False)
        clients.add(key)
    if not clients:
        raise KeyError_(f"no client public key (*.key other than {AGENT_NAME}.key) in {d}; nobody could connect")
    return ServerKeys(public, secret, frozenset(clients))


def client_key_provider(keys: ServerKeys) -> Any:
    """A ZAP credentials provider admitting exactly ``keys.clients``."""

    class _Provider:
        def callback(self, domain: str, key: bytes) -> bool:
            return key in keys.clients

    return _Provider()
