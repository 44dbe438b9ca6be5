"""Durable file writes shared by the audit log and the MQTT outbox: everything that must
survive a crash goes through these, so that the fsync rules are written once.

Blocking: call them from a worker thread, never on the event loop.
"""

from __future__ import annotations

import contextlib
import os
import threading
from pathlib import Path

__all__ = ["fsync_dir", "write_all", "write_atomic"]


def fsync_dir(path: Path) -> None:
    """Make a directory's entries (a new file, a rename) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_all(fd: int, data: bytes | bytearray | memoryview) -> None:
    """``os.write`` until every byte is written (it may write fewer); a slice of a
    memoryview is written without a copy."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def write_atomic(path: Path, data: bytes, *, tmp: Path | None = None) -> None:
    """Replace ``path`` with ``data`` all at once: write a temporary file, fsync it,
    rename it over ``path``, fsync the directory. ``tmp`` defaults to a name unique to
    this process and thread, so that two writers never share one."""
    tmp = tmp or path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    # The temporary file is always a new one, created without following a link: a link
    # planted under its (fixed, predictable) name would otherwise have the data written
    # into, and truncate, whatever file it points to. A leftover is removed first (unlink
    # removes a link itself, never its target); one planted again in between makes the
    # create fail, an error like any failing write.
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
    try:
        write_all(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    tmp.replace(path)
    fsync_dir(path.parent)
