"""User accounts: who may sign, with a password only they know (issue 19, item 1).

- ``kdf.py``: password rules (NIST SP 800-63B-4), the argon2id hash (RFC 9106 parameters) and
  the user's Ed25519 seed sealed with AES-256-GCM under an argon2id-derived key;
- ``store.py``: the account store, one JSON file per site in a 0700 directory, and the
  three crash-safe steps of a change;
- ``record.py``: the account record, an audit-log directory of signed account events, and
  its replay (``iort-users check``);
- ``keyring.py``: the keyring derived from the store, in the daemon's format
  (auditlog/keyring.py, parsed before it is written);
- ``api.py``: :func:`unlock` (a holder and password to a Signer),
  :func:`verify_password` and :func:`load_checked_store`, for the dashboard's login and
  sign-off;
- ``signing.py``: :func:`signed_command`, a command signed with an unlocked key (the
  dashboard's sign-off), so the dashboard needs no import of the audit-log core;
- ``changes.py`` and ``cli.py``: ``iort-users``.

Layer: on the kernel and the audit-log core only; the daemon never imports it (it reads the
keyring file). argon2 is imported here and nowhere else (tests/unit/test_layers.py).
docs/accounts.md is the user's page.
"""

from iortd.auditlog.note import Signer
from iortd.users.api import (
    AuthError,
    PasswordChangeRequired,
    load_checked_store,
    unlock,
    verify_password,
)
from iortd.users.signing import signed_command
from iortd.users.store import Store, StoreError, load_store

__all__ = [
    "AuthError",
    "PasswordChangeRequired",
    "Signer",
    "Store",
    "StoreError",
    "load_checked_store",
    "load_store",
    "signed_command",
    "unlock",
    "verify_password",
]
