"""A proof that a contiguous range of leaves is leaves ``lo .. hi-1`` of an RFC 6962 tree
of a given size: what ``iort-audit prove`` puts in a bundle (audit/bundle.py) and
``verify-bundle`` checks, in O(log n + (hi - lo)) hashes.

**The proof** is the list of the roots of the subtrees that lie wholly outside [lo, hi)
and whose parent does not, in the order a left-to-right walk of the tree (RFC 6962 §2.1's
split: k the largest power of two smaller than the subtree's size) meets them. The
verifier walks the same tree: a subtree wholly outside takes the next proof hash, a single
leaf inside takes the range's next leaf hash, anything else is split and hashed with
``node_hash``; the result must be the signed root and every proof hash must have been
used. It is the idea of transparency-dev/merkle's compact ranges (the subtrees left and
right of a range); for hi = lo + 1 it holds the hashes of RFC 6962's audit path (PATH),
ordered left to right instead of from the leaf up. Why not one
inclusion proof per leaf: that costs (hi - lo) log n hashes and still does not show the
leaves are adjacent; why not only the first and last leaves' proofs plus the leaves: the
hashes between them would have to be recomputed from the leaves anyway, which is what
this does, with each outside subtree given once.

**Size.** At most two outside subtrees per level (one left of lo, one right of hi): at
most 2 * 64 hashes whatever the log's size; the walk visits O(log n) nodes outside the
range. The proof does not bind the tree size (merkle.py says why): the verifier takes the
size and the root from one signed checkpoint.

**Generation** reads every leaf once, in order (the outside subtrees cover [0, lo) and
[hi, n)): :func:`subtree_roots` folds each wanted interval with a frontier while the
leaves stream by, so memory is O(log n) whatever the log's size. Consistency proofs
(RFC 6962 §2.1.2) are also lists of subtree roots: :func:`consistency_intervals` names
them, so that one pass over the log can give both.

Pure: no I/O; leaf hashes in, hashes out. ProofError (merkle.py) says what is wrong.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from iortd.auditlog.merkle import HASH_SIZE, Frontier, ProofError, node_hash

__all__ = [
    "consistency_intervals",
    "range_intervals",
    "root_from_range",
    "subtree_roots",
]

Interval = tuple[int, int]  # [start, end) of leaf indexes


def _split(n: int) -> int:
    return 1 << ((n - 1).bit_length() - 1)


def _check_range(lo: int, hi: int, size: int) -> None:
    if not 0 <= lo < hi <= size:
        raise ProofError(f"leaves {lo} .. {hi - 1} are not a range of a tree of {size} leaves")


def range_intervals(lo: int, hi: int, size: int) -> list[Interval]:
    """The subtrees whose roots prove leaves [lo, hi) of a tree of ``size``, in order."""
    _check_range(lo, hi, size)
    out: list[Interval] = []

    def walk(a: int, b: int) -> None:
        if b <= lo or a >= hi:
            out.append((a, b))
        elif b - a > 1:
            k = _split(b - a)
            walk(a, a + k)
            walk(a + k, b)

    walk(0, size)
    return out


def consistency_intervals(old_size: int, size: int) -> list[Interval]:
    """The subtrees of RFC 6962 §2.1.2 PROOF(old_size, D[0:size]), in the proof's order
    (merkle.consistency_proof's walk, naming intervals instead of hashing them)."""
    if not 0 <= old_size <= size:
        raise ValueError(f"no consistency proof from size {old_size} to {size}")
    if old_size in (0, size):
        return []
    out: list[Interval] = []
    lo, hi, m, whole = 0, size, old_size, True
    while m != hi - lo:
        k = _split(hi - lo)
        if m <= k:
            out.append((lo + k, hi))
            hi = lo + k
        else:
            out.append((lo, lo + k))
            lo, m, whole = lo + k, m - k, False
    if not whole:
        out.append((lo, hi))
    out.reverse()
    return out


def subtree_roots(leaves: Iterable[bytes], intervals: Iterable[Interval]) -> dict[Interval, bytes]:
    """The MTH of every interval, from the leaf hashes streamed in order from leaf 0 (one
    pass; the stream may stop after the last interval's end). Intervals may overlap."""
    wanted = sorted(set(intervals))
    if not wanted:
        return {}
    end = max(b for _, b in wanted)
    out: dict[Interval, bytes] = {}
    active: list[tuple[Interval, Frontier]] = []
    nxt = 0
    i = -1
    for i, leaf in enumerate(leaves):
        if i >= end:
            break
        while nxt < len(wanted) and wanted[nxt][0] == i:
            active.append((wanted[nxt], Frontier()))
            nxt += 1
        still: list[tuple[Interval, Frontier]] = []
        for iv, f in active:
            f.append(leaf)
            if iv[1] == i + 1:
                out[iv] = f.root()
            else:
                still.append((iv, f))
        active = still
    if len(out) != len(wanted):
        raise ValueError(f"the leaves end at {i + 1}, before leaf {end - 1}")
    return out


def root_from_range(leaves: Sequence[bytes], lo: int, size: int, proof: Sequence[bytes]) -> bytes:
    """The root of the tree of ``size`` whose leaves lo .. lo+len(leaves)-1 are ``leaves``,
    with ``proof`` the outside subtrees' roots (:func:`range_intervals`' order).
    ProofError if the proof has the wrong number or shape of hashes."""
    hi = lo + len(leaves)
    _check_range(lo, hi, size)
    for i, h in enumerate(leaves):
        if len(h) != HASH_SIZE:
            raise ProofError(f"leaf hash {lo + i} is {len(h)} bytes, not {HASH_SIZE}")
    for i, h in enumerate(proof):
        if len(h) != HASH_SIZE:
            raise ProofError(f"proof hash {i} is {len(h)} bytes, not {HASH_SIZE}")
    want = len(range_intervals(lo, hi, size))
    if len(proof) != want:
        raise ProofError(
            f"the range proof has {len(proof)} hashes; leaves {lo} .. {hi - 1} of a tree of "
            f"{size} need {want}"
        )
    used = 0

    def walk(a: int, b: int) -> bytes:
        nonlocal used
        if b <= lo or a >= hi:
            used += 1
            return proof[used - 1]
        if b - a == 1:
            return leaves[a - lo]
        k = _split(b - a)
        return node_hash(walk(a, a + k), walk(a + k, b))

    return walk(0, size)
