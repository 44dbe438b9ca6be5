"""Canonical JSON and the entry hash.

An entry is one line: canonical JSON (keys sorted, no insignificant whitespace, UTF-8, as
produced by orjson with OPT_SORT_KEYS) followed by ``\\n``. Its ``hash`` is the SHA-256 of
the canonical entry *without* the ``hash`` key. Because keys are sorted and the envelope
keys are fixed, that is exactly the line with the text ``,"hash":"<64 hex>"`` removed,
which is how both the writer (splice in) and the verifier (cut out) handle it, without
serialising twice. One serialiser is used for writing and for checking, never mixed:
serialisers differ on floats such as 1e-07 and on non-ASCII text.

Envelope keys, in their sorted order:
    data, delivery_id (optional), hash, mono_ns, prev, seq, ts, type
All payload goes under ``data``, so no payload key can sort between them.
"""

from __future__ import annotations

import enum
import hashlib
import math
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson

__all__ = [
    "ZERO_HASH",
    "CanonicalError",
    "Envelope",
    "Scan",
    "canonical",
    "check_json_value",
    "open_line",
    "scan_chain",
    "seal",
    "seal_parts",
]

ZERO_HASH = "0" * 64
_HASH_KEY = b',"hash":"'
_AFTER_HASH = b',"mono_ns":'
# What orjson writes without loss: signed and unsigned 64-bit integers.
INT_MIN, INT_MAX = -(2**63), 2**64 - 1


class CanonicalError(ValueError):
    """A value cannot be written canonically (NaN, infinity, a >64-bit integer, ...)."""


def _str_ok(value: str) -> bool:
    if value.isascii():
        return True
    try:
        value.encode("utf-8")  # a lone surrogate cannot be written as UTF-8
    except UnicodeEncodeError:
        return False
    return True


def _fast_ok(value: Any) -> bool:
    """Exact-type walk without error paths; the common case, cheap. False sends the value
    to the slow walk, which names what is wrong."""
    t = type(value)
    if t is str:
        return _str_ok(value)
    if t is bool or value is None:
        return True
    if t is float:
        return math.isfinite(value)
    if t is int:
        return bool(INT_MIN <= value <= INT_MAX)
    if t is dict:
        for k, v in value.items():
            if type(k) is not str or not _str_ok(k) or not _fast_ok(v):
                return False
        return True
    if t is list or t is tuple:
        return all(_fast_ok(v) for v in value)
    return False


def check_json_value(value: Any, path: str = "data") -> None:
    """Refuse exactly what canonical() cannot write faithfully, naming where it is.

    Accepted: str, int (64-bit), finite float, bool, None, dict with str keys, list,
    tuple; an Enum is written as its value and a UUID in its canonical text form (as
    orjson does). Refused: NaN and infinities (orjson would write null), datetimes
    (write them as text in the one format of the log), dataclasses and other objects,
    subclasses of str/int/dict/list that are not enums, lone surrogates.
    """
    if not _fast_ok(value):
        _check_slow(value, path)


def _check_slow(value: Any, path: str) -> None:
    t = type(value)
    if value is None or t is bool:
        return
    if t is str:
        if not _str_ok(value):
            raise CanonicalError(f"{path}: text with a lone surrogate cannot be written as UTF-8")
        return
    if t is int:
        if not INT_MIN <= value <= INT_MAX:
            raise CanonicalError(f"{path}: integer {value} does not fit in 64 bits")
        return
    if t is float:
        if not math.isfinite(value):
            raise CanonicalError(f"{path}: {value} is not a finite number")
        return
    if isinstance(value, enum.Enum):
        _check_slow(value.value, path)
        return
    if isinstance(value, uuid.UUID):
        return
    if t is dict:
        for k, v in value.items():
            if type(k) is not str:
                raise CanonicalError(f"{path}: key {k!r} is not a string")
            _check_slow(k, f"{path} (key {k!r})")
            _check_slow(v, f"{path}.{k}")
        return
    if t is list or t is tuple:
        for i, v in enumerate(value):
            _check_slow(v, f"{path}[{i}]")
        return
    raise CanonicalError(f"{path}: {t.__name__} is not a JSON value")


# Sorted keys; and no silent conversions of datetimes, dataclasses or str/int/dict/list
# subclasses (orjson would otherwise write them in a format of its own choosing).
_OPTIONS = (
    orjson.OPT_SORT_KEYS
    | orjson.OPT_PASSTHROUGH_DATETIME
    | orjson.OPT_PASSTHROUGH_DATACLASS
    | orjson.OPT_PASSTHROUGH_SUBCLASS
)


def canonical(obj: Mapping[str, Any]) -> bytes:
    try:
        return orjson.dumps(obj, option=_OPTIONS)
    except orjson.JSONEncodeError as exc:
        # e.g. a lone surrogate in a str, or a mapping type orjson does not know
        raise CanonicalError(f"cannot be written as canonical JSON: {exc}") from None


def seal(body: bytes) -> tuple[bytes, str]:
    """From the canonical entry without ``hash``, the line (with newline) and its hash."""
    at = body.rfind(_AFTER_HASH)
    if at < 0:
        raise CanonicalError("entry has no mono_ns key")
    return seal_parts(body[:at], body[at:])


def seal_parts(head: bytes, tail: bytes) -> tuple[bytes, str]:
    """The same, from the canonical entry split where ``hash`` goes: ``head`` ends before
    it (data, delivery_id), ``tail`` starts at ``,"mono_ns":``. The writer builds the two
    parts directly, so nothing is serialised twice or searched for."""
    h = hashlib.sha256(head)
    h.update(tail)
    digest = h.hexdigest()
    return b"".join((head, _HASH_KEY, digest.encode(), b'"', tail, b"\n")), digest


@dataclass(frozen=True, slots=True)
class Envelope:
    """The fixed fields of an entry that follow ``hash``, read without parsing ``data``."""

    hash: str
    computed: str  # SHA-256 of the line with its hash removed
    mono_ns: int
    prev: str
    seq: int
    ts: str
    type: str


def open_line(line: bytes) -> Envelope:
    """Split one line (without its newline) into hash, recomputed hash and envelope.

    Raises ValueError (or orjson.JSONDecodeError, a ValueError) when the line is not an
    entry. The caller compares ``hash`` with ``computed``.
    """
    at = line.rfind(_HASH_KEY)
    if at < 0:
        raise ValueError("no hash field")
    end = at + len(_HASH_KEY) + 64
    if line[end : end + 2] != b'",':
        raise ValueError("malformed hash field")
    claimed = line[at + len(_HASH_KEY) : end].decode("ascii")
    computed = hashlib.sha256(line[:at] + line[end + 1 :]).hexdigest()
    # With the "{" put back, a successful parse is always an object.
    tail = orjson.loads(b"{" + line[end + 2 :])
    try:
        return Envelope(
            hash=claimed,
            computed=computed,
            mono_ns=int(tail["mono_ns"]),
            prev=str(tail["prev"]),
            seq=int(tail["seq"]),
            ts=str(tail["ts"]),
            type=str(tail["type"]),
        )
    except KeyError as exc:
        raise ValueError(f"envelope lacks {exc.args[0]!r}") from None


@dataclass(slots=True)
class Scan:
    intact: int  # bytes of whole, valid entries from the start
    entries: int
    last_hash: str
    last_seq: int
    last_ts: str | None
    last_type: str | None  # of the last entry that is not a checkpoint
    error: str | None = None


def scan_chain(
    data: bytes | bytearray,
    prev_hash: str | None,
    prev_seq: int | None,
    *,
    pause_every: int = 0,
    pause_s: float = 0.0,
) -> Scan:
    """The longest prefix of whole, valid, chained entries of a segment's bytes: each
    entry's hash recomputed, its ``prev`` and ``seq`` following the entry before it (the
    first one's against ``prev_hash`` / ``prev_seq`` when given). The one chain check of
    recovery, retention and the fork guard. With ``pause_every``, sleeps ``pause_s`` after
    that many entries: a check in a worker thread lets the GIL go to the event loop."""
    pos = 0
    scan = Scan(0, 0, prev_hash or ZERO_HASH, -1 if prev_seq is None else prev_seq, None, None)
    while pos < len(data):
        nl = data.find(b"\n", pos)
        if nl < 0:
            scan.error = "incomplete last line"
            break
        try:
            env = open_line(data[pos:nl])  # type: ignore[arg-type]  # bytes-like is enough
        except ValueError as exc:
            scan.error = f"unreadable entry: {exc}"
            break
        if env.hash != env.computed:
            scan.error = "hash mismatch"
            break
        first = scan.entries == 0
        if not (first and prev_hash is None) and env.prev != scan.last_hash:
            scan.error = "prev does not link to the previous entry"
            break
        if not (first and prev_seq is None) and env.seq != scan.last_seq + 1:
            scan.error = f"seq {env.seq} does not follow {scan.last_seq}"
            break
        scan.entries += 1
        scan.last_hash, scan.last_seq = env.hash, env.seq
        scan.last_ts = env.ts
        if env.type != "checkpoint":  # a shutdown signs after daemon_stop
            scan.last_type = env.type
        pos = nl + 1
        scan.intact = pos
        if pause_every and not scan.entries % pause_every:
            time.sleep(pause_s)
    return scan
