"""Unlocking a user's signing key: what the dashboard's login and sign-off call.

:func:`unlock` takes a holder id and a password and returns the user's
:class:`~iortd.auditlog.note.Signer` (for auditlog/command.py's ``sign_command``);
:func:`verify_password` only checks the password (a re-entry before a signature, a login
that needs no key). Both raise one error, :class:`AuthError`, with one message, for an
unknown holder, a wrong password, a disabled account and an account past its end: a caller
cannot tell them apart, by the message or by the time taken (an unknown holder costs one
argon2id verification against a dummy hash of the default parameters, like a known one).
Only after the right password for an active account do they say more:
:class:`PasswordChangeRequired` when the password was set by an admin (``add``, ``reset``)
and the user must choose their own before they can sign (no key exists until then).

The two derivations (kdf.py) make one unlock cost about two argon2id hashes at the
parameters of the user's hash and sealed key; nothing is cached here. Callers hold the
returned Signer only as long as the session needs it.
"""

from __future__ import annotations

from datetime import UTC, datetime

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from iortd.auditlog.keyring import parse_utc
from iortd.auditlog.note import KeyFileError, Signer, Verifier
from iortd.users.kdf import DEFAULT_COST, SealError, hash_password, open_seed, verify_hash
from iortd.users.store import Store, User

__all__ = ["AuthError", "PasswordChangeRequired", "unlock", "verify_password"]

AUTH_FAILED = "unknown user, wrong password, or account not active"
_dummy_hash: str | None = None


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


def _dummy() -> str:
    global _dummy_hash  # noqa: PLW0603 - one lazily made constant, not state
    if _dummy_hash is None:
        _dummy_hash = hash_password("not a password of anyone here", DEFAULT_COST)
    return _dummy_hash


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
        verify_hash(_dummy(), password)  # the same work as for a known holder
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
