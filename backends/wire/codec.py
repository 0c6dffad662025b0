"""The payload of TASKS and RESULTS: a batch index, an inline list and extra frames.

::

    Encoder.add(tid, a, w, value) ... finish() ─► [index, inline, extra, extra, ...]
        small builtins          ─► the inline list (one C-pickled list per batch)
        other values            ─► one cloudpickle frame each + out-of-band buffers >= 64 KiB
        big bytes / bytearray   ─► their own memory as a frame (sent without copying)
    Index.parse(...)            ─► checks sizes, codes and the frame count first
    decode_values(index, frames)─► values in index order (Undecodable for one that fails)

Encoding each value on its own is what lets one unpicklable (or unloadable) value fail
only its own item. See ``PROTOCOL.md`` for the table layout.
"""

from __future__ import annotations

import array
import io
import pickle
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "BIG_FRAME",
    "ENCODINGS",
    "INLINE_TYPES",
    "STATUSES",
    "Encoder",
    "Index",
    "ProtocolError",
    "Undecodable",
    "decode_values",
    "error_info",
]


class ProtocolError(Exception):
    """A message broke the protocol (malformed, truncated, unexpected). The peer is at fault."""


#: A bytes-like value (or out-of-band pickle buffer) at least this big travels as a
#: frame of its own, sent without copying. Below it, zero-copy costs more than it
#: saves (pyzmq copies below zmq.COPY_THRESHOLD = 64 KiB anyway).
BIG_FRAME = 64 * 1024

# Result statuses (the index's ``a`` column in RESULTS).
S_OK = 0  # the attempt returned; value attached
S_EMIT = 1  # a generator attempt yielded; value attached; not terminal
S_ERROR = 2  # the function raised; error info attached
S_DIED = 3  # the worker process died mid-item (WorkerDied); error info attached
S_TIMEOUT = 4  # the attempt exceeded the stage's timeout (its worker was killed)
S_LOST = 5  # handed back unrun or unfinished (agent draining); re-dispatch it
STATUSES = (S_OK, S_EMIT, S_ERROR, S_DIED, S_TIMEOUT, S_LOST)

# Value encodings (the index's ``enc`` column).
ENC_INLINE = 0  # in the inline list
ENC_BLOB = 1  # a cloudpickle frame, then ``nbuf`` out-of-band buffer frames
ENC_RAW_BYTES = 2  # one raw frame -> bytes
ENC_RAW_BYTEARRAY = 3  # one raw frame -> bytearray
ENC_NONE = 4  # no value (LOST entries)
ENC_ERROR = 5  # in the inline list: (type name, message, traceback text, pickled exc | None)
ENCODINGS = (ENC_INLINE, ENC_BLOB, ENC_RAW_BYTES, ENC_RAW_BYTEARRAY, ENC_NONE, ENC_ERROR)


# --- the batch index -----------------------------------------------------------------------

_LITTLE = sys.byteorder == "little"
assert (
    array.array("q").itemsize == 8
    and array.array("I").itemsize == 4
    and array.array("i").itemsize == 4
    and array.array("H").itemsize == 2
)
_ENTRY = 8 + 4 + 4 + 1 + 2  # tid, a, w, enc, nbuf


def _col(code: str, data: Any, start: int, n: int, size: int) -> list[int]:
    arr = array.array(code)
    arr.frombytes(data[start : start + n * size])
    if not _LITTLE:  # pragma: no cover - big-endian hosts
        arr.byteswap()
    return arr.tolist()


def _pack(code: str, values: Iterable[int]) -> bytes:
    arr = array.array(code, values)
    if not _LITTLE:  # pragma: no cover
        arr.byteswap()
    return arr.tobytes()


@dataclass
class Index:
    """The table of a TASKS/RESULTS batch, stored column-wise and little-endian.

    ``tid`` task ids (u64); ``a`` the attempt number (TASKS) or status (RESULTS) (u32);
    ``w`` the worker index that must run it, -1 for any (i32); ``enc`` how the value is
    encoded (u8); ``nbuf`` out-of-band buffers after a BLOB frame (u16).
    """

    tid: list[int]
    a: list[int]
    w: list[int]
    enc: list[int]
    nbuf: list[int]

    def pack(self) -> bytes:
        return b"".join(
            (
                _pack("q", self.tid),
                _pack("I", self.a),
                _pack("i", self.w),
                _pack("B", self.enc),
                _pack("H", self.nbuf),
            )
        )

    @classmethod
    def parse(cls, data: Any, n: int, extras: int, *, results: bool) -> Index:
        """Parse and check an index of ``n`` entries against ``extras`` frames present."""
        if len(data) != n * _ENTRY:
            raise ProtocolError(f"index of {len(data)} bytes, expected {n * _ENTRY} for {n} entries")
        mv = memoryview(data)
        tid = _col("q", mv, 0, n, 8)
        a = _col("I", mv, 8 * n, n, 4)
        w = _col("i", mv, 12 * n, n, 4)
        enc = _col("B", mv, 16 * n, n, 1)
        nbuf = _col("H", mv, 17 * n, n, 2)
        need = 0
        for i in range(n):
            e = enc[i]
            if e == ENC_BLOB:
                need += 1 + nbuf[i]
            elif e == ENC_RAW_BYTES or e == ENC_RAW_BYTEARRAY:
                need += 1
            elif e not in ENCODINGS:
                raise ProtocolError(f"entry {i}: unknown encoding {e}")
            if tid[i] < 0:
                raise ProtocolError(f"entry {i}: negative task id")
        if need != extras:
            raise ProtocolError(f"index announces {need} extra frames, message has {extras}")
        if results:
            if any(s not in STATUSES for s in a):
                raise ProtocolError("unknown result status")
        elif any(x < 1 for x in a) or any(x < -1 for x in w):
            raise ProtocolError("bad attempt number or worker index")
        return cls(tid, a, w, enc, nbuf)


# --- values --------------------------------------------------------------------------------

#: Types whose values go into the shared inline list: the C pickler handles them
#: fast and any Python loads them.
INLINE_TYPES = frozenset({int, float, str, bool, type(None), complex})

#: Tuples of at most this many inline values are inline too (pairs, small records).
_INLINE_TUPLE = 16


class Encoder:
    """Builds one batch: index columns, inline list and extra frames. Reused across batches.

    ``add(tid, a, w, value)`` returns False (adding nothing) when the value cannot be
    pickled, with the exception in ``self.failure``; ``add_error`` and ``add_none``
    add entries without a value to pickle; ``nbytes`` is the batch's payload size.
    """

    def __init__(self) -> None:
        import cloudpickle  # type: ignore[import-untyped]

        self._file = io.BytesIO()
        self._oob: list[Any] = []
        self._pickler = cloudpickle.Pickler(self._file, protocol=5, buffer_callback=self._on_buffer)
        self.failure: BaseException | None = None
        self.reset()

    def reset(self) -> None:
        self.entries: list[tuple[int, int, int, int, int]] = []  # (tid, a, w, enc, nbuf)
        self.inline: list[Any] = []
        self.extras: list[Any] = []
        self.nbytes = 0

    def __len__(self) -> int:
        return len(self.entries)

    def _on_buffer(self, buf: pickle.PickleBuffer) -> bool:
        try:
            raw = buf.raw()
        except BufferError:  # not contiguous: pickled in-band
            return True
        if raw.nbytes < BIG_FRAME:
            return True
        self._oob.append(raw)
        return False

    def pop_last(self, nbytes: int) -> None:
        """Remove the entry added last (too big to send); ``nbytes`` is the size before it."""
        self.nbytes = nbytes
        _, _, _, enc, nbuf = self.entries.pop()
        if enc == ENC_INLINE or enc == ENC_ERROR:
            self.inline.pop()
        elif enc == ENC_BLOB:
            del self.extras[len(self.extras) - 1 - nbuf :]
        elif enc != ENC_NONE:
            self.extras.pop()

    def add(self, tid: int, a: int, w: int, value: Any) -> bool:
        t = type(value)
        if t in INLINE_TYPES:
            self.inline.append(value)
            self.entries.append((tid, a, w, ENC_INLINE, 0))
            self.nbytes += 16 if t is not str else 16 + len(value)
            return True
        if t is bytes or t is bytearray:
            n = len(value)
            if n >= BIG_FRAME:
                self.extras.append(value)
                self.entries.append((tid, a, w, ENC_RAW_BYTES if t is bytes else ENC_RAW_BYTEARRAY, 0))
                self.nbytes += n
                return True
            if t is bytes:
                self.inline.append(value)
                self.entries.append((tid, a, w, ENC_INLINE, 0))
                self.nbytes += 16 + n
                return True
        elif t is tuple and len(value) <= _INLINE_TUPLE and all(type(x) in INLINE_TYPES for x in value):
            self.inline.append(value)
            self.entries.append((tid, a, w, ENC_INLINE, 0))
            self.nbytes += 16 * (1 + len(value))
            return True
        f = self._file
        f.seek(0)
        f.truncate()
        p = self._pickler
        p.clear_memo()
        if hasattr(p, "globals_ref"):
            p.globals_ref = {}  # cloudpickle shares function globals within one dump only
        self._oob = []
        try:
            p.dump(value)
        except BaseException as exc:  # noqa: BLE001 - any failure to pickle fails this item only
            self._oob = []
            self.failure = exc
            return False
        oob, self._oob = self._oob, []
        data = f.getvalue()
        self.extras.append(data)
        self.extras.extend(oob)
        self.entries.append((tid, a, w, ENC_BLOB, len(oob)))
        self.nbytes += len(data) + sum(memoryview(b).nbytes for b in oob)
        return True

    def add_error(self, tid: int, status: int, info: tuple[str, str, str, bytes | None]) -> None:
        self.inline.append(info)
        self.entries.append((tid, status, -1, ENC_ERROR, 0))
        self.nbytes += 64 + sum(len(x) for x in info if x is not None)

    def add_none(self, tid: int, status: int) -> None:
        self.entries.append((tid, status, -1, ENC_NONE, 0))
        self.nbytes += 8

    def finish(self) -> tuple[int, list[Any]]:
        """(n, payload frames: index, inline, extras...) and reset for the next batch."""
        entries = self.entries
        n = len(entries)
        tid, a, w, enc, nbuf = zip(*entries)
        index = Index(tid, a, w, enc, nbuf).pack()  # type: ignore[arg-type]
        frames = [index, pickle.dumps(self.inline, protocol=5), *self.extras]
        self.reset()
        return n, frames


def _buf(frame: Any) -> Any:
    return frame.buffer if hasattr(frame, "buffer") else frame


def decode_values(index: Index, frames: Sequence[Any], raw: Callable[[Any, bool], Any] | None = None) -> list[Any]:
    """The values of a batch, in index order; a value that cannot be decoded becomes an ``Undecodable``.

    ``frames`` are the payload frames after the header (index, inline, extras...).
    Raises ``ProtocolError`` if the inline list is not a list of the right length.
    With ``raw``, a RAW_BYTES / RAW_BYTEARRAY value is ``raw(buffer, is_bytearray)``
    instead of a copy of its frame (the agent hands the frame's memory on: its
    process backend copies it once, into the worker's shared memory).
    """
    try:
        inline = pickle.loads(_buf(frames[1]))
    except Exception as exc:  # noqa: BLE001 - whatever the garbage raises, it is the peer's fault
        raise ProtocolError(f"inline frame does not load: {type(exc).__name__}: {exc}") from None
    if type(inline) is not list:
        raise ProtocolError("inline frame is not a list")
    want = sum(1 for e in index.enc if e == ENC_INLINE or e == ENC_ERROR)
    if len(inline) != want:
        raise ProtocolError(f"inline list has {len(inline)} values, index announces {want}")
    out: list[Any] = []
    ii = 0
    fi = 2
    for e, nb in zip(index.enc, index.nbuf):
        if e == ENC_INLINE or e == ENC_ERROR:
            out.append(inline[ii])
            ii += 1
        elif e == ENC_BLOB:
            try:
                out.append(pickle.loads(_buf(frames[fi]), buffers=[_buf(f) for f in frames[fi + 1 : fi + 1 + nb]]))
            except BaseException as exc:  # noqa: BLE001 - this value only
                out.append(Undecodable(exc))
            fi += 1 + nb
        elif e == ENC_RAW_BYTES:
            out.append(bytes(_buf(frames[fi])) if raw is None else raw(_buf(frames[fi]), False))
            fi += 1
        elif e == ENC_RAW_BYTEARRAY:
            out.append(bytearray(_buf(frames[fi])) if raw is None else raw(_buf(frames[fi]), True))
            fi += 1
        else:
            out.append(None)
    return out


class Undecodable:
    """Stands for a value that could not be unpickled; ``error`` says why."""

    __slots__ = ("error",)

    def __init__(self, error: BaseException) -> None:
        self.error = error


# --- errors across the wire ----------------------------------------------------------------


def error_info(exc: BaseException) -> tuple[str, str, str, bytes | None]:
    """(type name, message, traceback text, pickled exception or None), never raising
    (``errors.describe`` and ``errors.pickled``: the one error path)."""
    import cloudpickle

    from .errors import describe, pickled

    return (*describe(exc), pickled(exc, lambda e: cloudpickle.dumps(e, protocol=5)))