"""Writing entry lines into the log's segments: append, fsync, rotate (by size and at UTC
midnight). The part of the writer (writer.py) that runs in a worker thread, moved out of
it unchanged (issue 20 needed the room): :class:`SegmentWriting` is a base class of
``AuditLog`` and keeps its attributes (``directory``, ``_segment``, ``_max``,
``on_rotate``).

All or nothing per segment: a failing write or fsync cuts the segment back to its last
committed size, so that a torn line never sits in the middle of a file when the retry
appends after it, and :class:`PartialWrite` says how many entries of the batch (from the
start) are on disk. A deleted log directory is never recreated (a fresh chain there would
hide the deletion).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

from iortd.auditlog.logdir import OpenSegment, check_same_file, create_segment
from iortd.kernel.durable import write_all

__all__ = ["PartialWrite", "Pending", "SegmentWriting"]


class PartialWrite(Exception):
    def __init__(self, written: int, error: OSError) -> None:
        super().__init__(str(error))
        self.written = written
        self.error = error


class Pending(NamedTuple):
    seq: int
    date: str  # YYYYMMDD of the entry's ts: which day's segment it belongs to
    line: bytes
    future: asyncio.Future[None]
    durable: bool
    hash: str


class SegmentWriting:
    """The segment files of one writer (a base class of writer.AuditLog)."""

    directory: Path
    _segment: OpenSegment | None
    _max: int
    on_rotate: Callable[[], None]

    def _write_batch(self, batch: list[Pending]) -> None:
        """Runs in a worker thread: write, rotate and fsync; all or nothing per segment.

        Raises PartialWrite saying how many entries (from the start) are on disk."""
        i = 0
        while i < len(batch):
            try:
                i = self._write_chunk(batch, i)
            except OSError as exc:
                raise PartialWrite(i, exc) from exc

    def _write_chunk(self, batch: list[Pending], i: int) -> int:
        """Write the entries from ``i`` that go into one segment; return where it stopped."""
        seg = self._segment
        first = batch[i]
        if (
            seg is None
            or seg.date != first.date
            or (seg.size > 0 and seg.size + len(first.line) > self._max)
        ):
            seg = self._rotate(first.seq, first.date)
        chunk: list[bytes] = []
        size = seg.size
        while i < len(batch) and batch[i].date == seg.date:
            line = batch[i].line
            if chunk and size + len(line) > self._max:
                break
            chunk.append(line)
            size += len(line)
            i += 1
        check_same_file(seg)
        try:
            write_all(seg.fd, b"".join(chunk))
            os.fsync(seg.fd)
        except OSError:
            # Cut back to the last committed size so that a torn write never sits
            # in the middle of the file when the retry appends after it.
            with contextlib.suppress(OSError):
                os.ftruncate(seg.fd, seg.size)
            raise
        seg.size = size
        return i

    def _rotate(self, first_seq: int, date: str) -> OpenSegment:
        if not self.directory.is_dir():
            # Never recreate a deleted log directory: a new chain in an empty directory
            # would hide the deletion. The alarm stays up until an operator acts.
            raise OSError(errno.ENOENT, f"{self.directory}: the log directory is gone")
        old = self._segment
        if old is not None:
            os.fsync(old.fd)
            os.close(old.fd)
            self._segment = None
        self._segment = create_segment(self.directory, first_seq, date)
        self.on_rotate()
        return self._segment
