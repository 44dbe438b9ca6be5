"""Proof bundles: one delivery's entries and the proof that they are a contiguous stretch
of a signed Merkle tree, checked offline with only the public keys (issue 20, item 2).

``make_bundle`` (``iort-audit prove``) reads the log twice, streaming: once to find the
delivery's range, the tree checkpoints and the ``recovery`` entries; once for the leaf
hashes the proofs are folded from (range_proof.subtree_roots: O(log n) memory).
``check_bundle`` (``iort-audit verify-bundle``) needs only the bundle and the keys and does
O(log n + range) hashes. The format (docs/audit-log.md, "Proof bundles") is one JSON object:

- ``format`` ``"iortd-proof-bundle"``, ``version`` 1, ``origin``, ``delivery_id``;
- ``first_seq``, ``last_seq``: the delivery's range as signoff.delivery_record defines it
  (every entry from the first to the last naming the delivery at top level, sign-offs
  excepted) — one definition of "the delivery's range" in the project;
- ``start`` and ``entries``: the stored lines (without newline) of entries ``start`` ..;
  they are the range plus its two neighbours, entry ``first_seq - 1`` (when > 0) and entry
  ``last_seq + 1`` (when inside the tree), so that the verifier sees that neither names the
  delivery: the range is not cut short at either end;
- ``tree_size``, ``range_proof`` (base64 hashes: range_proof.py) and ``checkpoint``: the
  signed tree checkpoint note, with any witness cosignature lines;
- ``recoveries``: each ``recovery`` entry of the tree whose unvouched range meets the
  bundle's entries, as ``{"seq", "entry", "proof"}`` (its line and its range proof): the
  bundle says which of its entries no signature vouched for when they were written;
- ``consistency`` (optional): ``{"checkpoint": older signed note, "proof": [...]}``, the
  RFC 6962 consistency proof from a checkpoint the auditor already holds.

**What it proves, and what it cannot.** Leaf *i* is entry *i*'s stored line (merkle.py), so
the entries are exactly those of the signed tree at those positions: none changed, none
added, none dropped, none moved. The neighbours show no entry of the delivery lies just
outside, and the range must hold the delivery's ``delivery_started`` and end with its
``delivery_terminated`` or ``delivery_amended``: without that, a range cut at an entry
inside the delivery that names none (a checkpoint) would pass the neighbour test. So
``prove`` refuses a delivery that has not ended. An entry naming the delivery far from
the range (a forged "late" entry, say) cannot be excluded without the whole log:
``iort-audit verify`` reads all of it. Likewise a ``recovery`` entry the prover left out
cannot be noticed offline; a bundle made by ``prove`` from a log includes every one that
touches its entries.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import orjson

from iortd.auditlog.canonical import open_line
from iortd.auditlog.cosignature import CosignatureError, CosignerVerifier, verify_cosignature
from iortd.auditlog.logdir import entry_seq
from iortd.auditlog.merkle import ProofError, entry_leaf, verify_consistency
from iortd.auditlog.note import Checkpoint, NoteError, Verifier
from iortd.auditlog.range_proof import (
    consistency_intervals,
    range_intervals,
    root_from_range,
    subtree_roots,
)
from iortd.auditlog.signed_note import SIG_PREFIX, split_note
from iortd.auditlog.signoff import SIGNOFF_TYPES
from iortd.auditlog.verify import iter_entries

__all__ = ["BundleError", "Checked", "check_bundle", "make_bundle"]

FORMAT: Final = "iortd-proof-bundle"
VERSION: Final = 1
_KEYS: Final = frozenset(
    {
        "format",
        "version",
        "origin",
        "delivery_id",
        "first_seq",
        "last_seq",
        "start",
        "entries",
        "tree_size",
        "range_proof",
        "checkpoint",
        "recoveries",
        "consistency",
    }
)
_OPTIONAL: Final = frozenset({"consistency"})
_END_TYPES: Final = frozenset({"delivery_terminated", "delivery_amended"})


class BundleError(Exception):
    """A bundle cannot be made (``usage``: exit 2) or does not verify (exit 1); says what."""

    def __init__(self, what: str, *, usage: bool = False) -> None:
        super().__init__(what)
        self.usage = usage


def _b64(hashes: Sequence[bytes]) -> list[str]:
    return [base64.b64encode(h).decode("ascii") for h in hashes]


def _names(e: dict[str, Any], delivery_id: str) -> bool:
    return e.get("delivery_id") == delivery_id and e.get("type") not in SIGNOFF_TYPES


def _lines(files: Sequence[Path]) -> Iterator[tuple[int, bytes]]:
    """(seq, line without newline) in order; BundleError for a torn or foreign line."""
    expect = None
    for path, n, raw in iter_entries(files):
        if not raw.endswith(b"\n"):
            raise BundleError(f"{path} line {n}: an incomplete last line (run iort-audit verify)")
        line = raw[:-1]
        seq = entry_seq(line)
        if seq is None or (expect is not None and seq != expect):
            raise BundleError(f"{path} line {n}: seq {seq} breaks the sequence (run verify)")
        if expect is None and seq != 0:
            raise BundleError(
                f"{path} line {n}: the log starts at seq {seq}, not 0: give the archive too"
            )
        expect = seq + 1
        yield seq, line


@dataclass(slots=True)
class _Scan:
    first: int = -1
    last: int = -1
    last_type: str = ""
    checkpoints: list[tuple[int, str]] = field(default_factory=list)  # (tree size, note)
    recoveries: list[tuple[int, int, int]] = field(default_factory=list)  # seq, first, last


def _scan(files: Sequence[Path], delivery_id: str) -> _Scan:
    try:
        return _scan_lines(files, delivery_id)
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise BundleError(
            f"the log holds an entry that cannot be read ({exc!r}): run verify"
        ) from None


def _scan_lines(files: Sequence[Path], delivery_id: str) -> _Scan:
    s = _Scan()
    did = delivery_id.encode()
    for seq, line in _lines(files):
        # Not an elif chain: a recovery entry may hold the id in its data (the deliveries
        # it closed) without naming the delivery, and must still be found.
        if did in line and _names(e := orjson.loads(line), delivery_id):
            s.first = seq if s.first < 0 else s.first
            s.last, s.last_type = seq, str(e.get("type"))
        if line.endswith(b'"type":"checkpoint"}'):
            data = orjson.loads(line).get("data") or {}
            if isinstance(data.get("note"), str) and "root" in data:
                s.checkpoints.append((int(data["count"]), data["note"]))
        elif line.endswith(b'"type":"recovery"}'):
            u = (orjson.loads(line).get("data") or {}).get("unvouched")
            if isinstance(u, dict):
                s.recoveries.append((seq, int(u["first_seq"]), int(u["last_seq"])))
    return s


def _pick(s: _Scan, size: int | None) -> tuple[int, str]:
    covering = [(n, note) for n, note in s.checkpoints if n > s.last]
    if size is not None:
        for n, note in covering:
            if n == size:
                return n, note
        raise BundleError(
            f"--checkpoint-size {size}: no tree checkpoint of that size covering seq "
            f"{s.last} in the log (sizes: {', '.join(str(n) for n, _ in covering) or 'none'})",
            usage=True,
        )
    if not covering:
        raise BundleError(
            f"no tree checkpoint in the log covers the delivery's last entry (seq {s.last}): "
            "wait for the next checkpoint (the daemon signs one at every delivery end and at "
            "its interval), or the log predates Merkle-tree checkpoints",
        )
    # The first that also covers the entry after the range (so the bundle shows it).
    for n, note in covering:
        if n > s.last + 1:
            return n, note
    return covering[0]


def make_bundle(
    files: Sequence[Path],
    delivery_id: str,
    *,
    pubkey: Verifier | None = None,
    checkpoint_size: int | None = None,
    cosigned: str | None = None,
    held: str | None = None,
) -> dict[str, Any]:
    """The bundle of one delivery (module docstring). ``cosigned``: a copy of the chosen
    checkpoint with witnesses' cosignature lines, used instead of the log's (its text must
    be the same); ``held``: an older checkpoint the auditor holds (a consistency proof from
    it is added). BundleError says what is wrong."""
    s = _scan(files, delivery_id)
    if s.first < 0:
        raise BundleError(f"no entry names the delivery {delivery_id!r} (see: deliveries)")
    if s.last_type not in _END_TYPES:
        raise BundleError(
            f"the delivery {delivery_id!r} has not ended in the log (its last entry, seq "
            f"{s.last}, is {s.last_type!r}): a bundle proves a whole delivery"
        )
    size, note = _pick(s, checkpoint_size)
    cp = _open(note, pubkey, "the log's checkpoint")
    if cosigned is not None:
        copy = _open(cosigned, pubkey, "the cosigned checkpoint")
        if copy.text != cp.text:
            raise BundleError(
                f"the cosigned checkpoint is of size {copy.count}, not the chosen {size}: "
                "give --checkpoint-size or a copy of that one",
                usage=True,
            )
        note = cosigned
    lo, hi = max(s.first - 1, 0), min(s.last + 2, size)
    recov = [r for r in s.recoveries if r[0] < size and r[1] < hi and lo <= r[2]]
    wanted = {"range": range_intervals(lo, hi, size)}
    for r in recov:
        wanted[f"r{r[0]}"] = range_intervals(r[0], r[0] + 1, size)
    old: Checkpoint | None = None
    if held is not None:
        old = _open(held, pubkey, "the held checkpoint (--from-checkpoint)")
        if old.origin != cp.origin or old.root is None or old.count > size:
            raise BundleError(
                f"--from-checkpoint: size {old.count} of {old.origin}, not an older tree "
                f"checkpoint of {cp.origin} (size <= {size})",
                usage=True,
            )
        wanted["old"] = consistency_intervals(old.count, size)
    lines: dict[int, bytes] = {}
    need = set(range(lo, hi)) | {r[0] for r in recov}

    def leaves() -> Iterator[bytes]:
        for seq, line in _lines(files):
            if seq in need:
                lines[seq] = line
            yield entry_leaf(line)

    roots = subtree_roots(leaves(), [iv for ivs in wanted.values() for iv in ivs])
    if len(lines) < len(need):  # the stream stopped at the last interval: read the rest
        for seq, line in _lines(files):
            if seq in need:
                lines[seq] = line
    bundle: dict[str, Any] = {
        "format": FORMAT,
        "version": VERSION,
        "origin": cp.origin,
        "delivery_id": delivery_id,
        "first_seq": s.first,
        "last_seq": s.last,
        "start": lo,
        "entries": [_text(lines[i], i) for i in range(lo, hi)],
        "tree_size": size,
        "range_proof": _b64([roots[iv] for iv in wanted["range"]]),
        "checkpoint": note,
        "recoveries": [
            {
                "seq": r[0],
                "entry": _text(lines[r[0]], r[0]),
                "proof": _b64([roots[iv] for iv in wanted[f"r{r[0]}"]]),
            }
            for r in recov
        ],
    }
    if old is not None and held is not None:
        bundle["consistency"] = {
            "checkpoint": held,
            "proof": _b64([roots[iv] for iv in wanted["old"]]),
        }
    return bundle


def _text(line: bytes, seq: int) -> str:
    try:
        return line.decode("utf-8")
    except UnicodeDecodeError:
        raise BundleError(
            f"entry seq {seq} is not UTF-8: the log was altered (run verify)"
        ) from None


def _open(note: str, pubkey: Verifier | None, what: str) -> Checkpoint:
    try:
        got = Checkpoint.read(note, pubkey)
    except NoteError as exc:
        raise BundleError(f"{what}: {exc}") from None
    if pubkey is not None and not got.signed:
        raise BundleError(f"{what}: not signed by {pubkey.name} (the given --pubkey)")
    if got.checkpoint.root is None:
        raise BundleError(f"{what}: a chain-head checkpoint, not a Merkle-tree one")
    return got.checkpoint


@dataclass(slots=True)
class Checked:
    """What a bundle that verified proves, for the report."""

    origin: str
    delivery_id: str
    first_seq: int
    last_seq: int
    tree_size: int
    cosigned_by: list[str]
    consistent_from: int | None
    unvouched: list[str]  # one line per recovery range that meets the delivery
    caveats: list[str]


def _hashes(raw: Any, what: str) -> list[bytes]:
    if not isinstance(raw, list):
        raise BundleError(f"{what}: not a list of base64 hashes")
    out = []
    for i, h in enumerate(raw):
        try:
            b = base64.b64decode(h, validate=True) if isinstance(h, str) else b""
        except (ValueError, binascii.Error):
            b = b""
        if len(b) != 32:
            raise BundleError(f"{what}: hash {i} is not the base64 of 32 bytes")
        out.append(b)
    return out


def _entry(text: Any, seq: int) -> tuple[bytes, dict[str, Any], str, str]:
    """(line, parsed entry, hash, prev) of a bundle's entry at ``seq``, its own hash checked."""
    if not isinstance(text, str):
        raise BundleError(f"entry seq {seq}: not a string (the stored line)")
    line = text.encode("utf-8")
    try:
        env = open_line(line)
        e = orjson.loads(line)
    except ValueError as exc:
        raise BundleError(f"entry seq {seq}: not a log entry ({exc})") from None
    if not isinstance(e, dict):
        raise BundleError(f"entry seq {seq}: not a log entry (not a JSON object)")
    if env.seq != seq or e.get("seq") != seq:
        raise BundleError(f"entry seq {seq}: its seq field says {env.seq}: moved or replaced")
    if env.hash != env.computed:
        raise BundleError(f"entry seq {seq}: its hash does not match its content: altered")
    return line, e, env.hash, env.prev


def _field(b: dict[str, Any], key: str, kind: type) -> Any:
    v = b.get(key)
    if type(v) is not kind:
        raise BundleError(f"the bundle's {key!r} is not a {kind.__name__}")
    return v


def check_bundle(
    raw: bytes,
    pubkey: Verifier,
    witnesses: Sequence[CosignerVerifier] = (),
    quorum: int | None = None,
    progress: Callable[[str], None] | None = None,
) -> Checked:
    """Check a bundle (its bytes) offline; BundleError names the first thing wrong."""
    try:
        b = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise BundleError(f"not a JSON bundle: {exc}") from None
    if not isinstance(b, dict) or b.get("format") != FORMAT:
        raise BundleError(f'not an {FORMAT} (no "format": {FORMAT!r})')
    if b.get("version") != VERSION:
        raise BundleError(f"bundle version {b.get('version')!r}: this tool reads version {VERSION}")
    if bad := sorted(set(b) - _KEYS) + sorted(_KEYS - _OPTIONAL - set(b)):
        raise BundleError(f"the bundle's keys {bad} are unknown or missing")
    # 1. The checkpoint: signed by the log's key, a tree checkpoint of this origin and size.
    note = _field(b, "checkpoint", str)
    cp = _open(note, pubkey, "the checkpoint note")
    origin, size = _field(b, "origin", str), _field(b, "tree_size", int)
    if cp.origin != origin or cp.count != size:
        raise BundleError(
            f"the checkpoint note is of {cp.origin} size {cp.count}, not the bundle's "
            f"{origin} size {size}"
        )
    root = bytes.fromhex(cp.root or "")
    cosigned = _cosignatures(note, witnesses, quorum)
    # 2. The entries: each its own hash, the chain inside, the range and its neighbours.
    did = _field(b, "delivery_id", str)
    first, last = _field(b, "first_seq", int), _field(b, "last_seq", int)
    start, texts = _field(b, "start", int), _field(b, "entries", list)
    if not texts:
        raise BundleError("the bundle holds no entries")
    if not 0 <= first <= last < size:
        raise BundleError(f"the range seq {first}..{last} is not in the tree of {size}")
    want_start, want_end = max(first - 1, 0), min(last + 2, size)
    if start != want_start or start + len(texts) != want_end:
        raise BundleError(
            f"the entries are seq {start}..{start + len(texts) - 1}; the range {first}..{last} "
            f"with its neighbours is seq {want_start}..{want_end - 1}: an entry was dropped, "
            "added or the range moved"
        )
    leaves, entries = [], []
    prev_hash = None
    for i, text in enumerate(texts):
        seq = start + i
        line, e, h, prev = _entry(text, seq)
        if prev_hash is not None and prev != prev_hash:
            raise BundleError(f"entry seq {seq}: its prev is not entry {seq - 1}'s hash")
        prev_hash = h
        leaves.append(entry_leaf(line))
        entries.append(e)
    for seq in (first, last):
        if not _names(entries[seq - start], did):
            raise BundleError(f"entry seq {seq}: does not name the delivery {did!r}")
    if first > 0 and _names(entries[0], did):
        raise BundleError(f"entry seq {first - 1}: names the delivery: the range starts earlier")
    if last + 1 < size and _names(entries[-1], did):
        raise BundleError(f"entry seq {last + 1}: names the delivery: the range ends later")
    types = [e.get("type") for e in entries[first - start : last - start + 1]]
    if "delivery_started" not in types:
        raise BundleError(f"the range seq {first}..{last} holds no delivery_started entry")
    if types[-1] not in _END_TYPES:
        raise BundleError(
            f"the range seq {first}..{last} does not end with the delivery's "
            f"delivery_terminated or delivery_amended (entry seq {last} is "
            f"{types[-1]!r}): cut short, or the delivery is not over"
        )
    # 3. The tree: the entries at their places, with the proof, give the signed root.
    proof = _hashes(b.get("range_proof"), "range_proof")
    try:
        got = root_from_range(leaves, start, size, proof)
    except ProofError as exc:
        raise BundleError(f"range_proof: {exc}") from None
    if got != root:
        raise BundleError(
            f"the entries seq {start}..{want_end - 1} with the range proof do not give the "
            f"checkpoint's root at size {size}: an entry or a proof hash was changed"
        )
    if progress:
        progress(f"entries seq {start}..{want_end - 1} are leaves of the signed tree")
    checked = Checked(origin, did, first, last, size, cosigned, None, [], [])
    if last + 1 >= size:
        checked.caveats.append(
            f"the checkpoint's tree ends with the delivery's last entry (seq {last}): an "
            "entry of the delivery after it would not be in this tree; a bundle over a later "
            "checkpoint (--checkpoint-size) shows the entry after the range"
        )
    _recoveries(b.get("recoveries"), entries, start, size, root, checked)
    if "consistency" in b:
        checked.consistent_from = _consistency(b["consistency"], pubkey, cp, root)
    return checked


def _cosignatures(
    note: str, witnesses: Sequence[CosignerVerifier], quorum: int | None
) -> list[str]:
    need = len(witnesses) if quorum is None else quorum
    if need > len(witnesses):
        raise BundleError(f"--quorum {need} needs at least {need} --witness-key", usage=True)
    if need == 0:
        return []
    text, sigs = split_note(note, "checkpoint")
    known = {(w.name, w.key_id): w for w in witnesses}
    good: list[str] = []
    for sig in sigs:
        w = known.get((sig.name, sig.key_id))
        if w is None or w.name in good:
            continue
        blob = sig.key_id.to_bytes(4, "big") + sig.signature
        line = f"{SIG_PREFIX}{sig.name} {base64.b64encode(blob).decode()}\n"
        try:
            verify_cosignature(w, text, line)
        except CosignatureError as exc:
            raise BundleError(f"the checkpoint note: {exc}") from None
        good.append(w.name)
    if len(good) < need:
        raise BundleError(
            f"the checkpoint has {len(good)} valid cosignature(s) by the given witnesses "
            f"({', '.join(good) or 'none'}); {need} required (--quorum)"
        )
    return good


def _recoveries(
    raw: Any, entries: list[dict[str, Any]], start: int, size: int, root: bytes, out: Checked
) -> None:
    if not isinstance(raw, list):
        raise BundleError("the bundle's 'recoveries' is not a list")
    found = [e for e in entries if e.get("type") == "recovery"]
    for i, r in enumerate(raw):
        if not isinstance(r, dict) or set(r) != {"seq", "entry", "proof"}:
            raise BundleError(f"recoveries[{i}]: needs exactly seq, entry, proof")
        seq = r["seq"]
        if type(seq) is not int or not 0 <= seq < size:
            raise BundleError(f"recoveries[{i}]: seq {seq!r} is not in the tree")
        line, e, _, _ = _entry(r["entry"], seq)
        try:
            got = root_from_range([entry_leaf(line)], seq, size, _hashes(r["proof"], "proof"))
        except ProofError as exc:
            raise BundleError(f"recoveries[{i}] (seq {seq}): {exc}") from None
        if got != root or e.get("type") != "recovery":
            raise BundleError(
                f"recoveries[{i}] (seq {seq}): not a recovery entry of the signed tree"
            )
        found.append(e)
    lo, hi = start, start + len(entries) - 1
    for e in found:
        data = e.get("data")
        u = data.get("unvouched") if isinstance(data, dict) else None
        if not isinstance(u, dict):
            continue
        a, z = u.get("first_seq"), u.get("last_seq")
        if type(a) is int and type(z) is int and a <= hi and lo <= z:
            out.unvouched.append(
                f"entries seq {u['first_seq']}..{u['last_seq']} were not vouched for by any "
                f"signature when written (recovery entry at seq {e['seq']}: {u.get('why')})"
            )


def _consistency(raw: Any, pubkey: Verifier, cp: Checkpoint, root: bytes) -> int:
    if not isinstance(raw, dict) or set(raw) != {"checkpoint", "proof"}:
        raise BundleError("consistency: needs exactly checkpoint and proof")
    if not isinstance(raw["checkpoint"], str):
        raise BundleError("consistency: the checkpoint is not a note")
    old = _open(raw["checkpoint"], pubkey, "consistency: the older checkpoint")
    if old.origin != cp.origin:
        raise BundleError(f"consistency: the older checkpoint is of {old.origin}, not {cp.origin}")
    proof = _hashes(raw["proof"], "consistency proof")
    try:
        verify_consistency(old.count, cp.count, proof, bytes.fromhex(old.root or ""), root)
    except ProofError as exc:
        raise BundleError(f"consistency proof from size {old.count}: {exc}") from None
    return old.count
