"""The retention marker: ``retention`` in the log directory, written before the first
segment is deleted and before each deletion after it.

It says where the archive of this log is, the log's origin and the first seq still kept
locally (JSON, replaced atomically). The log's first segment, which names the origin, may
be gone from the directory: recovery takes the origin from the marker then. A forged one
only makes the daemon refuse to start: the origin is checked against the daemon's own
signatures (vouch.py). ``iort-audit verify`` uses it only to say where the archive is; the
archive's own segments are what is verified.

The writer's ``hash_at`` finds an entry before the first local segment in the archive
(:func:`hash_at_anywhere`), and the fork guard compares that hash with the broker's signed
checkpoint before the off-host copy is overwritten. So it trusts neither the marker nor the
share: the archive is the *configured* one (``ARCHIVE_DIR/<origin>``, the origin the
writer's own), never the path the marker names, which anyone who can write the log
directory can change; and the archived entries from the one asked for up to the first
local entry must hash-chain, each entry's hash recomputed and each ``prev`` linked, into
that first local entry's ``prev``. A forged segment in the archive, however consistent in
itself, then gives no hash (None: the guard treats it as a conflict, never as a match).
The read runs in a daemon thread bounded by :data:`HASH_AT_TIMEOUT_S` (:func:`find_hash`):
an archive on a stalled share gives None too, and never holds up the daemon's exit.
"""

from __future__ import annotations

import asyncio
import os
import stat
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import structlog

from iortd.auditlog.archive import ArchiveError, archive_dir_for, read_whole, scan
from iortd.auditlog.canonical import open_line
from iortd.auditlog.logdir import entry_seq, hash_at, segment_paths
from iortd.auditlog.segments import SegmentError, open_segment
from iortd.kernel.durable import write_atomic
from iortd.kernel.threads import in_daemon_thread

__all__ = [
    "HASH_AT_TIMEOUT_S",
    "MARKER_FILE",
    "find_hash",
    "hash_at_anywhere",
    "marker_origin",
    "read_marker",
    "write_marker",
]

log = structlog.get_logger("iortd.audit")

MARKER_FILE = "retention"
MARKER_FORMAT = "iortd-retention/1"
MARKER_MAX_BYTES = 64 * 1024
# How long the fork guard waits for an entry's hash (an archive on a stalled share).
HASH_AT_TIMEOUT_S = 30.0


def write_marker(log_dir: Path, origin: str, archive: Path, first_local_seq: int) -> None:
    """Say, before any segment is deleted, where the archive is and what stays local."""
    marker: dict[str, Any] = {
        "archive": str(archive),
        "first_local_seq": first_local_seq,
        "format": MARKER_FORMAT,
        "origin": origin,
        "updated": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    write_atomic(log_dir / MARKER_FILE, orjson.dumps(marker, option=orjson.OPT_SORT_KEYS))


def read_marker(log_dir: Path) -> dict[str, Any] | None:
    """The marker's fields, or None when there is none or it is unusable (only a small
    regular file is read, never through a link)."""
    try:
        fd = os.open(log_dir / MARKER_FILE, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not (stat.S_ISREG(st.st_mode) and st.st_size <= MARKER_MAX_BYTES):
            return None
        data = os.read(fd, MARKER_MAX_BYTES + 1)
    except OSError:
        return None
    finally:
        os.close(fd)
    try:
        marker = orjson.loads(data)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(marker, dict) or marker.get("format") != MARKER_FORMAT:
        return None
    return marker


def marker_origin(log_dir: Path) -> str | None:
    marker = read_marker(log_dir)
    origin = None if marker is None else marker.get("origin")
    return origin if isinstance(origin, str) else None


async def find_hash(
    directory: Path, seq: int, origin: str, archive_root: Path | None
) -> str | None:
    """:func:`hash_at_anywhere` in a daemon thread, bounded by :data:`HASH_AT_TIMEOUT_S`:
    past it (a stalled share) None, as for a hash that cannot be vouched for, and the
    thread is abandoned, never joined (kernel/threads.py)."""
    try:
        async with asyncio.timeout(HASH_AT_TIMEOUT_S):
            return await in_daemon_thread(
                hash_at_anywhere, directory, seq, origin, archive_root, name="iortd-hash-at"
            )
    except TimeoutError:
        log.error("audit_hash_at_timeout", seq=seq, timeout_s=HASH_AT_TIMEOUT_S)  # noqa: TRY400 - no traceback to give
        return None


def hash_at_anywhere(
    directory: Path, seq: int, origin: str, archive_root: Path | None
) -> str | None:
    """The hash of entry ``seq``: from the log directory, or, for an entry before its first
    segment, from the configured archive (``archive_root``, the ``[log.retention]
    archive_dir``; None: no archive, no hash), checked to chain into the local log (see
    the module doc). The writer's ``hash_at`` uses it: the MQTT sink compares it with the
    broker's signed checkpoint before overwriting the off-host copy, and an entry
    retention archived is not a fork. It is a start-time guard, not a proof: that every
    segment verifies is what ``iort-audit verify --archive`` checks."""
    local = segment_paths(directory)
    if not local or seq >= _first_seq(local[0]):
        return hash_at(local, seq)
    if archive_root is None:
        return None
    try:
        return _archived_hash(archive_dir_for(archive_root, origin), seq, local[0])
    except (ArchiveError, OSError):
        return None


def _first_seq(path: Path) -> int:
    return int(path.name[4:20])


def _archived_hash(archive: Path, seq: int, first_local: Path) -> str | None:
    """Entry ``seq``'s hash in ``archive``, if the archived entries from it to the one
    before ``first_local``'s first link into that first entry; else None."""
    try:
        with open_segment(first_local) as seg:
            head = open_line(seg.first_line())
    except (SegmentError, ValueError):
        return None
    start = _first_seq(first_local)
    if head.seq != start:
        return None
    chain = [p for p in segment_paths(archive) if _first_seq(p) < start]
    while chain[1:] and _first_seq(chain[1]) <= seq:
        chain.pop(0)
    found: str | None = None
    prev: tuple[int, str] | None = None
    for path in chain:
        data = read_whole(path)
        entries, last_seq, last_hash, error, intact = scan(data, prev)
        if error or intact != len(data) or last_seq - entries + 1 != _first_seq(path):
            return None
        if found is None:
            lines = (bytes(raw) for raw in data.splitlines())
            found = next((open_line(raw).hash for raw in lines if entry_seq(raw) == seq), None)
            if found is None:
                return None
        prev = (last_seq, last_hash)
    return found if prev == (start - 1, head.prev) else None
