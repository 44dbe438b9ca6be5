"""A physicist's electronic sign-off of one delivery: what is signed, and how it is checked.

A sign-off is a signed command (auditlog/command.py) of kind ``signoff`` whose body binds
the signature to ONE delivery's record::

    {"delivery_id": "D-...", "meaning": "approved", "reason": null,
     "name": "A. Example, MPE", "utc_offset_min": 60,
     "record": {"first_seq": 120, "last_seq": 377,
                "entries_sha256": "<64 hex>",
                "checkpoint": {"size": 379, "hash": "<64 hex>"}}}

* ``meaning`` is one of :data:`MEANINGS`; ``reason`` is required for
  ``approved_with_deviation`` (1 to :data:`MAX_REASON` printable characters, no line
  breaks) and absent or null otherwise.
* ``name`` is the signer's printed name as the keyring says it at signing time (the daemon
  refuses a body whose name is not the keyring's, so the name shown is the one the signer
  saw and the one enrolled).
* ``utc_offset_min`` (optional, -840..840): the signing station's offset from UTC, in
  minutes, at signing time, so that the report can show the local time the signer saw
  and say which zone it was (UTC+01:00); absent: the report shows UTC only.
* ``record`` is the delivery's range in the log (:func:`delivery_record`): **every** entry
  from the first to the last entry naming the delivery (top-level ``delivery_id``), whatever
  its type (a checkpoint or a device entry in between included), so the range is one
  contiguous stretch of the hash chain, as an inclusion proof would cover it.
  ``entries_sha256`` is the SHA-256 of the concatenated 32-byte hashes (each entry's
  ``hash``, hex-decoded) of those entries in seq order. ``checkpoint`` is the first signed
  checkpoint after the range that covers it (its ``count``, i.e. tree size, greater than
  ``last_seq``), by its size and the chain head ``hash`` it signs.

The range is computed from the entries *before* the sign-off's own entry: a later
amendment of the delivery (which moves its last entry on) does not turn an earlier
signature invalid; the sign-off says what it covered. Sign-off entries themselves
(:data:`SIGNOFF_TYPES`) carry the delivery id inside their data only, never as the
top-level ``delivery_id``, so they never extend the range they sign, and a second sign-off
covers exactly what the first did.

:func:`check_envelope` checks a recorded envelope's Ed25519 signature against a keyring at
the signing time (the envelope's ``issued_at``), for a key with the physicist role, as
``iort-audit verify --keyring`` does (audit/signoffs.py).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from cryptography.exceptions import InvalidSignature

from iortd.auditlog.canonical import CanonicalError, canonical
from iortd.auditlog.keyring import KeyEntry, Keyring, parse_utc

__all__ = [
    "MAX_REASON",
    "MEANINGS",
    "SIGNOFF_TYPES",
    "DeliveryRange",
    "RangeBuilder",
    "SignoffBody",
    "SignoffError",
    "check_envelope",
    "delivery_record",
    "parse_body",
]

MEANINGS: Final = ("reviewed", "approved", "approved_with_deviation")
MEANING_TEXT: Final = {
    "reviewed": "reviewed",
    "approved": "approved",
    "approved_with_deviation": "approved with deviation",
}
MAX_REASON: Final = 500
MAX_NAME: Final = 200
SIGNOFF_TYPES: Final = frozenset({"delivery_signed", "signoff_refused"})
_HEX64 = re.compile(r"[0-9a-f]{64}")
_DELIVERY_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
_BODY_KEYS = frozenset({"delivery_id", "meaning", "reason", "name", "record", "utc_offset_min"})
_OPTIONAL = frozenset({"reason", "utc_offset_min"})
_RECORD_KEYS = frozenset({"first_seq", "last_seq", "entries_sha256", "checkpoint"})
_CP_KEYS = frozenset({"size", "hash"})


class SignoffError(ValueError):
    """A sign-off that cannot be taken or does not check; ``reason`` is a fixed word."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason, self.detail = reason, detail


@dataclass(frozen=True, slots=True)
class SignoffBody:
    delivery_id: str
    meaning: str
    reason: str | None
    name: str
    record: dict[str, Any]
    utc_offset_min: int | None = None


@dataclass(frozen=True, slots=True)
class DeliveryRange:
    """What the log holds of a delivery (before a given seq)."""

    delivery_id: str
    first_seq: int
    last_seq: int
    entries_sha256: str
    ended: bool  # a delivery_terminated (or a later amendment) is in the range
    checkpoint: dict[str, Any] | None  # {"size", "hash"}: the first covering one, or None

    def record(self) -> dict[str, Any] | None:
        """The body's ``record`` (None while no signed checkpoint covers the delivery)."""
        if self.checkpoint is None:
            return None
        return {
            "first_seq": self.first_seq,
            "last_seq": self.last_seq,
            "entries_sha256": self.entries_sha256,
            "checkpoint": dict(self.checkpoint),
        }


def _bad(detail: str) -> SignoffError:
    return SignoffError("malformed", detail)


def _int(value: Any, key: str) -> int:
    if type(value) is not int or value < 0:
        raise _bad(f"record.{key}: must be a whole number >= 0")
    return value


def _hex(value: Any, key: str) -> str:
    if not isinstance(value, str) or not _HEX64.fullmatch(value):
        raise _bad(f"{key}: must be 64 lowercase hex digits")
    return value


def _record(raw: Any) -> dict[str, Any]:
    if not isinstance(raw, dict) or set(raw) != _RECORD_KEYS:
        raise _bad(f"record: must be an object with exactly {sorted(_RECORD_KEYS)}")
    cp = raw["checkpoint"]
    if not isinstance(cp, dict) or set(cp) != _CP_KEYS:
        raise _bad("record.checkpoint: must be an object with exactly ['hash', 'size']")
    first, last = _int(raw["first_seq"], "first_seq"), _int(raw["last_seq"], "last_seq")
    size = _int(cp["size"], "checkpoint.size")
    if not first <= last < size:
        raise _bad("record: needs first_seq <= last_seq < checkpoint.size")
    return {
        "first_seq": first,
        "last_seq": last,
        "entries_sha256": _hex(raw["entries_sha256"], "record.entries_sha256"),
        "checkpoint": {"size": size, "hash": _hex(cp["hash"], "record.checkpoint.hash")},
    }


def _reason(meaning: str, reason: Any) -> str | None:
    if meaning != "approved_with_deviation":
        if reason is not None:
            raise _bad(f"reason: only with approved_with_deviation (not with {meaning})")
        return None
    if (
        not isinstance(reason, str)
        or not 1 <= len(reason) <= MAX_REASON
        or not reason.isprintable()
        or not reason.strip()
    ):
        raise _bad(
            f"reason: approved_with_deviation needs a reason of 1 to {MAX_REASON} printable "
            "characters on one line"
        )
    return reason


def parse_body(body: Mapping[str, Any]) -> SignoffBody:
    """The sign-off a command's body holds; SignoffError("malformed") says what is wrong
    (never echoing a value: it could be anything)."""
    extra = sorted(set(body) - _BODY_KEYS)
    if extra:
        raise _bad(f"{len(extra)} unknown key(s); a sign-off holds only {sorted(_BODY_KEYS)}")
    missing = sorted(_BODY_KEYS - _OPTIONAL - set(body))
    if missing:
        raise _bad(f"missing {missing}")
    did, meaning, name = body["delivery_id"], body["meaning"], body["name"]
    if not isinstance(did, str) or not _DELIVERY_RE.fullmatch(did):
        raise _bad("delivery_id: not a delivery id")
    if meaning not in MEANINGS:
        raise _bad(f"meaning: must be one of {list(MEANINGS)}")
    if not isinstance(name, str) or not 1 <= len(name) <= MAX_NAME or not name.isprintable():
        raise _bad(f"name: the printed name, 1 to {MAX_NAME} printable characters")
    offset = body.get("utc_offset_min")
    if offset is not None and (type(offset) is not int or not -840 <= offset <= 840):
        raise _bad("utc_offset_min: whole minutes from -840 to 840, or absent")
    return SignoffBody(
        did, meaning, _reason(meaning, body.get("reason")), name, _record(body["record"]), offset
    )


class RangeBuilder:
    """One delivery's range, fed the log's entries in seq order one at a time (so that a
    reader following several deliveries in one pass keeps one of these per delivery)."""

    def __init__(self, delivery_id: str) -> None:
        self.delivery_id = delivery_id
        self._h = hashlib.sha256()
        self._first = self._last = -1
        self._digest = ""
        self._ended = False
        self._checkpoint: dict[str, Any] | None = None

    def feed(self, e: Mapping[str, Any]) -> None:
        """The next entry (an entry without an int ``seq`` is passed over). Raises
        SignoffError("malformed") for an entry of the range without a 64-hex ``hash``."""
        seq, kind = e.get("seq"), e.get("type")
        if not isinstance(seq, int):
            return
        mine = e.get("delivery_id") == self.delivery_id and kind not in SIGNOFF_TYPES
        if self._first < 0 and not mine:
            return
        if self._first < 0:
            self._first = seq
        try:
            self._h.update(bytes.fromhex(_hex(e.get("hash"), f"entry seq {seq}: hash")))
        except ValueError as exc:
            raise SignoffError("malformed", str(exc)) from None
        if mine:
            self._last, self._digest, self._checkpoint = seq, self._h.hexdigest(), None
            self._ended = self._ended or kind in ("delivery_terminated", "delivery_amended")
        elif kind == "checkpoint" and self._checkpoint is None:
            self._checkpoint = _covering(e.get("data"), self._last)

    def result(self) -> DeliveryRange | None:
        """The range so far (None: no entry of the delivery yet)."""
        if self._first < 0:
            return None
        cp = None if self._checkpoint is None else dict(self._checkpoint)
        return DeliveryRange(
            self.delivery_id, self._first, self._last, self._digest, self._ended, cp
        )


def delivery_record(
    entries: Iterable[Mapping[str, Any]], delivery_id: str, before_seq: int | None = None
) -> DeliveryRange | None:
    """The delivery's range in ``entries`` (whole log entries in seq order), considering only
    those with ``seq < before_seq`` when given; None if no entry names the delivery.
    Raises SignoffError("malformed") for an entry without a 64-hex ``hash`` in the range."""
    b = RangeBuilder(delivery_id)
    for e in entries:
        seq = e.get("seq")
        if before_seq is not None and isinstance(seq, int) and seq >= before_seq:
            break
        b.feed(e)
    return b.result()


def _covering(data: Any, last: int) -> dict[str, Any] | None:
    if not isinstance(data, dict) or not isinstance(data.get("note"), str):
        return None
    size, head = data.get("count"), data.get("head")
    if type(size) is not int or size <= last or not isinstance(head, str):
        return None
    return {"size": size, "hash": head}


def check_envelope(envelope: Mapping[str, Any], keyring: Keyring) -> KeyEntry:
    """The keyring entry whose key made ``envelope``'s signature: a key of its signer,
    valid at its ``issued_at`` (the signing time), with the physicist role. SignoffError
    otherwise: ``not_enrolled``, ``not_valid_then``, ``not_physicist``, ``bad_signature``,
    ``malformed``."""
    holder, sig_text = envelope.get("signer"), envelope.get("sig")
    if not isinstance(holder, str) or not isinstance(sig_text, str):
        raise _bad("the envelope has no signer or sig")
    try:
        signed_at = parse_utc(envelope.get("issued_at"))
        sig = base64.b64decode(sig_text, validate=True)
        message = canonical({k: v for k, v in envelope.items() if k != "sig"})
    except (ValueError, binascii.Error, CanonicalError) as exc:
        raise _bad(f"the envelope cannot be read: {exc}") from None
    keys = keyring.of(holder)
    if not keys:
        raise SignoffError("not_enrolled", f"{holder!r} is not in the keyring")
    keys = tuple(k for k in keys if k.valid_at(signed_at))
    if not keys:
        raise SignoffError(
            "not_valid_then", f"no key of {holder!r} was valid at {envelope['issued_at']}"
        )
    keys = tuple(k for k in keys if "physicist" in k.roles)
    if not keys:
        raise SignoffError("not_physicist", f"{holder!r} had no physicist role then")
    for k in keys:
        try:
            k.verifier.public_key.verify(sig, message)
        except InvalidSignature:
            continue
        return k
    raise SignoffError("bad_signature", f"not signed by an enrolled key of {holder!r}")
