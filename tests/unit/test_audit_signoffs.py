"""``iort-audit verify`` checks every ``delivery_signed`` entry (audit/signoffs.py): a valid
one passes with ``--keyring``; without a keyring it is a warning, never a pass; an edited
entry, a sign-off moved to another delivery, a key not enrolled and a key without the
physicist role each fail (exit 1), naming the sign-off entry."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import orjson
import pytest
from signofflog import D1, D2, body, deliveries, open_room, ring_text

from iortd.audit.cli import main
from iortd.auditlog.signoff import delivery_record
from iortd.auditlog.writer import segment_paths


async def _signed_log(directory: Path, *, moved: bool = False, twice: bool = False) -> int:
    """A log where phys-anna signed D1 as approved; ``moved``: then the same signed entry
    (envelope and all) recorded again, re-aimed at D2, as a forger with the log's key would
    write it. Returns the seq of the last sign-off."""
    r = await open_room(directory)
    try:
        await deliveries(r.audit)
        await r.audit.checkpoint("delivery_end")  # D2 covered too
        got = await r.send(body(r))
        assert got["type"] == "delivery_signed"
        seq = int(got["seq"])
        if moved or twice:
            data: dict[str, Any] = copy.deepcopy(got["data"])
            if moved:
                data["delivery_id"] = data["envelope"]["body"]["delivery_id"] = D2
            e = r.audit.append("delivery_signed", data, durable=True)
            await e.committed
            seq = e.seq
        await r.audit.checkpoint("shutdown")
    finally:
        await r.audit.close()
        await r.task
    return seq


def _verify(
    log: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], ring: str | None
) -> tuple[int, str, str]:
    argv = ["verify", str(log)]
    if ring is not None:
        (tmp_path / "keyring.toml").write_text(ring)
        argv += ["--keyring", str(tmp_path / "keyring.toml")]
    rc = main(argv)
    out = capsys.readouterr()
    return rc, out.out, out.err


async def test_a_valid_sign_off_verifies_with_the_keyring(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    log = tmp_path / "log"
    await _signed_log(log)
    rc, out, err = _verify(log, tmp_path, capsys, ring_text())
    assert rc == 0, out
    assert "1 sign-off: 1 signature(s) valid against the keyring" in out
    rc, out, err = _verify(log, tmp_path, capsys, None)
    assert rc == 0
    assert "warning: sign-offs not checked: no keyring" in err
    assert "signatures NOT checked" in out


@pytest.mark.parametrize(
    ("ring", "said"),
    [
        (ring_text(without="phys-anna"), "signature not valid (not_enrolled)"),
        (ring_text('["operator"]'), "signature not valid (not_physicist)"),
    ],
)
async def test_a_key_not_enrolled_or_not_a_physicist_fails(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], ring: str, said: str
) -> None:
    log = tmp_path / "log"
    seq = await _signed_log(log)
    rc, out, _ = _verify(log, tmp_path, capsys, ring)
    assert rc == 1
    assert f"SIGN-OFF NOT VALID: seq {seq}: delivery_signed (delivery {D1}): {said}" in out


async def test_a_sign_off_moved_to_another_delivery_fails(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    log = tmp_path / "log"
    seq = await _signed_log(log, moved=True)
    rc, out, _ = _verify(log, tmp_path, capsys, ring_text())
    assert rc == 1, out
    assert "INTACT" in out  # the chain holds: only the sign-off check sees it
    assert (
        f"SIGN-OFF NOT VALID: seq {seq}: delivery_signed (delivery {D2}): the signed record "
        f"is not delivery {D2}'s" in out
    )
    assert out.count("SIGN-OFF NOT VALID") == 1  # the genuine one still verifies


async def test_the_same_signed_command_recorded_twice_fails(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A copy of a genuine sign-off entry (by someone with the log's key): one signature,
    one act; the second entry is named."""
    log = tmp_path / "log"
    seq = await _signed_log(log, twice=True)
    rc, out, _ = _verify(log, tmp_path, capsys, ring_text())
    assert rc == 1, out
    assert f"SIGN-OFF NOT VALID: seq {seq}: delivery_signed (delivery {D1}): the same signed" in out
    assert out.count("SIGN-OFF NOT VALID") == 1


async def test_an_edited_sign_off_breaks_the_chain_and_is_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    log = tmp_path / "log"
    seq = await _signed_log(log)
    [path] = segment_paths(log)
    raw = path.read_bytes()
    lines = raw.splitlines(keepends=True)
    i = next(n for n, line in enumerate(lines) if b'"type":"delivery_signed"' in line)
    e = orjson.loads(lines[i])
    e["data"]["meaning"] = "reviewed"  # the signed envelope still says approved
    lines[i] = orjson.dumps(e, option=orjson.OPT_SORT_KEYS) + b"\n"
    path.write_bytes(b"".join(lines))
    rc, out, _ = _verify(log, tmp_path, capsys, ring_text())
    assert rc == 1
    assert "NOT INTACT" in out
    assert (
        f"SIGN-OFF NOT VALID: seq {seq}: delivery_signed (delivery {D1}): its meaning is not "
        "what the signed envelope says" in out
    )


def test_the_range_ignores_what_comes_after_the_sign_off() -> None:
    """An amendment after a sign-off moves the delivery's last entry on: the sign-off is
    judged on the range before it, so it still says what it covered."""
    es = [
        {"seq": 0, "type": "delivery_started", "delivery_id": D1, "hash": "00" * 32},
        {"seq": 1, "type": "delivery_terminated", "delivery_id": D1, "hash": "01" * 32},
        {"seq": 2, "type": "delivery_amended", "delivery_id": D1, "hash": "02" * 32},
    ]
    before = delivery_record(es, D1, before_seq=2)
    assert before is not None
    assert before.last_seq == 1


async def test_the_report_shows_each_sign_off_and_valid_only_when_checked(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    log = tmp_path / "log"
    await _signed_log(log)
    (tmp_path / "keyring.toml").write_text(ring_text())
    out = tmp_path / "r.html"
    argv = ["report", str(log), "--delivery", D1, "--out", str(out)]
    assert main([*argv, "--keyring", str(tmp_path / "keyring.toml")]) == 0
    page = out.read_text()
    assert "Electronic sign-off" in page
    assert "A. Example, MPE" in page
    assert "phys-anna" in page
    assert ">approved<" in page
    assert "(UTC+01:00, signing station)" in page
    assert "valid (checked against the keyring)" in page
    assert "Reviewed by (medical physicist)" not in page  # no paper box beside it
    assert main(argv) == 0
    page = out.read_text()
    assert "not checked (no --keyring)" in page
    assert "valid (checked" not in page
    capsys.readouterr()
