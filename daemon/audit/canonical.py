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

import hashlib
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson

__all__ = [
    "ZERO_HASH",
    "CanonicalError",
    "Envelope",
    "canonical",
    "check_json_value",
    "open_line",
    "seal",
]

ZERO_HASH = "0" * 64
_HASH_KEY = b',"hash":"'
_AFTER_HASH = b',"mono_ns":'
INT_MIN, INT_MAX = -(2**63), 2**63 - 1


class CanonicalError(ValueError):
    """A value cannot be written canonically (NaN, infinity, a >64-bit integer, ...)."""


def check_json_value(value: Any, path: str = "data") -> None:
    """Refuse what canonical JSON cannot carry faithfully: orjson would write NaN as null."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return
    if isinstance(value, int):
        if not INT_MIN <= value <= INT_MAX:
            raise CanonicalError(f"{path}: integer {value} does not fit in 64 bits")
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise CanonicalError(f"{path}: {value} is not a finite number")
        return
    if isinstance(value, Mapping):
        for k, v in value.items():
            if not isinstance(k, str):
                raise CanonicalError(f"{path}: key {k!r} is not a string")
            check_json_value(v, f"{path}.{k}")
        return
    if isinstance(value, list | tuple):
        for i, v in enumerate(value):
            check_json_value(v, f"{path}[{i}]")
        return
    raise CanonicalError(f"{path}: {type(value).__name__} is not a JSON value")


def canonical(obj: Mapping[str, Any]) -> bytes:
    return orjson.dumps(obj, option=orjson.OPT_SORT_KEYS)


def seal(body: bytes) -> tuple[bytes, str]:
    """From the canonical entry without ``hash``, the line (with newline) and its hash."""
    digest = hashlib.sha256(body).hexdigest()
    at = body.rfind(_AFTER_HASH)
    if at < 0:
        raise CanonicalError("entry has no mono_ns key")
    line = b"".join((body[:at], _HASH_KEY, digest.encode(), b'"', body[at:], b"\n"))
    return line, digest


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
