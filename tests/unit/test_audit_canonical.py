"""Canonical JSON and the entry hash (auditlog/canonical.py).

The contract (docs/audit-log.md, docs/architecture.md): an entry is the canonical JSON of the
entry (orjson, OPT_SORT_KEYS) followed by a newline, and its ``hash`` is the SHA-256 of the
canonical entry without ``hash``. ``seal`` and ``open_line`` do this by splicing text in
and out; here every result is checked against an independent computation that serialises
dicts with orjson and hashes them with hashlib.
"""

from __future__ import annotations

import hashlib
import string
from types import MappingProxyType
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from iortd.auditlog.canonical import (
    INT_MAX,
    INT_MIN,
    ZERO_HASH,
    CanonicalError,
    Envelope,
    canonical,
    check_json_value,
    open_line,
    seal,
)


def dumps(obj: Any) -> bytes:
    """The reference serialiser, independent of canonical.canonical()."""
    return orjson.dumps(obj, option=orjson.OPT_SORT_KEYS)


def independent_hash(entry: dict[str, Any]) -> str:
    """SHA-256 of the canonical entry without its "hash" key."""
    without = {k: v for k, v in entry.items() if k != "hash"}
    return hashlib.sha256(dumps(without)).hexdigest()


# ---- strategies --------------------------------------------------------------------------

# Keys that could confuse a splice-based implementation: envelope names inside data,
# and text that looks like the hash field.
tricky_keys = st.sampled_from(
    ["hash", "mono_ns", "prev", "seq", "ts", "type", "data", ',"hash":"', ',"mono_ns":', ""]
)
keys = tricky_keys | st.text(max_size=12)
scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=INT_MIN, max_value=INT_MAX)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.sampled_from([1e-07, 5e-324, 1.7976931348623157e308, -0.0, 0.1, 1e16, 123456789.125])
    | st.text(max_size=20)
    | st.sampled_from(['"', "\\", "\n", "\u2014", "\U0001f600", ',"hash":"', "\x00", "é"])
)
json_values = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(keys, children, max_size=4),
    max_leaves=20,
)
hex64 = st.text(alphabet="0123456789abcdef", min_size=64, max_size=64)


@st.composite
def entries(draw: st.DrawFn) -> dict[str, Any]:
    """An entry without "hash": the envelope keys plus data, delivery_id sometimes."""
    entry: dict[str, Any] = {
        "data": draw(st.dictionaries(keys, json_values, max_size=5)),
        "mono_ns": draw(st.integers(min_value=0, max_value=INT_MAX)),
        "prev": draw(st.just(ZERO_HASH) | hex64),
        "seq": draw(st.integers(min_value=0, max_value=INT_MAX)),
        "ts": draw(st.just("2026-11-26T10:49:18.825039Z") | st.text(max_size=30)),
        "type": draw(st.sampled_from(["sample", "checkpoint", "log_created"]) | st.text()),
    }
    delivery_id = draw(st.none() | st.text(max_size=30))
    if delivery_id is not None:
        entry["delivery_id"] = delivery_id
    return entry


# ---- seal --------------------------------------------------------------------------------


@settings(max_examples=120, deadline=None)
@given(entries())
def test_seal_writes_the_sorted_entry_with_its_hash_and_a_newline(entry: dict[str, Any]) -> None:
    check_json_value(entry["data"])  # everything the strategy makes is writable
    line, digest = seal(canonical(entry))
    assert digest == hashlib.sha256(dumps(entry)).hexdigest()
    assert line == dumps({**entry, "hash": digest}) + b"\n"
    assert line.count(b"\n") == 1, "one entry, one line: newlines in strings are escaped"
    # Reading it back gives the same entry, and its hash is the independent hash.
    parsed = orjson.loads(line)
    assert parsed == {**entry, "hash": digest}
    assert independent_hash(parsed) == parsed["hash"]


@settings(max_examples=120, deadline=None)
@given(entries())
def test_open_line_recomputes_the_hash_and_reads_the_envelope(entry: dict[str, Any]) -> None:
    line, digest = seal(canonical(entry))
    env = open_line(line[:-1])
    assert env == Envelope(
        hash=digest,
        computed=digest,
        mono_ns=entry["mono_ns"],
        prev=entry["prev"],
        seq=entry["seq"],
        ts=entry["ts"],
        type=entry["type"],
    )


@settings(max_examples=100, deadline=None)
@given(entries(), st.data())
def test_open_line_sees_any_change_to_the_data(entry: dict[str, Any], data: st.DataObject) -> None:
    _, digest = seal(canonical(entry))
    altered = dict(entry)
    altered["data"] = {**entry["data"], "injected": data.draw(json_values)}
    # The altered entry keeps the old hash: what a forger who cannot recompute it writes.
    forged = dumps({**altered, "hash": digest})
    env = open_line(forged)
    assert env.hash == digest
    assert env.computed == independent_hash(altered)
    assert env.computed != env.hash


def test_seal_of_a_known_entry() -> None:
    entry = {
        "type": "sample",
        "seq": 7,
        "ts": "2026-11-26T10:49:18.825039Z",
        "prev": ZERO_HASH,
        "mono_ns": 42,
        "delivery_id": "or-1-x",
        "data": {"z": 1, "a": [1e-07, "\u2014"], "m": {"b": True, "a": None}},
    }
    line, digest = seal(canonical(entry))
    expected = (
        b'{"data":{"a":[1e-7,"\xe2\x80\x94"],"m":{"a":null,"b":true},"z":1},'
        b'"delivery_id":"or-1-x","hash":"' + digest.encode() + b'","mono_ns":42,'
        b'"prev":"' + ZERO_HASH.encode() + b'","seq":7,"ts":"2026-11-26T10:49:18.825039Z",'
        b'"type":"sample"}\n'
    )
    assert line == expected
    assert (
        digest
        == hashlib.sha256(
            expected.replace(b',"hash":"' + digest.encode() + b'"', b"")[:-1]
        ).hexdigest()
    )


def test_seal_refuses_a_body_without_mono_ns() -> None:
    with pytest.raises(CanonicalError, match="mono_ns"):
        seal(canonical({"data": {}, "prev": ZERO_HASH, "seq": 0, "ts": "t", "type": "x"}))


# ---- open_line on lines that are not entries ---------------------------------------------


def _sealed(**over: Any) -> bytes:
    entry = {"data": {"x": 1}, "mono_ns": 1, "prev": ZERO_HASH, "seq": 3, "ts": "t", "type": "x"}
    entry.update(over)
    return seal(canonical(entry))[0][:-1]


@pytest.mark.parametrize(
    ("line", "why"),
    [
        (b'{"data":{},"mono_ns":1,"prev":"0","seq":0,"ts":"t","type":"x"}', "no hash field"),
        (b"", "no hash field"),
        (b'{"data":{},"hash":"abc","mono_ns":1}', "malformed hash field"),
        (_sealed().replace(b'","mono_ns"', b'" ,"mono_ns"'), "malformed hash field"),
    ],
)
def test_open_line_refuses_lines_without_a_well_formed_hash(line: bytes, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        open_line(line)


def test_open_line_refuses_an_envelope_without_type() -> None:
    body = canonical({"data": {}, "mono_ns": 1, "prev": ZERO_HASH, "seq": 0, "ts": "t"})
    line, _ = seal(body)
    with pytest.raises(ValueError, match="type"):
        open_line(line[:-1])


def test_open_line_refuses_a_tail_that_is_not_json() -> None:
    line = _sealed()
    with pytest.raises(ValueError):  # noqa: PT011 - orjson.JSONDecodeError is a ValueError
        open_line(line[:-5])


def test_open_line_uses_the_envelope_hash_not_one_inside_data() -> None:
    inner = "f" * 64
    entry = {
        "data": {"a": 0, "hash": inner, "mono_ns": 9, "seq": 99},
        "mono_ns": 1,
        "prev": ZERO_HASH,
        "seq": 3,
        "ts": "t",
        "type": "x",
    }
    line, digest = seal(canonical(entry))
    assert line.count(b',"hash":"') == 2
    env = open_line(line[:-1])
    assert (env.hash, env.computed, env.seq, env.mono_ns) == (digest, digest, 3, 1)


# ---- check_json_value --------------------------------------------------------------------


@settings(max_examples=100, deadline=None)
@given(st.dictionaries(keys, json_values, max_size=5))
def test_check_json_value_accepts_what_canonical_writes_faithfully(value: dict[str, Any]) -> None:
    check_json_value(value)
    assert orjson.loads(canonical({"data": value})) == {"data": value}


@pytest.mark.parametrize(
    "value",
    [INT_MAX, INT_MIN, 0, -0.0, 1e-07, 5e-324, "", "\u2014", True, None, [], {}, (1, "a")],
)
def test_check_json_value_accepts_edge_values(value: Any) -> None:
    check_json_value({"v": value})


@pytest.mark.parametrize(
    ("value", "path", "what"),
    [
        ({"a": float("nan")}, "data.a", "not a finite number"),
        ({"a": float("inf")}, "data.a", "not a finite number"),
        ({"a": float("-inf")}, "data.a", "not a finite number"),
        ({"a": INT_MAX + 1}, "data.a", "does not fit in 64 bits"),
        ({"a": INT_MIN - 1}, "data.a", "does not fit in 64 bits"),
        ({"a": 2**64}, "data.a", "does not fit in 64 bits"),
        ({1: "x"}, "data", "key 1 is not a string"),
        ({"a": {None: 1}}, "data.a", "key None is not a string"),
        ({"a": [0, {2: 3}]}, "data.a[1]", "key 2 is not a string"),
        ({"a": {1, 2}}, "data.a", "set is not a JSON value"),
        ({"a": b"bytes"}, "data.a", "bytes is not a JSON value"),
        ({"a": object()}, "data.a", "object is not a JSON value"),
        ({"a": {"b": [0.5, 1.5, float("nan")]}}, "data.a.b[2]", "not a finite number"),
        ({"a": ({"b": frozenset()},)}, "data.a[0].b", "frozenset is not a JSON value"),
    ],
)
def test_check_json_value_refuses_with_the_path(value: Any, path: str, what: str) -> None:
    with pytest.raises(CanonicalError) as err:
        check_json_value(value)
    assert str(err.value).startswith(f"{path}: ")
    assert what in str(err.value)


def test_check_json_value_names_the_path_it_is_given() -> None:
    with pytest.raises(CanonicalError, match=r"^sample\.dose: "):
        check_json_value({"dose": float("nan")}, "sample")


def test_canonical_error_is_a_value_error() -> None:
    assert issubclass(CanonicalError, ValueError)


def test_check_json_value_refuses_a_lone_surrogate_with_the_path() -> None:
    value = {"serial": "SN\udcff"}
    with pytest.raises(CanonicalError, match=r"^data\.serial: "):
        check_json_value(value)


def test_whatever_check_json_value_accepts_canonical_can_write() -> None:
    value = {"config": MappingProxyType({"a": 1})}
    try:
        check_json_value(value)
    except CanonicalError:
        return  # refused with a CanonicalError: the contract holds
    canonical({"data": value})


def test_keys_sort_by_code_point_as_the_contract_says() -> None:
    data = {k: i for i, k in enumerate(["b", "a", "B", "\u00e9", "aa", "_", "1"])}
    out = canonical({"data": data})
    assert out == b'{"data":{"1":6,"B":2,"_":5,"a":1,"aa":4,"b":0,"\xc3\xa9":3}}'
    assert b" " not in out


def test_hash_hex_is_lowercase_64() -> None:
    entry = {"data": {}, "mono_ns": 0, "prev": ZERO_HASH, "seq": 0, "ts": "", "type": ""}
    _, digest = seal(canonical(entry))
    assert len(digest) == 64
    assert set(digest) <= set(string.hexdigits.lower())
