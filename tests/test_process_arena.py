"""The process backend's shared-memory arena for big buffers (``_procpool.Arena``).

Big ``bytes``/``bytearray``/``memoryview`` items and protocol-5 out-of-band buffers
are copied once into the receiving worker's arena (a memfd); a ``bytes`` item is
handed to the function as an object laid over its slot (no copy in the worker).
These tests check that values arrive intact and typed on that path and on the
socket fallback, that a slot is never reused while the worker can still reach it,
and that nothing (process, fd, mapping, /dev/shm entry) outlives a run.

No sleeps: a worker kills itself on a marked item; everything else is plain runs.
"""

from __future__ import annotations

import asyncio
import os
import pickle
import signal
import sys
import zlib
from collections.abc import Awaitable, Iterator
from typing import Any, TypeVar

import psutil
import pytest
from pypline.backends import _procpool
from pypline.backends._procpool import Arena
from pypline.backends._procwire import ARENA_ALIGN, RawValue

from pypline import Pipeline, PipelineError, WorkerDied, work_pool
from pypline.util import unwrap, unwrap_err

T = TypeVar("T")

pytestmark = [
    pytest.mark.skipif(sys.platform == "win32", reason="the process backend needs add_reader (POSIX)"),
    pytest.mark.skipif(not Arena.available(), reason="no os.memfd_create: the arena is not used here"),
]



def arun(coro: Awaitable[T], timeout: float = 45.0) -> T:
    async def main() -> T:
        return await asyncio.wait_for(coro, timeout)

    return asyncio.run(main())


@pytest.fixture(autouse=True)
def no_children() -> Iterator[None]:
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    yield

    def left() -> list[psutil.Process]:
        """New descendants, except those of a process that was there before (an agent's workers)."""
        out = []
        for p in psutil.Process().children(recursive=True):
            try:
                if p.pid not in before and not any(a.pid in before for a in p.parents()):
                    out.append(p)
            except psutil.NoSuchProcess:
                pass
        return out

    psutil.wait_procs(left(), timeout=5.0)  # returns as soon as they are all gone
    assert not left(), f"leftover child processes: {left()}"


@pytest.fixture
def arenas(monkeypatch: pytest.MonkeyPatch) -> list[Arena]:
    """Every Arena created in this test, and how many buffers went into one (``placed``)."""
    created: list[Arena] = []
    init, put = Arena.__init__, Arena.put

    def tracking_init(self: Arena, size: int | None = None) -> None:
        init(self, size)
        self.placed = 0  # type: ignore[attr-defined]
        created.append(self)

    def counting_put(self: Arena, buf: memoryview, owner: int) -> int | None:
        off = put(self, buf, owner)
        if off is not None:
            self.placed += 1  # type: ignore[attr-defined]
        return off

    monkeypatch.setattr(Arena, "__init__", tracking_init)
    monkeypatch.setattr(Arena, "put", counting_put)
    return created


def _arena_fds_and_maps() -> tuple[list[str], list[str]]:
    fds = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if "pypline-arena" in target:
            fds.append(target)
    with open("/proc/self/maps") as f:
        maps = [line for line in f if "pypline-arena" in line]
    return fds, maps


# --- functions run in the workers (this module travels by value) ---------------------------------


def where(x: Any) -> str:
    """'arena' if the object itself lies in a shared-memory arena mapping of this process."""
    addr = id(x)
    with open("/proc/self/maps") as f:
        for line in f:
            if "pypline-arena" in line:
                lo, hi = (int(v, 16) for v in line.split()[0].split("-"))
                if lo <= addr < hi:
                    return "arena"
    return "heap"


def describe(x: Any) -> tuple[str, int, int, str, Any]:
    data = bytes(x) if not hasattr(x, "payload") else bytes(x.payload)
    shape = (x.format, x.shape) if isinstance(x, memoryview) else None
    return type(x).__name__, len(data), zlib.crc32(data), where(x), shape


class OutOfBand:
    """A value whose payload pickles out of band (protocol 5), like a numpy array."""

    def __init__(self, payload: Any) -> None:
        self.payload = payload

    def __reduce_ex__(self, protocol: int) -> Any:
        return (OutOfBand, (pickle.PickleBuffer(self.payload),))


def _items() -> list[Any]:
    big = bytes(range(256)) * (4 * 4096)  # 4 MiB
    import array

    grid = memoryview(array.array("d", range(30_000))).cast("B").cast("d", (100, 300))
    return [
        big,
        bytearray(big[:200_000]),
        memoryview(big)[: 3 * 65536],
        grid,
        OutOfBand(bytearray(b"o" * 300_000)),
        list(range(40_000)),  # pickled in-band, a frame of its own above 64 KiB
        b"small",
        big[:65536],
    ]


def _expected(x: Any) -> tuple[str, int, int, Any]:
    data = bytes(x) if not hasattr(x, "payload") else bytes(x.payload)
    if isinstance(x, list):
        return "list", -1, -1, None
    shape = (x.format, x.shape) if isinstance(x, memoryview) else None
    return type(x).__name__, len(data), zlib.crc32(data), shape


def _check(items: list[Any], out: list[Any]) -> None:
    for x, (name, n, crc, _, shape) in zip(items, out):
        if isinstance(x, list):
            assert name == "list"
            continue
        assert (name, n, crc, shape) == _expected(x), type(x)


def describe_list_aware(x: Any) -> Any:
    if isinstance(x, list):
        assert x == list(range(40_000))
        return "list", -1, -1, where(x), None
    return describe(x)


# --- round trips -------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_big_values_round_trip_through_the_arena(arenas: list[Arena]) -> None:
    """bytes, bytearray, memoryviews (format and shape kept), out-of-band buffers and big pickles."""
    items = _items()
    stage = work_pool(describe_list_aware, multi_proc=True, num_workers=2)
    out = unwrap((Pipeline(items) >> stage).run_sync())
    _check(items, out)
    assert sum(a.placed for a in arenas) >= 7  # every frame of 64 KiB or more went through shared memory
    # What the function gets is an ordinary object, copied out: never memory of the arena.
    assert [o[3] for o in out] == ["heap"] * len(items)
    assert all(a.view is None for a in arenas)  # unmapped when the run ended


@pytest.mark.timeout(60)
def test_values_round_trip_on_the_socket_without_memfd(arenas: list[Arena], monkeypatch: pytest.MonkeyPatch) -> None:
    """Where there is no memfd, the same values travel as raw frames on the socket."""
    monkeypatch.setattr(Arena, "available", staticmethod(lambda: False))
    items = _items()
    out = unwrap((Pipeline(items) >> work_pool(describe_list_aware, multi_proc=True, num_workers=2)).run_sync())
    _check(items, out)
    assert arenas == [] and all(o[3] == "heap" for o in out)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("arena", [True, False])
def test_raw_values_from_an_agent_arrive_as_bytes_and_bytearray(monkeypatch: pytest.MonkeyPatch, arena: bool) -> None:
    """RawValue (the agent's received frame, not copied) reaches the function as bytes / bytearray."""
    if not arena:
        monkeypatch.setattr(Arena, "available", staticmethod(lambda: False))
    big = os.urandom(300_000)
    items = [RawValue(memoryview(big)), RawValue(memoryview(big), True), RawValue(b"tiny")]
    out = unwrap((Pipeline(items) >> work_pool(describe, multi_proc=True, num_workers=1)).run_sync())
    assert [o[:3] for o in out] == [
        ("bytes", len(big), zlib.crc32(big)),
        ("bytearray", len(big), zlib.crc32(big)),
        ("bytes", 4, zlib.crc32(b"tiny")),
    ]


def test_numpy_arrays_round_trip() -> None:
    np = pytest.importorskip("numpy")
    a = np.arange(300_000, dtype=np.float64).reshape(600, 500)

    def twice(x: Any) -> Any:
        x *= 2  # writable: the worker has its own copy
        return x

    out = unwrap((Pipeline([a, a[:, :3]]) >> work_pool(twice, multi_proc=True, num_workers=2)).run_sync())
    assert (out[0] == a * 2).all() and (out[1] == a[:, :3] * 2).all()


# --- slot lifetime ----------------------------------------------------------------------------


def make_keeper() -> Any:
    kept: list[bytes] = []

    def keep_some(x: bytes) -> tuple[int, int]:
        """Keep every third item; return its crc and a digest of every item kept so far."""
        if x[0] % 3 == 0:
            kept.append(x)
        digest = 0
        for k in kept:
            digest = zlib.crc32(k, digest)
        return zlib.crc32(x), digest

    return keep_some


@pytest.mark.timeout(60)
def test_kept_items_are_never_overwritten_while_the_arena_is_reused(
    arenas: list[Arena], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A small arena, reused many times over, while the function keeps some items in a list:
    a kept item is an ordinary object copied out of its slot, so its bytes never change when
    the slot is reused; an item bigger than the arena takes the socket."""
    monkeypatch.setattr(_procpool, "ARENA_BYTES", 2 << 20)
    items = [bytes([i % 256]) + os.urandom(200_000 + 4096 * (i % 5)) for i in range(60)]
    items[10] = bytes([10]) + os.urandom(3 << 20)  # bigger than the arena: the socket
    out = unwrap((Pipeline(items) >> work_pool(make_keeper(), multi_proc=True, num_workers=1)).run_sync())
    digest = 0
    for x, (crc, got) in zip(items, out):
        if x[0] % 3 == 0:
            digest = zlib.crc32(x, digest)
        assert crc == zlib.crc32(x) and got == digest
    (arena,) = arenas
    fit = (2 << 20) // (53 * ARENA_ALIGN)  # slots of this size the arena holds at once
    # Slots were reused many times over (items that found it full took the socket).
    assert 2 * fit < arena.placed <= 59


def die_on_marked(x: bytes) -> int:
    if x[0] == 0xFF:
        os.kill(os.getpid(), signal.SIGKILL)
    return zlib.crc32(x)


@pytest.mark.timeout(60)
def test_worker_killed_while_holding_a_slot(arenas: list[Arena]) -> None:
    """The item whose worker dies holding its slot fails with WorkerDied; the others, re-sent to the
    replacement (a new arena), succeed; every arena is unmapped and no fd or mapping remains."""
    fds_before, maps_before = _arena_fds_and_maps()
    items = [bytes([i]) + os.urandom(500_000) for i in range(12)]
    items[4] = b"\xff" + items[4][1:]
    err = unwrap_err((Pipeline(items) >> work_pool(die_on_marked, multi_proc=True, num_workers=2, buffer=4)).run_sync())
    assert isinstance(err, PipelineError)
    assert [f.index for f in err.failures] == [4]
    assert isinstance(err.failures[0].error, WorkerDied) and err.failures[0].error.signal == signal.SIGKILL
    assert sorted(err.outputs) == sorted(zlib.crc32(x) for i, x in enumerate(items) if i != 4)
    assert len(arenas) >= 3  # two workers and the replacement (and any spare the executor keeps)
    assert all(a.view is None and a.fd == -1 for a in arenas)
    assert _arena_fds_and_maps() == (fds_before, maps_before)


@pytest.mark.timeout(60)
def test_no_fd_mapping_or_dev_shm_entry_outlives_runs(arenas: list[Arena]) -> None:
    shm_before = set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()
    fds_before = len(os.listdir("/proc/self/fd"))
    for _ in range(3):
        items = [os.urandom(300_000) for _ in range(8)]
        out = unwrap((Pipeline(items) >> work_pool(describe, multi_proc=True, num_workers=2)).run_sync())
        assert [o[2] for o in out] == [zlib.crc32(x) for x in items]
    assert len(arenas) >= 6 and all(a.view is None for a in arenas)
    assert _arena_fds_and_maps() == ([], [])
    assert len(os.listdir("/proc/self/fd")) == fds_before
    if os.path.isdir("/dev/shm"):
        assert set(os.listdir("/dev/shm")) == shm_before


# --- the allocator ----------------------------------------------------------------------------


def test_arena_slots_are_freed_once_out_of_flight() -> None:
    """A slot is reused as soon as its task is out of flight (``sweep``), never while it is in
    flight; neighbouring free slots merge; the task being encoded keeps its slot."""
    arena = Arena(4 * 65536)
    try:
        in_flight = {1, 2, 3}
        arena.in_flight = in_flight.__contains__
        data = memoryview(os.urandom(65536))  # exactly one 64 KiB slot each
        offs = [arena.put(data, owner) for owner in (1, 2, 3)]
        assert offs == [i * 65536 for i in range(3)]
        assert arena.view is not None and bytes(arena.view[offs[1] : offs[1] + data.nbytes]) == bytes(data)
        assert arena.put(memoryview(bytes(2 * 65536)), 4) is None  # 64 KiB left; all three in flight
        in_flight -= {1}
        arena.sweep(keep=0)
        assert arena.used == 2 * 65536  # 1 freed; 2 and 3 in flight
        assert arena.put(memoryview(bytes(2 * 65536)), 5) is None  # no two adjacent free slots
        in_flight -= {2}
        # put() sweeps when full: 2 is freed and merges with 1's slot
        assert arena.put(memoryview(bytes(2 * 65536)), 6) == 0
        in_flight.add(6)
        in_flight.discard(3)
        arena.sweep(keep=6)
        assert arena.used == 2 * 65536
    finally:
        arena.close()
        arena.close()  # idempotent
    assert arena.put(memoryview(b"x" * 65536), 7) is None  # closed: the socket


# --- through an agent -------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_big_items_through_an_agent_keep_their_types(shared_agent: Any, use_agents: Any) -> None:
    """The agent hands a received frame to its process workers without a copy of its own (RawValue):
    the function still gets bytes / bytearray with the right content."""
    use_agents(shared_agent)
    items = [os.urandom(1 << 20), bytearray(os.urandom(300_000)), b"small", os.urandom(70_000)]
    out = unwrap(arun((Pipeline(items) >> work_pool(describe, multi_proc=True, num_workers=2)).run()))
    assert [o[:3] for o in out] == [(type(x).__name__, len(x), zlib.crc32(x)) for x in items]
    assert [o[3] for o in out] == ["heap"] * len(items)  # ordinary objects, never the arena's memory
