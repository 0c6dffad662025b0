"""The wire between the process backend's parent and its worker processes: one module both use.

::

    parent (pypline.backends.process)                 worker process (_procworker.py)
    Encoder.value(v) -> (tag, data) + frames   ──►    FrameReader.read() -> messages
        message_header / one_frame_header             decode(tag, data, frames) -> v
        send_all(sock, frames)  (sendmsg, iovecs)
    decode(...)                                ◄──    Encoder / send_all (results)

**The wire.** Each direction of the socketpair carries messages made of frames::

    u32 nframes | nframes x u64 length | frame 0 (envelope) | frame 1 | ... | frame n-1

The envelope is a plain ``pickle`` (protocol 5) of a tuple ``(kind, ...)`` holding
ints, strings and values of a few builtin types (``INLINE_TYPES``), so it never fails
and always loads. Any other value is pickled ON ITS OWN with cloudpickle into a frame of
its own (so one value that cannot be pickled, or cannot be unpickled on the other side,
fails only its own item) and appears in the envelope as ``(tag, data)``, followed by its
protocol-5 out-of-band buffers (numpy arrays, ...) as separate frames. A large
``bytes``/``bytearray``/``memoryview`` value travels as a raw frame: the sender hands
its memory to ``sendmsg`` (no pickling, no copy) and the receiver ``recv_into``s a
``bytearray`` of the exact size (a ``bytes`` value is made from it: one copy, an ordinary
object). Small frames are parsed out of one reusable read buffer, so many small messages
cost one ``recv``.

**Big frames through shared memory.** From parent to worker, a frame of at least
``BIG_FRAME`` bytes is copied once into the worker's arena (a memfd both map:
``_procpool.Arena``) and only its offset travels (``IN_ARENA`` in its length word); it
arrives as ``InArena`` and ``decode`` never lets user code keep a view of it: it is
copied out (``bytes``, ``bytearray``, memoryviews, out-of-band buffers: one copy into an
ordinary object) or read in place by the unpickler.

A worker process loads this file by its path (see ``_procworker``): it imports only the
standard library at import time (cloudpickle when a value needs it).
"""

from __future__ import annotations

import io
import pickle
import socket
import struct
from collections import deque
from collections.abc import Sequence
from typing import Any

# --- tuning -----------------------------------------------------------------------------

#: A bytes-like value (or out-of-band buffer) at least this big travels as its own
#: frame, sent straight from its memory and received into a buffer of its own size.
#: Smaller ones are copied into the envelope: a 64 KiB memcpy costs less than the
#: extra iovec, length word and allocation of a separate frame.
BIG_FRAME = 64 * 1024

#: Bytes asked for per ``recv``. Big enough that a batch of a thousand small
#: results is one system call; frames at least BIG_FRAME bypass it.
READ_CHUNK = 256 * 1024

#: Most iovecs handed to one ``sendmsg`` (POSIX guarantees at least 16, Linux 1024).
IOV_BATCH = 512

# --- the wire ---------------------------------------------------------------------------

_COUNT = struct.Struct("<I")
_LEN = struct.Struct("<Q")
ONE_FRAME_HEAD = struct.Struct("<IQ")  # the header of a message of one frame: count, length

#: Set in a frame's length when the frame's data is in the receiver's shared-memory
#: arena (see ``_procpool.Arena``): the frame on the wire is then only the 8-byte
#: offset, and the length word (without the flags) is the data's size.
IN_ARENA = 1 << 62

_FLAGS = IN_ARENA

#: Arena layout (both sides): slots of whole ARENA_ALIGN pages, each holding one frame's data
#: from its first byte. Page-sized slots keep a big frame's pages to itself.
ARENA_ALIGN = 4096


# Value tags in an envelope.
INLINE = 0  # the value itself is in the envelope
BLOB = 1  # (frame index, number of out-of-band buffers): cloudpickled on its own
RAW = 2  # (frame index, RAW_BYTES | RAW_BYTEARRAY | RAW_MEMORYVIEW)

RAW_BYTES = 0
RAW_BYTEARRAY = 1
RAW_MEMORYVIEW = 2

#: Written by the parent on the lifeline pipe: give back the tasks not started yet.
REVOKE = b"R"

#: Written by the parent on the lifeline pipe with a ``stop`` message: a worker inside a
#: call tears down now (in its monitor thread); an idle one reads the message first.
STOP = b"S"

# Outcome codes in an ``events`` message.
OK = 0
EMIT = 1
ERROR = 2

#: Types whose values go into the envelope as they are: plain pickle handles them,
#: and they load in any interpreter.
INLINE_TYPES = frozenset({int, float, str, bool, type(None), complex})


class RawValue:
    """A ``bytes`` (or ``bytearray``) value still in the buffer it arrived in.

    The agent receives an item's bytes in a zmq frame; wrapped in this, the process
    backend moves that memory to the worker (into its arena, or onto the socket)
    without first making a ``bytes`` copy in the agent. The worker gets a real
    ``bytes`` (``bytearray`` when ``mutable``): user code never sees this type.
    """

    __slots__ = ("buf", "mutable")

    def __init__(self, buf: Any, mutable: bool = False) -> None:
        self.buf = buf
        self.mutable = mutable


class Flagged:
    """A frame sent as ``data`` whose length word is ``length`` (a size with flags)."""

    __slots__ = ("data", "length")

    def __init__(self, data: Any, length: int) -> None:
        self.data = data
        self.length = length


class InArena:
    """A received frame that is a view of the sender's shared-memory arena.

    Only ``decode`` sees one, and it copies what it returns out of it (see
    ``_procpool``'s module docstring: the sender reuses the memory once the task is
    no longer in flight, so nothing may keep a view of it).
    """

    __slots__ = ("off", "view")

    def __init__(self, view: memoryview, off: int) -> None:
        self.view = view
        self.off = off  # where the data starts in the arena


class Encoder:
    """Turns values into (tag, data) envelope entries plus the frames they refer to.

    One encoder is reused for many messages: building a cloudpickle ``Pickler`` costs
    more than pickling a small value with an existing one. In the parent, a message's
    big buffers go into the receiving worker's arena when ``reset`` got one (and it
    has room), tagged with ``owner`` (the task id being encoded).
    """

    def __init__(self) -> None:
        import cloudpickle  # type: ignore[import-untyped]  # only now: keeps worker start-up light

        self._file = io.BytesIO()
        self._oob: list[pickle.PickleBuffer] = []
        self._pickler = cloudpickle.Pickler(self._file, protocol=5, buffer_callback=self._on_buffer)
        self.frames: list[Any] = []
        self.arena: Any = None  # the receiver's _procpool.Arena, or None: everything on the socket
        self.owner = 0
        self._swept = False

    def _on_buffer(self, buf: pickle.PickleBuffer) -> bool:
        try:
            raw = buf.raw()
        except BufferError:  # not contiguous: let pickle copy it in-band
            return True
        if raw.nbytes < BIG_FRAME:
            return True
        self._oob.append(raw)  # type: ignore[arg-type]
        return False  # out-of-band: becomes a frame of its own

    def reset(self, arena: Any = None) -> None:
        self.frames = [None]  # frame 0 is the envelope, filled by finish()
        self.arena = arena
        self._swept = False

    def _big(self, buf: Any) -> int:
        """Append a frame of at least BIG_FRAME bytes (in the arena if there is room); its index."""
        arena = self.arena
        if arena is not None:
            if not self._swept:  # once per message: reclaim slots of tasks no longer in flight
                self._swept = True
                arena.sweep(self.owner)
            view = memoryview(buf)
            off = arena.put(view, self.owner)
            if off is not None:
                self.frames.append(Flagged(_LEN.pack(off), view.nbytes | IN_ARENA))
                return len(self.frames) - 1
        self.frames.append(buf)
        return len(self.frames) - 1

    def value(self, v: Any) -> tuple[int, Any]:
        """Encode one value; raises whatever pickling raises (nothing is appended then)."""
        t = type(v)
        if t in INLINE_TYPES:
            return INLINE, v
        if t is RawValue:
            if v.mutable:
                return RAW, (self._big(v.buf), RAW_BYTEARRAY)
            return RAW, (self._big(v.buf), RAW_BYTES)
        if t is memoryview and v.c_contiguous:  # pickle refuses memoryviews: always a raw frame
            flat = v.cast("B") if v.format != "B" or v.ndim != 1 else v
            if flat.nbytes >= BIG_FRAME:
                index = self._big(flat)
            else:
                self.frames.append(flat)
                index = len(self.frames) - 1
            return RAW, (index, RAW_MEMORYVIEW, v.format, v.shape)
        if t is bytes or t is bytearray:
            if len(v) >= BIG_FRAME:
                return RAW, (self._big(v), RAW_BYTES if t is bytes else RAW_BYTEARRAY)
            if t is bytes:
                return INLINE, v
        f = self._file
        f.seek(0)
        f.truncate()
        self._oob = []
        p = self._pickler
        p.clear_memo()
        if hasattr(p, "globals_ref"):
            p.globals_ref = {}  # cloudpickle shares function globals within one dump only
        try:
            p.dump(v)
        finally:
            oob, self._oob = self._oob, []
            p.clear_memo()  # holds what it pickled: let it go now
        data = f.getvalue()
        index = len(self.frames)
        if len(data) >= BIG_FRAME:
            self._big(data)
        else:
            self.frames.append(data)
        for b in oob:  # each at least BIG_FRAME (_on_buffer)
            self._big(b)
        return BLOB, (index, len(oob))

    def finish(self, envelope: Any) -> list[Any]:
        """The message's frames, envelope first."""
        frames = self.frames
        frames[0] = pickle.dumps(envelope, protocol=5)
        self.frames = []
        return frames


def _new_bytearray(size: int) -> tuple[bytearray, memoryview]:
    buf = bytearray(size)
    return buf, memoryview(buf)


def _own(buf: Any) -> Any:
    """A frame as a buffer the caller may keep: a copy of it if it is in the arena."""
    return bytearray(buf.view) if type(buf) is InArena else buf


def decode(tag: int, data: Any, frames: Sequence[Any]) -> Any:
    """The value an envelope entry stands for; raises if it cannot be unpickled.

    What it returns never refers to a frame in the arena (``InArena``): those are
    copied (buffers, raw values) or read in place by the unpickler, which copies
    what it keeps.
    """
    if tag == INLINE:
        return data
    if tag == BLOB:
        index, nbufs = data
        blob = frames[index]
        if type(blob) is InArena:
            blob = blob.view
        return pickle.loads(blob, buffers=[_own(b) for b in frames[index + 1 : index + 1 + nbufs]])
    index, code = data[0], data[1]
    buf = frames[index]
    if type(buf) is InArena:
        if code == RAW_BYTES:
            return bytes(buf.view)  # one copy, straight out of the arena
        buf = bytearray(buf.view)
    if code == RAW_BYTES:
        return buf if type(buf) is bytes else bytes(buf)
    if code == RAW_BYTEARRAY:
        return buf if type(buf) is bytearray else bytearray(buf)
    view = memoryview(buf)
    fmt, shape = data[2], data[3]
    return view if fmt == "B" and len(shape) == 1 else view.cast(fmt, shape)


def _length(f: Any) -> int:
    t = type(f)
    if t is bytes:
        return len(f)
    if t is Flagged:
        return int(f.length)
    return memoryview(f).nbytes


def message_header(frames: Sequence[Any]) -> bytes:
    """The count and length table (a ``Flagged`` frame carries its own length word)."""
    n = len(frames)
    return _COUNT.pack(n) + struct.pack(f"<{n}Q", *[_length(f) for f in frames])


def one_frame_header(data: bytes) -> bytes:
    """``message_header([data])`` for a message of one ``bytes`` frame, without the general table."""
    return ONE_FRAME_HEAD.pack(1, len(data))


def wire_view(f: Any) -> memoryview:
    """What goes on the wire for a frame, as a flat byte view."""
    m = memoryview(f.data if type(f) is Flagged else f)
    return m.cast("B") if m.format != "B" or m.ndim != 1 else m


def send_all(sock: socket.socket, frames: Sequence[Any]) -> None:
    """Send one message on a blocking socket, without copying the frames."""
    if len(frames) == 1 and type(frames[0]) is bytes:  # most messages: one pickled envelope
        data = frames[0]
        head = one_frame_header(data)
        sent = sock.sendmsg((head, data))
        if sent == len(head) + len(data):
            return
        bufs: deque[memoryview] = deque((memoryview(head), memoryview(data)))
        advance(bufs, sent)
    else:
        bufs = deque(wire_view(f) for f in (message_header(frames), *frames))
    while bufs:
        sent = sock.sendmsg(list(bufs)[:IOV_BATCH] if len(bufs) > IOV_BATCH else bufs)
        advance(bufs, sent)


def advance(bufs: deque[memoryview], sent: int) -> None:
    """Drop ``sent`` bytes from the front of a deque of buffers."""
    while sent:
        head = bufs[0]
        n = head.nbytes
        if sent >= n:
            bufs.popleft()
            sent -= n
        else:
            bufs[0] = head[sent:]
            sent = 0
    while bufs and not bufs[0].nbytes:
        bufs.popleft()


class FrameReader:
    """Parses messages out of a socket, blocking or not.

    ``read()`` does ONE ``recv`` and returns the messages completed by it (each a
    list of frames: ``bytes`` for small ones, a ``bytearray`` of its own for big
    ones, an ``InArena`` view for one the sender put in ``arena``). On a
    non-blocking socket it raises ``BlockingIOError`` when nothing is there; at the
    end of the stream it raises ``EOFError``. ``drained`` tells whether that recv
    got less than it asked for: then the socket was empty, and a caller woken by a
    level-triggered poll need not try again just to get ``BlockingIOError``.
    """

    def __init__(self, sock: socket.socket, arena: memoryview | None = None) -> None:
        self.sock = sock
        self.arena = arena
        self.buf = bytearray(READ_CHUNK)
        self.view = memoryview(self.buf)
        self.start = 0
        self.end = 0
        self.lengths: tuple[int, ...] | None = None
        self.nframes = -1
        self.frames: list[Any] = []
        self.big: bytes | bytearray | None = None
        self.big_view: memoryview | None = None
        self.big_off = 0
        self.drained = False

    def read(self, flags: int = 0) -> list[list[Any]]:
        if self.big is not None:
            assert self.big_view is not None
            want = len(self.big) - self.big_off
            n = self.sock.recv_into(self.big_view[self.big_off :], 0, flags)
            if not n:
                raise EOFError
            self.drained = n < want
            self.big_off += n
            if self.big_off < len(self.big):
                return []
            self.frames.append(self.big)
            self.big = self.big_view = None
            return self._parse()
        if self.start == self.end:
            self.start = self.end = 0
        elif len(self.buf) - self.end < READ_CHUNK // 4:  # keep room to read into
            left = self.end - self.start
            self.view[:left] = self.view[self.start : self.end]
            self.start, self.end = 0, left
        want = len(self.buf) - self.end
        n = self.sock.recv_into(self.view[self.end :], 0, flags)
        if not n:
            raise EOFError
        self.end += n
        self.drained = n < want
        return self._parse()

    def _parse(self) -> list[list[Any]]:
        out: list[list[Any]] = []
        view = self.view
        while True:
            avail = self.end - self.start
            if self.nframes < 0:
                if avail < 4:
                    break
                self.nframes = _COUNT.unpack_from(view, self.start)[0]
                self.start += 4
                avail -= 4
            if self.lengths is None:
                need = 8 * self.nframes
                if need > len(self.buf) // 2:  # a huge message: grow the read buffer
                    self._grow(need * 2)
                    view = self.view
                if avail < need:
                    break
                self.lengths = struct.unpack_from(f"<{self.nframes}Q", view, self.start)
                self.start += need
            frames = self.frames
            lengths = self.lengths
            while len(frames) < self.nframes:
                size = lengths[len(frames)]
                avail = self.end - self.start
                if size & IN_ARENA:
                    if avail < 8:
                        return out
                    off = _LEN.unpack_from(view, self.start)[0]
                    size &= ~_FLAGS
                    arena = self.arena
                    if arena is None or off + size > arena.nbytes:
                        raise ValueError(f"a frame at {off}+{size} outside the shared-memory arena")
                    self.start += 8
                    frames.append(InArena(arena[off : off + size], off))
                    continue
                size &= ~_FLAGS
                if size >= BIG_FRAME:
                    big, big_view = _new_bytearray(size)  # a bytes frame becomes bytes in decode (one copy)
                    take = min(avail, size)
                    big_view[:take] = view[self.start : self.start + take]
                    self.start += take
                    if take < size:
                        self.big, self.big_view, self.big_off = big, big_view, take
                        return out
                    frames.append(big)
                else:
                    if avail < size:
                        return out
                    frames.append(bytes(view[self.start : self.start + size]))
                    self.start += size
            out.append(frames)
            self.frames = []
            self.lengths = None
            self.nframes = -1
        return out

    def _grow(self, size: int) -> None:
        buf = bytearray(max(size, READ_CHUNK))
        left = self.end - self.start
        buf[:left] = self.view[self.start : self.end]
        self.buf, self.view = buf, memoryview(buf)
        self.start, self.end = 0, left
