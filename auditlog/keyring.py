"""The keyring: who may sign commands, with which roles, and when.

One TOML file for every command kind (prescriptions now; acknowledgements, sign-offs and
replay requests later), one ``[[key]]`` table per key::

    [[key]]
    holder = "phys-anna"            # id, [a-z0-9][a-z0-9._-]{0,63}; what commands name
    name = "A. Example, MPE"        # printed name, for signatures (staff, never patients)
    roles = ["physicist"]           # physicist, operator, viewer, admin, service, replay
    public_key = "phys-anna+1a2b3c4d+AU..."   # what `iort-audit keygen` writes to NAME.pub
    valid_from = "2026-01-01T00:00:00Z"
    valid_until = "2027-01-01T00:00:00Z"

The public key is the signed-note verifier format of auditlog/note.py, so a key pair made
by ``iort-audit keygen --name HOLDER`` is enrolled by pasting its ``.pub`` line here. With
user accounts, ``iort-users`` writes this file from its store (users/keyring.py), one table
per period in which a key may sign; without them, such a key plus its entry stands for a
signer.

A holder may have several entries (a key rolled over): each is judged by its own window.
A key that expired or was withdrawn (``valid_until`` in the past) keeps its entry, so the
signatures it made while valid can still be judged at their own time: a command is checked
against the key's window at the time it is judged (auditlog/command.py), and an auditor
judges an old command at the time the log accepted it.

Loading reads every entry and reports every problem, each naming the file, the entry (its
index and holder) and the key, so that one run of ``iort-audit keyring check`` or
``iortd check-config`` lists them all. :attr:`Keyring.sha256` is the hash of the file's
bytes: the daemon records it (with holders and roles, never keys) whenever it loads the file.
"""

from __future__ import annotations

import hashlib
import re
import tomllib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from iortd.auditlog.note import KeyFileError, Verifier

__all__ = [
    "HOLDER_RE",
    "MAX_KEYRING_BYTES",
    "ROLES",
    "KeyEntry",
    "Keyring",
    "KeyringError",
    "load_keyring",
    "parse_keyring",
    "parse_utc",
]

HOLDER_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
# ``replay``: a replay-only key (a central consumer's, iort-ingest): it may sign replay
# requests and nothing else (auditlog/command.py's ROLES_FOR_KIND).
ROLES = frozenset({"physicist", "operator", "viewer", "admin", "service", "replay"})
MAX_KEYRING_BYTES = 1024 * 1024
_KEYS = frozenset({"holder", "name", "roles", "public_key", "valid_from", "valid_until"})
# RFC 3339 in UTC with a Z, as the log writes it (fraction optional, at most microseconds).
_UTC_RE = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,6})?Z")


def parse_utc(text: object) -> datetime:
    """An RFC 3339 UTC time with ``Z`` (fraction optional, at most microseconds), as the
    log writes it: the one parser of such times (keyrings, commands, prescriptions);
    ValueError, in words, otherwise."""
    if not isinstance(text, str) or not _UTC_RE.fullmatch(text):
        raise ValueError("expected an RFC 3339 UTC time such as 2026-01-31T08:00:00Z")
    try:
        return datetime.fromisoformat(text[:-1]).replace(tzinfo=UTC)
    except ValueError:  # the right shape, not a date (2026-02-30)
        raise ValueError(f"not a valid date and time: {text}") from None


class KeyringError(ValueError):
    """The keyring file cannot be used; ``problems`` has one line per problem."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


@dataclass(frozen=True, slots=True)
class KeyEntry:
    holder: str
    name: str
    roles: frozenset[str]
    verifier: Verifier
    valid_from: datetime
    valid_until: datetime

    def valid_at(self, when: datetime) -> bool:
        return self.valid_from <= when < self.valid_until

    def summary(self) -> dict[str, Any]:
        """What may be recorded or published about the entry: no key material."""
        return {
            "holder": self.holder,
            "roles": sorted(self.roles),
            "valid_from": self.valid_from.isoformat().replace("+00:00", "Z"),
            "valid_until": self.valid_until.isoformat().replace("+00:00", "Z"),
        }


@dataclass(frozen=True, slots=True)
class Keyring:
    path: Path
    sha256: str
    entries: tuple[KeyEntry, ...]

    def __iter__(self) -> Iterator[KeyEntry]:
        return iter(self.entries)

    def of(self, holder: str) -> tuple[KeyEntry, ...]:
        return tuple(e for e in self.entries if e.holder == holder)

    def summary(self) -> dict[str, Any]:
        """For the ``keyring_loaded`` entry: the file's hash, holders and roles, no keys."""
        return {
            "keyring_sha256": self.sha256,
            "keys": [e.summary() for e in self.entries],
        }


def load_keyring(path: Path) -> Keyring:
    """Read and check ``path``; :class:`KeyringError` lists every problem."""
    try:
        with path.open("rb") as f:
            raw = f.read(MAX_KEYRING_BYTES + 1)
    except OSError as exc:
        raise KeyringError([f"{path}: cannot read the keyring: {exc.strerror}"]) from None
    if len(raw) > MAX_KEYRING_BYTES:
        raise KeyringError([f"{path}: larger than {MAX_KEYRING_BYTES} bytes; not a keyring"])
    return parse_keyring(raw, path)


def parse_keyring(raw: bytes, path: Path) -> Keyring:
    try:
        doc = tomllib.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise KeyringError([f"{path}: not valid TOML: {exc}"]) from None
    problems: list[str] = []
    extra = sorted(set(doc) - {"key"})
    if extra:
        problems.append(f"{path}: unknown top-level key(s) {extra}; only [[key]] tables")
    tables = doc.get("key", [])
    if not isinstance(tables, list):
        problems.append(f"{path}: 'key' must be an array of tables, written [[key]]")
        tables = []
    entries: list[KeyEntry] = []
    for i, table in enumerate(tables):
        if not isinstance(table, dict):
            problems.append(f"{path}: key[{i}]: expected a [[key]] table, got {table!r:.40}")
            continue
        entry = _entry(table, f"{path}: key[{i}]", problems)
        if entry is not None:
            entries.append(entry)
    if problems:
        raise KeyringError(problems)
    return Keyring(path, hashlib.sha256(raw).hexdigest(), tuple(entries))


def _entry(table: Mapping[str, Any], where: str, problems: list[str]) -> KeyEntry | None:
    holder = table.get("holder")
    if isinstance(holder, str) and HOLDER_RE.fullmatch(holder):
        where = f"{where} (holder {holder})"
    before = len(problems)
    for key in sorted(set(table) - _KEYS):
        problems.append(f"{where}: unknown key {key!r}")
    for key in sorted(_KEYS - set(table)):
        problems.append(f"{where}: missing key {key!r}")
    if "holder" in table and not (isinstance(holder, str) and HOLDER_RE.fullmatch(holder)):
        problems.append(
            f"{where}: holder: expected an id of a-z, 0-9, '.', '_', '-' (at most 64, "
            f"starting with a letter or digit); got {holder!r}"
        )
    name = table.get("name")
    if "name" in table and not (
        isinstance(name, str) and 0 < len(name) <= 200 and name.isprintable()
    ):
        problems.append(f"{where}: name: expected the printed name (1-200 printable characters)")
    roles = table.get("roles")
    if "roles" in table and not (
        isinstance(roles, list) and roles and all(isinstance(r, str) for r in roles)
    ):
        problems.append(f"{where}: roles: expected a non-empty list such as ['physicist']")
        roles = None
    elif isinstance(roles, list):
        unknown = sorted(set(roles) - ROLES)
        if unknown:
            problems.append(f"{where}: roles: unknown role(s) {unknown}; use {sorted(ROLES)}")
    verifier = None
    if "public_key" in table:
        try:
            verifier = Verifier.parse(str(table["public_key"]))
        except KeyFileError as exc:
            problems.append(
                f"{where}: public_key: {exc}; paste the line of the .pub file that "
                "`iort-audit keygen` wrote"
            )
        else:
            if isinstance(holder, str) and verifier.name != holder:
                # A mis-pasted line would let another key's owner sign as this holder.
                problems.append(
                    f"{where}: public_key: the key is named {verifier.name!r}, not {holder!r}: "
                    f"paste the .pub line of `iort-audit keygen --name {holder}`"
                )
    times: dict[str, datetime] = {}
    for key in ("valid_from", "valid_until"):
        if key in table:
            value = table[key]
            if isinstance(value, datetime) and value.utcoffset() == timedelta(0):
                times[key] = value  # written unquoted: a TOML offset date-time in UTC
                continue
            try:
                times[key] = parse_utc(value)
            except ValueError as exc:
                problems.append(f"{where}: {key}: {exc}")
    if len(times) == 2 and times["valid_until"] <= times["valid_from"]:
        problems.append(f"{where}: valid_until must be after valid_from")
    if len(problems) > before or verifier is None:
        return None
    return KeyEntry(
        holder=str(holder),
        name=str(name),
        roles=frozenset(roles or ()),
        verifier=verifier,
        valid_from=times["valid_from"],
        valid_until=times["valid_until"],
    )
