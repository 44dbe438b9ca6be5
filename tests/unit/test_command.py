"""Signed commands (auditlog/command.py) and the keyring (auditlog/keyring.py): every
reject reason, the order of the checks, and a keyring's errors naming file, entry and key."""

from __future__ import annotations

import base64
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest

from iortd.auditlog.canonical import canonical
from iortd.auditlog.command import (
    MAX_COMMAND_BYTES,
    Command,
    CommandRejected,
    NonceBook,
    RejectReason,
    check_command,
    sign_command,
)
from iortd.auditlog.keyring import Keyring, KeyringError, parse_keyring
from iortd.auditlog.note import Signer, generate_keypair

NOW = datetime(2026, 12, 6, 8, 0, tzinfo=UTC)
PHYS = generate_keypair("phys-anna")
OPER = generate_keypair("op-bob")
OLD = generate_keypair("phys-old")
STRANGER = generate_keypair("phys-anna")  # same name, another key: a forgery


def keyring_text(*entries: tuple[str, Signer, list[str], str, str]) -> str:
    out = []
    for holder, signer, roles, frm, until in entries:
        out.append(
            f'[[key]]\nholder = "{holder}"\nname = "Staff {holder}"\nroles = {roles!r}\n'
            f'public_key = "{signer.verifier.text}"\nvalid_from = "{frm}"\n'
            f'valid_until = "{until}"\n'
        )
    return "\n".join(out).replace("'", '"')


RING = parse_keyring(
    keyring_text(
        ("phys-anna", PHYS, ["physicist"], "2026-01-01T00:00:00Z", "2027-01-01T00:00:00Z"),
        ("op-bob", OPER, ["operator"], "2026-01-01T00:00:00Z", "2027-01-01T00:00:00Z"),
        ("phys-old", OLD, ["physicist"], "2025-01-01T00:00:00Z", "2026-12-06T07:00:00Z"),
    ).encode(),
    Path("/etc/iortd/keyring.toml"),
)


def make(
    kind: str = "prescription",
    *,
    signer: Signer = PHYS,
    holder: str = "phys-anna",
    room: str = "or-3",
    ttl_s: float = 600,
    now: datetime = NOW,
    body: dict[str, Any] | None = None,
) -> dict[str, Any]:
    return sign_command(
        kind,
        body if body is not None else {"plan": "P-1", "dose_gy": 20.0},
        signer=signer,
        holder=holder,
        site="site-a",
        room=room,
        ttl_s=ttl_s,
        now=now,
    )


def resign(obj: dict[str, Any], signer: Signer = PHYS) -> bytes:
    unsigned = {k: v for k, v in obj.items() if k != "sig"}
    sig = signer.private_key.sign(canonical(unsigned))
    return orjson.dumps({**unsigned, "sig": base64.b64encode(sig).decode()})


def check(
    raw: bytes, *, now: datetime = NOW, seen: NonceBook | None = None, ring: Keyring = RING
) -> Command:
    return check_command(
        raw,
        ring,
        site="site-a",
        room="or-3",
        now=now,
        skew_s=60,
        seen=seen if seen is not None else NonceBook(60),
    )


def reason_of(raw: bytes, **kw: Any) -> RejectReason:
    with pytest.raises(CommandRejected) as info:
        check(raw, **kw)
    return info.value.reason


def test_a_signed_command_is_accepted_with_what_it_says() -> None:
    obj = make()
    raw = orjson.dumps(obj)
    cmd = check(raw)
    assert cmd.kind == "prescription"
    assert cmd.signer == "phys-anna"
    assert cmd.signer_name == "Staff phys-anna"
    assert dict(cmd.body) == {"plan": "P-1", "dose_gy": 20.0}
    assert cmd.nonce == obj["nonce"]
    assert cmd.expires_at - cmd.issued_at == timedelta(seconds=600)
    assert len(cmd.sha256) == 64


def test_oversized_is_refused_before_parsing() -> None:
    raw = b"[" * (MAX_COMMAND_BYTES + 1)  # not JSON either: size is judged first
    assert reason_of(raw) == RejectReason.oversized


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"\xff\xfe",
        b"not json",
        b"[1, 2]",
        b'"a string"',
        b"{" + b'"a":{' * 40 + b"}" * 41,  # deeper than MAX_DEPTH
        b"[" * 2000 + b"]" * 2000,  # deeper than orjson's own limit
    ],
)
def test_malformed_bytes(raw: bytes) -> None:
    assert reason_of(raw) == RejectReason.malformed


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"v": 2}, RejectReason.unknown_version),
        ({"v": True}, RejectReason.unknown_version),
        ({"v": "1"}, RejectReason.unknown_version),
        ({"nonce": "ABC"}, RejectReason.malformed),
        ({"nonce": "0" * 31}, RejectReason.malformed),
        ({"kind": "Prescription"}, RejectReason.malformed),
        ({"signer": "Anna Example"}, RejectReason.malformed),
        ({"body": [1]}, RejectReason.malformed),
        ({"sig": 5}, RejectReason.malformed),
        ({"issued_at": "2026-12-06 08:00:00"}, RejectReason.malformed),
        ({"expires_at": "2026-12-06T08:00:00+01:00"}, RejectReason.malformed),
        ({"expires_at": "2026-12-06T07:59:00Z"}, RejectReason.malformed),  # before issued
        ({"expires_at": "2026-12-08T08:00:00Z"}, RejectReason.malformed),  # ttl beyond max
        ({"extra": 1}, RejectReason.malformed),
        ({"kind": "self_destruct"}, RejectReason.unknown_kind),
        ({"room": "or-4"}, RejectReason.wrong_room),
        ({"site": "site-b"}, RejectReason.wrong_room),
        ({"signer": "nobody"}, RejectReason.unknown_signer),
    ],
)
def test_field_reasons(change: dict[str, Any], reason: RejectReason) -> None:
    # Re-signed after the change: the field check, not the signature, refuses it.
    obj = {**make(), **change}
    raw = orjson.dumps(obj) if "sig" in change else resign(obj)
    assert reason_of(raw) == reason


def test_a_missing_field_is_malformed() -> None:
    obj = make()
    del obj["nonce"]
    assert reason_of(orjson.dumps(obj)) == RejectReason.malformed


def test_a_key_outside_its_window_is_not_valid_now() -> None:
    raw = orjson.dumps(make(signer=OLD, holder="phys-old"))
    assert reason_of(raw) == RejectReason.signer_not_valid_now
    # ...but judged at its own time (an auditor, at the time the log accepted it) it verifies.
    early = NOW - timedelta(hours=2)
    cmd = check(orjson.dumps(make(signer=OLD, holder="phys-old", now=early)), now=early)
    assert cmd.signer == "phys-old"


def test_role_not_allowed() -> None:
    raw = orjson.dumps(make(signer=OPER, holder="op-bob"))
    assert reason_of(raw) == RejectReason.role_not_allowed
    # The operator may send an acknowledgement.
    assert check(orjson.dumps(make("ack", signer=OPER, holder="op-bob"))).kind == "ack"


def test_unsigned_forged_and_tampered_are_bad_signatures() -> None:
    obj = make()
    assert reason_of(orjson.dumps({**obj, "sig": ""})) == RejectReason.bad_signature
    assert reason_of(orjson.dumps({**obj, "sig": "%%%"})) == RejectReason.bad_signature
    assert reason_of(resign(obj, STRANGER)) == RejectReason.bad_signature
    tampered = {**obj, "body": {"plan": "P-1", "dose_gy": 25.0}}
    assert reason_of(orjson.dumps(tampered)) == RejectReason.bad_signature


def test_the_signature_covers_the_canonical_form_not_the_bytes() -> None:
    obj = make()
    spaced = orjson.dumps(obj, option=orjson.OPT_INDENT_2)  # same object, other bytes
    assert check(spaced).nonce == obj["nonce"]


def test_expired_and_not_yet_valid_with_the_skew() -> None:
    raw = orjson.dumps(make(ttl_s=60))
    assert check(raw, now=NOW + timedelta(seconds=119)).kind == "prescription"
    assert reason_of(raw, now=NOW + timedelta(seconds=121)) == RejectReason.expired
    future = orjson.dumps(make(now=NOW + timedelta(seconds=61)))
    assert reason_of(future) == RejectReason.not_yet_valid
    assert check(orjson.dumps(make(now=NOW + timedelta(seconds=59)))).kind == "prescription"


def test_replayed_once_the_nonce_is_booked_and_forgotten_after_expiry() -> None:
    seen = NonceBook(60)
    raw = orjson.dumps(make(ttl_s=60))
    cmd = check(raw, seen=seen)
    seen.add(cmd.nonce, cmd.expires_at)
    assert reason_of(raw, seen=seen) == RejectReason.replayed
    seen.prune(NOW + timedelta(seconds=119))
    assert len(seen) == 1
    seen.prune(NOW + timedelta(seconds=121))
    assert len(seen) == 0  # by then the command is refused as expired anyway


def test_checks_run_in_order_cheapest_first() -> None:
    # Expired, replayed and forged at once: the signature is judged before time and nonce.
    old = make(now=NOW - timedelta(hours=1), ttl_s=60)
    seen = NonceBook(60)
    seen.add(old["nonce"], NOW)
    assert reason_of(resign(old, STRANGER), seen=seen) == RejectReason.bad_signature
    assert reason_of(orjson.dumps(old), seen=seen) == RejectReason.expired
    # Wrong room with a bad signature: the room is judged first (no crypto for it).
    assert reason_of(orjson.dumps({**make(room="or-4"), "sig": ""})) == RejectReason.wrong_room


def test_sign_command_refuses_what_no_receiver_accepts() -> None:
    with pytest.raises(ValueError, match="ttl_s"):
        make(ttl_s=0)
    with pytest.raises(ValueError, match="kind"):
        make("Bad-Kind")
    with pytest.raises(ValueError, match="finite"):
        make(body={"x": float("nan")})


# ---- the keyring ---------------------------------------------------------------------


def test_keyring_hash_and_summary_have_no_keys() -> None:
    summary = RING.summary()
    assert len(summary["keyring_sha256"]) == 64
    assert summary["keys"][0] == {
        "holder": "phys-anna",
        "roles": ["physicist"],
        "valid_from": "2026-01-01T00:00:00Z",
        "valid_until": "2027-01-01T00:00:00Z",
    }
    assert PHYS.verifier.text.split("+", 2)[2] not in orjson.dumps(summary).decode()


def test_keyring_accepts_unquoted_toml_datetimes() -> None:
    text = keyring_text(("phys-anna", PHYS, ["viewer"], "X", "Y"))
    text = text.replace('"X"', "2026-01-01T00:00:00Z").replace('"Y"', "2027-01-01T00:00:00Z")
    ring = parse_keyring(text.encode(), Path("k.toml"))
    assert ring.entries[0].valid_at(NOW)


def test_keyring_names_every_problem_with_file_entry_and_key() -> None:
    good = keyring_text(("a", PHYS, ["physicist"], "2026-01-01T00:00:00Z", "2027-01-01T00:00:00Z"))
    bad = (
        good + '\n[[key]]\nholder = "b"\nname = "B"\nroles = ["surgeon"]\npublic_key = "nope"\n'
        'valid_from = "2026-01-01"\nvalid_until = "2025-01-01T00:00:00Z"\ncolour = 1\n'
        '\n[[key]]\nholder = "Bad Holder"\n'
    )
    with pytest.raises(KeyringError) as info:
        parse_keyring(bad.encode(), Path("/etc/iortd/keyring.toml"))
    problems = info.value.problems
    text = "\n".join(problems)
    assert all(p.startswith("/etc/iortd/keyring.toml: key[") for p in problems), text
    assert "key[1] (holder b): roles: unknown role(s) ['surgeon']" in text
    assert "key[1] (holder b): public_key:" in text
    assert "key[1] (holder b): valid_from: expected an RFC 3339 UTC time" in text
    assert "key[1] (holder b): unknown key 'colour'" in text
    assert "key[2]: holder: expected an id" in text
    assert "key[2]: missing key 'public_key'" in text


def test_keyring_not_toml() -> None:
    with pytest.raises(KeyringError, match=r"k\.toml: not valid TOML"):
        parse_keyring(b"[[key]\n", Path("k.toml"))


def test_keyring_refuses_a_key_under_another_holder_and_an_entry_that_is_no_table() -> None:
    # A mis-pasted .pub line would let its owner sign as the holder it was pasted under.
    text = keyring_text(
        ("phys-bob", PHYS, ["physicist"], "2026-01-01T00:00:00Z", "2027-01-01T00:00:00Z")
    )
    with pytest.raises(KeyringError) as info:
        parse_keyring(text.encode(), Path("k.toml"))
    assert "k.toml: key[0] (holder phys-bob): public_key: the key is named 'phys-anna'" in str(
        info.value
    )
    with pytest.raises(KeyringError) as info:
        parse_keyring(b"key = [1]\n", Path("k.toml"))
    assert "k.toml: key[0]: expected a [[key]] table" in str(info.value)
