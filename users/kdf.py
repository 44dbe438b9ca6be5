"""Passwords: the rules for a new one, the argon2id hash, and the key sealed under it.

Two derivations from one password, each with its own random salt, so that neither gives
the other:

- the **password hash**, argon2id in the PHC string form
  (``$argon2id$v=19$m=65536,t=3,p=4$SALT$HASH``), which records its own parameters and salt
  and is checked by argon2-cffi's ``PasswordHasher.verify`` (the comparison is done in
  constant time by the reference implementation underneath);
- the **key-encryption key**, argon2id raw output (32 bytes) over its own 16-byte salt, which
  seals the user's Ed25519 seed with AES-256-GCM (``cryptography``). The associated data is
  the holder id, the key's version and its public key, so a blob copied to another user, to
  another key version or beside another public key does not open.

Parameters (:data:`DEFAULT_COST`) are RFC 9106's second recommended option, section 4
("t=3 iterations, p=4 lanes, m=2^(16) (64 MiB of RAM), 128-bit salt, 256-bit tag"), which is
also argon2-cffi's ``RFC_9106_LOW_MEMORY`` profile; they are above OWASP's Password Storage
Cheat Sheet minimum for argon2id (m=19 MiB, t=2, p=1). One unlock computes both derivations:
about 0.4 s on the 2-core development VM (docs/accounts.md). The parameters travel with each
hash and each sealed key, so raising them later needs no migration: ``passwd`` rewrites both
with the parameters of its time.

A lower cost exists for the test suite only, passed explicitly to the functions that create
hashes (:data:`TEST_COST`); nothing reads it from the environment or a config file.
``iort-users check`` names every hash or sealed key below :data:`MIN_COST`.

Password rules (:func:`password_problem`) follow NIST SP 800-63B-4, section 3.1.1.2, for a
password used as a single factor: at least 15 characters (Unicode code points, after NFKC
normalisation, which is also what is hashed), at most 256; no composition rules; refused when
it is a commonly used one or built from the account's own id or name.
"""

from __future__ import annotations

import base64
import binascii
import secrets
import unicodedata
from dataclasses import dataclass
from typing import Any

from argon2 import PasswordHasher
from argon2.exceptions import HashingError, InvalidHashError, VerificationError
from argon2.low_level import Type, hash_secret_raw
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

__all__ = [
    "DEFAULT_COST",
    "MAX_PASSWORD_CHARS",
    "MIN_COST",
    "MIN_PASSWORD_CHARS",
    "TEST_COST",
    "Cost",
    "SealError",
    "hash_cost",
    "hash_password",
    "normalise",
    "open_seed",
    "password_problem",
    "seal_seed",
    "sealed_cost",
    "verify_hash",
]

MIN_PASSWORD_CHARS = 15  # NIST SP 800-63B-4 3.1.1.2, a password as the single factor
MAX_PASSWORD_CHARS = 256  # it asks that at least 64 be allowed
SALT_BYTES = 16
KEY_BYTES = 32
NONCE_BYTES = 12  # AES-GCM's 96-bit nonce, random: one seal per key and password
SEAL_FORMAT = "argon2id+aes-256-gcm/1"

# A few of the most common passwords of the length allowed, and words of this domain: NIST
# asks for a blocklist of "commonly-used, expected, or compromised" values. The account's
# own id and printed name are checked too (password_problem).
_BLOCKLIST = frozenset(
    {
        "passwordpassword",
        "password1234567",
        "password12345678",
        "123456789012345",
        "1234567890123456",
        "qwertyuiopasdfgh",
        "qwertyuiopasdfghjkl",
        "iloveyouiloveyou",
        "changemechangeme",
        "welcomewelcome1",
        "administrator123",
        "radiotherapy2026",
        "intraoperative1",
    }
)
_CONTEXT_WORDS = ("iortd", "iort-users", "password", "passwort", "radiotherapy")


@dataclass(frozen=True, slots=True)
class Cost:
    """argon2id parameters: passes, memory in KiB, lanes."""

    time_cost: int
    memory_kib: int
    parallelism: int

    def at_least(self, other: Cost) -> bool:
        return (
            self.time_cost >= other.time_cost
            and self.memory_kib >= other.memory_kib
            and self.parallelism >= other.parallelism
        )


DEFAULT_COST = Cost(time_cost=3, memory_kib=64 * 1024, parallelism=4)  # RFC 9106, 4, second
MIN_COST = Cost(time_cost=2, memory_kib=19 * 1024, parallelism=1)  # OWASP's argon2id floor
TEST_COST = Cost(time_cost=1, memory_kib=64, parallelism=1)  # tests only, passed explicitly


class SealError(Exception):
    """A sealed key does not open: a wrong password, or a blob not made for this holder,
    key version and public key, or altered."""


def normalise(password: str) -> bytes:
    """What is hashed: NFKC (NIST SP 800-63B-4 asks for it, so that one password typed on two
    keyboards is one password), UTF-8."""
    return unicodedata.normalize("NFKC", password).encode("utf-8")


def password_problem(password: str, *, holder: str, name: str) -> str | None:
    """Why a new password is refused (one sentence), or None."""
    text = unicodedata.normalize("NFKC", password)
    if len(text) < MIN_PASSWORD_CHARS:
        return (
            f"too short: at least {MIN_PASSWORD_CHARS} characters (a passphrase of a few "
            "words is easiest to remember)"
        )
    if len(text) > MAX_PASSWORD_CHARS:
        return f"too long: at most {MAX_PASSWORD_CHARS} characters"
    if not text.isprintable():
        return "contains a control character (a line break, a tab)"
    folded = text.casefold()
    if len(set(folded)) < 5:
        return "repeats too few characters; choose a passphrase"
    if folded in _BLOCKLIST:
        return "is a commonly used password; choose another"
    squeezed = "".join(c for c in folded if c.isalnum())
    for word in (holder, *name.casefold().replace(",", " ").split(), *_CONTEXT_WORDS):
        w = "".join(c for c in word.casefold() if c.isalnum())
        if len(w) >= 4 and w in squeezed and len(squeezed) - len(w) < MIN_PASSWORD_CHARS - 4:
            return f"is mostly the account's own id or name or {word!r}; choose another"
    return None


def _hasher(cost: Cost) -> PasswordHasher:
    return PasswordHasher(
        time_cost=cost.time_cost,
        memory_cost=cost.memory_kib,
        parallelism=cost.parallelism,
        hash_len=KEY_BYTES,
        salt_len=SALT_BYTES,
        type=Type.ID,
    )


def hash_password(password: str, cost: Cost) -> str:
    """The argon2id PHC string of ``password``."""
    return _hasher(cost).hash(normalise(password))


def verify_hash(stored: str, password: str) -> bool:
    """Whether ``password`` matches ``stored`` (which carries its own parameters)."""
    try:
        return _hasher(DEFAULT_COST).verify(stored, normalise(password))
    except (VerificationError, InvalidHashError):
        return False


def hash_cost(stored: str) -> Cost | None:
    """The parameters recorded in a PHC string (None when it is not an argon2id hash)."""
    parts = stored.split("$")
    if len(parts) != 6 or parts[1] != "argon2id":
        return None
    try:
        fields = dict(kv.split("=", 1) for kv in parts[3].split(","))
        return Cost(int(fields["t"]), int(fields["m"]), int(fields["p"]))
    except (KeyError, ValueError):
        return None


def _kek(password: str, salt: bytes, cost: Cost) -> bytes:
    return hash_secret_raw(
        normalise(password),
        salt,
        time_cost=cost.time_cost,
        memory_cost=cost.memory_kib,
        parallelism=cost.parallelism,
        hash_len=KEY_BYTES,
        type=Type.ID,
    )


def _aad(holder: str, version: int, public_key: str) -> bytes:
    # Each field on its own line: none of them can contain a newline (HOLDER_RE, the note
    # key format), so no two different triples give the same bytes.
    return f"{SEAL_FORMAT}\n{holder}\n{version}\n{public_key}\n".encode()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def seal_seed(
    seed: bytes, password: str, *, holder: str, version: int, public_key: str, cost: Cost
) -> dict[str, Any]:
    """The sealed form of an Ed25519 seed, as stored (JSON-ready)."""
    salt, nonce = secrets.token_bytes(SALT_BYTES), secrets.token_bytes(NONCE_BYTES)
    box = AESGCM(_kek(password, salt, cost)).encrypt(nonce, seed, _aad(holder, version, public_key))
    return {
        "format": SEAL_FORMAT,
        "t": cost.time_cost,
        "m": cost.memory_kib,
        "p": cost.parallelism,
        "salt": _b64(salt),
        "nonce": _b64(nonce),
        "box": _b64(box),
    }


def sealed_cost(sealed: dict[str, Any]) -> Cost:
    return Cost(int(sealed["t"]), int(sealed["m"]), int(sealed["p"]))


def open_seed(
    sealed: dict[str, Any], password: str, *, holder: str, version: int, public_key: str
) -> bytes:
    """The seed sealed by :func:`seal_seed`; :class:`SealError` otherwise."""
    try:
        if sealed.get("format") != SEAL_FORMAT:
            raise SealError("not a sealed key of this format")
        cost = sealed_cost(sealed)
        salt = base64.b64decode(sealed["salt"], validate=True)
        nonce = base64.b64decode(sealed["nonce"], validate=True)
        box = base64.b64decode(sealed["box"], validate=True)
        if len(salt) != SALT_BYTES or len(nonce) != NONCE_BYTES:
            raise SealError("salt or nonce of the wrong size")
        kek = _kek(password, salt, cost)
        seed = AESGCM(kek).decrypt(nonce, box, _aad(holder, version, public_key))
    except (KeyError, TypeError, ValueError, binascii.Error, HashingError) as exc:
        raise SealError(f"malformed sealed key ({type(exc).__name__})") from None
    except InvalidTag:
        raise SealError("does not open with this password for this holder and key") from None
    if len(seed) != KEY_BYTES:
        raise SealError("not an Ed25519 seed")
    return seed
