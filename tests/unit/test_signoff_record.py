"""What a sign-off signs (auditlog/signoff.py): the body's strict form, the delivery's range
and its entries' hash, the covering checkpoint, and the envelope's check against a keyring."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from iortd.auditlog.command import sign_command
from iortd.auditlog.keyring import parse_keyring
from iortd.auditlog.note import generate_keypair
from iortd.auditlog.signoff import SignoffError, check_envelope, delivery_record, parse_body

D1, D2 = "or-1-20261126T100000000000Z", "or-1-20261126T110000000000Z"
PHYS, OPER, STRANGER = (
    generate_keypair("phys-anna"),
    generate_keypair("op-bob"),
    generate_keypair("x"),
)
RING = parse_keyring(
    (
        f'[[key]]\nholder = "phys-anna"\nname = "A. Example, MPE"\nroles = ["physicist"]\n'
        f'public_key = "{PHYS.verifier.text}"\nvalid_from = "2026-01-01T00:00:00Z"\n'
        'valid_until = "2027-01-01T00:00:00Z"\n'
        f'[[key]]\nholder = "op-bob"\nname = "B. Operator"\nroles = ["operator"]\n'
        f'public_key = "{OPER.verifier.text}"\nvalid_from = "2026-01-01T00:00:00Z"\n'
        'valid_until = "2027-01-01T00:00:00Z"\n'
    ).encode(),
    Path("keyring.toml"),
)
NOW = datetime(2026, 12, 6, 9, 0, tzinfo=UTC)


def entries() -> list[dict[str, Any]]:
    """D1 at seq 2..5 with a foreign entry at 3; a checkpoint inside (4? no: 6) and after."""
    kinds: list[tuple[str, str | None, dict[str, Any]]] = [
        ("daemon_start", None, {}),
        ("config_loaded", None, {}),
        ("delivery_started", D1, {}),
        ("device_identified", None, {}),
        ("sample", D1, {}),
        ("delivery_terminated", D1, {}),
        ("checkpoint", None, {"note": "n", "count": 6, "head": "ab" * 32}),
        ("delivery_started", D2, {}),
        ("checkpoint", None, {"note": "n", "count": 8, "head": "cd" * 32}),
    ]
    out = []
    for seq, (kind, did, data) in enumerate(kinds):
        e: dict[str, Any] = {"seq": seq, "type": kind, "data": data, "hash": f"{seq:064x}"}
        if did is not None:
            e["delivery_id"] = did
        out.append(e)
    return out


def body(**kw: Any) -> dict[str, Any]:
    b: dict[str, Any] = {
        "delivery_id": D1,
        "meaning": "approved",
        "name": "A. Example, MPE",
        "record": {
            "first_seq": 2,
            "last_seq": 5,
            "entries_sha256": "ab" * 32,
            "checkpoint": {"size": 6, "hash": "ab" * 32},
        },
    }
    b.update(kw)
    return b


def test_the_range_is_contiguous_and_hashes_every_entry_in_it() -> None:
    r = delivery_record(entries(), D1)
    assert r is not None
    assert (r.first_seq, r.last_seq, r.ended) == (2, 5, True)
    want = hashlib.sha256(b"".join(bytes.fromhex(f"{s:064x}") for s in range(2, 6))).hexdigest()
    assert r.entries_sha256 == want  # the foreign entry at seq 3 is in the range
    assert r.checkpoint == {"size": 6, "hash": "ab" * 32}  # the first one covering it
    assert r.record() == {
        "first_seq": 2,
        "last_seq": 5,
        "entries_sha256": want,
        "checkpoint": {"size": 6, "hash": "ab" * 32},
    }


def test_before_a_seq_and_not_extended_by_sign_off_entries() -> None:
    es = entries()
    signed_entry = {"seq": 9, "type": "delivery_signed", "data": {}, "hash": "0" * 64}
    es.append({**signed_entry, "delivery_id": D1})
    assert delivery_record(es, D1) == delivery_record(entries(), D1)
    cut = delivery_record(es, D1, before_seq=6)
    assert cut is not None
    assert cut.checkpoint is None
    assert cut.record() is None
    assert delivery_record(es, "or-1-nothing") is None
    open_one = delivery_record(es, D2)
    assert open_one is not None
    assert not open_one.ended


def test_body_is_strict() -> None:
    ok = parse_body(body())
    assert ok.meaning == "approved"
    assert ok.reason is None
    dev = parse_body(body(meaning="approved_with_deviation", reason="dose 2 % low, accepted"))
    assert dev.reason == "dose 2 % low, accepted"
    assert parse_body(body(utc_offset_min=-300)).utc_offset_min == -300
    for bad, word in [
        (body(meaning="fine"), "meaning"),
        (body(meaning="approved_with_deviation"), "reason"),
        (body(meaning="approved_with_deviation", reason="x" * 501), "reason"),
        (body(meaning="approved_with_deviation", reason="two\nlines"), "reason"),
        (body(reason="why"), "reason"),
        (body(extra=1), "unknown key"),
        (body(record={"first_seq": 2}), "record"),
        (body(name=""), "name"),
        (body(delivery_id="../x"), "delivery_id"),
        (body(utc_offset_min=900), "utc_offset_min"),
        (body(utc_offset_min="+01:00"), "utc_offset_min"),
    ]:
        with pytest.raises(SignoffError, match=word) as exc:
            parse_body(bad)
        assert exc.value.reason == "malformed"


def signed(signer: Any = PHYS, holder: str = "phys-anna") -> dict[str, Any]:
    return sign_command(
        "signoff", body(), signer=signer, holder=holder, site="s", room="or-1", ttl_s=60, now=NOW
    )


def test_the_envelope_checks_against_the_keyring() -> None:
    assert check_envelope(signed(), RING).holder == "phys-anna"
    tampered = signed()
    tampered["body"] = {**tampered["body"], "meaning": "reviewed"}
    cases = [
        (tampered, "bad_signature"),
        (signed(STRANGER, "phys-zed"), "not_enrolled"),
        (signed(OPER, "op-bob"), "not_physicist"),
        (signed(STRANGER), "bad_signature"),
    ]
    late = sign_command(
        "signoff",
        body(),
        signer=PHYS,
        holder="phys-anna",
        site="s",
        room="or-1",
        ttl_s=60,
        now=datetime(2027, 6, 1, tzinfo=UTC),
    )
    cases.append((late, "not_valid_then"))
    for env, word in cases:
        with pytest.raises(SignoffError) as exc:
            check_envelope(env, RING)
        assert exc.value.reason == word
