"""Archiving and deleting closed segments: the blocking steps of retention (retention.py).

Everything here is synchronous and runs in a worker thread. A closed segment leaves the
log directory only through these steps, each safe to be cut short by a crash at any point:

1. **check** (:func:`check_segment`): its bytes are read once, as a regular file never
   through a link (:func:`read_whole`), and every entry's hash, seq and ``prev`` is
   checked (:func:`scan`), the first one against the last entry of the segment before it
   (local, or its archived copy) and the last one against the first entry of the segment
   after it. What is copied is exactly the bytes that were checked. The reading and
   hashing let the GIL go, and the check pauses every :data:`YIELD_EVERY` entries: it
   runs beside the event loop of the poll loops and the writer.
2. **copy** (:func:`archive_segment`): to ``.NAME.part`` in the log's archive directory
   (created anew, never through a link; a leftover of a crash is removed first), fsync'd,
   renamed to ``NAME``, the directory fsync'd; then the copy is read back and its SHA-256
   compared. A crash leaves at most a ``.part`` file, which no tool takes for a segment
   (the name does not match) and the next round replaces. A file already under ``NAME``
   that differs is never overwritten nor deleted: it is renamed aside
   (``NAME.differs-<UTC time>``) and the copy made again.
3. **delete** (:func:`delete_segment`): the local segment and the archived copy are both
   read again and must still have the checked SHA-256; the marker (below) is written
   first, then the segment is unlinked and the directory fsync'd. A crash before the
   unlink leaves the segment in place (the next round deletes it again); after it, the
   segment is in the archive.

Before a deletion the marker (marker.py) says where the archive is and what stays local.

The log's archive directory is ``ARCHIVE_DIR/<origin>`` (``iortd/SITE/ROOM/ID``): several
rooms can share one mounted share without their segments' names colliding.

Crash tests name a step in the environment variable :data:`CRASH_ENV` and the process
kills itself (SIGKILL) there. Unset, as in production, it does nothing.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import signal
import stat
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from iortd.auditlog.canonical import open_line, scan_chain
from iortd.auditlog.segments import SegmentError, open_segment
from iortd.kernel.durable import fsync_dir, write_all

__all__ = [
    "CRASH_ENV",
    "ArchiveError",
    "SegInfo",
    "archive_dir_for",
    "archive_segment",
    "check_segment",
    "crash_point",
    "delete_segment",
    "make_dirs",
]

CRASH_ENV = "IORTD_RETENTION_CRASH_AT"
CRASH_POINTS = ("copy-mid", "copy-before-rename", "renamed-before-delete", "delete-mid")
_PART = re.compile(r"^[A-Za-z0-9._-]{1,100}$")
BLOCK = 1024 * 1024  # reads and hashes go this much at a time, the GIL let go
YIELD_EVERY = 256  # entries checked between two moments the GIL is let go
YIELD_S = 0.001  # for this long: a background check takes a share of the CPU, not all of it


class ArchiveError(Exception):
    """A segment that cannot be archived or deleted now, and why (in words)."""


@dataclass(frozen=True, slots=True)
class SegInfo:
    """A closed segment as checked: its entries' seqs, the link hashes, its bytes."""

    name: str
    first_seq: int
    last_seq: int
    last_hash: str
    size: int
    sha256: str


def crash_point(step: str) -> None:
    """Die here (SIGKILL, as a power cut would stop the process) when a crash test names
    ``step`` in CRASH_ENV; nothing otherwise."""
    if os.environ.get(CRASH_ENV) == step:
        os.kill(os.getpid(), signal.SIGKILL)


def archive_dir_for(root: Path, origin: str) -> Path:
    """The log's own directory in the archive: ``root/<origin>``. The origin is checked
    part by part (it becomes a path): ArchiveError for one that cannot be used."""
    parts = origin.split("/")
    if not all(_PART.match(p) and p not in (".", "..") for p in parts):
        raise ArchiveError(f"the log's origin {origin!r} cannot name an archive directory")
    return root.joinpath(*parts)


def read_whole(path: Path) -> bytearray:
    """A segment's bytes, a regular file opened without following a link, read into one
    buffer with the GIL released (joining 64 MiB from blocks would hold it for tens of
    milliseconds, and the poll loops share it). OSError if it cannot be read."""
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
    try:
        fd = os.open(path, flags)
    except OSError:
        if os.path.islink(path):
            raise ArchiveError(f"{path}: is a symbolic link, not a segment file") from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ArchiveError(f"{path}: not a regular file: someone changed the directory")
        buf = bytearray(st.st_size)
        view = memoryview(buf)
        got = 0
        while got < len(buf):
            n = os.readv(fd, [view[got : got + BLOCK]])
            if n == 0:
                break
            got += n
        view.release()
        del buf[got:]
        return buf
    finally:
        os.close(fd)


def scan(data: bytearray, prev: tuple[int, str] | None) -> tuple[int, int, str, str | None, int]:
    """(entries, last seq, last hash, what is wrong or None, bytes of whole valid entries)
    of a segment's bytes, each entry's hash, seq and prev checked (the first one against
    ``prev`` when given) by the one chain check (canonical.scan_chain); the GIL is let go
    every :data:`YIELD_EVERY` entries, so that the event loop is not held up."""
    prev_seq, prev_hash = (None, None) if prev is None else prev
    s = scan_chain(data, prev_hash, prev_seq, pause_every=YIELD_EVERY, pause_s=YIELD_S)
    return s.entries, s.last_seq, s.last_hash, s.error, s.intact


def check_segment(
    path: Path, prev: tuple[int, str] | None, nxt: Path, *, linked: bool = True
) -> tuple[SegInfo, bytearray]:
    """Check a closed segment whole: its chain, its link to ``prev`` ((seq, hash) of the
    entry before it; None for the segment that starts the log, or, with ``linked`` False,
    when the segment before it cannot be read now) and the link of the first entry of
    ``nxt`` to it. Returns what was checked and the bytes themselves."""
    data = read_whole(path)
    first_seq = int(path.name[4:20])
    if prev is None and first_seq != 0 and linked:
        raise ArchiveError(
            f"{path.name}: the segment before it is neither in the log directory nor in "
            "the archive: its link cannot be checked"
        )
    entries, last_seq, last_hash, error, intact = scan(data, prev)
    if error is not None or intact != len(data) or entries == 0:
        line = data.count(b"\n", 0, intact) + 1
        why = error or "no entries"
        raise ArchiveError(f"{path.name}:{line}: does not verify ({why})")
    if last_seq - entries + 1 != first_seq:
        raise ArchiveError(f"{path.name}: its first entry is not seq {first_seq}")
    try:
        with open_segment(nxt) as seg:
            env = open_line(seg.first_line())
    except (SegmentError, ValueError) as exc:
        raise ArchiveError(f"{nxt.name}:1: cannot be read to check the link ({exc})") from None
    if env.seq != last_seq + 1 or env.prev != last_hash:
        raise ArchiveError(f"{nxt.name}:1: does not link to the end of {path.name}")
    digest = hashlib.sha256(data).hexdigest()
    return SegInfo(path.name, first_seq, last_seq, last_hash, len(data), digest), data


def last_entry(path: Path) -> tuple[int, str]:
    """(seq, hash) of a segment's last entry (the archived copy of the segment before the
    first local one; its own chain is checked, its link is the archive's business)."""
    entries, last_seq, last_hash, error, _ = scan(read_whole(path), None)
    if error is not None or entries == 0:
        raise ArchiveError(f"archived {path.name}: does not verify ({error or 'empty'})")
    return last_seq, last_hash


def file_sha256(path: Path) -> str | None:
    """SHA-256 of a regular file read without following a link, in blocks (hashing lets
    the GIL go); None if there is none."""
    h = hashlib.sha256()
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        return None
    except OSError:
        if os.path.islink(path):
            raise ArchiveError(f"{path}: is a symbolic link, not a segment file") from None
        raise
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ArchiveError(f"{path}: not a regular file")
        while chunk := os.read(fd, BLOCK):
            h.update(chunk)
    finally:
        os.close(fd)
    return h.hexdigest()


def make_dirs(root: Path, dest: Path) -> None:
    """``dest`` and the directories between it and ``root``, each made durable in its
    parent (a power cut on the share must not lose the directory with the copies)."""
    missing = []
    d = dest
    while d != root and not d.is_dir():
        missing.append(d)
        d = d.parent
    for d in reversed(missing):
        with contextlib.suppress(FileExistsError):
            d.mkdir()
        fsync_dir(d.parent)


def archive_segment(info: SegInfo, data: bytes | bytearray, dest_dir: Path) -> bool:
    """Copy a checked segment's bytes to ``dest_dir`` (see the module doc); True if a
    copy was made, False if an equal one was there already. OSError: the archive cannot
    be written (not mounted, not writable, full); ArchiveError: the copy read back differs."""
    dest = dest_dir / info.name
    have = file_sha256(dest)
    if have == info.sha256:
        return False
    if have is not None:
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
        dest.rename(dest_dir / f"{info.name}.differs-{stamp}")
        fsync_dir(dest_dir)
    tmp = dest_dir / f".{info.name}.part"
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()  # a crash's half copy (unlink removes a planted link, not its target)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o640)
    try:
        view, half = memoryview(data), len(data) // 2
        write_all(fd, view[:half])  # slices of a view: no copy of the segment
        crash_point("copy-mid")
        write_all(fd, view[half:])
        os.fsync(fd)
    finally:
        os.close(fd)
    crash_point("copy-before-rename")
    tmp.rename(dest)
    fsync_dir(dest_dir)
    if file_sha256(dest) != info.sha256:
        raise ArchiveError(f"{dest}: the copy read back differs from the segment")
    return True


def delete_segment(path: Path, info: SegInfo, archived: Path) -> None:
    """Unlink a local segment once both it and its archived copy still hold the checked
    bytes (ArchiveError otherwise: nothing is deleted)."""
    if file_sha256(archived) != info.sha256:
        raise ArchiveError(f"{archived}: the archived copy is missing or differs: not deleting")
    a, b = os.stat(archived, follow_symlinks=False), os.stat(path, follow_symlinks=False)
    if (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino):
        raise ArchiveError(f"{archived}: is the local segment itself, not a copy: not deleting")
    if file_sha256(path) != info.sha256:
        raise ArchiveError(f"{path.name}: changed since it was checked: not deleting")
    path.unlink()
    crash_point("delete-mid")
    fsync_dir(path.parent)


def errno_text(exc: OSError) -> str:
    """An OSError in a few words, for the record and the status: the errno name and its
    text (no path: the archive directory is in the config already)."""
    name = errno.errorcode.get(exc.errno or 0, "error")
    return f"{name}: {exc.strerror or exc}"
