"""The Merkle tree's frontier rebuilt from a log's segments (merkle.py over segments.py).

What the writer's open calls (tree_state.py; docs/audit-log.md, "The writer's
frontier"): :func:`rebuild_frontier` reads the segments in chain order and appends the
leaf of every entry (its line without the newline: merkle.py says why), giving the
frontier after all of them, or after the first ``upto``. Given a frontier saved earlier
(``start``), it reads only what follows it: segments that end before it are skipped by
their names, which start with their first seq.

Reading goes through :func:`segments.open_segment`, so whatever the directory holds is
read as the auditors' tools read it: regular files only, never through a symbolic link,
in 4 MiB blocks with lines of at most 8 MiB. Memory is those two bounds plus the frontier
(at most 64 hashes), whatever the size of the log.

What it checks, and what it leaves to others: every line must carry a ``seq`` and the seqs
must run 0, 1, 2, ... with no gap across segments, so that the frontier's size is the
number of entries and leaf *i* is entry *i*; an incomplete last line (a torn write) or a
log that does not start at seq 0 is refused. It does not recompute entry hashes nor check
``prev`` (``iort-audit verify`` checks all of it); :func:`rebuild_chained`, which the
writer's open uses, does both, since what it gives is then signed. With retention, the
oldest segments are in the archive: give the union of both places (union.py), or a saved
frontier that covers the archived part. Every refusal is a :class:`RebuildError` naming the file and
line.

A saved frontier is only as trustworthy as what vouches for it: whoever can write the log
directory can write a frontier file too. Before continuing one, the caller must check its
root against a signature at that size: tree_state.py takes it only from a seal signed by
the daemon's key that recovery found vouching for the log, whose root it folds to.

:func:`leaf_hashes` gives the leaf hashes of a range of entries the same way: what the
proofs of a range (``iort-audit prove``) are to be built from.

Blocking file I/O: run it in a worker thread from async code.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from pathlib import Path

from iortd.auditlog.canonical import open_line
from iortd.auditlog.logdir import SEGMENT_RE, entry_seq
from iortd.auditlog.merkle import Frontier
from iortd.auditlog.segments import SegmentError, open_segment

__all__ = ["RebuildError", "leaf_hashes", "rebuild_chained", "rebuild_frontier"]


class RebuildError(ValueError):
    """The segments cannot give a frontier: a torn or foreign line, a gap, a missing start."""


def _first_seq(path: Path) -> int | None:
    m = SEGMENT_RE.match(path.name)
    return int(m.group(1)) if m else None


def _skippable(files: Sequence[Path], skip: int) -> int:
    """How many leading segments hold only entries before seq ``skip`` (by their names:
    the next one starts at or before it)."""
    n = 0
    for nxt in files[1:]:
        first = _first_seq(nxt)
        if first is None or first > skip:
            break
        n += 1
    return n


def _lines_from(files: Sequence[Path], skip: int) -> Iterator[bytes]:
    """The lines (without newline) of the entries from seq ``skip`` on, in order, each
    checked to carry the next seq. Raises RebuildError naming the file and line."""
    files = files[_skippable(files, skip) :] if skip else files
    expect: int | None = None
    for path in files:
        try:
            seg = open_segment(path)
        except SegmentError as exc:
            raise RebuildError(f"{path}: {exc.what}") from None
        n = 0
        with seg:
            try:
                for block in seg.blocks():
                    for line in block:
                        n += 1
                        seq = entry_seq(line)
                        if seq is None:
                            raise RebuildError(f"{path} line {n}: not a log entry (no seq)")
                        if expect is None:
                            if seq > skip or (skip == 0 and seq != 0):
                                raise RebuildError(
                                    f"{path} line {n}: the log starts at seq {seq}, not "
                                    f"{skip}: give the whole log (with the archive's "
                                    "segments, if retention moved some there)"
                                )
                            expect = seq
                        if seq != expect:
                            raise RebuildError(
                                f"{path} line {n}: seq {seq} where {expect} was expected: "
                                "an entry is missing, inserted or out of order"
                            )
                        expect += 1
                        if seq >= skip:
                            yield line
            except SegmentError as exc:
                raise RebuildError(f"{path} line {exc.line}: {exc.what}") from None
            if seg.torn:
                raise RebuildError(
                    f"{path} line {n + 1}: an incomplete last line ({len(seg.torn)} bytes "
                    "without a newline: a torn write, which recovery sets aside first)"
                )


def rebuild_frontier(
    files: Sequence[Path], *, upto: int | None = None, start: Frontier | None = None
) -> Frontier:
    """The frontier over the entries in ``files`` (segments in chain order), after
    ``upto`` entries if given, else after all of them; continuing ``start`` (not
    changed) if given. Raises RebuildError naming the file and line of what is wrong."""
    frontier = Frontier() if start is None else start.copy()
    skip = frontier.size
    if upto is not None and upto < skip:
        raise RebuildError(f"the saved frontier already covers {skip} entries, more than {upto}")
    if upto == frontier.size:
        return frontier
    sha256 = hashlib.sha256
    append = frontier.append
    for line in _lines_from(files, skip):
        h = sha256(b"\x00")
        h.update(line)
        append(h.digest())
        if frontier.size == upto:
            return frontier
    if upto is not None:
        raise RebuildError(f"the log holds {frontier.size} entries, not {upto}")
    return frontier


def rebuild_chained(
    files: Sequence[Path], *, start: Frontier | None, start_head: str, head: str
) -> Frontier:
    """As :func:`rebuild_frontier` (continuing ``start``, or from seq 0), and every entry
    read is checked to be a link of the chain: its hash recomputed, its ``prev`` the hash
    before it (``start_head``: the hash of entry ``start.size - 1``, or 64 zeros from seq
    0), the last one's hash ``head``. What the writer's open uses (tree_state.py): a tree
    the daemon signs must be of entries that chain to the head its seal vouches for, so
    that an entry changed in an old segment (or in an archive a forged marker points at)
    is refused rather than signed into the tree; a consistent forged chain would need a
    SHA-256 preimage of the next genuine ``prev``. Raises RebuildError naming the seq."""
    frontier = Frontier() if start is None else start.copy()
    last = start_head
    sha256 = hashlib.sha256
    append = frontier.append
    for line in _lines_from(files, frontier.size):
        try:
            env = open_line(line)
        except ValueError as exc:
            raise RebuildError(f"entry {frontier.size}: not a log entry ({exc})") from None
        if env.hash != env.computed or env.prev != last:
            what = "its hash does not match it" if env.hash != env.computed else "prev"
            raise RebuildError(f"entry {env.seq} does not chain ({what}): the log was altered")
        last = env.hash
        h = sha256(b"\x00")
        h.update(line)
        append(h.digest())
    if last != head:
        raise RebuildError(
            f"the chain read ends at {last[:16]}..., not at the recovered head {head[:16]}..."
        )
    return frontier


def leaf_hashes(files: Sequence[Path], first: int, end: int) -> Iterator[bytes]:
    """The RFC 6962 leaf hashes of the entries ``first`` .. ``end - 1``, read from the
    segments (in chain order; those before ``first`` are skipped by their names): what
    inclusion and consistency proofs over a range are built from (issue 20, item 2).
    Raises RebuildError naming the file and line, or when the log ends before ``end``."""
    if not 0 <= first <= end:
        raise ValueError(f"not a range of entries: {first} .. {end}")
    got = first
    if first == end:
        return
    sha256 = hashlib.sha256
    for line in _lines_from(files, first):
        h = sha256(b"\x00")
        h.update(line)
        yield h.digest()
        got += 1
        if got == end:
            return
    raise RebuildError(f"the log holds {got} entries, not {end}")
