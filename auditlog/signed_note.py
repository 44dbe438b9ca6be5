"""Signed notes by the rules of C2SP signed-note (c2sp.org/signed-note): the one place
that knows them. note.py (iortd's keys, seals and checkpoints) and tlog_checkpoint.py read
every note through this module; it imports neither.

note.py's signing is byte-for-byte that of golang.org/x/mod/sumdb/note
(tests/unit/test_tlog_checkpoint.py signs Go's test note and gets Go's bytes); reading
follows the specification, so that notes other parties sign too (witnesses' cosignatures,
issue 20) read as it says:

* **Form** (:func:`split_note`). Valid UTF-8, no ASCII control character (below U+0020)
  but the newline; the text ends at the *last* blank line (it may hold empty lines); then
  one or more signature lines ``— NAME BASE64`` each ending in a newline, NAME non-empty
  without Unicode spaces or ``+`` (``/`` is allowed: C2SP recommends schema-less URLs such
  as ``example.com/foo``), BASE64 the standard, padded, canonical encoding of a 4-byte key
  ID and at least one signature byte. At most :data:`MAX_SIGNATURES` (100, as Go; C2SP: a
  verifier must accept at least 16). Anything else is refused, saying what is wrong and
  on which signature line.
* **Known and unknown keys** (:func:`check_signatures`). A signature is *known* when a
  given verifier has both its name and key ID; a known signature that does not verify
  refuses the whole note; every other one, of whatever length (a C2SP tlog-cosignature,
  type 0x04, is 4 + 8 + 64 bytes), is ignored and returned as such, never checked.
  :func:`open_note` also refuses a note with no verified known signature (C2SP: "clients
  SHOULD reject", "MUST reject"); ``note.Checkpoint.read`` instead says whether the one
  key it was given signed, as its callers decide what an unsigned checkpoint means.
* **Key ID** (:func:`key_id`): SHA-256(name || 0x0A || type || public key)[:4],
  big-endian. Ed25519 verifier keys (type 0x01) in C2SP's ``NAME+KEYID+BASE64`` form are
  read by ``note.parse_vkey``, which builds note.py's ``Verifier`` with these rules.

What iortd *writes* is unchanged by the reading rules: its own key names stay free of
``/`` (note.py: they name key files) and every signature it makes is 68 bytes.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, Generic, Protocol, TypeVar

__all__ = [
    "ALG_ED25519",
    "MAX_SIGNATURES",
    "SIG_PREFIX",
    "NoteError",
    "NoteSignature",
    "NoteVerifier",
    "OpenedNote",
    "check_key_name",
    "check_signatures",
    "decode_base64",
    "key_id",
    "open_note",
    "split_note",
]

ALG_ED25519: Final = 0x01  # C2SP signed-note signature type: Ed25519
SIG_PREFIX: Final = "\u2014 "  # em dash and space
MAX_SIGNATURES: Final = 100  # as golang.org/x/mod/sumdb/note; C2SP: accept at least 16


class NoteError(ValueError):
    """A note, a checkpoint or a key is malformed or does not verify."""


class NoteVerifier(Protocol):
    """What reading a note needs of a key (note.py's ``Verifier`` is one)."""

    @property
    def name(self) -> str: ...

    @property
    def key_hash(self) -> int: ...

    def verify(self, text: str, signature: bytes) -> bool: ...


V = TypeVar("V", bound=NoteVerifier)


@dataclass(frozen=True, slots=True)
class NoteSignature:
    name: str
    key_id: int
    signature: bytes  # after the 4-byte key ID

    @property
    def size(self) -> int:
        """Its length as written (key ID and signature): 68 for Ed25519, 76 for a
        tlog-cosignature."""
        return 4 + len(self.signature)


@dataclass(frozen=True, slots=True)
class OpenedNote(Generic[V]):
    text: str  # up to and including the newline before the blank line
    verified: tuple[V, ...]  # known keys whose signature verified, in note order
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


def decode_base64(text: str) -> bytes:
    """Standard base64 with padding, in its one canonical spelling; ValueError if not."""
    try:
        raw = base64.b64decode(text, validate=True)
    except binascii.Error:
        raise ValueError("not standard base64") from None
    if base64.b64encode(raw).decode("ascii") != text:
        raise ValueError("not the canonical base64 encoding")
    return raw


def split_note(note: str | bytes, what: str = "note") -> tuple[str, list[NoteSignature]]:
    """The text and the signatures of a note, checked for form only (nothing verified);
    ``what`` begins each error message ("note", "checkpoint")."""
    if isinstance(note, bytes):
        try:
            note = note.decode("utf-8")
        except UnicodeDecodeError:
            raise NoteError(f"{what}: not valid UTF-8") from None
    _check_chars(note, what)
    at = note.rfind("\n\n")
    if at < 0:
        raise NoteError(f"{what}: no blank line before the signatures")
    text, block = note[: at + 1], note[at + 2 :]
    if not block:
        raise NoteError(f"{what}: no signature")
    if not block.endswith("\n"):
        raise NoteError(f"{what}: must end with a newline")
    sigs: list[NoteSignature] = []
    for n, line in enumerate(block[:-1].split("\n"), start=1):
        if n > MAX_SIGNATURES:
            raise NoteError(f"{what}: more than {MAX_SIGNATURES} signatures")
        if not line.startswith(SIG_PREFIX):
            raise NoteError(f"{what}: signature line {n} does not start with '— '")
        name, _, b64 = line[len(SIG_PREFIX) :].partition(" ")
        try:
            check_key_name(name)
        except NoteError as exc:
            raise NoteError(f"{what}: signature line {n}: {exc}") from None
        try:
            raw = decode_base64(b64)
        except ValueError:
            raise NoteError(f"{what}: signature line {n} ({name}) is not base64") from None
        if len(raw) < 5:
            raise NoteError(f"{what}: signature line {n} ({name}) is shorter than 5 bytes")
        sigs.append(NoteSignature(name, int.from_bytes(raw[:4], "big"), raw[4:]))
    return text, sigs


def check_signatures(
    text: str, sigs: Sequence[NoteSignature], verifiers: Sequence[V], what: str = "note"
) -> tuple[tuple[V, ...], tuple[NoteSignature, ...]]:
    """The verifiers whose signature of ``text`` verified (each once, in note order) and
    the signatures by keys not given (ignored, never checked). A known signature that
    does not verify raises NoteError naming the key."""
    known = {(v.name, v.key_hash): v for v in verifiers}
    verified: list[V] = []
    seen: set[tuple[str, int]] = set()
    unverified: list[NoteSignature] = []
    for sig in sigs:
        v = known.get((sig.name, sig.key_id))
        if v is None:
            unverified.append(sig)
            continue
        # Every known signature is checked (C2SP: MUST verify), even a repeated one,
        # which is then counted once.
        if not v.verify(text, sig.signature):
            raise NoteError(
                f"{what}: the signature by {sig.name} ({sig.key_id:08x}) does not verify"
            )
        if (sig.name, sig.key_id) not in seen:
            seen.add((sig.name, sig.key_id))
            verified.append(v)
    return tuple(verified), tuple(unverified)


def open_note(note: str | bytes, verifiers: Sequence[V]) -> OpenedNote[V]:
    """Verify a note against the keys given: every known signature must verify and at
    least one must be there; unknown ones are ignored. Raises NoteError saying which."""
    text, sigs = split_note(note)
    verified, unverified = check_signatures(text, sigs, verifiers)
    if not verified:
        names = ", ".join(f"{v.name}+{v.key_hash:08x}" for v in verifiers) or "none given"
        raise NoteError(f"note: no signature by a known key ({names})")
    return OpenedNote(text, verified, unverified)
