"""Entries a stop could not write, kept outside the log directory for the next start.

A stop while the disk is full or read-only does not drop what is pending: after one more
try, the writer appends the entries to a spill file outside the log directory
(``spill_dir``, named by a hash of the log's origin, so one spill directory serves several
logs). The next open appends them to the log if they continue its chain exactly (they are
then unvouched: never sealed), or keeps the file in quarantine; either way the recovery
report says how many, which seqs, and where (recovery.py, :func:`restore_spill`). A spill
file is removed only after its entries are in the log, so a crash during the restore loses
none of them.

The spill directory lives in a shared place (the temporary directory by default): it is
used only if it is a real directory of this user with mode 0700, and the spill file is
never opened through a link.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import os
import stat
import tempfile
from collections.abc import Sequence
from pathlib import Path

import structlog

from iortd.kernel.durable import write_all

__all__ = ["DEFAULT_SPILL_DIR", "spill_path"]

DEFAULT_SPILL_DIR = Path(tempfile.gettempdir()) / "iortd-spill"

log = structlog.get_logger("iortd.audit")


def spill_path(spill_dir: Path, origin: str) -> Path:
    """Where a stop that could not write its last entries leaves them for this log."""
    return spill_dir / f"spill-{hashlib.sha256(origin.encode()).hexdigest()[:16]}.jsonl"


def private_dir(path: Path) -> None:
    """The spill directory lives in a shared place (the temporary directory): it must be
    a real directory of ours that nobody else can write, or a planted symlink could make
    the daemon write elsewhere, and a planted file be taken for a spill."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
        raise OSError(
            errno.EPERM, f"{path}: not a private directory of this user (mode 0700): not used"
        )


def write_spill(spill_dir: Path, origin: str, data: bytes) -> Path:
    """Runs in a worker thread: append ``data`` (whole entry lines) to the log's spill
    file, fsync'd; after an earlier spill, if any, so the file stays in seq order."""
    target = spill_path(spill_dir, origin)
    private_dir(spill_dir)
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW
    fd = os.open(target, flags, 0o600)
    try:
        write_all(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    return target


async def spill_entries(spill_dir: Path, origin: str, lost: Sequence[tuple[int, bytes]]) -> None:
    """Keep the (seq, line) entries a stop could not write in the spill file, for the next
    start. A failure here is logged: nothing else is left."""
    target = spill_path(spill_dir, origin)
    data = b"".join(line for _, line in lost)
    try:
        await asyncio.to_thread(write_spill, spill_dir, origin, data)
    except OSError as exc:
        log.critical("audit_log_spill_failed", path=str(target), error=str(exc))
        return
    log.critical(
        "audit_log_entries_spilled",
        path=str(target),
        count=len(lost),
        first_seq=lost[0][0],
        last_seq=lost[-1][0],
    )


def read_spill(spill_dir: Path, origin: str) -> bytes | None:
    """The log's spill file, if there is one (None otherwise). Raises OSError when it
    cannot be used: a spill directory that is not private, a spill that is not a regular
    file."""
    source = spill_path(spill_dir, origin)
    if not source.exists():
        return None
    private_dir(spill_dir)
    fd = os.open(source, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, f"{source}: not a regular file")
        with os.fdopen(os.dup(fd), "rb") as f:
            return f.read()
    finally:
        os.close(fd)
