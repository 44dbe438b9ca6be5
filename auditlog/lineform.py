"""The writer's exact form of a log line, as verify reads it: a fast shape checked by
byte comparison, and a full parse for every line that does not have it.

The writer (canonical.py) ends every entry with the same envelope, in one byte form::

    ,"hash":"<64 hex>","mono_ns":<digits>,"prev":"<64 hex>","seq":<digits>,
    "ts":"<27 characters>","type":"<kind>"}          (one line, without the break)

verify_log matches those bytes with one regular expression (:data:`ENVELOPE`, in C) and
compares what it captures with what it expects: the previous entry's hash as ``prev``
(bytes, so lowercase hex), the next ``seq`` in decimal, a timestamp of the writer's 27
characters (``2026-12-06T11:07:18.812944Z``), a kind of ``[a-z0-9_]`` whose data verify
does not read, a ``mono_ns`` without a leading zero; and before the hash field, the data
object's end (the last ``}`` before it), or a ``delivery_id`` of plain text right after
it, so that neither that key nor the hash can be there twice; the line opens with
``{"data":{``. One match, from the data's end to the end of the line. A line with that
*fast shape* needs no JSON parse: its entry hash covers the bytes before the hash field,
its leaf the whole line, and the envelope is exactly what the writer writes — no space, no
key twice, no key out of order, no escape — since any of those would not match. (Measured:
the match costs about as much as orjson's parse of the envelope, which checked none of
that, did before.)

Every other line takes the *full parse* (:func:`read_entry`): the first entry, an entry
of a kind verify reads (:data:`PARSED_KINDS`: its data is checked), a kind or ts with other
characters, and anything a forger made. Parsed, the line must then be the canonical JSON of
what it holds (:func:`not_canonical`): what the writer would have written for it, byte for
byte. So a duplicated key (two JSON readers can take different ones), keys out of order,
whitespace or an escape the writer does not write is a problem on the line that has it,
where it was before accepted as long as its hash matched.

What neither path does: parse the ``data`` of a line of the fast shape (a sample's
data). Its bytes are hashed, chained and signed like every other byte, so they cannot be
changed without breaking the chain, the tree or a signature; but verify does not say
whether they are canonical JSON. Only the writer, or someone who wrote the entry and its
whole chain after it, can have put them there; an entry no signature vouches for is
reported as unvouched in any case.
"""

from __future__ import annotations

import re
from typing import Any, Final

import orjson

from iortd.auditlog.canonical import CanonicalError, canonical

__all__ = [
    "ALTERED",
    "DATA_KEY",
    "ENVELOPE",
    "HASH_KEY",
    "PARSED_KINDS",
    "chain_problem",
    "not_canonical",
    "read_entry",
    "tail_seq",
]

ALTERED: Final = "hash does not match the entry's content: the entry was altered"

HASH_KEY: Final = b',"hash":"'  # then 64 hex digits: the hash's closing quote is at +73
# From the end of the data object to the end of the line: a delivery_id of plain text (no
# quote, no escape) or none, and the envelope with hash, prev, seq, ts and type captured.
ENVELOPE: Final = re.compile(
    rb'}(?:,"delivery_id":"[^"\\]*")?,"hash":"(.{64})","mono_ns":[1-9][0-9]*,'
    rb'"prev":"(.{64})","seq":([0-9]+),"ts":"([0-9T:.Z-]{27})","type":"([a-z0-9_]*)"}'
)
DATA_KEY: Final = b'{"data":{'  # how the line opens
# The kinds whose data verify reads (verify.py): always parsed, so always checked canonical.
PARSED_KINDS: Final = frozenset(
    {
        b"log_created",
        b"daemon_start",
        b"checkpoint",
        b"recovery",
        b"config_loaded",
        b"log_rollback_accepted",
    }
)


def read_entry(line: bytes) -> tuple[dict[str, Any], int, str, str, str]:
    """(entry, seq, prev, ts, type) of a line parsed whole; ValueError saying what is
    missing or of the wrong kind when it is not an entry."""
    entry = orjson.loads(line)  # orjson.JSONDecodeError is a ValueError
    if type(entry) is not dict:
        raise ValueError("not a JSON object")
    try:
        seq, prev, ts, kind = entry["seq"], entry["prev"], entry["ts"], entry["type"]
    except KeyError as exc:
        raise ValueError(f"no {exc.args[0]!r}") from None
    if type(seq) is not int:
        raise ValueError("seq is not an integer")
    for name, value in (("prev", prev), ("ts", ts), ("type", kind)):
        if type(value) is not str:
            raise ValueError(f"{name} is not text")
    return entry, seq, prev, ts, kind


def not_canonical(entry: dict[str, Any], line: bytes) -> str | None:
    """Why ``line`` is not the canonical form of ``entry`` (parsed from it), or None."""
    try:
        again = canonical(entry)
    except CanonicalError as exc:
        return f"not in the log's canonical form ({exc})"
    if again == line:
        return None
    return (
        "not in the log's canonical form (a key twice, keys out of order, spaces, or an "
        "escape or number form the writer does not write): the writer did not write this "
        "line"
    )


def tail_seq(line: bytes, end: int) -> int | None:
    """The seq of an altered line, read from the envelope after its hash if it can be
    (a line merged with the next by a removed newline has the next one's)."""
    try:
        seq = orjson.loads(b"{" + line[end + 2 :]).get("seq")
    except (ValueError, AttributeError):
        return None
    return seq if type(seq) is int else None


def chain_problem(entry: dict[str, Any], line: bytes, expect_seq: int, prev_b: bytes) -> str | None:
    """What is wrong with a parsed line whose hash matches: its form; with its seq in
    place (verify.py words a seq out of place), its prev and the first entry's type."""
    bad = not_canonical(entry, line)
    if bad is not None or entry["seq"] != expect_seq:
        return bad
    if entry["prev"] != prev_b.decode():
        return f"prev does not match the hash of seq {expect_seq - 1}"
    if expect_seq == 0 and entry["type"] != "log_created":
        return "the log does not start with log_created"
    return None
