"""The account store: one JSON file per site, its directory and the changes to it.

The directory (``iort-users --dir DIR``) is mode 0700 and owned by whoever runs
``iort-users``; a directory that is a link, someone else's, or open to group or others is
refused, naming the ``chmod``. In it:

- ``users.json``: the store, mode 0600, canonical JSON (auditlog/canonical.py) and a
  newline. Per user: the holder id (the keyring's HOLDER_RE), the printed name, the roles,
  the state (``active``/``disabled``, when, by whom, why), an optional end of the account
  (``valid_until``), the argon2id password hash (kdf.py), whether the password was set by an
  admin (``must_change``), and the user's keys: each an Ed25519 public key (the note
  verifier text), the private seed **sealed** under the password (kdf.py; never in clear),
  and the windows in which it may sign, each with the roles of that window. A retired key
  keeps its public key and windows (its signatures stay verifiable) and loses its sealed
  seed.
- ``record/``: the account record, an audit-log directory (record.py).
- ``keyring.toml``: the keyring derived from the store (keyring.py).

Windows, not one validity per key: a key signs with the roles and in the periods the record
says. Disabling closes the open window at that instant; enabling opens a new one; a change
of roles closes the window and opens one with the new roles, so that a signature made as a
physicist in March is still judged against the roles of March. A key is made only from a
password its user chose (changes.py's ``passwd``, kdf.py's seal): ``add`` and ``reset`` set a
temporary password the admin knows and no key, so no admin can ever hold the means to sign
as someone else.

A change is made in three steps so that a crash leaves one story (:func:`commit_change`):
the new store is written to ``users.json.pending`` and fsync'd; the record's entry (which
names the new store's SHA-256) is appended and fsync'd; the pending file is renamed over
``users.json`` and the directory fsync'd. :func:`settle_pending` at the next start finishes
a rename whose entry is on disk and deletes a pending file whose entry is not.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from iortd.auditlog.canonical import canonical
from iortd.auditlog.keyring import HOLDER_RE, ROLES, parse_utc
from iortd.kernel.durable import fsync_dir, write_all

__all__ = [
    "FORMAT",
    "KEYRING_FILE",
    "PENDING_FILE",
    "RECORD_DIR",
    "STORE_FILE",
    "Key",
    "Store",
    "StoreError",
    "User",
    "Window",
    "check_dir",
    "load_store",
    "store_bytes",
]

FORMAT = "iort-users/1"
STORE_FILE = "users.json"
PENDING_FILE = "users.json.pending"
RECORD_DIR = "record"
KEYRING_FILE = "keyring.toml"
MAX_STORE_BYTES = 16 * 1024 * 1024
STATES = ("active", "disabled")


class StoreError(Exception):
    """The store cannot be used as it is (exit 2); the message names the file and key."""


@dataclass(slots=True)
class Window:
    """When a key may sign, and with which roles; ``until`` None: open."""

    since: str
    until: str | None
    roles: tuple[str, ...]


@dataclass(slots=True)
class Key:
    version: int
    public_key: str  # the note verifier text, HOLDER+HASH+KEY
    created_at: str
    sealed: dict[str, Any] | None  # None once retired
    windows: list[Window] = field(default_factory=list)
    retired_at: str | None = None

    @property
    def open_window(self) -> Window | None:
        return self.windows[-1] if self.windows and self.windows[-1].until is None else None


@dataclass(slots=True)
class User:
    holder: str
    name: str
    roles: tuple[str, ...]
    state: str
    state_at: str
    state_by: str
    state_reason: str
    created_at: str
    created_by: str
    valid_until: str | None
    password_hash: str
    password_set_at: str
    must_change: bool
    keys: list[Key] = field(default_factory=list)

    @property
    def current_key(self) -> Key | None:
        return self.keys[-1] if self.keys and self.keys[-1].sealed is not None else None


@dataclass(slots=True)
class Store:
    directory: Path
    users: dict[str, User]
    sha256: str  # of users.json as read ("" for a store not yet written)

    @property
    def path(self) -> Path:
        return self.directory / STORE_FILE


def store_bytes(store: Store) -> bytes:
    """The file's bytes: canonical JSON and a newline (users sorted by holder)."""
    doc = {
        "format": FORMAT,
        "users": [_user_dict(store.users[h]) for h in sorted(store.users)],
    }
    return canonical(doc) + b"\n"


def _user_dict(u: User) -> dict[str, Any]:
    return {
        "holder": u.holder,
        "name": u.name,
        "roles": list(u.roles),
        "state": u.state,
        "state_at": u.state_at,
        "state_by": u.state_by,
        "state_reason": u.state_reason,
        "created_at": u.created_at,
        "created_by": u.created_by,
        "valid_until": u.valid_until,
        "password_hash": u.password_hash,
        "password_set_at": u.password_set_at,
        "must_change": u.must_change,
        "keys": [
            {
                "version": k.version,
                "public_key": k.public_key,
                "created_at": k.created_at,
                "sealed": k.sealed,
                "retired_at": k.retired_at,
                "windows": [
                    {"since": w.since, "until": w.until, "roles": list(w.roles)} for w in k.windows
                ],
            }
            for k in u.keys
        ],
    }


def check_dir(directory: Path, *, create: bool = False) -> None:
    """The store's directory exists (or is made), is a real directory, ours, mode 0700."""
    if create:
        try:
            directory.mkdir(mode=0o700, parents=False)
        except FileExistsError:
            pass
        except OSError as exc:
            raise StoreError(f"--dir {directory}: cannot create it: {exc.strerror}") from None
    try:
        st = os.lstat(directory)
    except FileNotFoundError:
        raise StoreError(
            f"--dir {directory}: no such directory; create the store with iort-users init"
        ) from None
    except OSError as exc:
        raise StoreError(f"--dir {directory}: {exc.strerror}") from None
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        raise StoreError(f"--dir {directory}: not a directory (a link is refused)")
    if st.st_uid != os.geteuid():
        raise StoreError(
            f"--dir {directory}: owned by uid {st.st_uid}, not by you (uid {os.geteuid()}); "
            "run iort-users as the store's owner"
        )
    if stat.S_IMODE(st.st_mode) & 0o077:
        raise StoreError(
            f"--dir {directory}: open to group or others ({stat.S_IMODE(st.st_mode):o}); "
            f"restrict it: chmod 700 {directory}"
        )


def _read_store_file(path: Path) -> bytes | None:
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise StoreError(f"{path}: cannot be read ({exc.strerror}); a link is refused") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise StoreError(f"{path}: not a regular file")
        if st.st_uid != os.geteuid() or stat.S_IMODE(st.st_mode) & 0o077:
            raise StoreError(
                f"{path}: must be yours and mode 0600 (it is {stat.S_IMODE(st.st_mode):o}, "
                f"uid {st.st_uid}); chmod 600 {path}"
            )
        chunks = []
        size = 0
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
            size += len(chunk)
            if size > MAX_STORE_BYTES:
                raise StoreError(f"{path}: larger than {MAX_STORE_BYTES} bytes; not a store")
        return b"".join(chunks)
    finally:
        os.close(fd)


def load_store(directory: Path) -> Store:
    """The store in ``directory`` (an empty one when ``users.json`` does not exist yet)."""
    check_dir(directory)
    path = directory / STORE_FILE
    raw = _read_store_file(path)
    if raw is None:
        return Store(directory, {}, "")
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise StoreError(f"{path}: not JSON ({exc}); restore it from a backup") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise StoreError(f"{path}: format: expected {FORMAT!r}")
    users: dict[str, User] = {}
    for i, item in enumerate(_list(doc, "users", f"{path}")):
        user = _user(item, f"{path}: users[{i}]")
        if user.holder in users:
            raise StoreError(f"{path}: users[{i}]: holder {user.holder!r} appears twice")
        users[user.holder] = user
    return Store(directory, users, hashlib.sha256(raw).hexdigest())


def _list(obj: Any, key: str, where: str) -> list[Any]:
    value = obj.get(key) if isinstance(obj, dict) else None
    if not isinstance(value, list):
        raise StoreError(f"{where}: {key}: expected a list")
    return value


def _get(obj: dict[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
    if key not in obj:
        raise StoreError(f"{where}: missing key {key!r}")
    value = obj[key]
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        raise StoreError(f"{where}: {key}: wrong type")
    return value


def _time(obj: dict[str, Any], key: str, where: str, *, optional: bool = False) -> str | None:
    value = obj.get(key)
    if value is None and optional and key in obj:
        return None
    try:
        parse_utc(value)
    except ValueError as exc:
        raise StoreError(f"{where}: {key}: {exc}") from None
    return str(value)


def _roles(obj: dict[str, Any], where: str) -> tuple[str, ...]:
    roles = _get(obj, "roles", list, where)
    if not roles or not all(isinstance(r, str) and r in ROLES for r in roles):
        raise StoreError(f"{where}: roles: expected a non-empty list of {sorted(ROLES)}")
    return tuple(sorted(set(roles)))


def _user(item: Any, where: str) -> User:
    if not isinstance(item, dict):
        raise StoreError(f"{where}: expected an object")
    holder = _get(item, "holder", str, where)
    if not HOLDER_RE.fullmatch(holder):
        raise StoreError(f"{where}: holder: {holder!r} is not a holder id")
    where = f"{where} (holder {holder})"
    state = _get(item, "state", str, where)
    if state not in STATES:
        raise StoreError(f"{where}: state: expected one of {STATES}")
    keys = [_key(k, f"{where}: keys[{j}]") for j, k in enumerate(_list(item, "keys", where))]
    return User(
        holder=holder,
        name=_get(item, "name", str, where),
        roles=_roles(item, where),
        state=state,
        state_at=str(_time(item, "state_at", where)),
        state_by=_get(item, "state_by", str, where),
        state_reason=_get(item, "state_reason", str, where),
        created_at=str(_time(item, "created_at", where)),
        created_by=_get(item, "created_by", str, where),
        valid_until=_time(item, "valid_until", where, optional=True),
        password_hash=_get(item, "password_hash", str, where),
        password_set_at=str(_time(item, "password_set_at", where)),
        must_change=_get(item, "must_change", bool, where),
        keys=keys,
    )


def _key(item: Any, where: str) -> Key:
    if not isinstance(item, dict):
        raise StoreError(f"{where}: expected an object")
    sealed = item.get("sealed")
    if sealed is not None and not isinstance(sealed, dict):
        raise StoreError(f"{where}: sealed: expected an object or null")
    windows = []
    for j, w in enumerate(_list(item, "windows", where)):
        ww = f"{where}: windows[{j}]"
        if not isinstance(w, dict):
            raise StoreError(f"{ww}: expected an object")
        windows.append(
            Window(str(_time(w, "since", ww)), _time(w, "until", ww, optional=True), _roles(w, ww))
        )
    return Key(
        version=_get(item, "version", int, where),
        public_key=_get(item, "public_key", str, where),
        created_at=str(_time(item, "created_at", where)),
        sealed=sealed,
        windows=windows,
        retired_at=_time(item, "retired_at", where, optional=True),
    )


# ---- writing: the three steps of a change ----------------------------------------------


def write_pending(store: Store, data: bytes) -> None:
    """Step 1: the new store beside the old one, mode 0600, fsync'd."""
    pending = store.directory / PENDING_FILE
    with contextlib.suppress(FileNotFoundError):
        pending.unlink()
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(pending, flags, 0o600)
        try:
            os.fchmod(fd, 0o600)  # whatever the umask
            write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        raise StoreError(f"{pending}: cannot write: {exc.strerror}") from None


def install_pending(directory: Path) -> None:
    """Step 3: the pending store becomes the store."""
    try:
        (directory / PENDING_FILE).replace(directory / STORE_FILE)
        fsync_dir(directory)
    except OSError as exc:
        raise StoreError(f"{directory / STORE_FILE}: cannot replace: {exc.strerror}") from None


def settle_pending(directory: Path, recorded_sha256: str | None) -> str | None:
    """After a crash mid-change: install a pending store whose SHA-256 the record's last
    entry names (the change happened), delete any other (it did not). Returns what was
    done, in words, or None when there was nothing pending."""
    pending = directory / PENDING_FILE
    try:
        data = _read_store_file(pending)
    except StoreError:
        data = b""  # unreadable or not ours: it cannot be the recorded store
    if data is None:
        return None
    if recorded_sha256 is not None and hashlib.sha256(data).hexdigest() == recorded_sha256:
        install_pending(directory)
        return "a change recorded before an interruption was completed"
    with contextlib.suppress(FileNotFoundError):
        pending.unlink()
    fsync_dir(directory)
    return "a change interrupted before it was recorded was discarded"
