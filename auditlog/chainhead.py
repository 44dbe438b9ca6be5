"""The head of the chain, and how the next entry becomes its line: the writer's hot path.

An entry line is the canonical JSON of ``{data, delivery_id?, hash, mono_ns, prev, seq,
ts, type}`` (canonical.py; docs/audit-log.md). :meth:`ChainHead.next_line` builds it
without a second serialisation: the data is serialised once, the envelope is laid out by
hand in sorted-key order (a test holds the result to exactly ``canonical(entry)``), and
``seal_parts`` adds the hash. The head moves on only when the line was made: data that
cannot be written faithfully (CanonicalError, a NaN, an infinity) appends nothing.

Two caches keep the cost per entry down: the formatted UTC second (most entries of a
group commit share it) and the JSON of entry types and delivery ids (few, and one id
repeats for a whole delivery). Appending is about 8 µs per entry on the development VM
(docs/development.md, benchmarks), most of it canonical JSON and SHA-256.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from orjson import dumps

from iortd.auditlog.canonical import CanonicalError, canonical, check_json_value, seal_parts

__all__ = ["ChainHead"]

_JSON_CACHE_MAX = 256


class ChainHead:
    """(seq, hash) of the last entry of the chain, and the next entry's line."""

    __slots__ = ("_hash_b", "_json_cache", "_ts_date", "_ts_prefix", "_ts_second", "hash", "seq")

    def __init__(self, seq: int, hash: str) -> None:
        self.seq = seq
        self.hash = hash
        self._hash_b = hash.encode()
        self._ts_second = -1  # the formatted second is cached: most appends share it
        self._ts_prefix = ""
        self._ts_date = ""
        self._json_cache: dict[tuple[str, bytes], bytes] = {}

    def next_line(
        self,
        type: str,
        data: Mapping[str, Any],
        delivery_id: str | None,
        now_mono: int,
        now_wall: int,
    ) -> tuple[bytes, str, str, str]:
        """The next entry's line, its hash, its ts and its UTC date (YYYYMMDD: which
        segment it belongs to); the head moves on to it. Raises CanonicalError (or
        TypeError) for data that cannot be written faithfully, and the head stays."""
        second, micro = divmod(now_wall // 1000, 1_000_000)
        if second != self._ts_second:
            self.ts(now_wall)  # a new second: refresh the cached prefix and date
        ts = f"{self._ts_prefix}.{micro:06d}Z"
        date = self._ts_date
        try:
            data_json = canonical(data)  # refuses non-JSON types (CanonicalError)
            did = b"" if delivery_id is None else self._json_key(delivery_id, b',"delivery_id":')
            # The envelope is laid out by hand in sorted-key order; the result is exactly
            # canonical(entry) (a test holds it to that), without a second serialisation.
            tail = b',"mono_ns":%d,"prev":"%s","seq":%d,"ts":"%s","type":%s}' % (
                now_mono,
                self._hash_b,
                self.seq + 1,
                ts.encode(),
                self._json_key(type, b""),
            )
        except (CanonicalError, TypeError):
            check_json_value(data)  # says where, when it can
            raise
        if b"null" in data_json:
            # orjson writes NaN and infinities as null: only then walk the data to refuse
            # them (a walk on every entry would be most of the cost of appending).
            check_json_value(data)
        line, digest = seal_parts(b"".join((b'{"data":', data_json, did)), tail)
        self.seq += 1
        self.hash, self._hash_b = digest, digest.encode()
        return line, digest, ts, date

    def _json_key(self, text: str, prefix: bytes) -> bytes:
        """``prefix`` + the JSON string of ``text``, cached: entry types are few, and one
        delivery id repeats for a whole delivery."""
        key = (text, prefix)
        out = self._json_cache.get(key)
        if out is None:
            if len(self._json_cache) > _JSON_CACHE_MAX:
                self._json_cache.clear()
            out = self._json_cache[key] = prefix + dumps(text)
        return out

    def ts(self, wall_ns: int) -> tuple[str, str]:
        """An entry's ts for ``wall_ns`` and its UTC date (YYYYMMDD)."""
        second, micro = divmod(wall_ns // 1000, 1_000_000)
        if second != self._ts_second:
            self._ts_second = second
            self._ts_prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            self._ts_date = self._ts_prefix[0:4] + self._ts_prefix[5:7] + self._ts_prefix[8:10]
        return f"{self._ts_prefix}.{micro:06d}Z", self._ts_date
