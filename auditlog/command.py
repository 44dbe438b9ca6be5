"""Signed commands: the envelope, its signature and the checks before anything changes.

Every command the daemon accepts (a prescription; later an acknowledgement, a sign-off, a
replay request) is one JSON object, UTF-8, at most :data:`MAX_COMMAND_BYTES`::

    {"v": 1, "kind": "prescription", "site": "site-a", "room": "or-3",
     "issued_at": "2026-12-06T08:00:00.000000Z", "expires_at": "2026-12-06T08:10:00.000000Z",
     "nonce": "<32 lowercase hex>", "signer": "phys-anna", "body": {...},
     "sig": "<base64 Ed25519 signature>"}

``sig`` is the Ed25519 signature, by a key of the keyring (auditlog/keyring.py), of the
canonical JSON bytes (auditlog/canonical.py: the audit log's own form, keys sorted, no
whitespace) of the object without ``sig``. The signer names its keyring holder; the site
and room bind the command to one room (a command for another room is refused, not
forwarded); the nonce and the expiry bound where and when it can be replayed: the receiver
remembers every accepted nonce until its expiry (plus the clock skew) has passed.

:func:`check_command` runs the checks in an order in which junk costs least: the size
(before anything is parsed), the parse (orjson, then a walk bounded to
:data:`MAX_DEPTH` levels), the fields, the keyring (holder known, key valid now and at
``issued_at``, role allowed for the kind), then the signature (the one costly step), then
time (``expires_at``, ``issued_at`` against ``now`` with the allowed skew), then the nonce.
The first failing check is the reason (:class:`RejectReason`); the check changes nothing:
the caller records an accepted command's nonce in its :class:`NonceBook`, after logging it.

Which roles may send which kind is :data:`ROLES_FOR_KIND`; a kind missing there is refused
(``unknown_kind``) whoever signs it. The daemon (daemon/commands.py) and, later,
``iort-audit`` use these checks; an auditor judges a logged command at the time the log
accepted it, so a key withdrawn since still verifies what it signed while valid.

:func:`sign_command` builds a signed envelope (the tools that send commands, and tests).
"""

from __future__ import annotations

import base64
import binascii
import enum
import hashlib
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from types import MappingProxyType
from typing import Any

import orjson
from cryptography.exceptions import InvalidSignature

from iortd.auditlog.canonical import CanonicalError, canonical, check_json_value
from iortd.auditlog.keyring import HOLDER_RE, KeyEntry, Keyring, parse_utc
from iortd.auditlog.note import Signer
from iortd.kernel.timefmt import utc_ts

__all__ = [
    "COMMAND_VERSION",
    "MAX_COMMAND_BYTES",
    "MAX_DEPTH",
    "MAX_TTL_S",
    "ROLES_FOR_KIND",
    "Command",
    "CommandRejected",
    "NonceBook",
    "Refused",
    "RejectReason",
    "check_command",
    "recorded_command",
    "sign_command",
]

COMMAND_VERSION = 1
MAX_COMMAND_BYTES = 16384
# Nesting of objects and arrays, the envelope counted: a prescription body needs ~4.
MAX_DEPTH = 16
# The longest a command may be valid for (expires_at - issued_at): bounds how far back the
# daemon reads the log at start to rebuild the nonces it must refuse.
MAX_TTL_S = 24 * 3600.0
ALL_ROLES = frozenset({"physicist", "operator", "viewer", "admin", "service"})

# Which roles may sign which kind. ``ping`` is a documented no-op: it is logged and
# answered on ``events`` (docs/commands.md), for checking a sender's set-up end to end.
ROLES_FOR_KIND: Mapping[str, frozenset[str]] = MappingProxyType(
    {
        "prescription": frozenset({"physicist"}),
        "output_factor": frozenset({"physicist"}),  # the day's QA output factor
        "override": frozenset({"physicist"}),  # of a named verification mismatch
        "ack": frozenset({"operator", "physicist"}),
        "signoff": frozenset({"physicist"}),
        # A gap repair (daemon/replay.py): the central consumer's replay-only key, or a
        # person who may look into the room's record anyway.
        "replay": frozenset({"replay", "physicist", "admin"}),
        "ping": ALL_ROLES,
    }
)

_FIELDS = frozenset(
    {"v", "kind", "site", "room", "issued_at", "expires_at", "nonce", "signer", "body", "sig"}
)
_KIND_RE = re.compile(r"[a-z_]{1,32}")
_NONCE_RE = re.compile(r"[0-9a-f]{32}")
_ROOM_RE = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")


class RejectReason(enum.StrEnum):
    """Why a command was refused: the counters, log entries and events use these values."""

    oversized = "oversized"
    malformed = "malformed"
    unknown_version = "unknown_version"
    unknown_kind = "unknown_kind"
    wrong_room = "wrong_room"
    unknown_signer = "unknown_signer"
    signer_not_valid_now = "signer_not_valid_now"
    role_not_allowed = "role_not_allowed"
    bad_signature = "bad_signature"
    expired = "expired"
    not_yet_valid = "not_yet_valid"
    replayed = "replayed"
    # Judged by the receiver, not by check_command (daemon/commands.py):
    retained = "retained"  # a retained MQTT message: it would replay at every reconnect
    no_handler = "no_handler"  # a known kind this daemon has no handler for (yet)
    wrong_topic = "wrong_topic"  # cmd/{kind} on MQTT must name the envelope's kind
    busy = "busy"  # the accepted commands' queue is full


class CommandRejected(Exception):
    """A command refused; ``reason`` says which check failed, ``detail`` in words (never
    the payload itself)."""

    def __init__(self, reason: RejectReason, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True, slots=True)
class Command:
    """An accepted command."""

    kind: str
    signer: str  # the keyring holder id
    body: Mapping[str, Any]
    nonce: str
    issued_at: datetime
    expires_at: datetime
    sha256: str  # of the raw bytes as received
    signer_name: str = ""
    roles: frozenset[str] = field(default_factory=frozenset)
    # The whole signed object as received (sig included), for a handler that records it so
    # that anyone can check the signature offline (a sign-off: daemon/signoff.py).
    envelope: Mapping[str, Any] = field(default_factory=dict)


def recorded_command(kind: str, data: Mapping[str, Any], body: Mapping[str, Any]) -> Command:
    """The command a ``command_accepted`` entry's ``data`` records, with ``body`` (what the
    handler's summary kept of it): a handler finishes one that a crash left unhandled."""
    return Command(
        kind=kind,
        signer=str(data["signer"]),
        body=body,
        nonce=str(data["nonce"]),
        issued_at=parse_utc(data["issued_at"]),
        expires_at=parse_utc(data["expires_at"]),
        sha256=str(data["sha256"]),
    )


class Refused(Exception):
    """A command's handler judged its body and refused it; ``reason`` is a fixed word
    (recorded and counted), ``detail`` one line in words."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason, self.detail = reason, detail


class NonceBook:
    """Accepted nonces until they can no longer be replayed (their expiry plus the skew):
    memory bounded by the commands valid at once, never by what a flood sends (only
    accepted commands, signed by enrolled keys, are added)."""

    def __init__(self, skew_s: float) -> None:
        self._skew = timedelta(seconds=skew_s)
        self._until: dict[str, datetime] = {}

    def __contains__(self, nonce: object) -> bool:
        return nonce in self._until

    def __len__(self) -> int:
        return len(self._until)

    def add(self, nonce: str, expires_at: datetime) -> None:
        self._until[nonce] = max(expires_at + self._skew, self._until.get(nonce, expires_at))

    def prune(self, now: datetime) -> None:
        for nonce in [n for n, t in self._until.items() if t < now]:
            del self._until[nonce]


def _reject(reason: RejectReason, detail: str) -> CommandRejected:
    return CommandRejected(reason, detail)


def _depth_ok(value: Any, left: int) -> bool:
    if isinstance(value, dict):
        return left > 0 and all(_depth_ok(v, left - 1) for v in value.values())
    if isinstance(value, list):
        return left > 0 and all(_depth_ok(v, left - 1) for v in value)
    return True


def _parse(raw: bytes) -> dict[str, Any]:
    if len(raw) > MAX_COMMAND_BYTES:
        raise _reject(RejectReason.oversized, f"{len(raw)} bytes; at most {MAX_COMMAND_BYTES}")
    try:
        obj = orjson.loads(raw)  # strict UTF-8 and JSON; its own nesting limit is 1024
    except orjson.JSONDecodeError:
        raise _reject(RejectReason.malformed, "not UTF-8 JSON") from None
    if not isinstance(obj, dict):
        raise _reject(RejectReason.malformed, "not a JSON object")
    if not _depth_ok(obj, MAX_DEPTH):
        raise _reject(RejectReason.malformed, f"nested deeper than {MAX_DEPTH} levels")
    return obj


def _time(obj: Mapping[str, Any], key: str) -> datetime:
    try:
        return parse_utc(obj[key])
    except ValueError as exc:
        raise _reject(RejectReason.malformed, f"{key}: {exc}") from None


def _fields(obj: dict[str, Any]) -> tuple[datetime, datetime]:
    v = obj.get("v")
    if "v" in obj and (type(v) is not int or v != COMMAND_VERSION):
        shown = v if type(v) is int and abs(v) < 10**6 else f"a {type(v).__name__}"  # not echoed
        raise _reject(RejectReason.unknown_version, f"v is {shown}; this daemon reads v=1")
    missing = sorted(_FIELDS - set(obj))
    if missing:
        raise _reject(RejectReason.malformed, f"missing field(s) {missing}")
    extra = sorted(set(obj) - _FIELDS)
    if extra:
        # Counted, never named: a name is the sender's text (docs/commands.md).
        raise _reject(RejectReason.malformed, f"{len(extra)} unknown field(s)")
    for key, pattern in (
        ("kind", _KIND_RE),
        ("nonce", _NONCE_RE),
        ("signer", HOLDER_RE),
        ("site", _ROOM_RE),
        ("room", _ROOM_RE),
    ):
        if not isinstance(obj[key], str) or not pattern.fullmatch(obj[key]):
            raise _reject(RejectReason.malformed, f"{key}: not of the form {pattern.pattern}")
    if not isinstance(obj["body"], dict) or not isinstance(obj["sig"], str):
        raise _reject(RejectReason.malformed, "body must be an object and sig a string")
    issued, expires = _time(obj, "issued_at"), _time(obj, "expires_at")
    if not timedelta(0) < expires - issued <= timedelta(seconds=MAX_TTL_S):
        raise _reject(
            RejectReason.malformed,
            f"expires_at must be after issued_at, by at most {MAX_TTL_S:.0f} s",
        )
    if obj["kind"] not in ROLES_FOR_KIND:
        raise _reject(RejectReason.unknown_kind, f"kind {obj['kind']!r} is not a command")
    return issued, expires


def _key(keyring: Keyring, obj: Mapping[str, Any], now: datetime, issued: datetime) -> KeyEntry:
    holder, kind = obj["signer"], obj["kind"]
    entries = keyring.of(holder)
    if not entries:
        raise _reject(RejectReason.unknown_signer, f"{holder!r} is not in the keyring")
    valid = [e for e in entries if e.valid_at(now) and e.valid_at(issued)]
    if not valid:
        raise _reject(
            RejectReason.signer_not_valid_now,
            f"no key of {holder!r} is valid at {utc_ts(now)} and at issued_at",
        )
    allowed = ROLES_FOR_KIND[kind]
    valid = [e for e in valid if e.roles & allowed]
    if not valid:
        raise _reject(
            RejectReason.role_not_allowed,
            f"{holder!r} has no role allowed to send {kind!r} ({sorted(allowed)})",
        )
    return _verified(valid, obj)


def _verified(entries: list[KeyEntry], obj: Mapping[str, Any]) -> KeyEntry:
    try:
        sig = base64.b64decode(obj["sig"], validate=True)
    except (binascii.Error, ValueError):
        raise _reject(RejectReason.bad_signature, "sig is not base64") from None
    if len(sig) != 64:
        raise _reject(RejectReason.bad_signature, "sig is not an Ed25519 signature (64 bytes)")
    unsigned = {k: v for k, v in obj.items() if k != "sig"}
    try:
        message = canonical(unsigned)
    except CanonicalError:
        raise _reject(RejectReason.malformed, "cannot be written canonically") from None
    for entry in entries:  # a holder's keys during a roll-over: any valid one
        try:
            entry.verifier.public_key.verify(sig, message)
        except InvalidSignature:
            continue
        return entry
    raise _reject(RejectReason.bad_signature, f"not signed by a valid key of {obj['signer']!r}")


def check_command(
    raw: bytes,
    keyring: Keyring,
    *,
    site: str,
    room: str,
    now: datetime,
    skew_s: float,
    seen: NonceBook,
) -> Command:
    """The accepted command in ``raw``; :class:`CommandRejected` names the first failed
    check. Changes nothing (the caller adds the nonce to ``seen`` once it has logged it)."""
    obj = _parse(raw)
    issued, expires = _fields(obj)
    if obj["site"] != site or obj["room"] != room:
        raise _reject(
            RejectReason.wrong_room, f"for {obj['site']}/{obj['room']}, this is {site}/{room}"
        )
    entry = _key(keyring, obj, now, issued)
    skew = timedelta(seconds=skew_s)
    if now > expires + skew:
        raise _reject(RejectReason.expired, f"expired at {utc_ts(expires)}")
    if issued > now + skew:
        raise _reject(
            RejectReason.not_yet_valid, f"issued at {utc_ts(issued)}, beyond the clock skew"
        )
    if obj["nonce"] in seen:
        raise _reject(RejectReason.replayed, f"nonce {obj['nonce']} was accepted before")
    return Command(
        kind=obj["kind"],
        signer=entry.holder,
        body=MappingProxyType(obj["body"]),
        nonce=obj["nonce"],
        issued_at=issued,
        expires_at=expires,
        sha256=hashlib.sha256(raw).hexdigest(),
        signer_name=entry.name,
        roles=entry.roles,
        envelope=MappingProxyType(obj),
    )


def sign_command(
    kind: str,
    body: Mapping[str, Any],
    *,
    signer: Signer,
    holder: str,
    site: str,
    room: str,
    ttl_s: float,
    now: datetime | None = None,
) -> dict[str, Any]:
    """A signed envelope (a dict; send ``orjson.dumps`` of it). ``signer`` is the holder's
    private key (``iort-audit keygen``); raises ValueError for what no receiver accepts."""
    if not _KIND_RE.fullmatch(kind) or not HOLDER_RE.fullmatch(holder):
        raise ValueError(f"kind {kind!r} or holder {holder!r} is not of the allowed form")
    if not 0 < ttl_s <= MAX_TTL_S:
        raise ValueError(f"ttl_s must be in (0, {MAX_TTL_S:.0f}]")
    check_json_value(dict(body), "body")
    issued = (now or datetime.now(UTC)).astimezone(UTC)
    unsigned = {
        "v": COMMAND_VERSION,
        "kind": kind,
        "site": site,
        "room": room,
        "issued_at": utc_ts(issued),
        "expires_at": utc_ts(issued + timedelta(seconds=ttl_s)),
        "nonce": secrets.token_hex(16),
        "signer": holder,
        "body": dict(body),
    }
    sig = signer.private_key.sign(canonical(unsigned))
    return {**unsigned, "sig": base64.b64encode(sig).decode("ascii")}
