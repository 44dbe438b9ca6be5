"""Account changes: one function per ``iort-users`` command, each a recorded change.

:func:`open_session` locks the store's directory (``DIR/.lock``, an flock the kernel drops
when the process dies), finishes or discards a change a crash interrupted
(store.settle_pending), replays the record (record.check_record) and loads the store; it
refuses (:class:`Refused`) a store whose record does not check or whose SHA-256 is not the
one the record's last entry names. Every change then goes through :meth:`Session.commit`:
pending store, signed record entry, store installed, keyring rewritten (store.py's three
steps; the keyring is derived and rewritten at every start of a change too, so a crash
before it is repaired by the next command).

Who may do what: ``init`` only on an empty store and record; ``passwd`` by the user, with
the old password; everything else by an active admin, with their password (the admin's
key signs the record's entry). The last active admin with a key cannot be disabled, lose the
admin role, or be reset: the store would have no one left to change it.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from iortd.auditlog.note import Signer, generate_keypair
from iortd.kernel.timefmt import utc_ts
from iortd.users.api import AuthError, PasswordChangeRequired, active, unlock, verify_password
from iortd.users.kdf import Cost, SealError, hash_password, open_seed, password_problem, seal_seed
from iortd.users.keyring import keyring_bytes, write_keyring
from iortd.users.record import RecordState, append_event, check_record
from iortd.users.store import (
    KEYRING_FILE,
    RECORD_DIR,
    Key,
    Store,
    StoreError,
    User,
    Window,
    check_dir,
    install_pending,
    load_store,
    settle_pending,
    store_bytes,
    write_pending,
)

__all__ = ["Refused", "Session", "open_session"]

LOCK_FILE = ".lock"


class Refused(Exception):
    """The change is refused: the thing checked is bad (exit 1)."""


@dataclass(slots=True)
class Session:
    directory: Path
    store: Store
    record: RecordState
    cost: Cost
    now: datetime
    lock_fd: int
    notes: list[str]

    def close(self) -> None:
        os.close(self.lock_fd)

    # ---- the commit --------------------------------------------------------------------

    def commit(self, type: str, data: dict[str, Any], actor: Signer) -> None:
        new = store_bytes(self.store)
        digest = hashlib.sha256(new).hexdigest()
        keyring, _ = keyring_bytes(self.store)  # checked before anything is written
        write_pending(self.store, new)
        append_event(
            self.directory / RECORD_DIR,
            type,
            {**data, "store_sha256_before": self.store.sha256, "store_sha256": digest},
            actor,
        )
        install_pending(self.directory)
        self.store.sha256 = digest
        write_keyring(self.directory / KEYRING_FILE, keyring)

    # ---- who is acting -----------------------------------------------------------------

    def admin(self, holder: str, password: str) -> Signer:
        """The signing key of an active admin; Refused otherwise (one message)."""
        try:
            signer = unlock(self.store, holder, password, now=self.now)
        except (AuthError, PasswordChangeRequired):
            raise Refused(f"--admin {holder}: {AuthError()}") from None
        if "admin" not in self.store.users[holder].roles:
            raise Refused(f"--admin {holder}: not an admin")
        return signer

    def user(self, holder: str) -> User:
        user = self.store.users.get(holder)
        if user is None:
            raise Refused(f"{self.store.path}: no user {holder!r}; see iort-users list")
        return user

    def _new_password(self, password: str, user_holder: str, name: str) -> str:
        problem = password_problem(password, holder=user_holder, name=name)
        if problem:
            raise Refused(f"the new password of {user_holder} {problem}")
        return hash_password(password, self.cost)

    def _new_key(self, user: User, password: str) -> Key:
        signer = generate_keypair(user.holder)
        version = (user.keys[-1].version + 1) if user.keys else 1
        public = signer.verifier.text
        sealed = seal_seed(
            signer.private_key.private_bytes_raw(),
            password,
            holder=user.holder,
            version=version,
            public_key=public,
            cost=self.cost,
        )
        ts = utc_ts(self.now)
        windows = [Window(ts, None, user.roles)] if user.state == "active" else []
        return Key(version, public, ts, sealed, windows)

    def _last_admin(self, holder: str) -> bool:
        others = [
            u
            for u in self.store.users.values()
            if u.holder != holder
            and "admin" in u.roles
            and active(u, self.now)
            and u.current_key is not None
        ]
        return not others

    def _close_window(self, user: User) -> None:
        key = user.current_key
        w = key.open_window if key else None
        if w is not None:
            w.until = utc_ts(self.now)

    def _open_window(self, user: User) -> None:
        key = user.current_key
        if key is not None and key.open_window is None and user.state == "active":
            key.windows.append(Window(utc_ts(self.now), None, user.roles))

    # ---- the commands ------------------------------------------------------------------

    def init(self, holder: str, name: str, roles: set[str], password: str) -> None:
        if self.store.users or self.record.changes:
            raise Refused(f"{self.directory}: the store has users already; use iort-users add")
        ts = utc_ts(self.now)
        roles_t = tuple(sorted(roles | {"admin"}))
        user = User(
            holder, name, roles_t, "active", ts, holder, "init", ts, holder, None,
            self._new_password(password, holder, name), ts, False,
        )  # fmt: skip
        key = self._new_key(user, password)
        user.keys.append(key)
        self.store.users[holder] = user
        signer = unlock(self.store, holder, password, now=self.now)
        data = {"holder": holder, "name": name, "roles": list(roles_t), "valid_until": None}
        self.commit("account_created", {**data, "public_key": key.public_key, "by": holder}, signer)

    def add(
        self,
        admin: Signer,
        holder: str,
        name: str,
        roles: set[str],
        valid_until: str | None,
        password: str,
    ) -> None:
        if holder in self.store.users:
            raise Refused(f"{self.store.path}: {holder!r} exists already (ids are never reused)")
        ts = utc_ts(self.now)
        self.store.users[holder] = User(
            holder, name, tuple(sorted(roles)), "active", ts, admin.name, "created", ts,
            admin.name, valid_until, self._new_password(password, holder, name), ts, True,
        )  # fmt: skip
        data = {"holder": holder, "name": name, "roles": sorted(roles)}
        self.commit(
            "account_created", {**data, "valid_until": valid_until, "by": admin.name}, admin
        )

    def set_state(self, admin: Signer, holder: str, *, enable: bool, reason: str) -> None:
        user = self.user(holder)
        if (user.state == "active") == enable:
            raise Refused(f"{holder} is {user.state} already")
        if not enable and "admin" in user.roles and self._last_admin(holder):
            raise Refused(f"{holder} is the last active admin; add another admin first")
        user.state, user.state_at = ("active" if enable else "disabled"), utc_ts(self.now)
        user.state_by, user.state_reason = admin.name, reason
        if enable:
            self._open_window(user)
        else:
            self._close_window(user)
        kind = "account_enabled" if enable else "account_disabled"
        extra = {} if enable else {"reason": reason}
        self.commit(kind, {"holder": holder, **extra, "by": admin.name}, admin)

    def set_roles(self, admin: Signer, holder: str, roles: set[str]) -> None:
        user = self.user(holder)
        new = tuple(sorted(roles))
        if new == user.roles:
            raise Refused(f"{holder} has the roles {list(new)} already")
        if "admin" in user.roles and "admin" not in new and self._last_admin(holder):
            raise Refused(f"{holder} is the last active admin; add another admin first")
        before = user.roles
        self._close_window(user)
        user.roles = new
        self._open_window(user)
        data = {"holder": holder, "roles_before": list(before), "roles": list(new)}
        self.commit("account_roles_changed", {**data, "by": admin.name}, admin)

    def reset(self, admin: Signer, holder: str, password: str) -> None:
        user = self.user(holder)
        if "admin" in user.roles and self._last_admin(holder):
            raise Refused(f"{holder} is the last active admin; add another admin first")
        user.password_hash = self._new_password(password, holder, user.name)
        user.password_set_at = utc_ts(self.now)
        user.must_change = True
        key = user.current_key
        if key is not None:
            self._close_window(user)
            key.sealed, key.retired_at = None, utc_ts(self.now)
        data = {"holder": holder, "retired_key_version": key.version if key else None}
        self.commit("account_password_reset", {**data, "by": admin.name}, admin)

    def passwd(self, holder: str, old: str, new: str) -> bool:
        """The user's own change; True when it made the user's (new) key."""
        try:
            user = verify_password(self.store, holder, old, now=self.now)
        except AuthError:
            raise Refused(f"{holder}: {AuthError()}") from None
        if old == new:
            raise Refused(f"{holder}: the new password is the old one")
        user.password_hash = self._new_password(new, holder, user.name)
        user.password_set_at = utc_ts(self.now)
        key = user.current_key
        made = user.must_change or key is None or key.sealed is None
        if made or key is None or key.sealed is None:
            key = self._new_key(user, new)
            user.keys.append(key)
        else:
            seed = unlock_seed(key.sealed, user, key, old)
            key.sealed = seal_seed(
                seed, new, holder=holder, version=key.version, public_key=key.public_key,
                cost=self.cost,
            )  # fmt: skip
        user.must_change = False
        signer = unlock(self.store, holder, new, now=self.now)
        data = {"holder": holder, "key_version": key.version, "public_key": key.public_key}
        self.commit("account_password_changed", {**data, "new_key": made, "by": holder}, signer)
        return made


def unlock_seed(sealed: dict[str, Any], user: User, key: Key, password: str) -> bytes:
    try:
        return open_seed(
            sealed, password, holder=user.holder, version=key.version,
            public_key=key.public_key,
        )  # fmt: skip
    except SealError:
        raise Refused(f"{user.holder}: {AuthError()}") from None


def _lock(directory: Path) -> int:
    flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(directory / LOCK_FILE, flags, 0o600)
    except OSError as exc:
        raise StoreError(f"{directory / LOCK_FILE}: cannot open: {exc.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise StoreError(
            f"{directory}: another iort-users is changing the store; try again when it is done"
        ) from None
    return fd


def _consistent(store: Store, state: RecordState) -> None:
    if state.problems:
        raise Refused(
            "\n".join([*state.problems, "the store is not changed; see docs/accounts.md"])
        )
    if store.sha256 != state.store_sha256:
        raise Refused(
            f"{store.path}: its SHA-256 is not the one the account record's last entry "
            "names: it was changed behind iort-users' back (or restored without its "
            "record); nothing is changed; see docs/accounts.md, 'When check fails'"
        )


def open_session(
    directory: Path, *, cost: Cost, create: bool = False, now: datetime | None = None
) -> Session:
    """Lock, settle, check and load the store (module doc); the caller closes it."""
    check_dir(directory, create=create)
    fd = _lock(directory)
    try:
        state = check_record(directory / RECORD_DIR)
        note = None
        if not state.problems:
            note = settle_pending(directory, state.store_sha256 or None)
        store = load_store(directory)
        _consistent(store, state)
        session = Session(directory, store, state, cost, now or datetime.now(UTC), fd, [])
        if note:
            session.notes.append(note)
        if store.users:  # the derived keyring, in case a crash came before it was written
            keyring, _ = keyring_bytes(store)
            write_keyring(directory / KEYRING_FILE, keyring)
    except BaseException:
        os.close(fd)
        raise
    return session
