"""The account record: every change to the store, append-only, hash-chained and signed.

The record is an audit-log directory (``DIR/record``) written by the audit-log writer
(auditlog/writer.py), so ``iort-audit verify DIR/record`` checks its chain like a room's
log. Each change is one entry:

=============================  ============================================================
``account_created``            ``holder``, ``name``, ``roles``, ``valid_until``; at ``init``
                               also ``public_key`` (the first admin makes their key then)
``account_disabled``           ``holder``, ``reason``
``account_enabled``            ``holder``
``account_roles_changed``      ``holder``, ``roles_before``, ``roles``
``account_password_changed``   ``holder``, ``key_version``, ``public_key``, ``new_key``
``account_password_reset``     ``holder``, ``retired_key_version`` (null when none)
=============================  ============================================================

and in every one: ``by`` (the holder who made the change), ``by_key`` (the key hash of the
key that signed it), ``store_sha256_before`` and ``store_sha256`` (of ``users.json`` before
and after), and ``sig``: the Ed25519 signature, by ``by``'s key, of the canonical JSON of
``{"data": <the data without sig>, "prev": <the previous entry's hash>, "type": <type>}``.
Never a password, a hash, a salt or a private key; public keys are public.

The signature is what a person with write access to the directory cannot make: the chain
alone they could rebuild, the signature of an active admin they cannot without that admin's
password. :func:`check_record` replays the record from its first entry: the first change
must be an ``init`` (an admin creating themselves, signed by the key it records); every
later change must be signed by an admin active at that moment (not disabled, not past the
account's end, an admin then) with the key the record gave them (a user's own ``passwd``:
by that user, with the key it records); and the store's SHA-256 must equal the last
entry's ``store_sha256``. A user added to ``users.json`` by hand, a role edited, a key
swapped: ``iort-users check`` names it (exit 1), and every other
command refuses to change a store that does not check.

What this does not stop: someone who can write the directory can put back an older store
*and* an older record together (a rollback), or remove both. The keyring the daemon loads
is recorded in the room's own log by its SHA-256 at every start (docs/commands.md), and the
directory belongs on the host's backup: docs/accounts.md says what to compare.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
from cryptography.exceptions import InvalidSignature

from iortd.auditlog.canonical import canonical
from iortd.auditlog.keyring import parse_utc
from iortd.auditlog.note import KeyFileError, Signer, Verifier
from iortd.auditlog.verify import collect_files, iter_entries, verify_log
from iortd.auditlog.writer import AuditLog

__all__ = [
    "EVENT_TYPES",
    "RecordError",
    "RecordState",
    "append_event",
    "append_event_async",
    "check_record",
]

EVENT_TYPES = frozenset(
    {
        "account_created",
        "account_disabled",
        "account_enabled",
        "account_roles_changed",
        "account_password_changed",
        "account_password_reset",
    }
)
ORIGIN = "iort-users"


class RecordError(Exception):
    """The record cannot be written (a usage problem: exit 2)."""


@dataclass(slots=True)
class _Account:
    roles: frozenset[str]
    active: bool
    keys: dict[str, Verifier] = field(default_factory=dict)  # key hash hex -> verifier
    current: str | None = None  # key hash hex of the key that signs now
    must_change: bool = False
    ends: datetime | None = None  # the account's valid_until

    def may_admin(self, at: datetime) -> bool:
        return (
            self.active
            and "admin" in self.roles
            and self.current is not None
            and (self.ends is None or at < self.ends)
        )


@dataclass(slots=True)
class RecordState:
    """What the record says: the problems found (empty: it checks) and the SHA-256 of the
    store its last entry names ("" when there is no change yet)."""

    problems: list[str] = field(default_factory=list)
    store_sha256: str = ""
    changes: int = 0
    accounts: dict[str, _Account] = field(default_factory=dict)


def signed_message(type: str, data: Mapping[str, Any], prev: str) -> bytes:
    unsigned = {k: v for k, v in data.items() if k != "sig"}
    return canonical({"data": unsigned, "prev": prev, "type": type})


def _key_hex(signer_or_verifier: Signer | Verifier) -> str:
    return f"{signer_or_verifier.key_hash:08x}"


async def append_event_async(record: Path, type: str, data: dict[str, Any], actor: Signer) -> None:
    """Append one signed change and wait until it is on disk (from a running event loop;
    the caller holds the store's lock, changes.py)."""
    if type not in EVENT_TYPES:
        raise ValueError(f"not an account event: {type}")
    try:
        log, _ = await AuditLog.open(record, origin=ORIGIN)
    except OSError as exc:
        raise RecordError(f"{record}: cannot open the account record: {exc}") from None
    task = asyncio.create_task(log.run())
    try:
        _seq, prev = log.head
        data = {**data, "by_key": _key_hex(actor)}
        sig = actor.private_key.sign(signed_message(type, data, prev))
        data["sig"] = base64.b64encode(sig).decode("ascii")
        entry = log.append(type, data, durable=True)
        await asyncio.wait_for(entry.committed, timeout=30.0)
    finally:
        await log.close()
        await task


def append_event(record: Path, type: str, data: dict[str, Any], actor: Signer) -> None:
    """The same, blocking (the command-line tool)."""
    asyncio.run(append_event_async(record, type, data, actor))


def _verifier(text: Any, where: str, holder: str, problems: list[str]) -> Verifier | None:
    try:
        v = Verifier.parse(str(text))
    except KeyFileError as exc:
        problems.append(f"{where}: public_key: {exc}")
        return None
    if v.name != holder:
        problems.append(f"{where}: public_key is named {v.name!r}, not {holder!r}")
        return None
    return v


def _sig_ok(entry: dict[str, Any], verifier: Verifier) -> bool:
    data = entry["data"]
    try:
        sig = base64.b64decode(str(data.get("sig", "")), validate=True)
        verifier.public_key.verify(sig, signed_message(entry["type"], data, entry["prev"]))
    except (binascii.Error, ValueError, InvalidSignature):
        return False
    return True


def check_record(record: Path) -> RecordState:
    """Verify the chain and replay the changes (module doc); never raises for a bad record."""
    state = RecordState()
    if not record.is_dir():
        return state
    report = verify_log([record])
    if not report.intact:
        state.problems.append(f"{record}: the chain is broken: {report.problem}")
        return state
    for path, n, raw in iter_entries(collect_files([record])):
        entry = orjson.loads(raw)
        if entry.get("type") in EVENT_TYPES:
            _replay(state, entry, f"{path.name}:{n} (seq {entry.get('seq')}, {entry['type']})")
    return state


def _replay(state: RecordState, entry: dict[str, Any], where: str) -> None:
    data = entry.get("data")
    if not isinstance(data, dict):
        state.problems.append(f"{where}: no data")
        return
    kind, holder, by = entry["type"], data.get("holder"), data.get("by")
    if not isinstance(holder, str) or not isinstance(by, str):
        state.problems.append(f"{where}: holder or by missing")
        return
    if data.get("store_sha256_before", "") != state.store_sha256:
        state.problems.append(
            f"{where}: made on a store ({str(data.get('store_sha256_before'))[:12]}…) that is "
            f"not the one the record left ({state.store_sha256[:12] or 'none'}…)"
        )
    accounts = state.accounts
    signer_key: Verifier | None = None
    if kind == "account_created" and state.changes == 0:
        # init: the first admin, signed by the key this entry records
        roles = data.get("roles")
        if by != holder or not isinstance(roles, list) or "admin" not in roles:
            state.problems.append(f"{where}: the first change must be an admin's init")
        signer_key = _verifier(data.get("public_key"), where, holder, state.problems)
        acc = _Account(frozenset(roles or ()), True)
        if signer_key is not None:
            acc.keys[_key_hex(signer_key)] = signer_key
            acc.current = _key_hex(signer_key)
        accounts[holder] = acc
    elif kind == "account_password_changed" and by == holder:
        acc_or_none = accounts.get(holder)
        signer_key = _verifier(data.get("public_key"), where, holder, state.problems)
        if acc_or_none is None or signer_key is None:
            state.problems.append(f"{where}: {holder!r} has no account in the record")
            signer_key = None
        else:
            new = _key_hex(signer_key)
            if data.get("new_key") is True:
                if not acc_or_none.must_change:
                    state.problems.append(f"{where}: a new key without a reset or a new account")
                acc_or_none.keys[new] = signer_key
                acc_or_none.current = new
            elif new != acc_or_none.current:
                state.problems.append(f"{where}: not the key the record gave {holder!r}")
            acc_or_none.must_change = False
    else:
        admin = accounts.get(by)
        if admin is None or admin.current is None or not admin.may_admin(_ts(entry)):
            state.problems.append(f"{where}: made by {by!r}, not an active admin at that time")
        else:
            signer_key = admin.keys[admin.current]
        _apply_admin_change(state, kind, holder, data, where)
    if signer_key is None or not _sig_ok(entry, signer_key):
        state.problems.append(f"{where}: the signature of {by!r} does not verify")
    state.store_sha256 = str(data.get("store_sha256", ""))
    state.changes += 1


def _ts(entry: dict[str, Any]) -> datetime:
    try:
        return parse_utc(entry.get("ts"))
    except ValueError:
        return datetime.max.replace(tzinfo=UTC)  # verify_log checked it; never an admin then


def _end(value: Any, where: str, problems: list[str]) -> datetime | None:
    if value is None:
        return None
    try:
        return parse_utc(value)
    except ValueError:
        problems.append(f"{where}: valid_until is not an RFC 3339 UTC time")
        return datetime.min.replace(tzinfo=UTC)


def _apply_admin_change(
    state: RecordState, kind: str, holder: str, data: dict[str, Any], where: str
) -> None:
    accounts = state.accounts
    if kind == "account_created":
        if holder in accounts:
            state.problems.append(f"{where}: {holder!r} was created before")
        ends = _end(data.get("valid_until"), where, state.problems)
        roles = frozenset(data.get("roles") or ())
        accounts[holder] = _Account(roles, True, must_change=True, ends=ends)
        return
    acc = accounts.get(holder)
    if acc is None:
        state.problems.append(f"{where}: {holder!r} has no account in the record")
        return
    if kind == "account_disabled":
        acc.active = False
    elif kind == "account_enabled":
        acc.active = True
    elif kind == "account_roles_changed":
        acc.roles = frozenset(data.get("roles") or ())
    elif kind == "account_password_reset":
        acc.current = None
        acc.must_change = True
    else:  # account_password_changed by someone else
        state.problems.append(f"{where}: a password changed by {data.get('by')!r}, not its user")
