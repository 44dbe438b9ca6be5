"""Ed25519 keys and signed checkpoints in the signed-note format.

Formats follow golang.org/x/mod/sumdb/note and C2SP tlog-checkpoint, so that standard
tools can read them:

- verifier (public) key:  ``<name>+<keyhash 8 hex>+<base64(0x01 || public key)>``
- signer (private) key:   ``PRIVATE+KEY+<name>+<keyhash 8 hex>+<base64(0x01 || seed)>``
- key hash: the first 4 bytes (big-endian) of SHA-256(name || "\\n" || 0x01 || public key)
- a note: text lines ending in ``\\n``, a blank line, then signature lines
  ``— <name> <base64(keyhash 4 bytes || Ed25519 signature of the text)>``

A checkpoint's text is the C2SP body: origin, entry count, base64 hash, then extension
lines. It comes in two forms, told apart by what the signed text says, never by guessing
(docs/audit-log.md, "Signed checkpoints"):

- a **tree checkpoint** (issue 20): line 3 is the RFC 6962 root of the Merkle tree over
  the first ``count`` entries (merkle.py), and line 4 is ``head <64 hex>``, the hash of
  entry ``count - 1`` (the chain's head, so that a reader holding the log finds it with
  one look-up); the body is read strictly by tlog_checkpoint.parse_body (one spelling);
- a **chain-head checkpoint** (written before issue 20, and still when the writer has no
  frontier): line 3 is the hash of entry ``count - 1``; line 4, if any, is never
  ``head …`` (it was ``time …``).

``head_hash`` is the chain's head in both forms; ``root`` is None for the old one.

Signing here is byte-for-byte Go's, and what iortd writes keeps to a narrower form than
C2SP allows: its key names have no '/' (they name its key files, ``NAME.key``) and its
signatures are 68 bytes. *Reading* is C2SP signed-note's, through signed_note.py (the one
place that knows those rules): :meth:`Checkpoint.read` accepts a checkpoint that others
cosigned too (witnesses' signatures of any length, names with '/'), ignores and lists the
signatures by keys it was not given, and refuses the whole note if a signature by the
given key does not verify. :func:`parse_vkey` reads any Ed25519 verifier key by C2SP's
rules; ``Verifier.parse`` stays iortd's reader of its own key files. The tree's checkpoint
body is in tlog_checkpoint.py.
"""

from __future__ import annotations

import base64
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from iortd.auditlog.signed_note import (
    ALG_ED25519,
    SIG_PREFIX,
    NoteError,
    NoteSignature,
    check_key_name,
    check_signatures,
    decode_base64,
    key_id,
    split_note,
)
from iortd.auditlog.tlog_checkpoint import CheckpointBody, parse_body

__all__ = [
    "Checkpoint",
    "KeyFileError",
    "NoteError",
    "ReadCheckpoint",
    "Signer",
    "Verifier",
    "generate_keypair",
    "load_signer",
    "load_verifier",
    "parse_vkey",
]


HEAD_PREFIX = "head "  # line 4 of a tree checkpoint: the chain's head (hex)


class KeyFileError(NoteError):
    """A key file is unusable (malformed, or readable by others)."""


def _key_hash(name: str, public: bytes) -> int:
    return key_id(name, ALG_ED25519, public)


def _check_name(name: str) -> None:
    if not name or any(c in name for c in "+ \n\t/\\") or not name.isprintable():
        raise NoteError(
            f"key name {name!r}: must be non-empty, printable, without '+', '/', or spaces"
        )


def _key_fields(name: str, hash_hex: str, b64: str, *, what: str) -> tuple[str, int, bytes]:
    """The name, key hash and 32 key bytes of a note key's text fields."""
    try:
        _check_name(name)
    except NoteError as exc:
        raise KeyFileError(f"{what}: {exc}") from None
    try:
        raw = base64.b64decode(b64, validate=True)
        claimed = int(hash_hex, 16)
    except ValueError:
        raise KeyFileError(f"{what}: bad hex or base64") from None
    if len(hash_hex) != 8 or len(raw) != 33 or raw[0] != ALG_ED25519:
        raise KeyFileError(f"{what}: not an Ed25519 note key")
    return name, claimed, raw[1:]


def _raw_public(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(Encoding.Raw, PublicFormat.Raw)


@dataclass(frozen=True)
class Verifier:
    name: str
    key_hash: int
    public_key: Ed25519PublicKey

    @property
    def text(self) -> str:
        raw = bytes([ALG_ED25519]) + _raw_public(self.public_key)
        return f"{self.name}+{self.key_hash:08x}+{base64.b64encode(raw).decode()}"

    @classmethod
    def parse(cls, text: str) -> Verifier:
        # The base64 key may itself contain '+': split off only the first two fields.
        parts = text.strip().split("+", 2)
        if len(parts) != 3:
            raise KeyFileError("verifier key: expected NAME+HASH+KEY")
        name, claimed, key = _key_fields(*parts, what="verifier key")
        if _key_hash(name, key) != claimed:
            raise KeyFileError("verifier key: key hash does not match name and key")
        return cls(name, claimed, Ed25519PublicKey.from_public_bytes(key))

    def verify(self, text: str, signature: bytes) -> bool:
        try:
            self.public_key.verify(signature, text.encode())
        except InvalidSignature:
            return False
        return True


@dataclass(frozen=True)
class Signer:
    name: str
    key_hash: int
    private_key: Ed25519PrivateKey

    @property
    def verifier(self) -> Verifier:
        return Verifier(self.name, self.key_hash, self.private_key.public_key())

    @property
    def text(self) -> str:
        seed = self.private_key.private_bytes_raw()
        raw = bytes([ALG_ED25519]) + seed
        return f"PRIVATE+KEY+{self.name}+{self.key_hash:08x}+{base64.b64encode(raw).decode()}"

    @classmethod
    def parse(cls, text: str) -> Signer:
        parts = text.strip().split("+", 4)
        if len(parts) != 5 or parts[:2] != ["PRIVATE", "KEY"]:
            raise KeyFileError("signer key: expected PRIVATE+KEY+NAME+HASH+KEY")
        name, claimed, seed = _key_fields(*parts[2:], what="signer key")
        private = Ed25519PrivateKey.from_private_bytes(seed)
        if _key_hash(name, _raw_public(private.public_key())) != claimed:
            raise KeyFileError("signer key: key hash does not match name and key")
        return cls(name, claimed, private)

    def sign(self, text: str) -> str:
        """The whole signed note: text, blank line, one signature line."""
        if not text.endswith("\n"):
            raise NoteError("note text must end with a newline")
        sig = self.private_key.sign(text.encode())
        blob = self.key_hash.to_bytes(4, "big") + sig
        return f"{text}\n{SIG_PREFIX}{self.name} {base64.b64encode(blob).decode()}\n"


def generate_keypair(name: str) -> Signer:
    _check_name(name)
    private = Ed25519PrivateKey.generate()
    return Signer(name, _key_hash(name, _raw_public(private.public_key())), private)


def load_signer(path: Path) -> Signer:
    """Load a private key, refusing one that group or others can read."""
    try:
        st = path.stat()
    except OSError as exc:
        raise KeyFileError(f"{path}: cannot read signing key: {exc.strerror}") from None
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise KeyFileError(
            f"{path}: signing key is accessible to group or others "
            f"(mode {stat.S_IMODE(st.st_mode):04o}); run: chmod 600 {path}"
        )
    try:
        return Signer.parse(path.read_text(encoding="ascii"))
    except (UnicodeDecodeError, KeyFileError) as exc:
        raise KeyFileError(f"{path}: {exc}") from None


def load_verifier(path: Path) -> Verifier:
    try:
        return Verifier.parse(path.read_text(encoding="ascii"))
    except OSError as exc:
        raise KeyFileError(f"{path}: cannot read public key: {exc.strerror}") from None
    except (UnicodeDecodeError, KeyFileError) as exc:
        raise KeyFileError(f"{path}: {exc}") from None


def parse_vkey(text: str) -> Verifier:
    """An Ed25519 verifier key ``NAME+KEYID+BASE64(0x01 || key)`` by C2SP signed-note's
    rules (signed_note.py): the name may hold '/', unlike iortd's own key files
    (``Verifier.parse``); the key ID is 8 lowercase hex digits, the key canonical base64."""
    name, sep1, rest = text.strip().partition("+")
    hash_hex, sep2, b64 = rest.partition("+")
    if not (sep1 and sep2):
        raise NoteError("verifier key: expected NAME+KEYID+KEY")
    check_key_name(name)
    if len(hash_hex) != 8 or any(c not in "0123456789abcdef" for c in hash_hex):
        raise NoteError(f"verifier key {name}: the key ID is not 8 lowercase hex digits")
    try:
        raw = decode_base64(b64)
    except ValueError:
        raise NoteError(f"verifier key {name}: the key is not base64") from None
    if len(raw) != 33 or raw[0] != ALG_ED25519:
        raise NoteError(f"verifier key {name}: not an Ed25519 key (type 0x01, 32 bytes)")
    claimed = int(hash_hex, 16)
    if key_id(name, ALG_ED25519, raw[1:]) != claimed:
        raise NoteError(f"verifier key {name}: the key ID does not match the name and key")
    return Verifier(name, claimed, Ed25519PublicKey.from_public_bytes(raw[1:]))


def write_keypair(signer: Signer, directory: Path) -> tuple[Path, Path]:
    """Write NAME.key (0600, created exclusively) and NAME.pub."""
    directory.mkdir(parents=True, exist_ok=True)
    key_path = directory / f"{signer.name}.key"
    pub_path = directory / f"{signer.name}.pub"
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="ascii") as f:
        f.write(signer.text + "\n")
        f.flush()
        os.fsync(f.fileno())
    pub_path.write_text(signer.verifier.text + "\n", encoding="ascii")
    return key_path, pub_path


@dataclass(frozen=True)
class Checkpoint:
    origin: str
    count: int  # entries in the log up to and including the head
    head_hash: str  # hex SHA-256 of entry count-1 (the chain's head)
    extensions: tuple[str, ...] = ()  # after the head line of a tree checkpoint
    root: str | None = None  # hex RFC 6962 root at count; None: a chain-head checkpoint

    @property
    def text(self) -> str:
        if self.root is not None:
            head = (HEAD_PREFIX + self.head_hash,)
            return CheckpointBody(
                self.origin, self.count, bytes.fromhex(self.root), head + self.extensions
            ).text
        head_b64 = base64.b64encode(bytes.fromhex(self.head_hash)).decode()
        lines = [self.origin, str(self.count), head_b64, *self.extensions]
        return "".join(line + "\n" for line in lines)

    def signed(self, signer: Signer) -> str:
        return signer.sign(self.text)

    @classmethod
    def read(cls, note: str | bytes, verifier: Verifier | None) -> ReadCheckpoint:
        """Read a signed checkpoint by C2SP signed-note's rules (signed_note.split_note:
        the text ends at the last blank line; UTF-8, no control character, at most 100
        well-formed signature lines). A signature by ``verifier`` (its name and key ID)
        must verify, or the whole note is refused; every other signature, of any length
        and name, is ignored and listed, never checked. NoteError says what is wrong."""
        text, sigs = split_note(note, "checkpoint")
        keys = [verifier] if verifier else []
        verified, ignored = check_signatures(text, sigs, keys, "checkpoint")
        return ReadCheckpoint(cls._parse_text(text), bool(verified), ignored)

    @classmethod
    def parse_verified(
        cls, note: str | bytes, verifier: Verifier | None
    ) -> tuple[Checkpoint, bool]:
        """Parse a signed checkpoint; the bool says whether ``verifier`` signed it (False
        when no verifier was given). As :meth:`read`, without the ignored signatures."""
        got = cls.read(note, verifier)
        return got.checkpoint, got.signed

    @classmethod
    def _parse_text(cls, text: str) -> Checkpoint:
        """The body: origin, count, base64 of the 32-byte head, extension lines; none
        of them empty (C2SP tlog-checkpoint), which only a note's last blank line can
        leave in the text."""
        lines = text.split("\n")[:-1]
        if len(lines) >= 4 and lines[3].startswith(HEAD_PREFIX):
            return cls._parse_tree(text, lines[3])
        if len(lines) < 3:
            raise NoteError("checkpoint: needs origin, count and head hash lines")
        if "" in lines:
            raise NoteError(f"checkpoint: line {lines.index('') + 1} is empty")
        origin, count_s, head_b64, *ext = lines
        try:
            count = int(count_s)
            head = base64.b64decode(head_b64, validate=True)
        except ValueError:
            raise NoteError("checkpoint: bad count or head hash") from None
        if count < 0 or str(count) != count_s or len(head) != 32:
            raise NoteError("checkpoint: bad count or head hash")
        return cls(origin, count, head.hex(), tuple(ext))

    @classmethod
    def _parse_tree(cls, text: str, head_line: str) -> Checkpoint:
        """A tree checkpoint: the C2SP body read strictly, the head on line 4."""
        body = parse_body(text)
        head = head_line[len(HEAD_PREFIX) :]
        if len(head) != 64 or any(c not in "0123456789abcdef" for c in head):
            raise NoteError("checkpoint: line 4 (head) is not 64 lowercase hex digits")
        return cls(body.origin, body.size, head, body.extensions[1:], body.root.hex())


@dataclass(frozen=True, slots=True)
class ReadCheckpoint:
    """A checkpoint as :meth:`Checkpoint.read` found it."""

    checkpoint: Checkpoint
    signed: bool  # the verifier given signed it (and the signature verified)
    ignored: tuple[NoteSignature, ...]  # signatures by other keys: not checked

    def ignored_summary(self) -> str:
        """The ignored signatures for a person: ``name (N bytes)``, comma-separated."""
        return ", ".join(
            f"{s.name if s.name.isprintable() else ascii(s.name)} ({s.size} bytes)"
            for s in self.ignored
        )
