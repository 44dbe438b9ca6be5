"""The account store's parts (users/kdf.py, store.py, api.py, keyring.py, record.py): the
password rules, the argon2id hash, the sealed key (a wrong password, a blob moved to another
holder or key version, a tampered blob all fail), the unlock API's single error, and the
record's signatures. Low argon2 cost (kdf.TEST_COST, passed explicitly) except in the one
test that measures the real parameters."""

from __future__ import annotations

import copy
import time
from pathlib import Path

import pytest

from iortd.auditlog.note import generate_keypair
from iortd.users import kdf
from iortd.users.api import AuthError, PasswordChangeRequired, unlock, verify_password
from iortd.users.changes import Refused, open_session
from iortd.users.kdf import (
    DEFAULT_COST,
    TEST_COST,
    SealError,
    hash_cost,
    hash_password,
    open_seed,
    password_problem,
    seal_seed,
    verify_hash,
)
from iortd.users.keyring import keyring_bytes
from iortd.users.record import check_record
from iortd.users.store import RECORD_DIR, StoreError, load_store

PW_ADMIN = "violet harbour lantern 42"
PW_ANNA = "seven quiet birches by the lake"
PW_TEMP = "temporary-but-long-enough-1"


def test_password_rules_follow_nist_800_63b() -> None:
    assert password_problem("short-one", holder="anna", name="A") is not None  # < 15
    assert "too short" in str(password_problem("a" * 14, holder="anna", name="A"))
    assert password_problem("aaaaaaaaaaaaaaaaaaa", holder="anna", name="A") is not None
    assert password_problem("passwordpassword", holder="anna", name="A") is not None
    assert password_problem("phys-anna-phys-anna", holder="phys-anna", name="A") is not None
    assert password_problem("x" * 257 + "abcde", holder="anna", name="A") is not None
    assert password_problem("line\nbreak in a password", holder="anna", name="A") is not None
    # no composition rules: a long lower-case passphrase is fine
    assert password_problem(PW_ANNA, holder="phys-anna", name="A. Example, MPE") is None


def test_hash_is_argon2id_with_its_parameters_and_nfkc() -> None:
    h = hash_password("ﬁne passphrase for tests", TEST_COST)  # U+FB01 ligature
    assert h.startswith("$argon2id$v=19$m=64,t=1,p=1$")
    assert hash_cost(h) == TEST_COST
    assert verify_hash(h, "fine passphrase for tests")  # NFKC: one password, two keyboards
    assert not verify_hash(h, "fine passphrase for test")
    assert not verify_hash("not a hash", "fine passphrase for tests")


def _sealed() -> tuple[dict[str, object], bytes, str]:
    signer = generate_keypair("phys-anna")
    seed = signer.private_key.private_bytes_raw()
    pub = signer.verifier.text
    box = seal_seed(seed, PW_ANNA, holder="phys-anna", version=1, public_key=pub, cost=TEST_COST)
    return box, seed, pub


def test_sealed_key_opens_only_for_its_password_holder_and_version() -> None:
    box, seed, pub = _sealed()
    assert seed.hex() not in str(box)
    assert open_seed(box, PW_ANNA, holder="phys-anna", version=1, public_key=pub) == seed
    with pytest.raises(SealError):
        open_seed(box, "wrong password entirely", holder="phys-anna", version=1, public_key=pub)
    with pytest.raises(SealError):  # moved to another holder
        open_seed(box, PW_ANNA, holder="phys-bert", version=1, public_key=pub)
    with pytest.raises(SealError):  # moved to another key version
        open_seed(box, PW_ANNA, holder="phys-anna", version=2, public_key=pub)
    other = generate_keypair("phys-anna").verifier.text
    with pytest.raises(SealError):  # beside another public key
        open_seed(box, PW_ANNA, holder="phys-anna", version=1, public_key=other)
    for field in ("box", "salt", "nonce"):
        bad = copy.deepcopy(box)
        raw = str(bad[field])
        bad[field] = ("B" if raw[0] != "B" else "C") + raw[1:]
        with pytest.raises(SealError):
            open_seed(bad, PW_ANNA, holder="phys-anna", version=1, public_key=pub)
    with pytest.raises(SealError):  # parameters edited: another key is derived
        open_seed({**box, "t": 2}, PW_ANNA, holder="phys-anna", version=1, public_key=pub)
    with pytest.raises(SealError):
        open_seed({**box, "box": "%%"}, PW_ANNA, holder="phys-anna", version=1, public_key=pub)


def _store_with_anna(tmp_path: Path) -> Path:
    d = tmp_path / "users"
    s = open_session(d, cost=TEST_COST, create=True)
    try:
        s.init("admin-eva", "E. Admin", set(), PW_ADMIN)
        admin = s.admin("admin-eva", PW_ADMIN)
        s.add(admin, "phys-anna", "A. Example, MPE", {"physicist"}, None, PW_TEMP)
    finally:
        s.close()
    s = open_session(d, cost=TEST_COST)
    try:
        assert s.passwd("phys-anna", PW_TEMP, PW_ANNA)  # her own password: her key made now
    finally:
        s.close()
    return d


def test_unlock_gives_the_key_and_one_error_for_every_failure(tmp_path: Path) -> None:
    d = _store_with_anna(tmp_path)
    store = load_store(d)
    signer = unlock(store, "phys-anna", PW_ANNA)
    assert signer.name == "phys-anna"
    assert signer.verifier.text == store.users["phys-anna"].keys[-1].public_key
    messages = set()
    for holder, pw in (("phys-anna", "wrong password for anna"), ("nobody", PW_ANNA)):
        with pytest.raises(AuthError) as info:
            unlock(store, holder, pw)
        messages.add(str(info.value))
    assert verify_password(store, "phys-anna", PW_ANNA).holder == "phys-anna"
    s = open_session(d, cost=TEST_COST)
    try:
        s.set_state(s.admin("admin-eva", PW_ADMIN), "phys-anna", enable=False, reason="left")
    finally:
        s.close()
    with pytest.raises(AuthError) as info:  # disabled: the same error as a wrong password
        unlock(load_store(d), "phys-anna", PW_ANNA)
    messages.add(str(info.value))
    assert len(messages) == 1


def test_a_temporary_password_unlocks_no_key(tmp_path: Path) -> None:
    d = tmp_path / "users"
    s = open_session(d, cost=TEST_COST, create=True)
    try:
        s.init("admin-eva", "E. Admin", set(), PW_ADMIN)
        s.add(s.admin("admin-eva", PW_ADMIN), "op-tom", "T. Op", {"operator"}, None, PW_TEMP)
    finally:
        s.close()
    store = load_store(d)
    with pytest.raises(PasswordChangeRequired):
        unlock(store, "op-tom", PW_TEMP)
    assert keyring_bytes(store)[1].of("op-tom") == ()  # no key in the keyring either


def test_unknown_holder_costs_an_argon2_verification(tmp_path: Path) -> None:
    """No shortcut for an unknown holder: it verifies a dummy hash at the default cost."""
    d = _store_with_anna(tmp_path)
    store = load_store(d)
    t0 = time.perf_counter()
    with pytest.raises(AuthError):
        verify_password(store, "nobody", "whatever it may be")
    assert time.perf_counter() - t0 > 0.02  # argon2id at 64 MiB; a dict miss is ~1 µs


def test_unlock_at_the_real_parameters(tmp_path: Path) -> None:
    """The one test at DEFAULT_COST (RFC 9106's second recommendation): prints the time."""
    signer = generate_keypair("phys-real")
    pub = signer.verifier.text
    seed = signer.private_key.private_bytes_raw()
    t0 = time.perf_counter()
    h = hash_password(PW_ANNA, DEFAULT_COST)
    box = seal_seed(seed, PW_ANNA, holder="phys-real", version=1, public_key=pub, cost=DEFAULT_COST)
    t1 = time.perf_counter()
    assert verify_hash(h, PW_ANNA)
    assert open_seed(box, PW_ANNA, holder="phys-real", version=1, public_key=pub) == seed
    t2 = time.perf_counter()
    assert h.startswith("$argon2id$v=19$m=65536,t=3,p=4$")
    print(f"argon2id RFC 9106 (m=64 MiB, t=3, p=4): create {t1 - t0:.2f} s, unlock {t2 - t1:.2f} s")  # noqa: T201


def test_store_file_and_directory_are_private(tmp_path: Path) -> None:
    d = _store_with_anna(tmp_path)
    assert (d.stat().st_mode & 0o777) == 0o700
    assert ((d / "users.json").stat().st_mode & 0o777) == 0o600
    (d / "users.json").chmod(0o644)
    with pytest.raises(StoreError, match="chmod 600"):
        load_store(d)
    (d / "users.json").chmod(0o600)
    d.chmod(0o750)
    with pytest.raises(StoreError, match="chmod 700"):
        load_store(d)


def test_record_replays_and_names_a_forged_entry(tmp_path: Path) -> None:
    d = _store_with_anna(tmp_path)
    state = check_record(d / RECORD_DIR)
    assert state.problems == []
    assert state.changes == 3  # init, add, passwd
    assert state.store_sha256 == load_store(d).sha256


def test_a_change_interrupted_before_its_record_is_discarded(tmp_path: Path) -> None:
    d = _store_with_anna(tmp_path)
    before = (d / "users.json").read_bytes()
    (d / "users.json.pending").write_bytes(b"{}")
    (d / "users.json.pending").chmod(0o600)
    s = open_session(d, cost=TEST_COST)
    try:
        assert s.notes == ["a change interrupted before it was recorded was discarded"]
    finally:
        s.close()
    assert (d / "users.json").read_bytes() == before
    assert not (d / "users.json.pending").exists()


def test_a_change_recorded_before_a_crash_is_completed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    d = _store_with_anna(tmp_path)
    from iortd.users import changes  # noqa: PLC0415

    def crash(directory: Path) -> None:
        raise SystemExit("killed between the record and the rename")

    monkeypatch.setattr(changes, "install_pending", crash)
    s = open_session(d, cost=TEST_COST)
    with pytest.raises(SystemExit):
        s.set_state(s.admin("admin-eva", PW_ADMIN), "phys-anna", enable=False, reason="left")
    s.close()
    monkeypatch.undo()
    s = open_session(d, cost=TEST_COST)
    try:
        assert s.notes == ["a change recorded before an interruption was completed"]
        assert s.store.users["phys-anna"].state == "disabled"
    finally:
        s.close()


def test_the_last_admin_cannot_be_disabled(tmp_path: Path) -> None:
    d = _store_with_anna(tmp_path)
    s = open_session(d, cost=TEST_COST)
    try:
        with pytest.raises(Refused, match="last active admin"):
            s.set_state(s.admin("admin-eva", PW_ADMIN), "admin-eva", enable=False, reason="x")
        with pytest.raises(Refused, match="not an admin"):
            s.admin("phys-anna", PW_ANNA)
    finally:
        s.close()


def test_test_cost_is_not_the_default() -> None:
    assert kdf.DEFAULT_COST.at_least(kdf.MIN_COST)
    assert not kdf.TEST_COST.at_least(kdf.MIN_COST)


def test_load_checked_store_refuses_an_unrecorded_user(tmp_path: Path) -> None:
    """What the dashboard's login loads: a user added by hand cannot log in."""
    import orjson  # noqa: PLC0415

    from iortd.users import load_checked_store  # noqa: PLC0415

    d = _store_with_anna(tmp_path)
    assert set(load_checked_store(d).users) == {"admin-eva", "phys-anna"}
    doc = orjson.loads((d / "users.json").read_bytes())
    doc["users"].append(dict(doc["users"][1], holder="intruder"))
    (d / "users.json").write_bytes(orjson.dumps(doc))
    with pytest.raises(StoreError, match="behind iort-users' back"):
        load_checked_store(d)


async def test_a_change_can_be_recorded_from_a_running_event_loop(tmp_path: Path) -> None:
    """The dashboard (item 2) runs in an event loop: the record has an async door."""
    import asyncio  # noqa: PLC0415

    from iortd.users.record import append_event_async  # noqa: PLC0415

    d = await asyncio.to_thread(_store_with_anna, tmp_path)  # the CLI's path runs its own loop
    before = load_store(d).sha256
    data = {"holder": "phys-anna", "reason": "test", "by": "admin-eva",
            "store_sha256_before": before, "store_sha256": before}  # fmt: skip
    signer = unlock(load_store(d), "admin-eva", PW_ADMIN)
    await append_event_async(d / RECORD_DIR, "account_disabled", data, signer)
    assert check_record(d / RECORD_DIR).changes == 4


def test_record_refuses_a_change_by_an_admin_whose_account_had_ended(tmp_path: Path) -> None:
    """The replay judges an admin by the account's end too, not only by disable."""
    from datetime import UTC, datetime, timedelta  # noqa: PLC0415

    from iortd.users.record import append_event  # noqa: PLC0415

    d = _store_with_anna(tmp_path)
    then = datetime.now(UTC) - timedelta(hours=1)
    ended = (then + timedelta(minutes=30)).isoformat().replace("+00:00", "Z")
    s = open_session(d, cost=TEST_COST, now=then)
    try:
        admin = s.admin("admin-eva", PW_ADMIN)
        s.add(admin, "admin-kai", "K. Admin", {"admin"}, ended, PW_TEMP)
        s.passwd("admin-kai", PW_TEMP, PW_ANNA)
        kai = unlock(s.store, "admin-kai", PW_ANNA, now=then)
    finally:
        s.close()
    assert check_record(d / RECORD_DIR).problems == []
    sha = load_store(d).sha256
    data = {"holder": "phys-anna", "reason": "late", "by": "admin-kai",
            "store_sha256_before": sha, "store_sha256": sha}  # fmt: skip
    append_event(d / RECORD_DIR, "account_disabled", data, kai)
    problems = check_record(d / RECORD_DIR).problems
    assert any("not an active admin" in p for p in problems), problems
