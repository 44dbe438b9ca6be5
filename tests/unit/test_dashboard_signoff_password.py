"""The password checked again at a sign-off is bounded as the login's is (review finding 7):
one check per session at a time (parallel requests are not all judged before the failures
count), within the login's ``UNLOCK_SLOTS`` (each check is a 64 MiB argon2id hash), and a
session ended by the third wrong one is in the access record (``session_ended``)."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import orjson
import pytest
import test_dashboard_signoff
from test_dashboard_login import PW_ANNA
from test_dashboard_signoff import Rig, physicist, sign

from iortd.auditlog.verify import collect_files, iter_entries
from iortd.dashboard import login as login_mod
from iortd.dashboard import signoff as signoff_mod
from iortd.users import verify_password
from iortd.users.access import ACCESS_DIR

rig = test_dashboard_signoff.rig  # the fixture: the dashboard's app, hub and store
TIMEOUT_S = 5.0
WRONG = "not my password at all"


async def test_parallel_requests_of_one_session_are_judged_one_at_a_time(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    b = await physicist(rig)
    started, release = threading.Event(), threading.Event()
    calls: list[str] = []

    def slow(store: Any, holder: str, password: str) -> None:
        calls.append(holder)
        started.set()
        release.wait(TIMEOUT_S)
        verify_password(store, holder, password)

    monkeypatch.setattr(signoff_mod, "verify_password", slow)
    tasks = [asyncio.create_task(sign(b, holder="phys-anna", password=WRONG)) for _ in range(5)]
    try:
        async with asyncio.timeout(TIMEOUT_S):
            await asyncio.to_thread(started.wait, TIMEOUT_S)
        # The others are answered while the first is being judged, not judged with it.
        async with asyncio.timeout(TIMEOUT_S):
            while sum(t.done() for t in tasks) < 4:
                await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
                assert len(calls) == 1, "a second password check of the session ran at once"
    finally:
        release.set()
        got = await asyncio.gather(*tasks)
    assert sorted(status for status, _ in got) == [401, 429, 429, 429, 429]
    assert calls == ["phys-anna"]


async def test_the_check_waits_for_a_slot_of_the_logins(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(signoff_mod, "PASSWORD_WAIT_S", 0.2)
    b = await physicist(rig)
    held = 0
    try:
        for _ in range(login_mod.UNLOCK_SLOTS):  # every slot taken by logins being judged
            await rig.auth._slots.acquire()
            held += 1
        status, body = await sign(b, holder="phys-anna", password=PW_ANNA)
        assert status == 503, body
        assert "busy" in body["error"]
    finally:
        for _ in range(held):
            rig.auth._slots.release()
    assert rig.sent == []


async def test_the_third_wrong_password_ends_the_session_on_the_record(rig: Rig) -> None:
    b = await physicist(rig)
    for _ in range(3):
        status, body = await sign(b, holder="phys-anna", password=WRONG)
        assert status == 401
    assert "session has ended" in body["error"]
    files = collect_files([rig.users / ACCESS_DIR])
    ended = [
        e["data"]
        for _, _, line in iter_entries(files)
        if (e := orjson.loads(line))["type"] == "session_ended"
    ]
    assert [(d["holder"], d["reason"]) for d in ended] == [("phys-anna", "signoff_password_failed")]
