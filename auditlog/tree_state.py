"""The writer's Merkle frontier across restarts: saved in the seal, continued at open.

The writer (writer.py) keeps the frontier of the tree over every entry (merkle.py) beside
the chain's head. It is not kept in a file of its own: the seal, written after every
group commit, carries it as its last extension line, ``frontier <base64> <base64> ...``
(one hash per set bit of the seal's size, largest subtree first: at most 64). The seal is
signed, so the saved frontier is vouched for by the same signature that vouches for the
seal's size, root and head; and its root must be the seal's root, or it is not used.

At open, :func:`open_frontier` takes the frontier from the seal when recovery found the
seal vouching for this log (``RecoveryReport.vouched_by == "seal"`` at the seal's size:
its head is the log's entry there), and reads only the entries after it
(merkle_log.rebuild_frontier with ``start``): a start costs the entries of the last
crash's tail, not the whole log. Otherwise (no seal, one from an older version without a
frontier, another key, a seal recovery did not accept) it rebuilds the frontier from seq
0, at about 3 to 5 s per million entries on the development VM (benchmarks/merkle.py;
docs/audit-log.md). Retention may have moved the oldest segments away: the rebuild then
reads the archive the directory's retention marker names (union.py), and when that cannot
be read either, there is no frontier: the writer then signs chain-head checkpoints, as
before issue 20, and says why in the operational log, rather than refuse to monitor.

Blocking file I/O: run it in a worker thread.
"""

from __future__ import annotations

import base64
import binascii
from pathlib import Path

from iortd.auditlog.logdir import SEAL_FILE, read_anchor, segment_paths
from iortd.auditlog.marker import read_marker
from iortd.auditlog.merkle import Frontier
from iortd.auditlog.merkle_log import RebuildError, rebuild_frontier
from iortd.auditlog.note import Checkpoint, NoteError, Verifier
from iortd.auditlog.union import find_archive, merge

__all__ = ["FRONTIER_PREFIX", "frontier_line", "open_frontier", "seal_frontier"]

FRONTIER_PREFIX = "frontier "


def frontier_line(frontier: Frontier) -> str:
    """The seal's extension line that saves ``frontier``."""
    return FRONTIER_PREFIX + " ".join(base64.b64encode(h).decode() for h in frontier.hashes)


def seal_frontier(cp: Checkpoint) -> Frontier | None:
    """The frontier a tree seal saved, if it has one of the right shape whose root is the
    seal's root; None otherwise."""
    if cp.root is None or not cp.extensions:
        return None
    last = cp.extensions[-1]
    if not last.startswith(FRONTIER_PREFIX):
        return None
    try:
        hashes = [base64.b64decode(h, validate=True) for h in last[len(FRONTIER_PREFIX) :].split()]
        frontier = Frontier.restore(cp.count, hashes)
    except (ValueError, binascii.Error):
        return None
    return frontier if frontier.root().hex() == cp.root else None


def _from_seal(directory: Path, verifier: Verifier, vouched: int | None) -> Frontier | None:
    try:
        text = read_anchor(directory / SEAL_FILE)
        if text is None:
            return None
        cp, signed = Checkpoint.parse_verified(text, verifier)
    except NoteError:
        return None
    if not signed or cp.count != vouched:
        return None
    return seal_frontier(cp)


def open_frontier(
    directory: Path, *, verifier: Verifier, vouched_by: str, vouched: int | None, size: int
) -> tuple[Frontier | None, str]:
    """The frontier over the log's ``size`` entries and how it was found (``seal``,
    ``rebuilt``), or None and why there is none."""
    start = _from_seal(directory, verifier, vouched) if vouched_by == "seal" else None
    files = segment_paths(directory)
    how = "seal" if start is not None else "rebuilt"
    try:
        try:
            frontier = rebuild_frontier(files, start=start)
        except RebuildError:
            archive = _archive(directory)
            if archive is None:
                raise
            union = merge(files, archive)
            if union.problem is not None:
                raise RebuildError(union.problem.what) from None
            frontier = rebuild_frontier(union.files, start=start)
    except RebuildError as exc:
        return None, str(exc)
    if frontier.size != size:
        return None, f"the segments hold {frontier.size} entries, recovery found {size}"
    return frontier, how


def _archive(directory: Path) -> Path | None:
    marker = read_marker(directory)
    where = None if marker is None else marker.get("archive")
    return find_archive(Path(where), directory) if isinstance(where, str) else None
