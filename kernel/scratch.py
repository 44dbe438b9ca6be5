"""Temporary directories that say whose they are, so that a later start can reclaim the
ones a killed process left behind, and never a live one's.

A :class:`ScratchDir` is ``$TMPDIR/iortd-KIND-PID-START-RANDOM`` (mode 0700; ``START`` is
the owner's start time from ``/proc/PID/stat``, in clock ticks since boot, ``0`` where there
is no ``/proc``), with a file ``owner.lock`` inside on which the owner holds an exclusive
``flock`` for as long as it lives. The kernel drops the lock when the owner dies, however it
dies (SIGKILL included), so the lock, not the name, is the authority: it also holds across
PID namespaces (a container sharing ``/tmp``), where a PID means nothing. The owner removes
its directory itself on a normal exit; SIGKILL leaves it, and the next start of the same
kind reclaims it (:func:`reclaim`).

:func:`reclaim` removes a directory only if all of these hold: its name matches the kind's
pattern; it is a real directory (not a symbolic link) owned by this user; and either its
lock can be taken (the owner is dead), or it has no lock file, is older than
:data:`YOUNG_S` (the owner may be between ``mkdtemp`` and the lock) and its PID and start
time no longer name a running process. It removes it while holding the lock, so two
starts reclaiming at once do not trip over each other. Anything it cannot read or remove
is left alone: reclaiming is housekeeping, never a reason to fail a start.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import stat
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Self

__all__ = ["LOCK_NAME", "YOUNG_S", "ScratchDir", "process_start", "reclaim"]

LOCK_NAME = "owner.lock"
YOUNG_S = 60.0
_KIND = re.compile(r"^[a-z][a-z0-9]*$")


def process_start(pid: int) -> int | None:
    """A process's start time (clock ticks since boot, field 22 of ``/proc/PID/stat``), or
    None if there is no such process (or no ``/proc``). A zombie counts as gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw.rsplit(")", 1)[-1].split()
    if len(fields) < 20 or fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


def _pattern(kind: str) -> re.Pattern[str]:
    return re.compile(rf"^iortd-{re.escape(kind)}-(\d+)-(\d+)-[A-Za-z0-9_]+$")


def _check_kind(kind: str) -> str:
    if not _KIND.match(kind):
        raise ValueError(f"a scratch directory's kind is lower-case letters/digits: {kind!r}")
    return kind


class ScratchDir:
    """A temporary directory owned by this process (see the module's notes). Entering it
    is optional; :meth:`close` (or leaving the ``with``) removes it."""

    def __init__(self, kind: str, *, base: Path | None = None) -> None:
        _check_kind(kind)
        pid = os.getpid()
        start = process_start(pid) or 0
        where = str(base) if base is not None else None
        self.path = Path(tempfile.mkdtemp(prefix=f"iortd-{kind}-{pid}-{start}-", dir=where))
        try:
            flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
            self._lock: int | None = os.open(self.path / LOCK_NAME, flags, 0o600)
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BaseException:
            shutil.rmtree(self.path, ignore_errors=True)
            raise

    def close(self) -> None:
        """Remove the directory (still holding the lock), then let go of the lock.
        Idempotent."""
        if self._lock is None:
            return
        try:
            _remove(self.path)
        finally:
            os.close(self._lock)
            self._lock = None

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<ScratchDir {self.path} {'held' if self._lock is not None else 'removed'}>"


def reclaim(kind: str, *, base: Path | None = None, now: float | None = None) -> list[Path]:
    """Remove the directories of ``kind`` in ``base`` (default: the temporary directory)
    that their owners left behind; the ones removed."""
    pattern = _pattern(_check_kind(kind))
    root = base if base is not None else Path(tempfile.gettempdir())
    wall = time.time() if now is None else now
    removed = []
    try:
        names = sorted(os.listdir(root))
    except OSError:
        return []
    for name in names:
        m = pattern.match(name)
        if m is None:
            continue
        path = root / name
        with contextlib.suppress(OSError):
            if _reclaim_one(path, int(m[1]), int(m[2]), wall):
                removed.append(path)
    return removed


def _reclaim_one(path: Path, pid: int, start: int, wall: float) -> bool:
    st = path.lstat()
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
        return False
    try:
        fd = os.open(path / LOCK_NAME, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        # No lock yet (or no longer): judge by age, PID and start time.
        if wall - st.st_mtime < YOUNG_S or _running(pid, start):
            return False
        _remove(path)
        return True
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False  # the owner lives
        if _running(pid, start):
            return False  # its owner made the lock file and has not locked it yet
        _remove(path)
        return True
    finally:
        os.close(fd)


def _running(pid: int, start: int) -> bool:
    now = process_start(pid)
    if now is not None:
        return start in (0, now)
    if Path("/proc/self/stat").exists():
        return False  # /proc is there and has no such (live) process
    try:
        os.kill(pid, 0)  # no /proc: a PID alone (it may have been reused: keep, to be safe)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def _remove(path: Path) -> None:
    """``shutil.rmtree`` that does not mind a concurrent remover (FileNotFoundError)."""

    def gone_already(func: object, p: str, exc: BaseException) -> None:
        if not isinstance(exc, FileNotFoundError):
            raise exc

    if sys.version_info >= (3, 12):
        shutil.rmtree(path, onexc=gone_already)
    else:
        shutil.rmtree(path, onerror=lambda f, p, info: gone_already(f, p, info[1]))
