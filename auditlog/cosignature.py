"""Witness cosignatures: c2sp.org/tlog-cosignature, ``cosignature/v1`` with Ed25519.

One module for the three parties that handle them: ``iort-witness`` signs (witness/), the
daemon will check what a witness returns before recording it, and ``iort-audit`` will
check the cosignatures an auditor requires. Pure: no clock (the signer is given the time),
no I/O but reading and writing a key file.

**The signed message** (the specification's "Ed25519 signed message"): the fixed line
``cosignature/v1``, the line ``time <POSIX seconds>`` (decimal, no leading zero), then the
checkpoint's whole note text (origin, size, root, extension lines) with its final
newline, no signature line. The time is part of what is signed, so it cannot be moved.

**The signature line**: ``— <name> base64(key ID || timestamp || signature)``, 4 + 8 + 64
= 76 bytes: the key ID is SHA-256(name || 0x0A || 0x04 || public key)[:4] (type 0x04,
"timestamped Ed25519 checkpoint cosignature", c2sp.org/signed-note), the timestamp the
same seconds as an unsigned 64-bit big-endian integer (at most 2^63 - 1; never 0 from a
witness, tlog-witness), the signature Ed25519 over the message above.

**What it states.** "As of the time, the largest consistent tree head this witness has
observed for the origin has this root" (tlog-cosignature); it says nothing about extension
lines, which are signed but not vouched for.

**Keys.** The verifier key a witness publishes is a vkey of type 0x04,
``<name>+<key ID>+base64(0x04 || public key)``; a type 0x01 (plain Ed25519 note) vkey is
refused here, since it has another key ID and would never match a cosignature line. The
private key file is the plain Ed25519 note key form that ``iort-audit keygen`` and Go's
``note.GenerateKey`` write, ``PRIVATE+KEY+<name>+<key ID of type 0x01>+base64(0x01 ||
seed)`` (transparency-dev/formats' ``NewSignerForCosignatureV1`` reads the same file, and
also the 0x04 form, read here too), mode 0600. Names follow C2SP: non-empty, no space or
'+'; a schema-less URL such as ``witness.example.org/iort-1`` is recommended, so '/' is
allowed (unlike iortd's own checkpoint keys, note.py).

:class:`CosignerVerifier` has the shape signed_note's readers expect (``name``,
``key_hash``, ``verify``), so a checkpoint with cosignatures appended opens with
``signed_note.open_note(note, [witness verifiers])`` as well as line by line with
:func:`verify_cosignature`; :func:`verified_cosignatures` picks, from a witness's answer,
the lines by trusted witnesses (each verified) and ignores the others. ML-DSA-44
cosignatures (type 0x06, which the specification recommends for new deployments) are not
implemented.
"""

from __future__ import annotations

import base64
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from iortd.auditlog.signed_note import (
    ALG_ED25519,
    SIG_PREFIX,
    NoteError,
    check_key_name,
    decode_base64,
    key_id,
    split_note,
)
from iortd.auditlog.tlog_checkpoint import CheckpointBody, parse_body

__all__ = [
    "ALG_COSIGNATURE_V1",
    "COSIGNATURE_SIZE",
    "CosignatureError",
    "CosignerKey",
    "CosignerVerifier",
    "cosigned_message",
    "load_cosigner",
    "verified_cosignatures",
    "verify_cosignature",
    "write_cosigner",
]

ALG_COSIGNATURE_V1: Final = 0x04
COSIGNATURE_SIZE: Final = 4 + 8 + 64
MAX_TIMESTAMP: Final = 2**63 - 1
_HEADER: Final = "cosignature/v1\n"


class CosignatureError(NoteError):
    """A cosignature line or a cosigner key is malformed or does not verify."""


def cosigned_message(body: str, timestamp: int) -> bytes:
    """What a cosignature/v1 signs: header, time line, the checkpoint's note text."""
    if not 0 <= timestamp <= MAX_TIMESTAMP:
        raise CosignatureError(f"cosignature: timestamp {timestamp} is not 0 .. 2^63-1")
    if not body.endswith("\n"):
        raise CosignatureError("cosignature: the checkpoint text must end with a newline")
    return f"{_HEADER}time {timestamp}\n{body}".encode()


def _check_permissions(path: Path) -> None:
    try:
        st = path.stat()
    except OSError as exc:
        raise CosignatureError(f"{path}: cannot read the witness key: {exc.strerror}") from None
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise CosignatureError(
            f"{path}: the witness key is accessible to group or others "
            f"(mode {stat.S_IMODE(st.st_mode):04o}); run: chmod 600 {path}"
        )


@dataclass(frozen=True, slots=True)
class CosignerVerifier:
    """A witness's public key for cosignature/v1 (type 0x04)."""

    name: str
    key_id: int
    public_bytes: bytes

    @property
    def key_hash(self) -> int:  # signed_note.NoteVerifier
        return self.key_id

    @property
    def text(self) -> str:
        raw = bytes([ALG_COSIGNATURE_V1]) + self.public_bytes
        return f"{self.name}+{self.key_id:08x}+{base64.b64encode(raw).decode('ascii')}"

    @classmethod
    def from_public(cls, name: str, public: bytes) -> CosignerVerifier:
        check_key_name(name)
        if len(public) != 32:
            raise CosignatureError(f"witness key {name}: not a 32-byte Ed25519 public key")
        return cls(name, key_id(name, ALG_COSIGNATURE_V1, public), public)

    @classmethod
    def parse(cls, text: str) -> CosignerVerifier:
        """A vkey ``NAME+KEYID+base64(0x04 || key)``; NoteError saying what is wrong."""
        name, sep1, rest = text.strip().partition("+")
        hash_hex, sep2, b64 = rest.partition("+")
        if not (sep1 and sep2):
            raise CosignatureError("witness key: expected NAME+KEYID+KEY")
        check_key_name(name)
        if len(hash_hex) != 8 or any(c not in "0123456789abcdef" for c in hash_hex):
            raise CosignatureError(f"witness key {name}: the key ID is not 8 lowercase hex digits")
        try:
            raw = decode_base64(b64)
        except ValueError:
            raise CosignatureError(f"witness key {name}: the key is not base64") from None
        if len(raw) != 33 or raw[0] != ALG_COSIGNATURE_V1:
            raise CosignatureError(
                f"witness key {name}: not a cosignature/v1 key (type 0x04 and 32 bytes; "
                "iort-witness keygen prints it)"
            )
        got = cls.from_public(name, raw[1:])
        if got.key_id != int(hash_hex, 16):
            raise CosignatureError(
                f"witness key {name}: the key ID does not match the name and key"
            )
        return got

    def timestamp_of(self, signature: bytes) -> int:
        """The timestamp of a signature (after the key ID); CosignatureError if it is
        not a cosignature/v1 signature of this key's shape."""
        if len(signature) != COSIGNATURE_SIZE - 4:
            raise CosignatureError(
                f"cosignature by {self.name}: {len(signature) + 4} bytes, not "
                f"{COSIGNATURE_SIZE} bytes (key ID, timestamp, Ed25519 signature)"
            )
        return int.from_bytes(signature[:8], "big")

    def verify(self, text: str, signature: bytes) -> bool:
        """signed_note's verifier interface: ``signature`` is timestamp || Ed25519."""
        try:
            ts = self.timestamp_of(signature)
            message = cosigned_message(text, ts)
            Ed25519PublicKey.from_public_bytes(self.public_bytes).verify(signature[8:], message)
        except (CosignatureError, InvalidSignature):
            return False
        return True


@dataclass(frozen=True, slots=True)
class CosignerKey:
    """A witness's private key: signs cosignature/v1 lines."""

    name: str
    private_key: Ed25519PrivateKey

    @classmethod
    def generate(cls, name: str) -> CosignerKey:
        check_key_name(name)
        return cls(name, Ed25519PrivateKey.generate())

    @classmethod
    def parse(cls, text: str) -> CosignerKey:
        """``PRIVATE+KEY+NAME+KEYID+base64(type || seed)``, type 0x01 or 0x04, the key
        ID that of the type given."""
        parts = text.strip().split("+", 4)
        if len(parts) != 5 or parts[:2] != ["PRIVATE", "KEY"]:
            raise CosignatureError("witness key: expected PRIVATE+KEY+NAME+KEYID+KEY")
        name, hash_hex, b64 = parts[2:]
        check_key_name(name)
        try:
            raw = decode_base64(b64)
            claimed = int(hash_hex, 16)
        except ValueError:
            raise CosignatureError(f"witness key {name}: bad hex or base64") from None
        if len(hash_hex) != 8 or len(raw) != 33 or raw[0] not in (ALG_ED25519, ALG_COSIGNATURE_V1):
            raise CosignatureError(f"witness key {name}: not an Ed25519 private key")
        private = Ed25519PrivateKey.from_private_bytes(raw[1:])
        if key_id(name, raw[0], private.public_key().public_bytes_raw()) != claimed:
            raise CosignatureError(f"witness key {name}: the key ID does not match the key")
        return cls(name, private)

    @property
    def text(self) -> str:
        """The key file's line (the plain Ed25519 note key form, type 0x01)."""
        public = self.private_key.public_key().public_bytes_raw()
        kid = key_id(self.name, ALG_ED25519, public)
        raw = bytes([ALG_ED25519]) + self.private_key.private_bytes_raw()
        return f"PRIVATE+KEY+{self.name}+{kid:08x}+{base64.b64encode(raw).decode('ascii')}"

    @property
    def verifier(self) -> CosignerVerifier:
        public = self.private_key.public_key().public_bytes_raw()
        return CosignerVerifier.from_public(self.name, public)

    def cosign(self, body: str, timestamp: int) -> str:
        """The signature line (with its newline) cosigning the checkpoint text ``body``
        at ``timestamp`` (POSIX seconds)."""
        sig = self.private_key.sign(cosigned_message(body, timestamp))
        blob = self.verifier.key_id.to_bytes(4, "big") + timestamp.to_bytes(8, "big") + sig
        return f"{SIG_PREFIX}{self.name} {base64.b64encode(blob).decode('ascii')}\n"


def load_cosigner(path: Path) -> CosignerKey:
    """The witness key from its file, refusing one that group or others can read."""
    _check_permissions(path)
    try:
        return CosignerKey.parse(path.read_text(encoding="ascii"))
    except (OSError, UnicodeDecodeError) as exc:
        raise CosignatureError(f"{path}: cannot read the witness key: {exc}") from None
    except NoteError as exc:
        raise CosignatureError(f"{path}: {exc}") from None


def write_cosigner(key: CosignerKey, path: Path) -> Path:
    """Write the private key to ``path`` (0600, created exclusively, fsync'd) and its
    verifier key beside it (``path`` with the suffix ``.pub``); returns the latter."""
    pub = path.with_suffix(".pub")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="ascii") as f:
        f.write(key.text + "\n")
        f.flush()
        os.fsync(f.fileno())
    pub.write_text(key.verifier.text + "\n", encoding="ascii")
    return pub


def verify_cosignature(
    witness: str | CosignerVerifier, checkpoint: str | CheckpointBody, line: str
) -> int:
    """Check one cosignature line (``— NAME BASE64``, with or without its newline) by
    ``witness`` (its vkey text or verifier) over the checkpoint (its note text or body).
    Returns the cosignature's timestamp; CosignatureError says why it is not one."""
    v = witness if isinstance(witness, CosignerVerifier) else CosignerVerifier.parse(witness)
    text = checkpoint.text if isinstance(checkpoint, CheckpointBody) else checkpoint
    parse_body(text)  # a cosignature vouches for a checkpoint, nothing else
    if not line.endswith("\n"):
        line += "\n"
    # The line read as the one signature of a note over the text: signed_note's form rules.
    _, sigs = split_note(f"{text}\n{line}", "cosignature")
    if len(sigs) != 1:
        raise CosignatureError("cosignature: expected one signature line")
    sig = sigs[0]
    if sig.name != v.name:
        raise CosignatureError(f"cosignature: signed by the name {sig.name!r}, not {v.name!r}")
    if sig.key_id != v.key_id:
        raise CosignatureError(
            f"cosignature by {v.name}: key ID {sig.key_id:08x}, not this witness's {v.key_id:08x}"
        )
    ts = v.timestamp_of(sig.signature)
    if not v.verify(text, sig.signature):
        raise CosignatureError(f"cosignature by {v.name}: the signature does not verify")
    if not 0 < ts <= MAX_TIMESTAMP:
        raise CosignatureError(f"cosignature by {v.name}: timestamp {ts} is not 1 .. 2^63-1")
    return ts


def verified_cosignatures(
    checkpoint: str | CheckpointBody, lines: Sequence[str], witnesses: Sequence[CosignerVerifier]
) -> tuple[str, ...]:
    """What a witness's 200 answer adds to a checkpoint: the lines that are cosignatures by
    one of ``witnesses`` (each witness once, in answer order), each verified. Lines by
    other keys are ignored (tlog-witness: the client MUST ignore them); a line with a
    trusted witness's name and key ID that does not verify raises CosignatureError, and a
    line that is not a signature line at all NoteError (its parent)."""
    text = checkpoint.text if isinstance(checkpoint, CheckpointBody) else checkpoint
    known = {(w.name, w.key_id): w for w in witnesses}
    kept: list[str] = []
    seen: set[tuple[str, int]] = set()
    for given in lines:
        line = given if given.endswith("\n") else given + "\n"
        _, sigs = split_note(f"{text}\n{line}", "cosignature")
        ident = (sigs[0].name, sigs[0].key_id) if len(sigs) == 1 else None
        if ident is None or ident not in known:
            continue
        verify_cosignature(known[ident], text, line)
        if ident not in seen:
            seen.add(ident)
            kept.append(line)
    return tuple(kept)
