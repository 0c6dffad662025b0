"""The wire protocol between the ``zmq`` backend (client) and ``pypline-agent``.

Both sides import this module; it imports neither. ``PROTOCOL.md`` next to it is
the description for people; this is the one implementation of it. ::

    client DEALER ──[header, payload...]──► agent ROUTER (adds/removes the routing id)
                  ◄──[header, payload...]──

    frame 0   header: a JSON object, UTF-8, at most MAX_HEADER bytes. NEVER pickle.
              {"t": <type>, "nf": <number of frames after this one>, ...fields}
    frame 1.. payload, type-dependent. For TASKS and RESULTS:
              index   one packed, column-wise table of the batch (see Index)
              inline  a plain-pickle list of the small builtin values of the batch
              extras  per item, in order: a cloudpickle frame + its out-of-band
                      buffers (BLOB), or the item's own bytes (RAW, zero-copy)

**Validation before use.** ``parse_header`` checks the header completely (size,
JSON, type, every field's type and range, ``nf == len(frames) - 1``) and raises
``ProtocolError`` otherwise; ``Index.parse`` checks the index table and that the
extras it announces are exactly the frames present. Only then does anyone look at a
payload frame, and payloads are unpickled only on a session that passed HELLO on
a connection that passed CURVE/ZAP when the agent has keys (``PROTOCOL.md``).

**Values.** One value that cannot be pickled (or unpickled on the other side)
fails only its own item: small values of a few builtin types go into the shared
``inline`` list (pickled with the C pickler, loads anywhere), every other value is
cloudpickled on its own, and big ``bytes``/``bytearray`` travel as raw frames.
"""

from __future__ import annotations

import json
import math
import platform
import sys
from collections.abc import Sequence
from typing import Any

from .codec import (  # the payload format, re-exported: the wire is one namespace
    BIG_FRAME,
    ENC_BLOB,
    ENC_ERROR,
    ENC_INLINE,
    ENC_NONE,
    ENC_RAW_BYTEARRAY,
    ENC_RAW_BYTES,
    ENCODINGS,
    INLINE_TYPES,
    S_DIED,
    S_EMIT,
    S_ERROR,
    S_LOST,
    S_OK,
    S_TIMEOUT,
    STATUSES,
    Encoder,
    Index,
    ProtocolError,
    Undecodable,
    decode_values,
    error_info,
)

__all__ = [
    "BATCH_BYTES",
    "BIG_FRAME",
    "CLIENT_MAX_MSG",
    "DEFAULT_MAX_MSG",
    "ENCODINGS",
    "ENC_BLOB",
    "ENC_ERROR",
    "ENC_INLINE",
    "ENC_NONE",
    "ENC_RAW_BYTEARRAY",
    "ENC_RAW_BYTES",
    "INLINE_TYPES",
    "KINDS",
    "MAX_BATCH_ITEMS",
    "FRAME_SLACK",
    "MAX_FRAME",
    "MAX_HEADER",
    "MSG_SLACK",
    "PROTOCOL_VERSION",
    "STATUSES",
    "S_DIED",
    "S_EMIT",
    "S_ERROR",
    "S_LOST",
    "S_OK",
    "S_TIMEOUT",
    "TYPES",
    "Encoder",
    "Index",
    "MessageTooLarge",
    "ProtocolError",
    "Undecodable",
    "VersionMismatch",
    "check_versions",
    "decode_values",
    "describe_versions",
    "error_info",
    "fn_id",
    "header",
    "joined",
    "local_versions",
    "message",
    "parse_header",
]

#: Wire protocol version. Bumped on any incompatible change; HELLO refuses a mismatch.
#: 2: payload frames above MAX_FRAME travel in pieces ("split").
#: 3: STAGE carries the stage's setup and teardown ("hooks"); an older agent would ignore them.
PROTOCOL_VERSION = 3

#: Largest header frame. Headers carry counts and ids, never data, so 4 KiB is plenty,
#: and a small cap means a malicious header costs nothing to refuse.
MAX_HEADER = 4096

#: Default largest item (or result), encoded: big enough for large arrays, small
#: enough that one message cannot exhaust an agent's memory. The agent advertises its
#: limit (``serve --max-message``) in HELLO_OK so the client fails an oversized item
#: itself, with a clear error: libzmq would just drop the connection.
DEFAULT_MAX_MSG = 256 * 1024 * 1024

#: Largest result message a client accepts: its guard against a hostile agent (checked
#: on the joined message); an agent fails a bigger result itself.
CLIENT_MAX_MSG = 1024 * 1024 * 1024

#: A message may exceed its per-item limit by this much: the rest of a batch and the header.
MSG_SLACK = 4 * 1024 * 1024 + 64 * 1024

#: Largest frame on the wire. A bigger payload frame travels in pieces of this size, which
#: the header announces (``split``) and the receiver joins. Both sides set ZMQ_MAXMSGSIZE
#: (a per-frame limit in libzmq, applied before authentication too) to MAX_FRAME +
#: FRAME_SLACK: a peer that never authenticates cannot make libzmq buffer more than that
#: per connection, and only until the handshake times out.
MAX_FRAME = 8 * 1024 * 1024
FRAME_SLACK = 64 * 1024

#: Most split frames one message may announce.
MAX_SPLITS = 256

#: Most items in one TASKS/RESULTS message. Batching amortises the per-message cost
#: (~20-40 µs through asyncio on both sides) over many items; the cap keeps one
#: message's decoding short enough not to stall the event loop noticeably.
MAX_BATCH_ITEMS = 2048

#: Soft cap on a batch's payload bytes: a batch is cut once it holds this much, so a
#: few big items do not wait for many small ones and memory per message stays bounded.
BATCH_BYTES = 4 * 1024 * 1024

#: Most frames one message may have (header included); far above what batching makes.
MAX_FRAMES = 1 << 16

#: Most workers a stage may declare, and longest names/ids accepted in headers.
MAX_WORKERS = 4096
MAX_NAME = 256
FN_ID_LEN = 32  # hex of a 16-byte SHA-256 prefix

# --- message types -----------------------------------------------------------------------

HELLO = "HELLO"  # client -> agent: versions, heartbeat; first message of a session
HELLO_OK = "HELLO_OK"  # agent -> client: instance id, versions, workers, limits
ERROR = "ERROR"  # agent -> client: code + message (+ sid for a stage's error)
FUNC = "FUNC"  # client -> agent: one cloudpickled function, by content hash
NEED_FUNC = "NEED_FUNC"  # agent -> client: these function ids are unknown here
STAGE = "STAGE"  # client -> agent: declare stage sid (name, workers' fn ids and kinds)
STAGE_OK = "STAGE_OK"  # agent -> client: stage sid runs here; first credit window
TASKS = "TASKS"  # client -> agent: a batch of attempts for stage sid
RESULTS = "RESULTS"  # agent -> client: a batch of outcomes (and yielded values)
CREDIT = "CREDIT"  # agent -> client: new window for sid; client -> agent: emit acks
PING = "PING"  # client -> agent: liveness (any traffic counts)
PONG = "PONG"  # agent -> client: instance id, in flight, capacity (+ status detail)
DRAIN = "DRAIN"  # agent -> client: shutting down, send nothing more
BYE = "BYE"  # either way: the session is over

# ERROR codes.
E_VERSION = "VERSION_MISMATCH"
E_DRAINING = "DRAINING"
E_NO_SESSION = "NO_SESSION"
E_STAGE = "STAGE_FAILED"

KINDS = ("async", "sync", "gen", "async_gen")  # pypline's FnKind values


class VersionMismatch(Exception):
    """The two sides cannot talk: protocol, Python or cloudpickle versions differ."""


class MessageTooLarge(ValueError):
    """An item or result is bigger than the largest message the agent accepts."""


# --- headers -------------------------------------------------------------------------------

_INT = "int"
_NUM = "num"
_STR = "str"
_BOOL = "bool"
_LIST = "list"
_DICT = "dict"
_OPT_NUM = "num?"

# Per type: field -> (kind, required). "t" and "nf" are checked for every type.
_SCHEMA: dict[str, dict[str, tuple[str, bool]]] = {
    HELLO: {
        "proto": (_INT, True),
        "pypline": (_STR, True),
        "python": (_LIST, True),
        "cloudpickle": (_STR, True),
        "hb": (_NUM, True),
        "hello": (_INT, True),
        "platform": (_STR, False),
    },
    HELLO_OK: {
        "proto": (_INT, True),
        "pypline": (_STR, True),
        "python": (_LIST, True),
        "cloudpickle": (_STR, True),
        "instance": (_STR, True),
        "workers": (_INT, True),
        "backend": (_STR, True),
        "max_msg": (_INT, True),
        "hello": (_INT, True),
        "host": (_STR, False),
    },
    ERROR: {"code": (_STR, True), "message": (_STR, True), "sid": (_INT, False), "hello": (_INT, False)},
    FUNC: {"fn": (_STR, True), "split": (_LIST, False)},
    NEED_FUNC: {"sid": (_INT, True), "fns": (_LIST, True)},
    STAGE: {
        "sid": (_INT, True),
        "name": (_STR, True),
        "kinds": (_LIST, True),
        "fns": (_LIST, True),
        "fork": (_BOOL, True),
        "timeout": (_OPT_NUM, True),
        "retries": (_INT, True),
        "buffer": (_INT, True),
        "hooks": (_LIST, False),
    },
    STAGE_OK: {"sid": (_INT, True), "win": (_INT, True), "workers": (_INT, True)},
    TASKS: {"sid": (_INT, True), "n": (_INT, True), "split": (_LIST, False)},
    RESULTS: {"sid": (_INT, True), "n": (_INT, True), "win": (_INT, True), "split": (_LIST, False)},
    CREDIT: {"sid": (_INT, True), "win": (_INT, False), "ack": (_INT, False)},
    PING: {"seq": (_INT, True), "detail": (_BOOL, False)},
    PONG: {
        "seq": (_INT, True),
        "instance": (_STR, True),
        "inflight": (_INT, True),
        "capacity": (_INT, True),
        "workers": (_INT, True),
        "draining": (_BOOL, True),
    },
    DRAIN: {"deadline": (_NUM, True)},
    BYE: {"reason": (_STR, False)},
}
TYPES = frozenset(_SCHEMA)

# Payload frames each type carries: exact count, or None when the header decides.
_FIXED_FRAMES: dict[str, int | None] = {t: 0 for t in _SCHEMA}
_FIXED_FRAMES.update({FUNC: 1, TASKS: None, RESULTS: None, PONG: None})


def _check_field(t: str, key: str, kind: str, v: Any) -> None:
    ok: bool
    if kind == _INT:
        ok = type(v) is int and 0 <= v < 1 << 63
    elif kind == _NUM:
        ok = type(v) in (int, float) and math.isfinite(v) and v >= 0
    elif kind == _OPT_NUM:
        ok = v is None or (type(v) in (int, float) and math.isfinite(v) and v > 0)
    elif kind == _STR:
        ok = type(v) is str and len(v) <= MAX_HEADER
    elif kind == _BOOL:
        ok = type(v) is bool
    elif kind == _LIST:
        ok = type(v) is list
    else:
        ok = type(v) is dict
    if not ok:
        raise ProtocolError(f"{t}: field {key!r} has a bad value {v!r:.80}")


def message(t: str, payload: Sequence[Any], **fields: Any) -> list[Any]:
    """``[header, *payload frames]``, each payload frame above MAX_FRAME sent in pieces."""
    out: list[Any] = []
    split: list[list[int]] = []
    for pos, frame in enumerate(payload):
        view = memoryview(frame)
        if view.nbytes <= MAX_FRAME:
            out.append(frame)
            continue
        view = view.cast("B")
        pieces = [view[i : i + MAX_FRAME] for i in range(0, view.nbytes, MAX_FRAME)]
        split.append([pos, len(pieces)])
        out.extend(pieces)
    if split:
        fields["split"] = split
    return [header(t, len(out), **fields), *out]


def joined(h: dict[str, Any], frames: list[Any]) -> list[Any]:
    """``frames`` (header first) with every split payload frame joined into one again."""
    split = h.get("split")
    if not split:
        return frames
    import zmq

    out = [frames[0]]
    i = 1
    pos = 0
    for at, k in split:
        while pos < at:
            out.append(frames[i])
            i += 1
            pos += 1
        out.append(zmq.Frame(b"".join(f.buffer if hasattr(f, "buffer") else f for f in frames[i : i + k])))
        i += k
        pos += 1
    out.extend(frames[i:])
    return out


def header(t: str, nf: int = 0, **fields: Any) -> bytes:
    """Encode a header frame (the sender's counterpart of ``parse_header``)."""
    fields["t"] = t
    fields["nf"] = nf
    data = json.dumps(fields, separators=(",", ":")).encode()
    if len(data) > MAX_HEADER:  # pragma: no cover - a bug on our side, not the peer's
        raise ValueError(f"{t} header of {len(data)} bytes exceeds {MAX_HEADER}")
    return data


def parse_header(frames: Sequence[Any]) -> dict[str, Any]:
    """Validate a message's header completely and return it; ``ProtocolError`` if anything is off.

    ``frames`` are the message's frames (``bytes`` or ``zmq.Frame``), routing id removed.
    No payload frame is looked at, apart from counting them. Whatever a peer sends, the
    only exception that leaves is ``ProtocolError``: a header that makes the JSON parser
    or a check fail in a way nobody foresaw (nesting deeper than the parser goes, say)
    is a malformed header like any other.
    """
    try:
        return _parse_header(frames)
    except ProtocolError:
        raise
    except Exception as exc:  # noqa: BLE001 - the peer's input must not reach the reader as anything else
        raise ProtocolError(f"unreadable header ({type(exc).__name__}: {str(exc):.80})") from None


def _parse_header(frames: Sequence[Any]) -> dict[str, Any]:
    if not frames:
        raise ProtocolError("empty message")
    if len(frames) > MAX_FRAMES:
        raise ProtocolError(f"{len(frames)} frames (at most {MAX_FRAMES})")
    first = frames[0]
    raw = first if isinstance(first, bytes) else first.bytes if hasattr(first, "bytes") else bytes(first)
    if len(raw) > MAX_HEADER:
        raise ProtocolError(f"header of {len(raw)} bytes (at most {MAX_HEADER})")
    if not raw.startswith(b"{"):
        raise ProtocolError("header is not a JSON object")
    try:
        h = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ProtocolError(f"header is not valid JSON: {type(exc).__name__}: {str(exc):.80}") from None
    if type(h) is not dict:
        raise ProtocolError("header is not a JSON object")
    t = h.get("t")
    if type(t) is not str or t not in _SCHEMA:
        raise ProtocolError(f"unknown message type {t!r:.40}")
    nf = h.get("nf")
    if type(nf) is not int or nf != len(frames) - 1:
        raise ProtocolError(f"{t}: header announces {nf!r:.20} payload frames, message has {len(frames) - 1}")
    logical = nf - _check_split(t, h.get("split"), nf)
    fixed = _FIXED_FRAMES[t]
    if fixed is not None and logical != fixed:
        raise ProtocolError(f"{t}: carries {fixed} payload frames, not {logical}")
    for key, (kind, required) in _SCHEMA[t].items():
        if key in h:
            _check_field(t, key, kind, h[key])
        elif required:
            raise ProtocolError(f"{t}: missing field {key!r}")
    _check_specific(t, h)
    return h


def _is_fn_id(v: Any) -> bool:
    return type(v) is str and len(v) == FN_ID_LEN and all(c in "0123456789abcdef" for c in v)


def _check_split(t: str, split: Any, nf: int) -> int:
    """Check a ``split`` field ([[position, pieces], ...]); how many more frames than logical ones."""
    if split is None:
        return 0
    if t not in (TASKS, RESULTS, FUNC) or type(split) is not list or not 1 <= len(split) <= MAX_SPLITS:
        raise ProtocolError(f"{t}: bad split field")
    extra = 0
    last = -1
    for entry in split:
        if (
            type(entry) is not list
            or len(entry) != 2
            or type(entry[0]) is not int
            or type(entry[1]) is not int
            or entry[0] <= last
            or not 2 <= entry[1] <= MAX_FRAMES
        ):
            raise ProtocolError(f"{t}: bad split entry {entry!r:.40}")
        last = entry[0]
        extra += entry[1] - 1
    if last >= nf - extra:
        raise ProtocolError(f"{t}: split names frame {last} of {nf - extra}")
    return extra


def _check_specific(t: str, h: dict[str, Any]) -> None:
    if t in (TASKS, RESULTS):
        n = h["n"]
        if not 1 <= n <= MAX_BATCH_ITEMS:
            raise ProtocolError(f"{t}: batch of {n} items (1..{MAX_BATCH_ITEMS})")
        if h["nf"] - _check_split(t, h.get("split"), h["nf"]) < 2:
            raise ProtocolError(f"{t}: needs an index and an inline frame")
    elif t == FUNC:
        if not _is_fn_id(h["fn"]):
            raise ProtocolError("FUNC: bad function id")
    elif t == NEED_FUNC:
        if not all(_is_fn_id(f) for f in h["fns"]) or len(h["fns"]) > MAX_WORKERS + 2:  # + setup, teardown
            raise ProtocolError("NEED_FUNC: bad function ids")
    elif t == STAGE:
        kinds, fns = h["kinds"], h["fns"]
        if not 1 <= len(fns) <= MAX_WORKERS or len(kinds) != len(fns):
            raise ProtocolError("STAGE: kinds and fns must be equally long lists of 1 or more")
        if not all(type(k) is str and k in KINDS for k in kinds) or not all(_is_fn_id(f) for f in fns):
            raise ProtocolError("STAGE: bad kinds or function ids")
        if not h["name"] or len(h["name"]) > MAX_NAME:
            raise ProtocolError("STAGE: bad name")
        if not 1 <= h["retries"] <= 1 << 31 or not 1 <= h["buffer"] <= 1 << 31:
            raise ProtocolError("STAGE: bad retries or buffer")
        hooks = h.get("hooks")
        if hooks is not None and (len(hooks) != 2 or not all(f is None or _is_fn_id(f) for f in hooks)):
            raise ProtocolError("STAGE: hooks must be [setup id or null, teardown id or null]")
    elif t == HELLO:
        py = h["python"]
        if len(py) != 4 or type(py[0]) is not str or not all(type(x) is int for x in py[1:]):
            raise ProtocolError("HELLO: python must be [implementation, major, minor, micro]")
    elif t == PONG and h["nf"] > 1:
        raise ProtocolError("PONG: at most one (JSON) payload frame")


# --- versions ------------------------------------------------------------------------------


def local_versions() -> dict[str, Any]:
    """This side's protocol, pypline, Python and cloudpickle versions, as HELLO carries them."""
    import cloudpickle  # type: ignore[import-untyped]

    try:
        from pypline import __version__ as pv
    except Exception:  # noqa: BLE001  # pragma: no cover - pypline is always importable here
        pv = "?"
    impl = sys.implementation.name
    return {
        "proto": PROTOCOL_VERSION,
        "pypline": pv,
        "python": [impl, sys.version_info[0], sys.version_info[1], sys.version_info[2]],
        "cloudpickle": cloudpickle.__version__,
        "platform": platform.platform(terse=True),
    }


def describe_versions(v: dict[str, Any]) -> str:
    py = v.get("python") or ["?", "?", "?", "?"]
    impl = {"cpython": "CPython", "pypy": "PyPy"}.get(str(py[0]), str(py[0]))
    return (
        f"protocol {v.get('proto')}, pypline {v.get('pypline')}, {impl} {py[1]}.{py[2]}.{py[3]}, "
        f"cloudpickle {v.get('cloudpickle')}"
    )


def check_versions(client: dict[str, Any], agent: dict[str, Any]) -> str | None:
    """None if the two sides can work together, else a message naming both sides' versions.

    Protocol, Python implementation and major.minor, and cloudpickle must be equal:
    cloudpickle only promises to load what the same Python and cloudpickle wrote.
    """
    cpy, apy = list(client.get("python") or []), list(agent.get("python") or [])
    if (
        client.get("proto") == agent.get("proto")
        and cpy[:3] == apy[:3]
        and client.get("cloudpickle") == agent.get("cloudpickle")
    ):
        return None
    return (
        f"version mismatch: client has {describe_versions(client)}; agent has {describe_versions(agent)} "
        "(protocol, Python major.minor and cloudpickle versions must be equal on both sides)"
    )


def fn_id(data: bytes) -> str:
    """A function's id: the hex of the first 16 bytes of SHA-256 of its pickle."""
    import hashlib

    return hashlib.sha256(data).hexdigest()[:FN_ID_LEN]
