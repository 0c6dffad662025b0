"""The wire between a pypline client and a ``pypline-agent``: one package both sides import.

::

    pypline.backends.remote (client)                      pypline.worker_agent (agent)
              │                                                      │
              └──────────► pypline.backends.wire ◄───────────────────┘
                             protocol.py   messages, headers, versions, limits
                             codec.py      batch payloads: values, results, errors
                             sockets.py    non-blocking send/recv on zmq sockets
                             keys.py       the key directory layout; the client's keys

The client backend never imports the agent package, and the agent imports only this
package (and the engine's public API) from the backends. ``PROTOCOL.md`` beside these
modules describes the protocol for people.
"""
