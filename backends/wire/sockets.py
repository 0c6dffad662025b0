"""Small helpers around ``zmq.asyncio`` sockets shared by the agent and the client.

pyzmq's asyncio sockets return futures that are already resolved when an operation
with ``NOBLOCK`` can complete (or fails) at once; these helpers make that synchronous
use explicit and typed. All socket calls stay on the event loop's thread.
"""

from __future__ import annotations

import asyncio
from typing import Any, cast

import zmq
import zmq.asyncio

__all__ = ["recv_now", "send_now"]


def send_now(sock: zmq.asyncio.Socket, frames: list[Any]) -> None:
    """Send a multipart message without waiting; raises ``zmq.Again`` / ``zmq.ZMQError`` if it cannot go now.

    Frames are sent without copying where pyzmq finds that worthwhile (big buffers);
    a buffer must not change until it has been sent.
    """
    fut = cast("asyncio.Future[Any]", sock.send_multipart(frames, zmq.NOBLOCK, copy=False))
    fut.result()


def recv_now(sock: zmq.asyncio.Socket) -> list[zmq.Frame]:
    """A message that is already queued; raises ``zmq.Again`` when there is none."""
    fut = cast("asyncio.Future[list[zmq.Frame]]", sock.recv_multipart(zmq.NOBLOCK, copy=False))
    return fut.result()
