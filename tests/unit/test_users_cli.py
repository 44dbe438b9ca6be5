"""``iort-users`` end to end in a temporary directory (users/cli.py): init, add, list,
passwd, disable, reset, check, keyring, with passwords through ``--password-fd``; the keyring
it writes loaded by auditlog/keyring.py and a command signed by an unlocked key accepted by
auditlog/command.check_command, refused after disable; a store edited behind its back named
by ``check``; and no password, hash, salt or private key in the record, the keyring or the
output. In-process at kdf.TEST_COST (passed explicitly); the console script runs once (no
terminal), and test_users.py times the real parameters."""

from __future__ import annotations

import base64
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import orjson
import pytest

from iortd.audit.cli import main as audit_main
from iortd.auditlog.command import (
    CommandRejected,
    NonceBook,
    RejectReason,
    check_command,
    sign_command,
)
from iortd.auditlog.keyring import load_keyring
from iortd.auditlog.note import generate_keypair
from iortd.users.api import unlock
from iortd.users.cli import main
from iortd.users.kdf import TEST_COST, Cost
from iortd.users.record import append_event
from iortd.users.store import load_store

PW_EVA = "violet harbour lantern 42"
PW_TEMP = "temporary but long enough"
PW_ANNA = "seven quiet birches by the lake"
PW_ANNA2 = "a second quiet passphrase here"
PW_TEMP2 = "another temporary passphrase"
ALL_PASSWORDS = (PW_EVA, PW_TEMP, PW_ANNA, PW_ANNA2, PW_TEMP2)


def run(
    capsys: pytest.CaptureFixture[str], d: Path, *args: str, passwords: tuple[str, ...] = ()
) -> tuple[int, str, str]:
    r, w = os.pipe()
    os.write(w, "".join(p + "\n" for p in passwords).encode())
    os.close(w)
    try:
        code = main([*args, "--dir", str(d), "--password-fd", str(r)], cost=TEST_COST)
    finally:
        os.close(r)
    out = capsys.readouterr()
    return code, out.out, out.err


def _ping(d: Path, password: str, now: datetime) -> bytes:
    signer = unlock(load_store(d), "phys-anna", password)
    env = sign_command(
        "ping", {}, signer=signer, holder="phys-anna", site="site-a", room="or-1", ttl_s=300,
        now=now,
    )  # fmt: skip
    return orjson.dumps(env)


def _judge(d: Path, raw: bytes, now: datetime) -> RejectReason | None:
    ring = load_keyring(d / "keyring.toml")
    try:
        check_command(raw, ring, site="site-a", room="or-1", now=now, skew_s=60, seen=NonceBook(60))
    except CommandRejected as exc:
        return exc.reason
    return None


def test_accounts_end_to_end(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    d = tmp_path / "users"
    said: list[str] = []

    def ok(*args: str, passwords: tuple[str, ...] = ()) -> str:
        code, out, err = run(capsys, d, *args, passwords=passwords)
        said.extend((out, err))
        assert code == 0, err
        return out

    ok("init", "admin-eva", "--name", "E. Admin", passwords=(PW_EVA,))
    add = ["add", "phys-anna", "--name", "A. Example, MPE", "--role", "physicist"]
    ok(*add, "--admin", "admin-eva", passwords=(PW_EVA, PW_TEMP))
    # a wrong admin password: refused, exit 1, nothing changed
    code, _, err = run(capsys, d, *add[:2], "--name", "X", "--role", "viewer", "--admin",
                       "admin-eva", passwords=("not the admin password",))  # fmt: skip
    assert code == 1
    assert "unknown user, wrong password, or account not active" in err
    # a short password: refused by the rules
    code, _, err = run(capsys, d, "passwd", "phys-anna", passwords=(PW_TEMP, "too-short"))
    assert (code, "at least 15 characters" in err) == (1, True)
    ok("passwd", "phys-anna", passwords=(PW_TEMP, PW_ANNA))
    listing = ok("list")
    assert "phys-anna\tA. Example, MPE\tphysicist\tactive" in listing
    assert "own, " in listing

    # the keyring is the daemon's: a command signed by the unlocked key is accepted
    now = datetime.now(UTC)
    assert _judge(d, _ping(d, PW_ANNA, now), now) is None
    # passwd keeps the key: the same identity before and after
    key_before = load_store(d).users["phys-anna"].keys[-1].public_key
    ok("passwd", "phys-anna", passwords=(PW_ANNA, PW_ANNA2))
    assert load_store(d).users["phys-anna"].keys[-1].public_key == key_before
    signed_before_disable = _ping(d, PW_ANNA2, now)
    her_key = unlock(load_store(d), "phys-anna", PW_ANNA2)  # as a session would hold it

    ok("disable", "phys-anna", "--reason", "left the department", "--admin", "admin-eva",
       passwords=(PW_EVA,))  # fmt: skip
    later = datetime.now(UTC) + timedelta(seconds=1)
    after = sign_command(
        "ping", {}, signer=her_key, holder="phys-anna", site="site-a", room="or-1", ttl_s=300,
        now=later,
    )  # fmt: skip
    assert _judge(d, orjson.dumps(after), later) is RejectReason.signer_not_valid_now
    code, _, err = run(capsys, d, "passwd", "phys-anna", passwords=(PW_ANNA2, PW_ANNA))
    assert code == 1  # a disabled account cannot even change its password
    # what she signed while enabled still verifies, judged at the time it was accepted
    assert _judge(d, signed_before_disable, now) is None

    ok("enable", "phys-anna", "--admin", "admin-eva", passwords=(PW_EVA,))
    ok("reset", "phys-anna", "--admin", "admin-eva", passwords=(PW_EVA, PW_TEMP2))
    ok("passwd", "phys-anna", passwords=(PW_TEMP2, PW_ANNA))
    store = load_store(d)
    keys = store.users["phys-anna"].keys
    assert len(keys) == 2 and keys[0].sealed is None and keys[0].retired_at  # noqa: PT018
    ring = load_keyring(d / "keyring.toml")
    anna = ring.of("phys-anna")
    assert {e.verifier.text for e in anna} == {keys[0].public_key, keys[1].public_key}
    # the old key stays in the keyring, its last window closed at the reset
    assert all(e.valid_until < datetime.now(UTC) for e in anna if e.verifier.text == key_before)
    # the old signature is still judged valid at its own time; a new one is by the new key
    assert _judge(d, signed_before_disable, now) is None
    ok("roles", "phys-anna", "--role", "physicist", "--role", "operator", "--admin",
       "admin-eva", passwords=(PW_EVA,))  # fmt: skip

    out = ok("check")
    assert out.startswith("OK: 2 user(s), 9 recorded change(s)")
    out = ok("keyring", "--out", str(tmp_path / "etc-keyring.toml"))
    assert (tmp_path / "etc-keyring.toml").read_bytes() == (d / "keyring.toml").read_bytes()
    assert load_keyring(tmp_path / "etc-keyring.toml").sha256 in out

    # the record verifies with iort-audit, like a room's log
    assert audit_main(["verify", str(d / "record")]) == 0
    said.append(capsys.readouterr().out)

    # no password, hash, salt or private key anywhere but the store
    _no_secrets(d, tmp_path / "etc-keyring.toml", said)


def _no_secrets(d: Path, keyring_copy: Path, said: list[str]) -> None:
    store = load_store(d)
    secrets: list[str] = list(ALL_PASSWORDS)
    for u in store.users.values():
        h = u.password_hash
        secrets += [h, h.split("$")[-1], h.split("$")[-2]]  # hash, its digest, its salt
        for k in u.keys:
            if k.sealed:
                secrets += [str(k.sealed[f]) for f in ("box", "salt", "nonce")]
    for who, pw in (("admin-eva", PW_EVA), ("phys-anna", PW_ANNA)):
        seed = unlock(store, who, pw).private_key.private_bytes_raw()
        secrets += [
            seed.hex(),
            base64.b64encode(seed).decode(),
            base64.b64encode(b"\x01" + seed).decode(),
        ]
    places = {p.name: p.read_text("utf-8", "replace") for p in (d / "record").iterdir()}
    places["keyring.toml"] = (d / "keyring.toml").read_text()
    places["copy"] = keyring_copy.read_text()
    places["output"] = "\n".join(said)
    for name, text in places.items():
        for s in secrets:
            assert s not in text, f"a secret ({s[:6]}…) in {name}"
    assert "PRIVATE+KEY" not in "".join(places.values())


def test_check_names_a_store_edited_behind_its_back(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    d = tmp_path / "users"
    assert run(capsys, d, "init", "admin-eva", "--name", "E. Admin", passwords=(PW_EVA,))[0] == 0
    doc = orjson.loads((d / "users.json").read_bytes())
    intruder = dict(doc["users"][0], holder="intruder", name="I. Ntruder")
    doc["users"].append(intruder)
    (d / "users.json").write_bytes(orjson.dumps(doc))
    code, out, _ = run(capsys, d, "check")
    assert code == 1
    assert "changed behind iort-users' back" in out
    # and no change is made on top of it
    code, _, err = run(capsys, d, "add", "op-tom", "--name", "T. Op", "--role", "operator",
                       "--admin", "admin-eva", passwords=(PW_EVA, PW_TEMP))  # fmt: skip
    assert code == 1
    assert "behind iort-users' back" in err


def test_check_names_a_forged_record_entry(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """Someone who can write the directory but has no admin's password adds a user: the
    chain is whole (the writer made it), the signature is not the admin's key."""
    d = tmp_path / "users"
    assert run(capsys, d, "init", "admin-eva", "--name", "E. Admin", passwords=(PW_EVA,))[0] == 0
    before = load_store(d).sha256
    forged = {"holder": "intruder", "name": "I. N.", "roles": ["admin"], "valid_until": None,
              "by": "admin-eva", "store_sha256_before": before, "store_sha256": before}  # fmt: skip
    append_event(d / "record", "account_created", forged, generate_keypair("admin-eva"))
    code, out, _ = run(capsys, d, "check")
    assert code == 1
    assert "the signature of 'admin-eva' does not verify" in out
    assert "account_created" in out  # the entry is named


def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, _, err = run(capsys, tmp_path / "missing", "list")
    assert code == 2
    assert "iort-users init" in err
    with pytest.raises(SystemExit) as info:
        main(["add", "Bad Holder", "--name", "x", "--role", "viewer", "--admin", "a", "--dir", "d"])
    assert info.value.code == 2
    code, _, err = run(capsys, tmp_path / "u", "init", "admin-eva", "--name", "E", passwords=())
    assert code == 2
    assert "--password-fd" in err


def test_the_console_script_hashes_at_the_real_parameters() -> None:
    """The installed ``iort-users`` calls ``main(argv)``: the cost is the default, and no
    flag, variable or file can lower it (test_users.py times one unlock at that cost; the
    console script itself runs in the no-terminal test below)."""
    import inspect  # noqa: PLC0415

    from iortd.users.kdf import DEFAULT_COST  # noqa: PLC0415

    assert inspect.signature(main).parameters["cost"].default is DEFAULT_COST
    assert Cost(time_cost=3, memory_kib=65536, parallelism=4) == DEFAULT_COST  # RFC 9106
    entry = Path(sys.executable).with_name("iort-users").read_text()
    assert "from iortd.users.cli import main" in entry


def test_keyring_out_refuses_a_store_edited_behind_its_back(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """Exporting would hand the daemon a user nobody recorded."""
    d = tmp_path / "users"
    assert run(capsys, d, "init", "admin-eva", "--name", "E. Admin", passwords=(PW_EVA,))[0] == 0
    doc = orjson.loads((d / "users.json").read_bytes())
    doc["users"][0]["roles"] = ["admin", "physicist"]
    (d / "users.json").write_bytes(orjson.dumps(doc))
    out_path = tmp_path / "keyring.toml"
    code, _, err = run(capsys, d, "keyring", "--out", str(out_path))
    assert code == 1
    assert "behind iort-users' back" in err
    assert not out_path.exists()
    code, _, err = run(capsys, d, "list")
    assert code == 0
    assert "warning: the store does not check" in err


def test_valid_until_in_the_past_is_refused(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    d = tmp_path / "users"
    assert run(capsys, d, "init", "admin-eva", "--name", "E. Admin", passwords=(PW_EVA,))[0] == 0
    code, _, err = run(capsys, d, "add", "op-tom", "--name", "T. Op", "--role", "operator",
                       "--valid-until", "2020-01-01T00:00:00Z", "--admin", "admin-eva",
                       passwords=(PW_EVA, PW_TEMP))  # fmt: skip
    assert code == 2
    assert "--valid-until" in err
    assert "op-tom" not in load_store(d).users


def test_without_a_terminal_or_password_fd_it_refuses_to_read_a_password(tmp_path: Path) -> None:
    """No terminal (a cron job, a pipe): never fall back to reading a password with echo."""
    exe = Path(sys.executable).with_name("iort-users")
    proc = subprocess.run(
        [str(exe), "init", "admin-eva", "--name", "E. Admin", "--dir", str(tmp_path / "u")],
        input=f"{PW_EVA}\n", capture_output=True, text=True, timeout=60, check=False,
        start_new_session=True,  # no controlling terminal
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert "--password-fd" in proc.stderr
    assert PW_EVA not in proc.stdout + proc.stderr


def test_a_keyring_edited_by_hand_is_named_and_rewritten_at_the_next_change(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """Also the state a crash after the store's rename and before the keyring leaves."""
    d = tmp_path / "users"
    assert run(capsys, d, "init", "admin-eva", "--name", "E. Admin", passwords=(PW_EVA,))[0] == 0
    good = (d / "keyring.toml").read_bytes()
    (d / "keyring.toml").write_bytes(good.replace(b'"admin"', b'"admin", "physicist"'))
    code, out, _ = run(capsys, d, "check")
    assert code == 1
    assert "keyring.toml: not the keyring the store gives" in out
    code, _, err = run(capsys, d, "disable", "nobody", "--reason", "x", "--admin", "admin-eva",
                       passwords=(PW_EVA,))  # fmt: skip
    assert code == 1  # no such user; but the session started and repaired the keyring
    assert "no user 'nobody'" in err
    assert (d / "keyring.toml").read_bytes() == good


def test_a_reason_that_is_not_one_printable_line_is_a_usage_error(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    with pytest.raises(SystemExit) as info:
        main(["disable", "x", "--reason", "two\nlines", "--admin", "a", "--dir", str(tmp_path)])
    assert info.value.code == 2
    assert "--reason: one line of 1-200 printable characters" in capsys.readouterr().err
