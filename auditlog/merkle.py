"""The RFC 6962 Merkle tree over the log's entries: hashes, the frontier, proofs.

Pure: bytes in, bytes out; no clock, no I/O. The writer keeps a :class:`Frontier` beside
the chain and signs its root in every checkpoint and seal; verify recomputes it
(docs/audit-log.md, "The Merkle tree").

**What a leaf is.** Leaf *i* is the entry with ``seq`` *i*: its line exactly as stored in
the segment, without the terminating newline (:func:`entry_leaf`). Not a re-serialisation
(serialisers differ, canonical.py) and not the entry's ``hash`` field: the line is what the
auditor holds, so a leaf can be checked against the bytes on disk with nothing but SHA-256,
and the tree commits to the ``hash`` and ``prev`` fields too, so the chain and the tree
cannot be made to disagree without one of them failing. Not the newline, because the
newline is the segment's separator, not part of the entry: ``Segment.blocks()`` and the
verifier already hand lines over without it, and a line ending in ``\\n`` given here is a
caller's mistake (refused) rather than a second, silently different leaf for one entry.

**Hashing** (RFC 6962 §2.1): ``leaf_hash(d) = SHA-256(0x00 || d)``, ``node_hash(l, r) =
SHA-256(0x01 || l || r)``; the distinct prefixes make a leaf never equal to an interior
node (second-preimage resistance). ``MTH({}) = SHA-256("")`` (:data:`EMPTY_ROOT`); for
n > 1, with k the largest power of two smaller than n, ``MTH(D[n]) = node_hash(MTH(D[0:k]),
MTH(D[k:n]))``.

**The frontier** (:class:`Frontier`) is the compact range [0, n): the roots of the perfect
subtrees that n's binary decomposition cuts the tree into, largest first, one per set bit
of n (at most 64 hashes). Appending a leaf merges equal-sized subtrees from the right like
a binary counter carries: amortised one node hash, at most log2 n; the root at the current
size folds them right to left (popcount(n) - 1 hashes). That is all the writer needs to
keep to sign the root at any commit, and what recovery restores at start (merkle_log.py).

**Proofs.** Generation (:func:`inclusion_proof`, :func:`consistency_proof`) follows RFC 6962
§2.1.1 PATH and §2.1.2 PROOF over a sequence of leaf hashes (a list, or any store that
indexes them); subtree roots are folded with a frontier, O(n) hashes per proof.
Verification follows RFC 9162 §2.1.3.2 and §2.1.4.2 step by step, in O(log n) hashes, and
raises :class:`ProofError` naming what is wrong. Beyond the RFC's steps, which assume
0 < first < second, the edges are decided thus (as transparency-dev/merkle and C2SP
tlog-witness do): a proof between equal sizes is empty and the roots are equal; from size
0 the proof is empty and the old root is the empty tree's (every tree extends the empty
one). Every hash (leaf, root, proof element) must be 32 bytes and every index or size an
unsigned 64-bit integer, or the proof is refused; a proof of the wrong length is refused
with the length it should have had.

**What a proof does not bind: the tree size.** A proof's hashes are opaque subtree roots, so
the same proof can verify for two sizes whose trees have the same shape along its path
(leaf 0 of 5 leaves and of 7; RFC 9162's algorithm cannot tell them apart, by design). The
size is bound to the root by the signed checkpoint that carries both: a verifier takes the
size and the root from one signed checkpoint, never the size from anywhere else.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from typing import Final

__all__ = [
    "EMPTY_ROOT",
    "HASH_SIZE",
    "Frontier",
    "ProofError",
    "consistency_proof",
    "entry_leaf",
    "inclusion_proof",
    "leaf_hash",
    "node_hash",
    "root_of",
    "verify_consistency",
    "verify_inclusion",
]

HASH_SIZE: Final = 32
EMPTY_ROOT: Final = hashlib.sha256(b"").digest()
MAX_SIZE: Final = 2**64 - 1  # sizes and indexes are uint64 (RFC 9162 §2.1.3.1, C2SP)
_LEAF: Final = b"\x00"
_NODE: Final = b"\x01"


class ProofError(ValueError):
    """A proof does not verify, or its arguments are not a proof at all; says which."""


def leaf_hash(data: bytes) -> bytes:
    return hashlib.sha256(_LEAF + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    h = hashlib.sha256(_NODE)
    h.update(left)
    h.update(right)
    return h.digest()


def entry_leaf(line: bytes) -> bytes:
    """The leaf hash of an entry: its stored line without the newline."""
    if line.endswith(b"\n"):
        raise ValueError("an entry's leaf is its line without the newline; strip it first")
    return hashlib.sha256(_LEAF + line).digest()


def _check_hash(h: bytes, what: str) -> None:
    if len(h) != HASH_SIZE:
        raise ProofError(f"{what} is {len(h)} bytes, not a {HASH_SIZE}-byte SHA-256 hash")


class Frontier:
    """The compact range [0, size): one subtree root per set bit of ``size``, largest
    (leftmost) first. ``append`` is amortised O(1), O(log n) at worst; ``root`` O(log n)."""

    __slots__ = ("_hashes", "_size")

    def __init__(self) -> None:
        self._size = 0
        self._hashes: list[bytes] = []

    @classmethod
    def restore(cls, size: int, hashes: Iterable[bytes]) -> Frontier:
        """A frontier from its saved state; refused unless it has the shape of one."""
        got = list(hashes)
        if not 0 <= size <= MAX_SIZE:
            raise ValueError(f"frontier size {size} is not a tree size")
        want = size.bit_count()
        if len(got) != want:
            raise ValueError(f"a frontier of size {size} has {want} hashes, not {len(got)}")
        for h in got:
            if len(h) != HASH_SIZE:
                raise ValueError(f"a frontier hash is {len(h)} bytes, not 32 bytes")
        f = cls()
        f._size = size
        f._hashes = got
        return f

    @property
    def size(self) -> int:
        return self._size

    @property
    def hashes(self) -> tuple[bytes, ...]:
        return tuple(self._hashes)

    def copy(self) -> Frontier:
        return Frontier.restore(self._size, self._hashes)

    def append(self, leaf: bytes) -> None:
        """Add the leaf hash of the next entry."""
        if len(leaf) != HASH_SIZE:
            raise ValueError(f"a leaf hash is {len(leaf)} bytes, not 32 bytes")
        hashes = self._hashes
        n = self._size
        hashes.append(leaf)
        # Each trailing one bit of the old size is a subtree of the new one's size: merge.
        while n & 1:
            right = hashes.pop()
            hashes[-1] = node_hash(hashes[-1], right)
            n >>= 1
        self._size += 1

    def extend(self, leaves: Iterable[bytes]) -> None:
        for leaf in leaves:
            self.append(leaf)

    def root(self) -> bytes:
        """MTH of the leaves so far: the subtrees folded right to left."""
        hashes = self._hashes
        if not hashes:
            return EMPTY_ROOT
        r = hashes[-1]
        for h in reversed(hashes[:-1]):
            r = node_hash(h, r)
        return r

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Frontier):
            return NotImplemented
        return self._size == other._size and self._hashes == other._hashes

    __hash__ = None  # type: ignore[assignment]  # mutable

    def __repr__(self) -> str:
        return f"Frontier(size={self._size}, root={self.root().hex()})"


def root_of(leaves: Iterable[bytes]) -> bytes:
    """MTH over leaf hashes."""
    f = Frontier()
    f.extend(leaves)
    return f.root()


def _mth(leaves: Sequence[bytes], lo: int, hi: int) -> bytes:
    # MTH of a range does not depend on where the range starts: fold it with a frontier.
    f = Frontier()
    for i in range(lo, hi):
        f.append(leaves[i])
    return f.root()


def _split(n: int) -> int:
    """The largest power of two smaller than n (n > 1)."""
    return 1 << ((n - 1).bit_length() - 1)


def _check_store(leaves: Sequence[bytes], size: int) -> None:
    if not 0 <= size <= len(leaves):
        raise ValueError(f"tree size {size}: the store holds {len(leaves)} leaf hashes")


def inclusion_proof(leaves: Sequence[bytes], index: int, size: int) -> list[bytes]:
    """PATH(index, D[0:size]) of RFC 6962 §2.1.1, from the first ``size`` leaf hashes,
    ordered from the leaf up."""
    _check_store(leaves, size)
    if not 0 <= index < size:
        raise ValueError(f"index {index} is not in a tree of size {size}")
    out: list[bytes] = []
    lo, hi, m = 0, size, index
    # Walk down from the root; the sibling of each step is added, then reversed.
    while hi - lo > 1:
        k = _split(hi - lo)
        if m < k:
            out.append(_mth(leaves, lo + k, hi))
            hi = lo + k
        else:
            out.append(_mth(leaves, lo, lo + k))
            lo, m = lo + k, m - k
    out.reverse()
    return out


def consistency_proof(leaves: Sequence[bytes], old_size: int, size: int) -> list[bytes]:
    """PROOF(old_size, D[0:size]) of RFC 6962 §2.1.2; empty when old_size is 0 or size."""
    _check_store(leaves, size)
    if old_size < 0:
        raise ValueError(f"old size {old_size} is not a tree size")
    if old_size > size:
        raise ValueError(f"old size {old_size} is larger than {size}")
    if old_size in (0, size):
        return []
    out: list[bytes] = []
    lo, hi, m, whole = 0, size, old_size, True
    while m != hi - lo:
        k = _split(hi - lo)
        if m <= k:
            out.append(_mth(leaves, lo + k, hi))
            hi = lo + k
        else:
            out.append(_mth(leaves, lo, lo + k))
            lo, m, whole = lo + k, m - k, False
    if not whole:
        out.append(_mth(leaves, lo, hi))
    out.reverse()
    return out


def _check_size(value: int, what: str) -> None:
    if not 0 <= value <= MAX_SIZE:
        raise ProofError(f"{what} {value} is not a tree size (0 .. 2^64-1)")


def _inclusion_length(index: int, size: int) -> int:
    # Below the level where index and size-1 part, every level has a sibling; above it,
    # one per set bit of what is left of the index (transparency-dev decompInclProof).
    inner = (index ^ (size - 1)).bit_length()
    return inner + (index >> inner).bit_count()


def verify_inclusion(
    leaf: bytes, index: int, size: int, proof: Sequence[bytes], root: bytes
) -> None:
    """RFC 9162 §2.1.3.2: the leaf hash is leaf ``index`` of the tree of ``size`` with
    ``root``. Returns None, or raises ProofError saying why not."""
    _check_size(size, "tree size")
    _check_size(index, "leaf index")
    if index >= size:
        raise ProofError(f"leaf index {index} is not in a tree of {size} leaves")
    _check_hash(leaf, "the leaf hash")
    _check_hash(root, "the root")
    for i, p in enumerate(proof):
        _check_hash(p, f"proof hash {i}")
    want = _inclusion_length(index, size)
    if len(proof) != want:
        raise ProofError(
            f"the inclusion proof has {len(proof)} hashes; leaf {index} of {size} needs {want}"
        )
    # 1-3: fn, sn, r
    fn, sn, r = index, size - 1, leaf
    for p in proof:  # 4
        if sn == 0:  # 4a
            raise ProofError("the inclusion proof is longer than the tree is deep")
        if fn & 1 or fn == sn:  # 4b
            r = node_hash(p, r)
            if not fn & 1:
                while fn and not fn & 1:
                    fn >>= 1
                    sn >>= 1
        else:
            r = node_hash(r, p)
        fn >>= 1  # 4c
        sn >>= 1
    if sn != 0:  # 5
        raise ProofError("the inclusion proof is shorter than the tree is deep")
    if r != root:
        raise ProofError(f"leaf {index} with this proof does not match the root of size {size}")


def verify_consistency(
    old_size: int, size: int, proof: Sequence[bytes], old_root: bytes, root: bytes
) -> None:
    """RFC 9162 §2.1.4.2: the tree of ``size`` with ``root`` extends the tree of
    ``old_size`` with ``old_root``. Returns None, or raises ProofError saying why not."""
    _check_size(old_size, "old tree size")
    _check_size(size, "tree size")
    _check_hash(old_root, "the old root")
    _check_hash(root, "the root")
    for i, p in enumerate(proof):
        _check_hash(p, f"proof hash {i}")
    if old_size > size:
        raise ProofError(f"old size {old_size} is larger than {size}: not an extension")
    if old_size in (0, size):
        if proof:
            raise ProofError(
                f"a consistency proof from size {old_size} to {size} must be empty, "
                f"it has {len(proof)} hashes"
            )
        if old_size == 0 and old_root != EMPTY_ROOT:
            raise ProofError("the old root of size 0 is not the empty tree's root")
        if old_size == size and old_root != root:
            raise ProofError(f"two trees of size {size} with different roots: a fork")
        return
    # The length a proof from old_size to size has (transparency-dev/merkle's rule).
    shift = (old_size & -old_size).bit_length() - 1  # trailing zeros
    inner = ((old_size - 1) ^ (size - 1)).bit_length() - shift
    border = ((old_size - 1) >> (inner + shift)).bit_count()
    want = inner + border + (0 if old_size == 1 << shift else 1)
    if len(proof) != want:
        raise ProofError(
            f"the consistency proof has {len(proof)} hashes; from size {old_size} to "
            f"{size} it needs {want}"
        )
    path = list(proof)
    if not path:  # 1
        raise ProofError("empty consistency proof")
    if old_size == 1 << shift:  # 2: an exact power of two
        path.insert(0, old_root)
    fn, sn = old_size - 1, size - 1  # 3
    while fn & 1:  # 4
        fn >>= 1
        sn >>= 1
    fr = sr = path[0]  # 5
    for c in path[1:]:  # 6
        if sn == 0:  # 6a
            raise ProofError("the consistency proof is longer than the tree is deep")
        if fn & 1 or fn == sn:  # 6b
            fr = node_hash(c, fr)
            sr = node_hash(c, sr)
            if not fn & 1:
                while fn and not fn & 1:
                    fn >>= 1
                    sn >>= 1
        else:
            sr = node_hash(sr, c)
        fn >>= 1  # 6c
        sn >>= 1
    if sn != 0:  # 7
        raise ProofError("the consistency proof is shorter than the tree is deep")
    if fr != old_root:
        raise ProofError(f"the proof does not match the old root of size {old_size}")
    if sr != root:
        raise ProofError(f"the proof does not match the root of size {size}")
