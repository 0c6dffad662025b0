"""The ``pypline-agent`` daemon that serves ``multi_proc`` stages to remote pipelines.

Installed as ``pypline.worker_agent``; run it as ``pypline-agent`` or
``python -m pypline.worker_agent``. Modules:

    cli.py        click commands: serve, keygen, ping, status (the only asyncio.run)
    server.py     the ROUTER loop: sessions, HELLO, liveness, drain, status
    session.py    one client's session and its stages (each hosting a local executor)
    stages.py     functions by content hash; starting (or reusing) a stage's executor
    pool.py       warm executors kept between runs
    protocol.py   the wire format both sides share (messages, headers, versions)
    codec.py      the TASKS/RESULTS payload: batch index, inline values, raw frames
    security.py   CURVE keys, ZAP authorisation, loopback checks
    probe.py      the one-shot client behind ping and status
    sockets.py    non-blocking send/recv helpers for zmq.asyncio sockets
    tuning.py     malloc settings for large payloads

PROTOCOL.md describes the protocol for people. The client side is
``pypline.backends.remote``. Importing this package imports nothing heavy, and the
engine (``pypline``) never imports it.
"""
