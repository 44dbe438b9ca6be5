"""The writer's Merkle frontier across restarts: saved in the seal, continued at open.

The writer (writer.py) keeps the frontier of the tree over every entry (merkle.py) beside
the chain's head. It is not kept in a file of its own: the seal, written after every
group commit, carries it as its last extension line, ``frontier <base64> <base64> ...``
(one hash per set bit of the seal's size, largest subtree first: at most 64). The seal is
signed, so the saved frontier is vouched for by the same signature that vouches for the
seal's size, root and head; and its root must be the seal's root, or it is not used.

At open, :func:`load_frontier` takes the frontier from the seal when recovery found the
seal vouching for this log (``RecoveryReport.vouched_by == "seal"`` at the seal's size:
its head is the log's entry there), and reads only the entries after it
(merkle_log.rebuild_chained with ``start``): a start costs the entries of the last
crash's tail, not the whole log. Otherwise (no seal, one from an older version without a
frontier, another key, a seal recovery did not accept) it rebuilds the frontier from seq
0, at the rate benchmarks/merkle.py measures (docs/development.md, "Merkle tree").

Every entry read is checked to chain from the seal's head (or from seq 0) to the head
recovery found: the daemon signs this tree, so an entry altered in an old segment, or in
an archive a forged retention marker points at, must be refused, not signed into it
(``iort-audit verify`` names the altered entry).

Retention may have moved the oldest segments away: the rebuild then reads the archive the
directory's retention marker names (union.py), in a daemon thread bounded by
:data:`ARCHIVE_REBUILD_TIMEOUT_S` (a share can hang: marker.py bounds its reads the same
way). The local segments are read without a bound, as recovery reads them. When there is
no frontier (a refused or unreadable log, an unreachable archive), the writer signs
chain-head checkpoints, as before issue 20, and says why in the operational log, rather
than refuse to monitor.

:func:`load_frontier` is the async entry point; :func:`open_frontier` its blocking part.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
from pathlib import Path

from iortd.auditlog.canonical import ZERO_HASH
from iortd.auditlog.logdir import SEAL_FILE, read_anchor, segment_paths
from iortd.auditlog.marker import read_marker
from iortd.auditlog.merkle import Frontier
from iortd.auditlog.merkle_log import RebuildError, rebuild_chained
from iortd.auditlog.note import Checkpoint, NoteError, Verifier
from iortd.auditlog.union import find_archive, merge
from iortd.kernel.threads import in_daemon_thread

__all__ = [
    "ARCHIVE_REBUILD_TIMEOUT_S",
    "FRONTIER_PREFIX",
    "frontier_line",
    "load_frontier",
    "open_frontier",
    "seal_frontier",
]

FRONTIER_PREFIX = "frontier "
# The archive part of a rebuild (a share: it can hang); past this, the run signs chain-head
# checkpoints. A rebuild reads a million entries in seconds at disk speed (benchmarks).
ARCHIVE_REBUILD_TIMEOUT_S = 120.0


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


def _from_seal(
    directory: Path, verifier: Verifier, vouched: int | None
) -> tuple[Frontier, str] | None:
    """The seal's frontier and head, if recovery found the seal vouching for the log."""
    try:
        text = read_anchor(directory / SEAL_FILE)
        if text is None:
            return None
        cp, signed = Checkpoint.parse_verified(text, verifier)
    except NoteError:
        return None
    if not signed or cp.count != vouched:
        return None
    frontier = seal_frontier(cp)
    return None if frontier is None else (frontier, cp.head_hash)


async def load_frontier(
    directory: Path,
    *,
    verifier: Verifier,
    vouched_by: str,
    vouched: int | None,
    size: int,
    head: str,
) -> tuple[Frontier | None, str]:
    """:func:`open_frontier` from the log directory in a worker thread; if that needs the
    archive, again with it, in a daemon thread bounded by ARCHIVE_REBUILD_TIMEOUT_S (the
    archive is touched only there: a hung share must not hang the loop)."""
    frontier, how = await asyncio.to_thread(
        open_frontier, directory, verifier, vouched_by, vouched, size, False, head
    )
    if frontier is not None or not await asyncio.to_thread(_has_marker_archive, directory):
        return frontier, how
    args = (directory, verifier, vouched_by, vouched, size, True, head)
    try:
        async with asyncio.timeout(ARCHIVE_REBUILD_TIMEOUT_S):
            return await in_daemon_thread(open_frontier, *args, name="iortd-tree")
    except TimeoutError:
        return None, (
            f"{how}; reading the archive took longer than {ARCHIVE_REBUILD_TIMEOUT_S:.0f} s"
        )


def open_frontier(
    directory: Path,
    verifier: Verifier,
    vouched_by: str,
    vouched: int | None,
    size: int,
    use_archive: bool,
    head: str,
) -> tuple[Frontier | None, str]:
    """The frontier over the log's ``size`` entries and how it was found (``seal``,
    ``rebuilt``, ``rebuilt with the archive``), or None and why there is none."""
    sealed = _from_seal(directory, verifier, vouched) if vouched_by == "seal" else None
    start, start_head = sealed or (None, ZERO_HASH)
    files = segment_paths(directory)
    how = "seal" if start is not None else "rebuilt"
    if use_archive:
        archive = _archive(directory)
        union = None if archive is None else merge(files, archive)
        if union is None:
            return None, "the retention marker names no archive"
        if union.problem is not None:
            return None, f"the archive: {union.problem.what}"
        files, how = union.files, how + " with the archive"
    try:
        frontier = rebuild_chained(files, start=start, start_head=start_head, head=head)
    except RebuildError as exc:
        return None, str(exc)
    if frontier.size != size:
        return None, f"the segments hold {frontier.size} entries, recovery found {size}"
    return frontier, how


def _has_marker_archive(directory: Path) -> bool:
    """The retention marker names an archive (the marker is local; the archive not read)."""
    marker = read_marker(directory)
    return marker is not None and isinstance(marker.get("archive"), str)


def _archive(directory: Path) -> Path | None:
    marker = read_marker(directory)
    where = None if marker is None else marker.get("archive")
    return find_archive(Path(where), directory) if isinstance(where, str) else None
