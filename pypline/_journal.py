"""Durable runs: ``run(journal="crawl.journal", key=lambda item: item["url"])`` resumes where a
killed run stopped, and never delivers an item twice across the runs.

::

    open: read the journal ─► the keys already delivered (a torn last line is cut off)
    source ─► key(item) in them? ─ yes ─► skipped (never enters the pipeline)
                                  └ no ──► (key, item): the engine keeps the key on the
                                           item's root envelope (None once the item failed)
    the item's last output delivered ─► delivered(key): appended unless None

What "delivered" means: for ``stream()`` and ``iter()``, an item's key is written before
its last output is handed to your loop; for ``run()``, when its last stage has finished
with it (``run()``'s own list is lost with the process, so give a durable run a last
stage that writes its results somewhere, and ``collect=False``). A failed item is not
written: the next run tries it again.

Durability: keys are written to the file (one ``write`` for all the keys gathered) before
the outputs they stand for are handed to your loop, and, for ``run()``, at most
``WRITE_SECONDS`` after their items finished; so a process killed with SIGKILL loses no
key of an output it handed over (a killed ``run()`` makes the next run redo at most the
items of its last ``WRITE_SECONDS``). ``fsync`` runs ``SYNC_SECONDS`` after
the first key it has not covered (or once ``SYNC_EVERY`` keys wait), and when the run
ends, so a machine that loses power loses at most that much (those items are delivered
again). An ``fsync`` per few hundred keys cost more than the engine itself on W1. Keys are JSON
(strings, numbers, booleans, None, and lists of them); one per line, after a header.
Keys are meant to be unique in a source: an item whose key an earlier run recorded is
skipped, while two items of one run with the same key both go through (the run keeps
the keys of earlier runs in memory, not its own).
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

__all__ = ["Journal"]

HEADER = "# pypline journal 1\n"
SYNC_EVERY = 65536
SYNC_SECONDS = 0.2

#: For ``run()``: how long a finished item's key may wait to be written. A ``write`` per
#: loop iteration cost W1 3 points more than one per 10 ms (bench_journal.py: +7.7 % against
#: +4.6 %, side by side); a stream writes before each handover anyway.
WRITE_SECONDS = 0.01


def _same(item: Any) -> Any:
    return item


_quote: Callable[[str], str] = getattr(json.encoder, "c_encode_basestring_ascii", None) or json.encoder.py_encode_basestring_ascii
"""``json.dumps(s)`` for a str ``s``, without the encoder's set-up (what dumps calls for a str)."""


def _encode(key: Any) -> str:
    t = type(key)
    if t is int:
        return str(key)
    if t is str:
        return _quote(key)
    try:
        return json.dumps(key, separators=(",", ":"), sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise TypeError(
            f"a journal key must be JSON (a str, number, bool, None or a list of them), got {key!r}: {exc}"
        ) from None


class Journal:
    """The keys of the items a run delivered, on disk; see the module docstring."""

    def __init__(self, path: str | os.PathLike[str], key: Callable[[Any], Any] | None) -> None:
        self.path = Path(path)
        self.key: Callable[[Any], Any] = key if key is not None else _same
        self.done: set[str] = set()
        self.skipped = 0
        self.written = 0
        self.unsynced = 0
        self.fd = -1
        self.timer: asyncio.TimerHandle | None = None  # the next fsync
        self.write_timer: asyncio.TimerHandle | None = None  # the next write
        self.lines: list[str] = []  # keys not yet written
        self.write_due = False

    def open(self) -> None:
        """Read what earlier runs delivered and open the file for appending."""
        if self.path.exists():
            data = self.path.read_bytes()
            if data and not data.startswith(HEADER.encode()):
                raise ValueError(f"{self.path} is not a pypline journal (it does not start with {HEADER.strip()!r})")
            end = data.rfind(b"\n") + 1
            if end < len(data):  # a line torn by a crash: cut it off
                os.truncate(self.path, end)
            for line in data[len(HEADER) : end].decode("utf-8").splitlines():
                if line:
                    self.done.add(line)
        self.fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        if os.fstat(self.fd).st_size == 0:
            os.write(self.fd, HEADER.encode())

    # --- the source --------------------------------------------------------------------------

    def filter(self, source: Any) -> Any:
        """``(key, item)`` for each source item not delivered yet (sync or async, as the source)."""
        if hasattr(source, "__aiter__"):
            return self._afilter(source)
        return self._filter(source)

    def _filter(self, source: Any) -> Iterator[tuple[str, Any]]:
        """The per-item cost of a journal on a fast pipeline is mostly here: the common keys
        (the item itself, an int, a str) take no function call but the key's own."""
        key, done, encode, quote = self.key, self.done, _encode, _quote
        identity = key is _same
        for item in source:
            k = item if identity else key(item)
            t = type(k)
            k = str(k) if t is int else quote(k) if t is str else encode(k)
            if done and k in done:
                self.skipped += 1
                continue
            yield k, item

    async def _afilter(self, source: Any) -> AsyncIterator[tuple[str, Any]]:
        key, done = self.key, self.done
        async for item in source:
            k = _encode(key(item))
            if k in done:
                self.skipped += 1
                continue
            yield k, item

    # --- delivery ------------------------------------------------------------------------------

    def delivered(self, key: str | None) -> None:
        """An item left the pipeline: its key goes to the file (``None``: it failed, it does not)."""
        if key is None:
            return
        self.lines.append(key)
        if not self.write_due:
            self.schedule_write()

    def schedule_write(self) -> None:
        """Write the keys gathered WRITE_SECONDS from now (or sooner, see ``write``)."""
        self.write_due = True
        self.write_timer = asyncio.get_running_loop().call_later(WRITE_SECONDS, self.write)

    def write(self) -> None:
        """Write the keys gathered so far: before an output is handed over, at the end, and
        WRITE_SECONDS after the first key that waits."""
        self.write_due = False
        if self.write_timer is not None:
            self.write_timer.cancel()
            self.write_timer = None
        lines = self.lines
        if not lines or self.fd < 0:
            return
        self.lines = []
        os.write(self.fd, ("\n".join(lines) + "\n").encode())
        self.written += len(lines)
        self.unsynced += len(lines)
        if self.unsynced >= SYNC_EVERY:
            self.sync()
        elif self.timer is None:
            self.timer = asyncio.get_running_loop().call_later(SYNC_SECONDS, self.sync)

    def sync(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.unsynced and self.fd >= 0:
            os.fsync(self.fd)
            self.unsynced = 0

    def close(self) -> None:
        if self.fd >= 0:
            self.write()
            self.sync()
            os.close(self.fd)
            self.fd = -1
