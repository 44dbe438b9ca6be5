"""Unlocking a user's signing key: what the dashboard's login and sign-off call.

:func:`unlock` takes a holder id and a password and returns the user's
:class:`~iortd.auditlog.note.Signer` (for auditlog/command.py's ``sign_command``);
:func:`verify_password` only checks the password (a re-entry before a signature, a login
that needs no key). Both raise one error, :class:`AuthError`, with one message, for an
unknown holder, a wrong password, a disabled account and an account past its end: a caller
cannot tell them apart, by the message or by the time taken (an unknown holder costs one
argon2id verification against a fixed hash at the default parameters, like a known one).
Only after the right password for an active account do they say more:
:class:`PasswordChangeRequired` when the password was set by an admin (``add``, ``reset``)
and the user must choose their own before they can sign (no key exists until then).

:func:`load_checked_store` is the store as a login should load it: only when the account
record (record.py) vouches for it, so that a user written into ``users.json`` by hand, with
a password and a key of their own making, cannot log in.

The two derivations (kdf.py) make one unlock cost about two argon2id hashes at the
parameters of the user's hash and sealed key; nothing is cached here. Callers hold the
returned Signer only as long as the session needs it.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from iortd.auditlog.keyring import parse_utc
from iortd.auditlog.note import KeyFileError, Signer, Verifier
from iortd.users.kdf import SealError, open_seed, verify_hash
from iortd.users.record import check_record
from iortd.users.store import RECORD_DIR, Store, StoreError, User, load_store

__all__ = [
    "AuthError",
    "PasswordChangeRequired",
    "load_checked_store",
    "unlock",
    "verify_password",
]

AUTH_FAILED = "unknown user, wrong password, or account not active"
# What an unknown holder's password is checked against: a hash at DEFAULT_COST of a random
# password nobody kept (made once, for this line), so that the work is the same as for a
# known holder from the first call on (a hash made lazily would double the first one).
_DUMMY_HASH = "$argon2id$v=19$m=65536,t=3,p=4$dRlqzsjKg816mCd9IL/4AQ$4GXaUJEbeaFHTLzC7bcpNbl8R91WkLAye3epd/uJvtE"  # noqa: E501


class AuthError(Exception):
    """The holder and password do not unlock an active account (one message for all)."""

    def __init__(self) -> None:
        super().__init__(AUTH_FAILED)


class PasswordChangeRequired(Exception):
    """The right password, set by an admin: the user must choose their own first."""

    def __init__(self, holder: str) -> None:
        super().__init__(
            f"{holder}: the password was set by an admin; choose your own first "
            f"(iort-users passwd {holder})"
        )
        self.holder = holder


def load_checked_store(directory: Path) -> Store:
    """The store, only if the account record vouches for it: its chain and signatures
    check and its last entry names this store's SHA-256 (record.py). What a login should
    load: a user written into ``users.json`` by hand cannot log in. StoreError otherwise."""
    store = load_store(directory)
    state = check_record(directory / RECORD_DIR)
    if state.problems:
        raise StoreError(f"{directory / RECORD_DIR}: the account record does not check: "
                         f"{state.problems[0]}; run iort-users check")  # fmt: skip
    if store.sha256 != state.store_sha256:
        raise StoreError(
            f"{store.path}: not the store the account record names: changed behind "
            "iort-users' back; run iort-users check"
        )
    return store


def active(user: User, now: datetime) -> bool:
    return user.state == "active" and (
        user.valid_until is None or now < parse_utc(user.valid_until)
    )


def verify_password(
    store: Store, holder: str, password: str, *, now: datetime | None = None
) -> User:
    """The active user ``holder`` if ``password`` is theirs; AuthError otherwise."""
    user = store.users.get(holder)
    if user is None:
        verify_hash(_DUMMY_HASH, password)  # the same work as for a known holder
        raise AuthError
    ok = verify_hash(user.password_hash, password)
    if not ok or not active(user, now or datetime.now(UTC)):
        raise AuthError
    return user


def unlock(store: Store, holder: str, password: str, *, now: datetime | None = None) -> Signer:
    """The signing key of ``holder``, opened with ``password`` (module doc)."""
    user = verify_password(store, holder, password, now=now)
    key = user.current_key
    if user.must_change or key is None or key.sealed is None:
        raise PasswordChangeRequired(holder)
    try:
        seed = open_seed(
            key.sealed, password, holder=holder, version=key.version, public_key=key.public_key
        )
        verifier = Verifier.parse(key.public_key)
    except (SealError, KeyFileError):
        raise AuthError from None  # a store altered behind iort-users' back
    private = Ed25519PrivateKey.from_private_bytes(seed)
    signer = Signer(verifier.name, verifier.key_hash, private)
    if signer.verifier.text != key.public_key:
        raise AuthError
    return signer
