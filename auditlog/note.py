"""Ed25519 keys and signed checkpoints in the signed-note format.

Formats follow golang.org/x/mod/sumdb/note and C2SP tlog-checkpoint, so that standard
tools can read them:

- verifier (public) key:  ``<name>+<keyhash 8 hex>+<base64(0x01 || public key)>``
- signer (private) key:   ``PRIVATE+KEY+<name>+<keyhash 8 hex>+<base64(0x01 || seed)>``
- key hash: the first 4 bytes (big-endian) of SHA-256(name || "\\n" || 0x01 || public key)
- a note: text lines ending in ``\\n``, a blank line, then signature lines
  ``— <name> <base64(keyhash 4 bytes || Ed25519 signature of the text)>``

A checkpoint's text is the C2SP body: origin, entry count, base64 head hash, then
extension lines. iortd's head hash is the hash of the last entry of the chain (a hash
chain, not a Merkle tree root); docs/audit-log.md says what that does and does not prove.
Signing here is byte-for-byte Go's; reading is made for iortd's own notes and is stricter
than C2SP signed-note in places (names without '/', only 68-byte signatures): notes other
parties sign too are read by signed_note.py, and the tree's checkpoint body is in
tlog_checkpoint.py.
"""

from __future__ import annotations

import base64
import hashlib
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

__all__ = [
    "Checkpoint",
    "KeyFileError",
    "NoteError",
    "Signer",
    "Verifier",
    "generate_keypair",
    "load_signer",
    "load_verifier",
]

ALG_ED25519 = 0x01
SIG_PREFIX = "\u2014 "  # em dash and space


class NoteError(ValueError):
    """A note, a checkpoint or a key is malformed or does not verify."""


class KeyFileError(NoteError):
    """A key file is unusable (malformed, or readable by others)."""


def _key_hash(name: str, public: bytes) -> int:
    digest = hashlib.sha256(name.encode() + b"\n" + bytes([ALG_ED25519]) + public).digest()
    return int.from_bytes(digest[:4], "big")


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
    head_hash: str  # hex SHA-256 of entry count-1
    extensions: tuple[str, ...] = ()

    @property
    def text(self) -> str:
        head_b64 = base64.b64encode(bytes.fromhex(self.head_hash)).decode()
        lines = [self.origin, str(self.count), head_b64, *self.extensions]
        return "".join(line + "\n" for line in lines)

    def signed(self, signer: Signer) -> str:
        return signer.sign(self.text)

    @classmethod
    def parse_verified(cls, note: str, verifier: Verifier | None) -> tuple[Checkpoint, bool]:
        """Parse a signed checkpoint; the bool says whether ``verifier`` signed it (False
        when no verifier was given)."""
        text, sep, sigs = note.partition("\n\n")
        if not sep:
            raise NoteError("checkpoint: no blank line before the signatures")
        text += "\n"
        lines = text.split("\n")[:-1]
        if len(lines) < 3:
            raise NoteError("checkpoint: needs origin, count and head hash lines")
        origin, count_s, head_b64, *ext = lines
        try:
            count = int(count_s)
            head = base64.b64decode(head_b64, validate=True)
        except ValueError:
            raise NoteError("checkpoint: bad count or head hash") from None
        if count < 0 or str(count) != count_s or len(head) != 32:
            raise NoteError("checkpoint: bad count or head hash")
        cp = cls(origin, count, head.hex(), tuple(ext))
        signed_by_verifier = False
        sig_lines = [s for s in sigs.split("\n") if s]
        if not sig_lines:
            raise NoteError("checkpoint: no signature")
        for line in sig_lines:
            if not line.startswith(SIG_PREFIX):
                raise NoteError(f"checkpoint: malformed signature line {line!r}")
            name, _, b64 = line[len(SIG_PREFIX) :].rpartition(" ")
            try:
                blob = base64.b64decode(b64, validate=True)
            except ValueError:
                raise NoteError("checkpoint: signature is not base64") from None
            if len(blob) != 68:
                raise NoteError("checkpoint: signature has the wrong length")
            if verifier is None or name != verifier.name:
                continue
            if int.from_bytes(blob[:4], "big") != verifier.key_hash:
                continue
            if not verifier.verify(text, blob[4:]):
                raise NoteError(f"checkpoint: signature by {name} does not verify")
            signed_by_verifier = True
        return cp, signed_by_verifier
