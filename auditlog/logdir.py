"""The files of a log directory, as the daemon's writer and its recovery handle them.

Layout (docs/audit-log.md):

    log-<first seq, 16 digits>-<UTC date YYYYMMDD>.jsonl   segments, in chain order
    checkpoint                                            the latest signed checkpoint
    seal                                                  the latest seal (writer.py)
    quarantine/                                           bytes set aside by recovery
    LOCK                                                  one writer per directory

Whoever can write the log directory can plant files in it. The daemon reads and writes
only regular files there and never follows a link: a segment or ``LOCK`` that is a FIFO, a
device or a link refuses the start (LogUnusable, naming the file); ``quarantine/`` must be
a real directory and its files are always created anew (O_EXCL|O_NOFOLLOW); a segment that
cannot be opened for appending that way is a failing write; before each write the open
segment is compared with its path (device, inode, link count), so a deleted or replaced
segment or log directory is a failing write, not entries written to an unlinked file. The
seal and checkpoint files are read only as small regular files (:func:`read_anchor`; the
auditors' verify reads them through it too).

Everything here is synchronous and runs in a worker thread (the writer's, or recovery's
before the writer starts).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import secrets
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import orjson

from iortd.auditlog.canonical import Envelope, open_line
from iortd.auditlog.note import NoteError
from iortd.auditlog.segments import SegmentError, open_segment
from iortd.kernel.durable import fsync_dir, write_all, write_atomic

__all__ = [
    "ANCHOR_MAX_BYTES",
    "CHECKPOINT_FILE",
    "SEAL_FILE",
    "SEGMENT_RE",
    "LogDamaged",
    "LogInUse",
    "LogUnusable",
    "OpenSegment",
    "new_origin",
    "read_anchor",
    "recent_lines",
    "segment_paths",
]

SEGMENT_RE = re.compile(r"^log-(\d{16})-(\d{8})\.jsonl$")
SEAL_FILE = "seal"
CHECKPOINT_FILE = "checkpoint"
ANCHOR_MAX_BYTES = 64 * 1024  # a seal or checkpoint note is a few hundred bytes


class LogDamaged(RuntimeError):
    """The log is damaged in a way a crash cannot explain; the daemon will not write to it."""


class LogUnusable(LogDamaged):
    """A file in the log directory that the daemon must not read or follow: not a regular
    file (a FIFO, a device, a directory) or a symbolic link, under a segment's name or as
    ``LOCK``. Someone else changed the directory; the daemon does not start on it."""


class LogInUse(RuntimeError):
    """Another process holds the log directory."""


def segment_paths(directory: Path) -> list[Path]:
    """Segments in chain order (their names start with the first entry's seq)."""
    found = [p for p in directory.iterdir() if SEGMENT_RE.match(p.name)]
    return sorted(found, key=lambda p: p.name)


def recent_lines(directory: Path, since_day: str, *needles: bytes) -> Iterator[bytes]:
    """The lines, oldest first, of the segments that hold entries of day ``since_day``
    (``YYYYMMDD``, UTC) or later and that contain one of ``needles`` (a cheap filter before
    parsing: what the command handlers rebuild their state from at start). A segment's name
    carries the day it began, so the one that began before ``since_day`` is read too (it may
    run into the window) and older ones are not. Blocking: run it in a thread."""
    paths: list[Path] = []
    for path in reversed(segment_paths(directory)):
        paths.append(path)
        m = SEGMENT_RE.match(path.name)
        if m and m.group(2) < since_day:
            break  # this segment began before the window: older ones are older still
    for path in reversed(paths):
        for line in read_segment(path).splitlines():
            if any(n in line for n in needles):
                yield line


@dataclass(slots=True)
class OpenSegment:
    """The segment the writer appends to: its path, descriptor, committed size and day."""

    path: Path
    fd: int
    size: int
    date: str


def open_for_append(path: Path, extra: int = 0) -> int:
    """A segment opened for appending: never through a link (the next segment's name is
    predictable; a link planted there would have the log appended to another file) and
    only a regular file (O_NONBLOCK: a FIFO planted there fails at once instead of
    waiting for a reader). Otherwise an OSError: a failing write, alarmed and retried."""
    flags = os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC | extra
    fd = os.open(path, flags, 0o640)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(
            errno.EINVAL, f"{path}: not a regular file: someone changed the log directory"
        )
    return fd


def create_segment(directory: Path, first_seq: int, date: str) -> OpenSegment:
    """The segment whose first entry is ``first_seq``, written on ``date`` (YYYYMMDD),
    opened for appending as :func:`open_for_append` does, and its name made durable."""
    path = directory / f"log-{first_seq:016d}-{date}.jsonl"
    fd = open_for_append(path, os.O_CREAT)
    size = os.fstat(fd).st_size
    fsync_dir(directory)
    return OpenSegment(path, fd, size, date)


def check_same_file(seg: OpenSegment) -> None:
    """The open segment is still the file at its path: not deleted, not replaced, its
    directory not moved or deleted. Otherwise writing on would go to a file nobody sees."""
    st = os.fstat(seg.fd)
    if st.st_nlink == 0:
        raise OSError(errno.ENOENT, f"{seg.path}: the open segment was deleted")
    try:
        at_path = os.stat(seg.path)
    except FileNotFoundError:
        raise OSError(
            errno.ENOENT, f"{seg.path}: the segment or the log directory was moved or deleted"
        ) from None
    if (at_path.st_dev, at_path.st_ino) != (st.st_dev, st.st_ino):
        raise OSError(errno.ESTALE, f"{seg.path}: the segment was replaced by another file")


def unusable(path: Path, what: str) -> LogUnusable:
    return LogUnusable(
        f"{path} {what}. Not reading it, and nothing was moved. Keep the directory as "
        "evidence and check it with `iort-audit verify`; then remove that file if it is "
        "not the log's, or point log.directory at a new directory to start a new log."
    )


def read_segment(path: Path) -> bytes:
    """A segment's bytes: only a regular file, never through a symbolic link (a FIFO
    would hang the start, a link to /dev/zero exhaust memory, a link elsewhere make the
    daemon read, truncate and append to a file of someone else's choosing)."""
    try:
        with open_segment(path) as seg:
            return seg.read_all()
    except SegmentError as exc:
        raise unusable(path, exc.what) from None


def check_segments(segments: list[Path]) -> None:
    """Every segment a regular file, checked before anything is read or touched."""
    for path in segments:
        try:
            open_segment(path).close()
        except SegmentError as exc:
            raise unusable(path, exc.what) from None


def read_origin(first: Path) -> str | None:
    try:
        with open_segment(first) as seg:
            line = seg.first_line()
    except SegmentError as exc:
        raise unusable(first, exc.what) from None
    try:
        entry = orjson.loads(line)
    except orjson.JSONDecodeError:
        return None
    if isinstance(entry, dict) and entry.get("type") == "log_created":
        origin = entry.get("data", {}).get("origin")
        return origin if isinstance(origin, str) else None
    return None


def quarantine_dir(directory: Path) -> Path:
    """The log directory's own quarantine/: a real directory, never a link (whoever can
    write the log directory could point it anywhere)."""
    q = directory / "quarantine"
    with contextlib.suppress(FileExistsError):
        q.mkdir()
    if not stat.S_ISDIR(os.lstat(q).st_mode):
        raise unusable(q, "is not a directory (a symbolic link, or a file)")
    return q


def write_new(path: Path, data: bytes) -> Path:
    """A new file in quarantine/, fsync'd; returns its path. Never through a link, never
    over a file that is there already (its name is predictable: a planted link there would
    make the daemon write into a file of someone else's choosing): a name taken gets a
    suffix (.1, .2, ...; a start that crashed in the same second left its copy)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    name = path.name
    for n in range(100):
        path = path.with_name(name if n == 0 else f"{name}.{n}")
        try:
            fd = os.open(path, flags, 0o640)
            break
        except FileExistsError:
            continue
    else:
        raise unusable(path, "and 99 names before it exist already in quarantine/")
    try:
        write_all(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    fsync_dir(path.parent)
    return path


def lock_directory(directory: Path) -> int:
    """One writer per log directory: an exclusive flock on LOCK, held until close (the
    kernel drops it if the process dies, so a crash never leaves it stale)."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "LOCK"
    flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(path, flags, 0o640)
    except OSError:
        if os.path.islink(path):
            raise unusable(path, "is a symbolic link, not the daemon's lock file") from None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise unusable(path, "is not a regular file, not the daemon's lock file")
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise LogInUse(
            f"{directory} is in use by another iortd (pid {holder}); one writer per log"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def damaged(where: str, why: str) -> LogDamaged:
    return LogDamaged(
        f"{where}: {why}: the log is damaged or was altered, not torn by a crash. Not "
        "writing to it, and nothing was moved. Check it with `iort-audit verify`, keep it "
        "as evidence, and point log.directory at a new directory to start a new log."
    )


def read_anchor(path: Path) -> str | None:
    """A seal or checkpoint file's text; None when there is none. Only a small regular
    file is read (a FIFO or a device put there must not hang or flood recovery)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise NoteError(f"cannot open: {exc.strerror or exc}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise NoteError("not a regular file")
        if st.st_size > ANCHOR_MAX_BYTES:
            raise NoteError(f"{st.st_size} bytes: too large for a note")
        data = os.read(fd, ANCHOR_MAX_BYTES + 1)
    finally:
        os.close(fd)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise NoteError("not UTF-8 text") from None


def write_anchor(directory: Path, name: str, note: str) -> None:
    """Replace the seal or checkpoint file atomically (``NAME.tmp`` removed and created
    anew, fsync'd, renamed over it, the directory fsync'd: kernel/durable.py)."""
    write_atomic(directory / name, note.encode("utf-8"), tmp=directory / f"{name}.tmp")


def entry_seq(raw: bytes) -> int | None:
    """The seq of a line, from its envelope tail (no parse of the data)."""
    at = raw.rfind(b',"seq":')
    if at < 0:
        return None
    end = raw.find(b",", at + 7)
    try:
        return int(raw[at + 7 : end])
    except ValueError:
        return None


def envelope_at(segments: list[Path], seq: int) -> Envelope | None:
    """The envelope of the entry with ``seq`` (its claimed hash and ts; recovery has
    checked the chain of the newest segments, and verify checks all of it)."""
    for path in reversed(segments):
        first = int(path.name[4:20])
        if first > seq:
            continue
        for raw in read_segment(path).splitlines():
            if entry_seq(raw) == seq:
                try:
                    return open_line(raw)
                except ValueError:
                    return None
        return None
    return None


def hash_at(segments: list[Path], seq: int) -> str | None:
    env = envelope_at(segments, seq)
    return None if env is None else env.hash


def new_origin(site: str, room: str) -> str:
    """A log origin: where it comes from plus a random id, never patient data."""
    return f"iortd/{site}/{room}/{secrets.token_hex(8)}"
