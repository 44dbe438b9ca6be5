"""Signed notes read by the rules of C2SP signed-note (c2sp.org/signed-note), beside
what note.py reads today.

note.py writes iortd's keys, seals and checkpoints, and its signing is byte-for-byte that
of golang.org/x/mod/sumdb/note (tests/unit/test_tlog_checkpoint.py signs Go's test note
and gets Go's bytes). Its *reading* was made for iortd's own notes and departs from the
specification in ways that matter once other parties sign the same note (witnesses,
issue 20); this module reads any note as the specification says, and today's checkpoints
are not changed by it:

* **Key names.** C2SP allows any name without Unicode spaces or ``+`` and recommends
  schema-less URLs (``example.com/foo``). note.py also refuses ``/`` (the name is its key
  files' name: ``NAME.key``), so it cannot read such a verifier key; :func:`parse_vkey`
  can (Ed25519, type 0x01).
* **Unknown signatures.** C2SP: a verifier MUST ignore signatures from unknown keys,
  whatever their length (a C2SP tlog-cosignature, type 0x04, is 4 + 8 + 64 bytes).
  ``note.Checkpoint.parse_verified`` refuses any signature that is not 68 bytes, so a
  checkpoint a witness cosigned would be refused; :func:`open_note` ignores it.
* **Where the text ends.** C2SP: at the *last* blank line (the text may hold empty
  lines). note.py splits at the first, which is the same for a checkpoint (its body has
  no empty line) but not for notes in general.
* **What is malformed.** C2SP and Go: valid UTF-8, no ASCII control character but the
  newline, every signature line ``— NAME BASE64`` ending in a newline with at least one
  signature byte after the 4-byte key ID; Go reads at most 100 signatures (C2SP: at least
  16 must be accepted). :func:`split_note` refuses all of that by name.
* **Key ID.** Both compute SHA-256(name || 0x0A || type || public key)[:4], big-endian
  (:func:`key_id`; note.py's ``_key_hash`` is its Ed25519 case).

A signature is *known* when a given verifier has both its name and key ID; a known
signature that does not verify refuses the note, and a note with no verified known
signature is refused (C2SP: "clients SHOULD reject", "MUST reject").
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from iortd.auditlog.note import ALG_ED25519, SIG_PREFIX, NoteError, Verifier

__all__ = [
    "MAX_SIGNATURES",
    "NoteSignature",
    "OpenedNote",
    "check_key_name",
    "key_id",
    "open_note",
    "parse_vkey",
    "split_note",
]

MAX_SIGNATURES: Final = 100  # as golang.org/x/mod/sumdb/note; C2SP: accept at least 16


@dataclass(frozen=True, slots=True)
class NoteSignature:
    name: str
    key_id: int
    signature: bytes  # after the 4-byte key ID


@dataclass(frozen=True, slots=True)
class OpenedNote:
    text: str  # up to and including the newline before the blank line
    verified: tuple[Verifier, ...]  # known keys whose signature verified, in note order
    unverified: tuple[NoteSignature, ...]  # signatures by keys not given: ignored


def key_id(name: str, sig_type: int, public: bytes) -> int:
    """SHA-256(name || 0x0A || type || public key)[:4], big-endian (C2SP signed-note)."""
    digest = hashlib.sha256(name.encode() + b"\n" + bytes([sig_type]) + public).digest()
    return int.from_bytes(digest[:4], "big")


def check_key_name(name: str) -> None:
    if not name or "+" in name or any(c.isspace() for c in name):
        raise NoteError(f"key name {name!r}: must be non-empty, without spaces or '+'")
    _check_chars(name, "key name")


def _check_chars(text: str, what: str) -> None:
    for i, c in enumerate(text):
        if c < " " and c != "\n":
            raise NoteError(f"{what}: control character {c!r} at offset {i}")


def _b64_strict(text: str) -> bytes:
    """Standard base64 with padding, in its one canonical spelling."""
    raw = base64.b64decode(text, validate=True)
    if base64.b64encode(raw).decode("ascii") != text:
        raise ValueError("not the canonical base64 encoding")
    return raw


def parse_vkey(text: str) -> Verifier:
    """An Ed25519 verifier key ``NAME+KEYID+BASE64(0x01 || key)`` by C2SP's rules (the
    name may hold '/', unlike note.py's own keys)."""
    name, sep1, rest = text.strip().partition("+")
    hash_hex, sep2, b64 = rest.partition("+")
    if not (sep1 and sep2):
        raise NoteError("verifier key: expected NAME+KEYID+KEY")
    check_key_name(name)
    if len(hash_hex) != 8 or any(c not in "0123456789abcdef" for c in hash_hex):
        raise NoteError(f"verifier key {name}: the key ID is not 8 lowercase hex digits")
    try:
        raw = _b64_strict(b64)
    except (ValueError, binascii.Error):
        raise NoteError(f"verifier key {name}: the key is not base64") from None
    if len(raw) != 33 or raw[0] != ALG_ED25519:
        raise NoteError(f"verifier key {name}: not an Ed25519 key (type 0x01, 32 bytes)")
    claimed = int(hash_hex, 16)
    if key_id(name, ALG_ED25519, raw[1:]) != claimed:
        raise NoteError(f"verifier key {name}: the key ID does not match the name and key")
    return Verifier(name, claimed, Ed25519PublicKey.from_public_bytes(raw[1:]))


def split_note(note: str | bytes) -> tuple[str, list[NoteSignature]]:
    """The text and the signatures of a note, checked for form only (nothing verified)."""
    if isinstance(note, bytes):
        try:
            note = note.decode("utf-8")
        except UnicodeDecodeError:
            raise NoteError("note: not valid UTF-8") from None
    _check_chars(note, "note")
    at = note.rfind("\n\n")
    if at < 0:
        raise NoteError("note: no blank line before the signatures")
    text, block = note[: at + 1], note[at + 2 :]
    if not block:
        raise NoteError("note: no signature")
    if not block.endswith("\n"):
        raise NoteError("note: must end with a newline")
    sigs: list[NoteSignature] = []
    for n, line in enumerate(block[:-1].split("\n"), start=1):
        if n > MAX_SIGNATURES:
            raise NoteError(f"note: more than {MAX_SIGNATURES} signatures")
        if not line.startswith(SIG_PREFIX):
            raise NoteError(f"note: signature line {n} does not start with '— '")
        name, _, b64 = line[len(SIG_PREFIX) :].partition(" ")
        check_key_name(name)
        try:
            raw = _b64_strict(b64)
        except (ValueError, binascii.Error):
            raise NoteError(f"note: signature line {n} ({name}) is not base64") from None
        if len(raw) < 5:
            raise NoteError(f"note: signature line {n} ({name}) is shorter than 5 bytes")
        sigs.append(NoteSignature(name, int.from_bytes(raw[:4], "big"), raw[4:]))
    return text, sigs


def open_note(note: str | bytes, verifiers: Sequence[Verifier]) -> OpenedNote:
    """Verify a note against the keys given: every known signature must verify and at
    least one must be there; unknown ones are ignored. Raises NoteError saying which."""
    text, sigs = split_note(note)
    known = {(v.name, v.key_hash): v for v in verifiers}
    verified: list[Verifier] = []
    seen: set[tuple[str, int]] = set()
    unverified: list[NoteSignature] = []
    for sig in sigs:
        v = known.get((sig.name, sig.key_id))
        if v is None:
            unverified.append(sig)
            continue
        if (sig.name, sig.key_id) in seen:
            continue  # the same key twice: counted once (as Go does)
        if not v.verify(text, sig.signature):
            raise NoteError(f"note: the signature by {sig.name} ({sig.key_id:08x}) does not verify")
        seen.add((sig.name, sig.key_id))
        verified.append(v)
    if not verified:
        names = ", ".join(f"{v.name}+{v.key_hash:08x}" for v in verifiers) or "none given"
        raise NoteError(f"note: no signature by a known key ({names})")
    return OpenedNote(text, tuple(verified), tuple(unverified))
