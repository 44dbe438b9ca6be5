"""The keyring written from the store: the one file the daemon and iort-audit read.

One ``[[key]]`` table per key *window* (store.py): a key that was disabled and enabled
again, or whose roles changed, has one table per period, each with that period's roles, so
that what it signed is judged by what it was allowed then. An open window ends at the
account's ``valid_until`` or, without one, at :data:`OPEN_END`; a closed one at the instant
it was closed (a disable, a reset, a change of roles). A user without a key yet (a new
account, or one reset, before its user chose a password) has no table.

The text is checked with the keyring's own parser (auditlog/keyring.py) before it is
written: what ``iort-users`` writes is, by construction, what the daemon reads. It holds
public keys, ids, printed names and roles only, and is written atomically (a new file,
fsync'd, renamed, the directory fsync'd), mode 0644.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from iortd.auditlog.keyring import Keyring, parse_keyring, parse_utc
from iortd.kernel.durable import write_atomic
from iortd.users.store import Store

__all__ = ["OPEN_END", "keyring_bytes", "write_keyring"]

# The keyring needs an end for every window; an account without one is open until then.
OPEN_END = "9999-12-31T23:59:59Z"


def keyring_bytes(store: Store) -> tuple[bytes, Keyring]:
    """The keyring's text for ``store``, and its parse (raises KeyringError if the store
    holds something the keyring refuses, which would be a bug here)."""
    blocks = [
        "# Written by iort-users from its account store: do not edit (changes are made with\n"
        "# iort-users and recorded; an edit here is overwritten at the next change).\n"
    ]
    for holder in sorted(store.users):
        user = store.users[holder]
        for key in user.keys:
            for w in key.windows:
                until = w.until or user.valid_until or OPEN_END
                if user.valid_until and parse_utc(user.valid_until) < parse_utc(until):
                    until = user.valid_until
                if parse_utc(until) <= parse_utc(w.since):
                    continue  # closed at the instant it opened: nothing could be signed
                blocks.append(
                    "\n".join(
                        [
                            "[[key]]",
                            f"holder = {json.dumps(holder)}",
                            f"name = {json.dumps(user.name)}",
                            f"roles = {json.dumps(list(w.roles))}",
                            f"public_key = {json.dumps(key.public_key)}",
                            f"valid_from = {json.dumps(w.since)}",
                            f"valid_until = {json.dumps(until)}",
                        ]
                    )
                    + "\n"
                )
    text = "\n".join(blocks).encode("utf-8")
    return text, parse_keyring(text, store.directory / "keyring.toml")


def write_keyring(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` atomically, readable by all (public keys only)."""
    write_atomic(path, data)
    os.chmod(path, 0o644)
