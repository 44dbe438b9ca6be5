"""The retention marker: ``retention`` in the log directory, written before the first
segment is deleted and before each deletion after it.

It says where the archive of this log is, the log's origin and the first seq still kept
locally (JSON, replaced atomically). The log's first segment, which names the origin, may
be gone from the directory: recovery takes the origin from the marker then. A forged one
only makes the daemon refuse to start: the origin is checked against the daemon's own
signatures (vouch.py). ``iort-audit verify`` uses it only to say where the archive is; the
archive's own segments are what is verified. The writer's ``hash_at`` looks there for an
entry before the first local segment (:func:`hash_at_anywhere`).
"""

from __future__ import annotations

import os
import stat
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from iortd.auditlog.logdir import hash_at, segment_paths
from iortd.kernel.durable import write_atomic

__all__ = ["MARKER_FILE", "hash_at_anywhere", "marker_origin", "read_marker", "write_marker"]

MARKER_FILE = "retention"
MARKER_FORMAT = "iortd-retention/1"
MARKER_MAX_BYTES = 64 * 1024


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


def hash_at_anywhere(directory: Path, seq: int) -> str | None:
    """The hash of entry ``seq``: from the log directory, or, for an entry before its first
    segment, from the archive the marker names. The writer's ``hash_at`` uses it: the MQTT
    sink compares it with the broker's signed checkpoint before overwriting the off-host
    copy, and an entry retention archived is not a fork. It is a start-time guard, not a
    proof: whether the local segments continue the archived ones is what
    ``iort-audit verify --archive`` checks."""
    local = segment_paths(directory)
    if local and seq < int(local[0].name[4:20]):
        marker = read_marker(directory)
        where = None if marker is None else marker.get("archive")
        if not isinstance(where, str) or not Path(where).is_dir():
            return None
        return hash_at(segment_paths(Path(where)), seq)
    return hash_at(local, seq)
