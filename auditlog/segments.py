"""Reading a log's segment files for the auditors' tools: only regular files, in bounded
memory.

Whoever can write to the log directory can put there, under a segment's name, a FIFO
(``open`` waits for a writer for ever), a symbolic link to ``/dev/zero`` (an endless line),
or a segment of many gigabytes. The auditors' tools read through :func:`open_segment`:

* opened with ``O_NOFOLLOW | O_NONBLOCK`` and checked with ``fstat`` on the open descriptor
  (what is checked is what is read: no race with a rename), and read only if it is a
  regular file. ``O_NONBLOCK`` makes the open of a FIFO return at once; regular files
  ignore it.
* A symbolic link in place of a segment is refused, even to a regular file: the daemon
  writes its segments as regular files in its own directory, so a link is a change someone
  else made to the log directory, and following it would let that person point the
  auditor's tool at any file the auditor can read. A path the user names on the command
  line may be a link (collect_files resolves it): the user chose it.
* Read in blocks of :data:`BLOCK_BYTES`, split into lines; a line longer than
  :data:`MAX_LINE_BYTES` is not a log entry and ends the reading with an error naming its
  line. Memory is bounded by those two sizes, whatever the size of the segment.

Every refusal is a :class:`SegmentError` naming the line (0: the file as a whole) and what
is wrong, in words; callers report it as the log being not intact.
"""

from __future__ import annotations

import itertools
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import Final, Self

__all__ = ["BLOCK_BYTES", "MAX_LINE_BYTES", "Segment", "SegmentError", "open_segment"]

BLOCK_BYTES: Final = 4 * 1024 * 1024
# The largest entry the daemon writes is config_loaded (the whole config, itself at most
# 1 MiB of TOML); samples and events are well under 1 KiB.
MAX_LINE_BYTES: Final = 8 * 1024 * 1024


class SegmentError(Exception):
    """A segment that cannot be read as log lines; ``line`` is 0 for the whole file."""

    def __init__(self, line: int, what: str) -> None:
        super().__init__(what)
        self.line = line
        self.what = what


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO (named pipe)"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return name
    return "not a regular file"


class Segment:
    """An open segment; iterate one of :meth:`blocks`, :meth:`flat` or :meth:`lines`, once.
    ``torn`` is the bytes after the last newline (``b""`` when the file ends with one),
    known when the iteration is over."""

    def __init__(self, fd: int, size: int) -> None:
        self._fd = fd
        self.size = size  # at open; a segment being written grows
        self.torn = b""
        self.consumed = 0  # bytes read so far
        self.error: SegmentError | None = None  # why flat() stopped early

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def blocks(self) -> Iterator[list[bytes]]:
        """Whole lines without their newline, a block's worth at a time."""
        rest = b""
        first_line = 1
        while True:
            try:
                chunk = os.read(self._fd, BLOCK_BYTES)
            except OSError as exc:
                raise SegmentError(0, f"cannot be read: {exc.strerror}") from None
            if not chunk:
                break
            self.consumed += len(chunk)
            data = rest + chunk if rest else chunk
            lines = data.split(b"\n")
            rest = lines.pop()
            if lines and max(map(len, lines)) > MAX_LINE_BYTES:
                n = next(i for i, x in enumerate(lines) if len(x) > MAX_LINE_BYTES)
                raise SegmentError(first_line + n, self._too_long())
            if len(rest) > MAX_LINE_BYTES:
                raise SegmentError(first_line + len(lines), self._too_long())
            first_line += len(lines)
            if lines:
                yield lines
        self.torn = rest

    def first_line(self) -> bytes:
        """The first line without its newline (at most MAX_LINE_BYTES are read)."""
        for lines in self.blocks():
            return lines[0]
        return self.torn

    def read_all(self) -> bytes:
        """The whole file at once (the daemon's recovery, which reads only the newest
        segments: a regular file, checked at open, so the reading ends)."""
        parts: list[bytes] = []
        while True:
            try:
                chunk = os.read(self._fd, BLOCK_BYTES)
            except OSError as exc:
                raise SegmentError(0, f"cannot be read: {exc.strerror}") from None
            if not chunk:
                return b"".join(parts)
            self.consumed += len(chunk)
            parts.append(chunk)

    @staticmethod
    def _too_long() -> str:
        return f"not a log entry (a line longer than {MAX_LINE_BYTES} bytes)"

    def flat(self) -> Iterator[bytes]:
        """Whole lines without their newline, one at a time. Stops early on a SegmentError
        and keeps it in ``error`` (for a loop that handles its own problems). The lines of
        a block are handed out in C (itertools.chain): no generator resumes per line."""
        return itertools.chain.from_iterable(self._blocks_keeping_error())

    def _blocks_keeping_error(self) -> Iterator[list[bytes]]:
        try:
            yield from self.blocks()
        except SegmentError as exc:
            self.error = exc

    def lines(self) -> Iterator[tuple[int, bytes]]:
        """(line number, line with its newline); an incomplete last line comes last, as
        it is, so that the caller sees it."""
        n = 0
        for block in self.blocks():
            for line in block:
                n += 1
                yield n, line + b"\n"
        if self.torn:
            yield n + 1, self.torn


def open_segment(path: Path) -> Segment:
    """Open a segment for reading; SegmentError (line 0) if it is not a regular file."""
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        if os.path.islink(path):
            raise SegmentError(
                0,
                "is a symbolic link, not a segment file: the daemon writes its segments as "
                "regular files; someone changed the log directory",
            ) from None
        raise SegmentError(0, f"cannot be opened: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
    except OSError as exc:
        os.close(fd)
        raise SegmentError(0, f"cannot be read: {exc.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise SegmentError(
            0, f"is {_kind(st.st_mode)}, not a segment file: someone changed the log directory"
        )
    return Segment(fd, st.st_size)
