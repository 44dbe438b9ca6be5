"""One retention round: the blocking side of retention.py, run in a worker thread.

:class:`Rounds` checks every closed segment (once: a closed segment never changes, so what
was checked is kept by name, inode and size between rounds), archives those not yet in the
archive, writes the marker (marker.py) as soon as archiving begins, and plans which of the
oldest segments may be deleted; :meth:`Rounds.delete` deletes them once the manager has
recorded them. The rules for each step are retention.py's module doc; the steps
themselves, safe against a crash at any point, are archive.py's.
"""

from __future__ import annotations

import contextlib
import os
import stat
import threading
from dataclasses import dataclass, field
from pathlib import Path

import orjson
import structlog

from iortd.auditlog.archive import (
    ArchiveError,
    SegInfo,
    archive_dir_for,
    archive_segment,
    check_segment,
    crash_point,
    delete_segment,
    errno_text,
    last_entry,
    make_dirs,
)
from iortd.auditlog.carryover import open_delivery
from iortd.auditlog.logdir import (
    CHECKPOINT_FILE,
    entry_seq,
    hash_at,
    read_anchor,
    read_segment,
    segment_paths,
)
from iortd.auditlog.marker import marker_origin, read_marker, write_marker
from iortd.auditlog.note import Checkpoint, NoteError, Verifier
from iortd.auditlog.segments import SegmentError, open_segment

__all__ = [
    "RetentionSettings",
    "RoundResult",
    "Rounds",
    "dir_bytes",
    "has_entry",
    "open_delivery_floor",
]

log = structlog.get_logger("iortd.retention")

# A round reads at most this much of the log (checks and copies), and deletes at most this
# much: a first round on a large log, or a share that has been away for days, goes on in
# the rounds that follow at once, each bounded in time.
ROUND_BYTES = 1024 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class RetentionSettings:
    budget_bytes: int
    warn_fraction: float = 0.8
    keep_fraction: float = 0.7
    archive_dir: Path | None = None  # None: nothing is ever deleted
    archive_mount_required: bool = True  # an unmounted share is an unreachable archive
    interval_s: float = 60.0


@dataclass(slots=True)
class RoundResult:
    used_bytes: int = 0
    local_segments: int = 0
    oldest_local: str | None = None
    unarchived: int = 0
    archived: list[SegInfo] = field(default_factory=list)
    deleted: list[SegInfo] = field(default_factory=list)
    archive_error: str | None = None
    problem: str | None = None  # a segment that does not verify: nothing past it is touched
    dest: Path | None = None  # the log's archive directory, when usable
    more: bool = False  # stopped at ROUND_BYTES: the next round comes at once
    newest_empty: bool = False  # a roll in progress: the next round comes soon
    # (segment, what was checked, the first seq of the segment after it): may be deleted
    deletable: list[tuple[Path, SegInfo, int]] = field(default_factory=list)


def dir_bytes(log_dir: Path) -> int:
    """Bytes of the regular files in the log directory and its quarantine/ (never
    following a link)."""
    total = 0
    for d in (log_dir, log_dir / "quarantine"):
        try:
            names = list(os.scandir(d))
        except OSError:
            continue
        for e in names:
            with contextlib.suppress(OSError):
                st = e.stat(follow_symlinks=False)
                if stat.S_ISREG(st.st_mode):
                    total += st.st_size
    return total


class Rounds:
    """The blocking side: one round at a time, in a worker thread. Caches what it checked
    (by name, size and inode: a closed segment never changes) between rounds."""

    def __init__(self, log_dir: Path, origin: str, verifier: Verifier | None) -> None:
        self.log_dir = log_dir
        self.origin = origin
        self.verifier = verifier
        self.stop = threading.Event()
        self._checked: dict[str, tuple[tuple[int, int], SegInfo, str]] = {}
        self._archived: set[str] = set()  # names whose copy was compared equal
        self._before: tuple[str, tuple[int, str]] | None = None  # _archived_before's last

    def round(self, s: RetentionSettings) -> RoundResult:
        res = RoundResult()
        segs = segment_paths(self.log_dir)
        res.used_bytes = dir_bytes(self.log_dir)
        res.local_segments = len(segs)
        res.oldest_local = segs[0].name if segs else None
        # Closed: every segment before the newest one that holds an entry (the writer
        # creates a segment before its first write; on a failing disk it stays empty).
        res.newest_empty = bool(segs) and not has_entry(segs[-1])
        closed = segs[:-2] if res.newest_empty else segs[:-1]
        dest: Path | None = None
        if s.archive_dir is not None:
            try:
                dest = self._archive_ready(s)
            except OSError as exc:
                res.archive_error = errno_text(exc)
            except ArchiveError as exc:
                res.archive_error = str(exc)
        if dest is not None and res.archive_error is None:
            try:
                self._ensure_marker(dest, segs)
            except OSError as exc:  # a deletion will not go ahead without it (_update_marker)
                log.warning("retention_marker_not_written", error=errno_text(exc))
        checked: list[tuple[Path, SegInfo]] = []
        prev: tuple[int, str] | None = None
        read = 0
        for i, path in enumerate(closed):
            if self.stop.is_set():
                break
            if read >= ROUND_BYTES:
                res.more = True  # the next round comes at once and goes on from here
                break
            copy = dest is not None and res.archive_error is None
            try:
                if prev is None and int(path.name[4:20]) != 0 and copy:
                    prev = self._archived_before(path.name, dest)
                # Without the archive, the first local segment's link to the archived one
                # before it is not checked now: nothing is archived or deleted meanwhile.
                info, data = self._check(path, prev, segs[i + 1], copy)
                read += len(data)
                if dest is not None and copy and path.name not in self._archived:
                    try:
                        if archive_segment(info, data, dest):
                            res.archived.append(info)
                        self._archived.add(path.name)
                    except OSError as exc:
                        res.archive_error = errno_text(exc)
            except (ArchiveError, OSError) as exc:
                res.problem = str(exc)
                break
            prev = (info.last_seq, info.last_hash)
            checked.append((path, info))
        res.unarchived = sum(1 for p in closed if p.name not in self._archived)
        res.dest = dest
        if (
            dest is not None
            and res.archive_error is None
            and res.problem is None
            and res.used_bytes >= s.warn_fraction * s.budget_bytes
        ):
            self._plan_deletion(s, res, checked, segs)
        return res

    def _archive_ready(self, s: RetentionSettings) -> Path | None:
        root = s.archive_dir
        if root is None:
            return None
        if not root.is_dir():
            raise ArchiveError("the archive directory is missing (is the share mounted?)")
        if s.archive_mount_required and not os.path.ismount(root):
            raise ArchiveError(
                "the archive directory is not a mount point (the share is not mounted)"
            )
        dest = archive_dir_for(root, self.origin)
        make_dirs(root, dest)
        real, logs = dest.resolve(), self.log_dir.resolve()
        if real == logs or real.is_relative_to(logs) or logs.is_relative_to(real):
            # A link planted in the share could make the "copy" the log itself.
            raise ArchiveError(f"the archive directory {real} leads into the log directory")
        if not os.access(dest, os.W_OK | os.X_OK):
            raise ArchiveError("the archive directory is not writable by the daemon")
        return dest

    def _check(
        self, path: Path, prev: tuple[int, str] | None, nxt: Path, copy: bool
    ) -> tuple[SegInfo, bytes | bytearray]:
        """Checked once (a closed segment never changes: by name, inode and size); read
        again when its bytes are needed for a copy."""
        st = os.lstat(path)
        key = (st.st_ino, st.st_size)
        hit = self._checked.get(path.name)
        if (
            hit is not None
            and hit[0] == key
            and (prev is None or prev[1] == hit[2])
            and not (copy and path.name not in self._archived)
        ):
            return hit[1], b""
        info, data = check_segment(path, prev, nxt, linked=copy)
        self._checked[path.name] = (key, info, "" if prev is None else prev[1])
        return info, data

    def _archived_before(self, name: str, dest: Path | None) -> tuple[int, str]:
        """The last entry of the archived segment before the first local one ``name``
        (read once for each first local segment, not at every round)."""
        if self._before is not None and self._before[0] == name:
            return self._before[1]
        before = [p for p in segment_paths(dest) if p.name < name] if dest else []
        if not before:
            raise ArchiveError(f"{name}: the segment before it is in neither place")
        self._before = (name, last_entry(before[-1]))
        return self._before[1]

    def _covered_count(self, segs: list[Path]) -> int:
        """Entries the checkpoint file covers, when it is signed by this daemon's key, for
        this log, and its head is the log's entry there (0 otherwise)."""
        if self.verifier is None:
            return 0
        try:
            text = read_anchor(self.log_dir / CHECKPOINT_FILE)
            if text is None:
                return 0
            cp, signed = Checkpoint.parse_verified(text, self.verifier)
        except NoteError:
            return 0
        if not signed or cp.origin != self.origin or cp.count < 1:
            return 0
        return cp.count if hash_at(segs, cp.count - 1) == cp.head_hash else 0

    def _plan_deletion(
        self,
        s: RetentionSettings,
        res: RoundResult,
        checked: list[tuple[Path, SegInfo]],
        segs: list[Path],
    ) -> None:
        """The oldest segments that may go (see the module doc), as many as bring the
        directory under keep_fraction of the budget; none is deleted here."""
        covered = self._covered_count(segs)
        floor: int | None = -1  # read only when a segment is otherwise due to go
        used = res.used_bytes
        for i, (path, info) in enumerate(checked):
            if used <= s.keep_fraction * s.budget_bytes:
                return
            if path.name not in self._archived or info.last_seq >= covered - 1:
                return  # not archived, or not covered with its checkpoint's entry kept
            if floor == -1:
                floor = open_delivery_floor(segs)
            if floor is not None and info.last_seq >= floor:
                return  # an open delivery has entries here
            if sum(x.size for _, x, _ in res.deletable) + info.size > ROUND_BYTES:
                res.more = True  # each is read twice more before it goes: bounded too
                return
            res.deletable.append((path, info, int(segs[i + 1].name[4:20])))
            used -= info.size

    def delete(self, res: RoundResult, dest: Path) -> RoundResult:
        """Delete what the round planned (recorded in the log first, by the manager), each
        checked again against its archived copy; stops at the first that cannot go."""
        crash_point("renamed-before-delete")
        for path, info, next_first in res.deletable:
            if self.stop.is_set():
                break
            try:
                self._update_marker(dest, next_first)
                delete_segment(path, info, dest / path.name)
            except OSError as exc:
                res.problem = f"{path.name}: cannot be deleted ({errno_text(exc)})"
                break
            except ArchiveError as exc:
                res.problem = str(exc)
                self._archived.discard(path.name)
                break
            self._checked.pop(path.name, None)
            res.deleted.append(info)
            res.used_bytes -= info.size
            res.local_segments -= 1
        res.oldest_local = next((p.name for p in segment_paths(self.log_dir)), None)
        return res

    def _update_marker(self, dest: Path, first_local: int) -> None:
        """The marker's first local seq, before an unlink. On a full disk this write may
        fail: the deletion goes on (it is what frees the space), as long as the marker
        that is there names this log's origin, which recovery needs once the first
        segment is gone (written when archiving began, with space to spare)."""
        try:
            write_marker(self.log_dir, self.origin, dest, first_local)
        except OSError as exc:
            if marker_origin(self.log_dir) != self.origin:
                raise
            log.warning("retention_marker_not_updated", error=errno_text(exc))

    def _ensure_marker(self, dest: Path, segs: list[Path]) -> None:
        """The marker names this log and its archive, written as soon as archiving
        begins, long before the disk is full."""
        marker = read_marker(self.log_dir)
        if marker is None or (marker.get("origin"), marker.get("archive")) != (
            self.origin,
            str(dest),
        ):
            write_marker(self.log_dir, self.origin, dest, int(segs[0].name[4:20]) if segs else 0)


def has_entry(path: Path) -> bool:
    """Whether a segment holds at least one whole line (read without following a link)."""
    try:
        with open_segment(path) as seg:
            return any(True for _ in seg.blocks())
    except SegmentError:
        return True  # not for this check to judge: the segment's own check says what it is


def open_delivery_floor(segs: list[Path]) -> int | None:
    """The seq of the ``delivery_started`` of the delivery the log shows open (as recovery
    would take it over), or None when none is open."""
    did = open_delivery(segs)[0]
    if did is None:
        return None
    needle = b'"delivery_id":' + orjson.dumps(did)
    for path in reversed(segs):
        for raw in reversed(read_segment(path).splitlines()):
            if raw.endswith(b'"type":"delivery_started"}') and needle in raw:
                return entry_seq(raw)
    return 0  # open, its start not found locally: keep everything
