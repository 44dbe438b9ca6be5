"""``add-checkpoint`` decided: c2sp.org/tlog-witness, rule by rule, on the stored state.

Bytes in, a :class:`Reply` (status, body, content type, and the outcome, origin and size
for the operational log) out; the state is read and written through witness/store.py in
one transaction; no clock but the one given, no network. Blocking (SQLite): the web app
calls :meth:`Witness.add_checkpoint` in a worker thread.

The checks, in the specification's order:

1. **The request body** (:func:`parse_request`): ``old <size>`` (decimal, no sign, no
   leading zero, at most 2^64-1), up to 63 base64 proof lines, an empty line, the signed
   checkpoint; each line ends in a newline (no CR). Anything else: **400**.
2. **The note's form** (signed_note.split_note: UTF-8, no control character, signature
   lines): **400** if malformed. The origin is its first line; an origin not in the
   configuration: **404** (its text is not logged: anyone can send one).
3. **The log's signature**, by the keys configured for the origin (C2SP signed-note:
   unknown keys are ignored): none from a trusted key, or one with a trusted key's name
   and ID that does not verify: **403**. Only then is the body parsed strictly
   (tlog_checkpoint.parse_body): not C2SP's form: **400**.
4. ``old`` above the checkpoint's size: **400**.
5. In the transaction: ``old`` other than the size last cosigned for the origin (0 if
   none): **409** with that size (``text/x.tlog.size``). A rollback is one of these or 4.
6. Size 0 with a root other than the empty tree's; a non-empty proof from old size 0:
   **422**.
7. ``old`` equal to the size: the root must be the one cosigned, else **422** (a fork);
   the same checkpoint again is cosigned again with a fresh time (tlog-witness: a newer
   timestamp shows freshness), never another root for a size. Otherwise the RFC 6962
   consistency proof from the stored size and root (merkle.verify_consistency): **422**
   if it does not verify (a fork, or a wrong proof). Forks and bad proofs with a valid
   log signature are kept as evidence (witness/store.py); :func:`proven_forks` says which
   of them prove the log signed two roots for one size (a bad proof alone does not: the
   proof is not signed, and anyone can replay a public checkpoint with a wrong one).
8. Cosign (auditlog/cosignature.py, the time from ``clock``), store, **200** with the
   cosignature line.

A 5xx is the web app's (a state file that fails): the request was not cosigned.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final

from iortd.auditlog.cosignature import CosignerKey
from iortd.auditlog.merkle import EMPTY_ROOT, HASH_SIZE, ProofError, verify_consistency
from iortd.auditlog.note import Verifier
from iortd.auditlog.signed_note import (
    SIG_PREFIX,
    NoteError,
    NoteSignature,
    check_signatures,
    decode_base64,
    split_note,
)
from iortd.auditlog.tlog_checkpoint import CheckpointBody, CheckpointError, parse_body
from iortd.auditlog.witness_client import MAX_PROOF_LINES, SIZE_TYPE
from iortd.witness.store import Decision, Evidence, History, Latest, Store

__all__ = ["AddCheckpoint", "Reply", "RequestError", "Witness", "parse_request", "proven_forks"]

_OLD: Final = re.compile(r"old (0|[1-9][0-9]*)")
MAX_SIZE: Final = 2**64 - 1
TEXT: Final = "text/plain; charset=utf-8"


class RequestError(ValueError):
    """The request body is not an add-checkpoint request."""


@dataclass(frozen=True, slots=True)
class AddCheckpoint:
    old: int
    proof: tuple[bytes, ...]
    note: bytes


@dataclass(frozen=True, slots=True)
class Reply:
    status: int
    body: bytes
    outcome: str  # for the log: cosigned, conflict, fork, bad_proof, ...
    content_type: str = TEXT
    origin: str | None = None  # only for a configured origin
    size: int | None = None


def parse_request(body: bytes) -> AddCheckpoint:
    first, sep, rest = body.partition(b"\n")
    if not sep:
        raise RequestError("no old size line")
    m = _OLD.fullmatch(first.decode("ascii", "replace"))
    if m is None or int(m.group(1)) > MAX_SIZE:
        raise RequestError("the first line is not 'old <size>'")
    proof: list[bytes] = []
    while True:
        line, sep, rest = rest.partition(b"\n")
        if not sep:
            raise RequestError("no empty line before the checkpoint")
        if not line:
            break
        if len(proof) == MAX_PROOF_LINES:
            raise RequestError(f"more than {MAX_PROOF_LINES} proof lines")
        try:
            proof.append(decode_base64(line.decode("ascii")))
        except (UnicodeDecodeError, ValueError):
            raise RequestError(f"proof line {len(proof) + 1} is not base64") from None
    return AddCheckpoint(int(m.group(1)), tuple(proof), rest)


def proven_forks(history: Sequence[History], evidence: Sequence[Evidence]) -> list[Evidence]:
    """The evidence that proves the log misbehaved on its own: a checkpoint signed by the
    log with another root for a size the witness cosigned (refused as a fork, or refused
    for a bad proof at a size cosigned later with another root)."""
    cosigned = {h.size: h.root for h in history}
    return [e for e in evidence if e.size in cosigned and cosigned[e.size] != e.root]


def _sig_line(sig: NoteSignature) -> str:
    blob = sig.key_id.to_bytes(4, "big") + sig.signature
    return f"{SIG_PREFIX}{sig.name} {base64.b64encode(blob).decode('ascii')}\n"


class Witness:
    """The witness for the configured logs: origin -> the log's verifier key(s)."""

    def __init__(
        self,
        key: CosignerKey,
        logs: Mapping[str, Sequence[Verifier]],
        store: Store,
        *,
        clock: Callable[[], float],
    ) -> None:
        self.key = key
        self.logs = {origin: tuple(keys) for origin, keys in logs.items()}
        self.store = store
        self._clock = clock

    def add_checkpoint(self, body: bytes) -> Reply:
        try:
            req = parse_request(body)
            text, sigs = split_note(req.note, "checkpoint")
        except (RequestError, NoteError) as exc:
            return Reply(400, f"{exc}\n".encode(), "malformed")
        origin = text.partition("\n")[0]
        keys = self.logs.get(origin)
        if keys is None:
            return Reply(404, b"unknown log origin\n", "unknown_origin")
        try:
            verified, _ = check_signatures(text, sigs, keys, "checkpoint")
        except NoteError:
            return Reply(403, b"a signature by the log's key does not verify\n",
                         "bad_signature", origin=origin)  # fmt: skip
        if not verified:
            return Reply(403, b"no signature by the log's key\n", "no_log_signature",
                         origin=origin)  # fmt: skip
        try:
            cp = parse_body(text)
        except CheckpointError as exc:
            return Reply(400, f"{exc}\n".encode(), "malformed", origin=origin)
        if req.old > cp.size:
            return Reply(400, b"old size above the checkpoint's size\n",
                         "old_size_above_size", origin=origin, size=cp.size)  # fmt: skip
        keep = "".join(_sig_line(s) for s in sigs if (s.name, s.key_id) in
                       {(v.name, v.key_hash) for v in verified})  # fmt: skip
        return self.store.decide(origin, lambda cur: self._decide(cur, req, cp, text, keep))

    def _decide(
        self, cur: Latest | None, req: AddCheckpoint, cp: CheckpointBody, text: str, log_sigs: str
    ) -> Decision[Reply]:
        origin = cp.origin
        size, root = (cur.size, cur.root) if cur is not None else (0, EMPTY_ROOT)

        def refuse(status: int, why: str, outcome: str, evidence: bool = False) -> Decision[Reply]:
            reply = Reply(status, f"{why}\n".encode(), outcome, origin=origin, size=cp.size)
            kept = None
            if evidence:
                # The text and the log's verified signature(s) only: not what else a
                # sender appended (anyone can add unknown signature lines to a copy).
                signed = f"{text}\n{log_sigs}"
                kept = Evidence(cp.size, cp.root, outcome, signed, self._now())
            return Decision(reply, evidence=kept)

        if req.old != size:
            reply = Reply(409, f"{size}\n".encode(), "conflict", SIZE_TYPE, origin, cp.size)
            return Decision(reply)
        if cp.size == 0 and cp.root != EMPTY_ROOT:
            return refuse(422, "a tree of size 0 has the empty tree's root", "bad_empty_root")
        if req.old == 0 and req.proof:
            return refuse(422, "the proof from size 0 must be empty", "bad_proof")
        if req.old == cp.size:
            if cp.root != root:
                return refuse(422, f"another root for size {size}: a fork", "fork", True)
        else:
            if any(len(h) != HASH_SIZE for h in req.proof):
                return refuse(422, "a proof line is not a 32-byte hash", "bad_proof", True)
            try:
                verify_consistency(req.old, cp.size, req.proof, root, cp.root)
            except ProofError as exc:
                return refuse(422, str(exc), "bad_proof", True)
        now = self._now()
        line = self.key.cosign(text, now)
        stored = Latest(origin, cp.size, cp.root, f"{text}\n{log_sigs}{line}", now)
        reply = Reply(200, line.encode(), "cosigned", origin=origin, size=cp.size)
        return Decision(reply, write=stored)

    def _now(self) -> int:
        return max(1, int(self._clock()))  # tlog-witness: the timestamp is never 0
