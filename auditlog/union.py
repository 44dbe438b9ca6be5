"""One log from two places: the segments still in the log directory and those in its
archive (retention.py), for ``iort-audit verify --archive``.

The union is taken by segment name (names start with the first entry's seq): a segment
in both places must hold the same bytes (read in bounded memory: segments.py), else the
log is not intact, and the local copy is the one read. Files in the archive that are not
segment names (a ``.NAME.part`` a crash left, a ``NAME.differs-*`` set aside) are not part
of the log. verify then checks the union as one chain; a segment missing from both places
shows as the seqs it held, named by :func:`missing_segment`.

The archive directory may be given as the log's own (holding segments) or as the share's
root: the log's directory under it is ``ROOT/<origin>``, the origin read from the log
directory's retention marker, seal or checkpoint file (only to find the directory; what
is in it is verified like everything else).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from iortd.auditlog.archive import ArchiveError, archive_dir_for
from iortd.auditlog.findings import Problem
from iortd.auditlog.logdir import CHECKPOINT_FILE, SEAL_FILE, read_anchor, segment_paths
from iortd.auditlog.marker import marker_origin
from iortd.auditlog.note import Checkpoint, NoteError
from iortd.auditlog.segments import SegmentError, open_segment

__all__ = ["Union", "find_archive", "merge", "missing_segment"]


@dataclass(slots=True)
class Union:
    files: list[Path]
    local: int = 0  # segments read from the log directory
    archived: int = 0  # read from the archive only
    both: int = 0  # in both places, compared equal
    problem: Problem | None = None


def find_archive(archive: Path, log_dir: Path | None) -> Path:
    """The directory holding this log's archived segments: ``archive`` itself when it
    holds segments, else ``archive/<origin>`` when that does."""
    if segment_paths(archive) or log_dir is None:
        return archive
    origins = [marker_origin(log_dir)]
    for name in (SEAL_FILE, CHECKPOINT_FILE):
        try:
            text = read_anchor(log_dir / name)
            origins.append(
                None if text is None else Checkpoint.parse_verified(text, None)[0].origin
            )
        except NoteError:
            continue
    for origin in origins:
        if not origin:
            continue
        try:
            candidate = archive_dir_for(archive, origin)  # where retention puts it
        except ArchiveError:
            continue
        if candidate.is_dir() and segment_paths(candidate):
            return candidate
    return archive


def _same(a: Path, b: Path) -> str | None:
    """None when both files hold the same bytes; else what differs."""
    try:
        with open_segment(a) as sa, open_segment(b) as sb:
            if sa.size != sb.size:
                return f"{sa.size} bytes here, {sb.size} in the archive"
            for la, lb in zip(sa.flat(), sb.flat(), strict=False):
                if la != lb:
                    return "their contents differ"
            if sa.error or sb.error or sa.torn != sb.torn:
                return "their contents differ"
    except SegmentError as exc:
        return exc.what
    return None


def merge(local: Sequence[Path], archive: Path) -> Union:
    """The union of the local segments and the archived ones, in chain order."""
    by_name = {p.name: p for p in local}
    first_local = min(by_name, default=None)
    out = Union(files=[])
    for arch in segment_paths(archive) if archive.is_dir() else []:
        here = by_name.get(arch.name)
        if here is None:
            if first_local is not None and arch.name > first_local:
                # Retention deletes oldest first: a segment missing here after the first
                # local one was never deleted by it. Were it taken, whoever can write the
                # share could continue (or fill in) the log with entries of their making.
                out.problem = Problem(
                    arch, 0, None,
                    "is in the archive only, but comes after the first local segment "
                    f"({first_local}): retention never deletes that one; not part of this log",
                )  # fmt: skip
                continue
            by_name[arch.name] = arch
            out.archived += 1
            continue
        why = _same(here, arch)
        if why is not None:
            out.problem = Problem(
                here,
                0,
                None,
                f"differs from its archived copy {arch} ({why}): one of them was altered",
            )
        out.both += 1
    out.files = [by_name[n] for n in sorted(by_name)]
    out.local = len(out.files) - out.archived
    return out


def missing_segment(expect_seq: int, seq: int, archive: Path) -> str:
    """What verify says when the chain jumps from ``expect_seq`` to ``seq`` at a segment
    boundary of the union."""
    return (
        f"entries seq {expect_seq}..{seq - 1} are in neither the log directory nor the "
        f"archive {archive}: the segment log-{expect_seq:016d}-*.jsonl was deleted without "
        "being archived, or removed from the archive"
    )
