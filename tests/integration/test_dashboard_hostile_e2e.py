"""Hostile MQTT input against the real dashboard (issue 13), through a real Mosquitto:

* in headless Chromium: wrong types, NaN, huge numbers, negative and huge ``seq``, a 10 MB
  payload, unknown topics, deep nesting and forged or broken ``delivery.verification``
  objects (wrong types and an extra key, a 10 kB reason list, a VERIFIED listing a failed
  item) are published into one room while two others
  go on publishing; every other room keeps updating within its bound, the attacked room
  shows what its daemon published (not the forged "all clear", and its NOT VERIFIED, not
  a forged VERIFIED), its rejects are shown,
  a room whose daemon stops is STALE although garbage keeps arriving for it, then AGED OUT
  and removed; 64 fake retained rooms of another site keep no real room out (sites are
  listed, rooms paged) and age out too; the page reports no error; the server's own
  snapshot says the same;
* the Mosquitto ACL example (config/mosquitto/acl.example), used verbatim: a rogue client
  (the dashboard's read-only user, another room's daemon) that publishes into a room's
  topics is refused by the broker, and nothing of it reaches the dashboard.

The genuine rooms are published by this test (valid v1 payloads, as a daemon sends
them), so that what each room *should* show is known exactly. No sleeps: every wait is
bounded and says what it waited for.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import time
import urllib.request
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiomqtt
import orjson
import pytest
from dashproc import Dashboard, Recorder, chromium, shot
from playwright.async_api import expect

from iortd.daemon.mqtt.broker import BrokerOptions, Mosquitto
from iortd.kernel.types import Interlock

pytestmark = [pytest.mark.integration]

ROOT = Path(__file__).resolve().parents[2]
ACL_EXAMPLE = ROOT / "config" / "mosquitto" / "acl.example"
SITE = "hospital-b"
STALE_AFTER_S = 2.0
AGE_OUT_S = 6.0  # long enough for the paging checks on a loaded machine
U64_MAX = 2**64 - 1
IL_NAMES = tuple(str(il) for il in Interlock)  # the published interlock names


def ts() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S.000000Z", time.gmtime())


def env(seq: int, **data: Any) -> dict[str, Any]:
    return {
        "schema": "iort/v1",
        "session": 3,
        "seq": seq,
        "ts": ts(),
        "sim": True,
        "historical": False,
        **data,
    }


def status(site: str, room: str, seq: int = 0) -> dict[str, Any]:
    return env(seq, online=True, software_version="0.1.0", site=site, room=room)


def interlocks(seq: int, *tripped: str) -> dict[str, Any]:
    states = {k: ("tripped" if k in tripped else "ok") for k in IL_NAMES}
    return env(seq, interlocks=states, all_clear=not tripped)


def telemetry(seq: int, dose: float) -> dict[str, Any]:
    return env(
        seq,
        device="source",
        at=ts(),
        state="IRRADIATING",
        phase="IRRADIATING",
        delivery_id="or-1-20261126T100000000000Z",
        dose_rate_gy_min=0.8,
        dose_primary_gy=dose,
        dose_secondary_gy=dose,
        preset_gy=20.0,
        remaining_gy=20.0 - dose,
        beam_on_s=seq / 10,
        elapsed_s=seq / 10,
        estimated_remaining_s=100.0,
        kv=50.0,
        ua=40.0,
    )


def verification(outcome: object, reasons: object) -> dict[str, Any]:
    return {
        "outcome": outcome,
        "at": ts(),
        "trigger": "ready",
        "reasons": reasons,
        "overridden": [],
        "prescription_sha256": "ab" * 32,
        "treatment_id": "T-0042",
        "plan_id": "P-0042-1",
        "prescribed_dose_gy": 20.0,
        "applicator_code": "SPH40",
        "expected_time_s": 1380.0,
        "planned_time_s": 1380.0,
        "preset_gy": 25.0,
    }


def delivery(seq: int, v: dict[str, Any]) -> dict[str, Any]:
    """The room's retained ``delivery`` while the beam is on, with its ``verification``."""
    return env(
        seq,
        delivery={
            "delivery_id": "or-1-20261126T100000000000Z",
            "phase": "IRRADIATING",
            "joined_in_progress": False,
            "preset_gy": 25.0,
            "delivered_primary_gy": 1.0,
            "delivered_secondary_gy": 1.0,
            "remaining_gy": 24.0,
            "expected_rate_gy_min": 0.8,
            "planned_time_s": 1380.0,
            "backup_timer_limit_s": 1518.0,
            "beam_on_s": 75.0,
            "elapsed_s": 80.0,
            "applicator": {"type": "spherical", "diameter_mm": 40.0, "serial": "APL-40-0042"},
            "segments": [],
            "interruptions": [],
            "gaps": [],
            "termination": None,
            "termination_reason": None,
            "started": ts(),
            "simulated": True,
            "dose_rate_gy_min": 0.8,
            "estimated_remaining_s": 1305.0,
            "verification": v,
        },
    )


def topic(room: str, name: str, site: str = SITE) -> str:
    return f"iort/v1/{site}/{room}/{name}"


@asynccontextmanager
async def client(port: int, name: str, **kw: Any) -> AsyncIterator[aiomqtt.Client]:
    c = aiomqtt.Client(
        "127.0.0.1",
        port,
        identifier=f"{name}-{uuid.uuid4().hex[:8]}",
        protocol=aiomqtt.ProtocolVersion.V5,
        timeout=10,
        **kw,
    )
    async with c:
        yield c


def snapshot(dash: Dashboard, query: str = "") -> dict[str, Any]:
    with urllib.request.urlopen(dash.url + "api/snapshot" + query, timeout=5) as r:  # noqa: S310 - our own http URL
        data: dict[str, Any] = json.loads(r.read())
    return data


async def until(what: str, check: Any, within_s: float) -> Any:
    """Poll ``check`` (a blocking call, run in a thread) every 100 ms until it returns
    something true; fail naming ``what`` after ``within_s``."""
    deadline = time.monotonic() + within_s
    while not (last := await asyncio.to_thread(check)):
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {within_s} s (last: {last!r})")
        await asyncio.sleep(0.1)  # polling another process: its HTTP API
    return last


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Mosquitto]:
    with Mosquitto(BrokerOptions(), tmp_path / "broker") as b:
        yield b


def hostile_cases() -> list[tuple[str, bytes]]:
    """(topic, payload) published into room or-2 by a client with publish rights."""
    il = topic("or-2", "interlocks")
    tel = topic("or-2", "telemetry")
    dl = topic("or-2", "delivery")
    ok_tel = orjson.dumps(telemetry(50, 1.0))
    forged = {**verification("VERIFIED", []), "outcome": True, "note": "trust me"}
    return [
        # a forged verification over the room's NOT VERIFIED one: wrong types and an extra
        # key; a 10 kB reason list; a VERIFIED that lists a failed item (inconsistent)
        (dl, orjson.dumps(delivery(60, forged))),
        (dl, orjson.dumps(delivery(61, verification("NOT_VERIFIED", ["dose"] * 2000)))),
        (dl, orjson.dumps(delivery(62, verification("VERIFIED", ["dose"])))),
        # the forged "all clear" in the room's own session, with the highest seq there is
        (il, orjson.dumps(interlocks(U64_MAX))),
        # wrong types: the two messages that froze the overview on f27b8b0
        (il, orjson.dumps({**interlocks(3), "interlocks": dict.fromkeys(IL_NAMES, 1)})),
        (tel, orjson.dumps({**telemetry(51, 1.0), "dose_primary_gy": True})),
        (tel, orjson.dumps({**telemetry(52, 1.0), "state": 7})),
        # NaN and huge numbers
        (tel, ok_tel.replace(b'"kv":50.0', b'"kv":NaN')),
        (tel, ok_tel.replace(b'"kv":50.0', b'"kv":1e999')),
        (tel, ok_tel.replace(b'"seq":50', b'"seq":' + b"9" * 40)),
        # negative and huge seq
        (tel, orjson.dumps({**telemetry(53, 1.0), "seq": -5})),
        (tel, orjson.dumps(telemetry(U64_MAX, 19.9))),
        # 10 MB
        (tel, b'{"schema":"iort/v1","pad":"' + b"x" * 10_000_000 + b'"}'),
        # unknown topics, also one that would make a room of its own
        (topic("or-2", "nonsense"), orjson.dumps(interlocks(4))),
        (topic("or-9", "nonsense"), orjson.dumps(interlocks(4))),
        ("iort/v1/or-2", orjson.dumps(interlocks(4))),
        # deep nesting
        (tel, b'{"a":' * 5000 + b"1" + b"}" * 5000),
        (il, orjson.dumps({**interlocks(5), "interlocks": {"door": {"x": [[[[[]]]]]}}})),
    ]


@pytest.mark.browser
async def test_hostile_messages_never_freeze_pin_or_hide_a_room_in_chromium(
    tmp_path: Path, broker: Mosquitto
) -> None:
    dash = await Dashboard.start(
        broker.url,
        tmp_path / "dashboard.log",
        *("--stale-after", str(STALE_AFTER_S), "--age-out", str(AGE_OUT_S)),
    )
    rec = Recorder()
    feeding = {"or-1", "or-2", "or-3"}
    doses = {"or-1": 0.0, "or-2": 0.0, "or-3": 0.0}
    try:
        async with client(broker.port, "genuine") as good, client(broker.port, "rogue") as rogue:
            for room in ("or-1", "or-2", "or-3"):
                await good.publish(
                    topic(room, "status"), orjson.dumps(status(SITE, room)), qos=1, retain=True
                )
            await good.publish(
                topic("or-2", "interlocks"),
                orjson.dumps(interlocks(1, "door")),
                qos=1,
                retain=True,
            )
            await good.publish(
                topic("or-2", "delivery"),
                orjson.dumps(delivery(1, verification("NOT_VERIFIED", ["dose"]))),
                qos=1,
                retain=True,
            )

            async def feed() -> None:
                """The rooms publish telemetry at 10 Hz while they are in ``feeding``;
                or-3's daemon stops (leaves it), and then garbage goes to or-3 instead."""
                seq = 0
                while True:
                    seq += 1
                    for room in ("or-1", "or-2", "or-3"):
                        if room in feeding:
                            doses[room] = round(doses[room] + 0.01, 4)
                            data = orjson.dumps(telemetry(seq, doses[room]))
                        else:
                            data = orjson.dumps({**telemetry(seq, 9.9), "kv": "high"})
                        await good.publish(topic(room, "telemetry"), data, qos=0)
                    await asyncio.sleep(0.1)  # the genuine rooms' sample rate

            feeder = asyncio.create_task(feed())
            try:
                async with chromium() as browser:
                    page = await browser.new_page(viewport={"width": 1500, "height": 1000})
                    rec.attach(page)
                    await page.goto(dash.url, wait_until="domcontentloaded", timeout=15_000)
                    cards = page.locator("#cards section.card")
                    await expect(cards).to_have_count(3, timeout=10_000)
                    or1, or2, or3 = (
                        page.locator(f'section.card[data-room="{SITE}/{r}"]')
                        for r in ("or-1", "or-2", "or-3")
                    )
                    await expect(or1).to_have_attribute("data-live", "true", timeout=5_000)
                    await expect(or2).to_contain_text("door TRIPPED")

                    # 64 fake rooms of another site, retained (what kept real rooms off the
                    # dashboard on f27b8b0): the real ones stay; the overview lists the
                    # sites and pages the 67 rooms; the fakes, publishing nothing more,
                    # age out and are removed (checked at the end).
                    for r in range(64):
                        await rogue.publish(
                            topic(f"r{r:02d}", "status", "fake"),
                            orjson.dumps(status("fake", f"r{r:02d}")),
                            qos=1,
                            retain=True,
                        )
                    faked = time.monotonic()
                    await expect(page.locator("#pages")).to_contain_text(
                        "Page 1 of 2, 67 rooms", timeout=4_000
                    )
                    await expect(page.locator("#sites")).to_contain_text("fake (64)")
                    await expect(page.locator("#sites")).to_contain_text(f"{SITE} (3)")
                    await expect(cards).to_have_count(48)
                    await page.locator(f'#sites a[data-site="{SITE}"]').click()
                    await page.wait_for_url(f"**/?site={SITE}")
                    await expect(cards).to_have_count(3, timeout=5_000)
                    await expect(or1).to_have_attribute("data-live", "true", timeout=5_000)

                    # or-3's daemon stops; garbage keeps coming for it. The attack on or-2.
                    feeding.discard("or-3")
                    stopped = time.monotonic()
                    cases = hostile_cases()
                    for t, data in cases:
                        await rogue.publish(t, data, qos=1)
                    # The daemon's next genuine message: door and emergency stop tripped.
                    await good.publish(
                        topic("or-2", "interlocks"),
                        orjson.dumps(interlocks(2, "door", "emergency_stop")),
                        qos=1,
                        retain=True,
                    )
                    await expect(or2).to_contain_text(
                        "NOT CLEAR: door TRIPPED, emergency_stop TRIPPED", timeout=5_000
                    )
                    await expect(or2).not_to_have_attribute("data-rejected", "0", timeout=3_000)
                    await expect(or2.locator(".rejected")).to_contain_text("rejected")
                    # Its daemon's NOT VERIFIED stands: no forged or broken verification
                    # took its place, and the card draws (no DISPLAY ERROR).
                    verif = or2.locator(".verif")
                    await expect(verif).to_have_attribute("data-outcome", "NOT_VERIFIED")
                    await expect(verif.locator(".verif-text")).to_have_text("NOT VERIFIED")
                    await expect(verif.locator('li[data-item="dose"]')).to_have_text(
                        "dose: console preset 25.00 Gy, prescribed 20.00 Gy"
                    )

                    # or-3: STALE within its bound, whatever garbage arrives for it.
                    await expect(or3).to_have_attribute(
                        "data-live", "false", timeout=int((STALE_AFTER_S + 1.5) * 1000)
                    )
                    assert time.monotonic() - stopped <= STALE_AFTER_S + 2.5
                    await expect(or3).to_contain_text("STALE")

                    # or-1 kept updating through all of it, and is LIVE.
                    before = float(await or1.locator(".big").inner_text())
                    await expect(or1.locator(".big")).not_to_have_text(
                        f"{before:.2f}", timeout=3_000
                    )
                    await expect(or1).to_have_attribute("data-live", "true")
                    await expect(page.locator("section.card[data-error]")).to_have_count(0)
                    await expect(cards).to_have_count(3)
                    await shot(page, "20-overview-hostile-input")

                    # The attacked room's own page: its daemon's interlocks, its rejects.
                    await page.goto(dash.url + f"room/{SITE}/or-2", wait_until="domcontentloaded")
                    door = page.locator('#interlocks li[data-interlock="door"]')
                    await expect(door).to_have_attribute("data-state", "tripped", timeout=5_000)
                    await expect(
                        page.locator('#interlocks li[data-interlock="emergency_stop"]')
                    ).to_have_attribute("data-state", "tripped")
                    await expect(page.locator("#all-clear")).to_contain_text("NOT CLEAR")
                    await expect(page.locator("#rejected")).to_contain_text("schema")
                    await expect(page.locator("#display-error")).to_be_hidden()
                    await shot(page, "21-room-after-hostile-input")

                    # Nothing valid from or-3 (garbage only) and the fakes: AGED OUT after
                    # --age-out, then removed after twice that; the live rooms stay.
                    await page.goto(dash.url + f"?site={SITE}", wait_until="domcontentloaded")
                    left = AGE_OUT_S - (time.monotonic() - stopped)
                    await expect(or3).to_contain_text(
                        "AGED OUT", timeout=int((max(0, left) + 2) * 1000)
                    )
                    await shot(page, "22-overview-room-aged-out")
                    await page.goto(dash.url, wait_until="domcontentloaded")
                    left = 2 * AGE_OUT_S - (time.monotonic() - faked)
                    await expect(cards).to_have_count(2, timeout=int((max(0, left) + 3) * 1000))
                    await expect(or1).to_have_attribute("data-live", "true")
                    await expect(or2).to_be_visible()
                    await expect(page.locator("#sites")).to_be_hidden()
                    assert rec.errors == [], f"the page reported errors: {rec.errors}"
            finally:
                feeder.cancel()
    finally:
        code = await dash.stop()
    assert code == 0

    # The server's state says the same (read after the stop from the log; the snapshot
    # was checked live above through the page).
    records = dash.log_records()
    rejected = [r for r in records if r.get("event") == "mqtt_message_rejected"]
    assert rejected, "rejects are logged"
    assert all("x" * 100 not in json.dumps(r) for r in records), "no payload in the log"


async def test_the_server_state_under_hostile_input(tmp_path: Path, broker: Mosquitto) -> None:
    """The same cases without a browser: what the server holds and counts."""
    dash = await Dashboard.start(broker.url, tmp_path / "dashboard.log")
    try:
        # subscribed (it reports the broker connected only after its subscription)
        await until("the dashboard connected", lambda: snapshot(dash)["broker"]["connected"], 10)
        async with client(broker.port, "genuine") as good, client(broker.port, "rogue") as rogue:
            await good.publish(topic("or-2", "status"), orjson.dumps(status(SITE, "or-2")), qos=1)
            await good.publish(
                topic("or-2", "interlocks"), orjson.dumps(interlocks(1, "door")), qos=1
            )
            cases = hostile_cases()
            for t, data in cases:
                await rogue.publish(t, data, qos=1)
            await good.publish(
                topic("or-2", "interlocks"),
                orjson.dumps(interlocks(2, "door", "emergency_stop")),
                qos=1,
            )

            def arrived() -> dict[str, Any] | None:
                snap = snapshot(dash, f"?room={SITE}/or-2")
                room = snap["rooms"].get(f"{SITE}/or-2")
                il = room and room["retained"].get("interlocks")
                return snap if il and il["payload"]["seq"] == 2 else None

            snap = await until("the genuine interlocks seq 2", arrived, 10)
        held = snap["rooms"][f"{SITE}/or-2"]
        assert held["retained"]["interlocks"]["payload"]["interlocks"]["emergency_stop"] == (
            "tripped"
        )
        assert held["telemetry"] is None, "no forged telemetry is held"
        diag = snap["diagnostics"]
        # The 10 MB one exceeds the Maximum Packet Size the dashboard asked for on
        # CONNECT: the broker discards it, the dashboard never reads it.
        assert diag["rejected"] == len(cases) - 1, diag
        assert diag["accepted"] == 3
        assert set(snapshot(dash)["rooms"]) == {f"{SITE}/or-2"}, "no room made of garbage"
        assert diag["bytes"] < 64 * 1024
    finally:
        assert await dash.stop() == 0


def test_the_acl_example_is_what_the_docs_show() -> None:
    doc = (ROOT / "docs" / "dashboard.md").read_text("utf-8")
    assert "config/mosquitto/acl.example" in doc


async def test_the_acl_example_refuses_a_rogue_publisher(tmp_path: Path) -> None:
    """Mosquitto with config/mosquitto/acl.example verbatim: the room's daemon publishes,
    the dashboard reads; the dashboard's user and another room's daemon try to publish
    into the room and the broker refuses (MQTT v5: "Not authorized")."""
    exe = shutil.which("mosquitto_passwd")
    pub = shutil.which("mosquitto_pub")
    assert exe is not None, "mosquitto_passwd missing: apt-get install mosquitto-clients"
    assert pub is not None
    users = {
        "iortd-hospital-a-or-1": "or1-Pw-77e1",
        "iortd-hospital-a-or-2": "or2-Pw-5c0a",
        "dashboard": "dash-Pw-19bb",
    }
    passwd = tmp_path / "passwd"
    for i, (user, pw) in enumerate(users.items()):
        create = ["-c"] if i == 0 else []
        await asyncio.to_thread(
            subprocess.run, [exe, "-b", *create, str(passwd), user, pw], check=True, timeout=10
        )
    dash_pw = tmp_path / "dash.pw"
    dash_pw.write_text(users["dashboard"])
    dash_pw.chmod(0o600)
    options = BrokerOptions(password_file=passwd, acl_file=ACL_EXAMPLE)
    with Mosquitto(options, tmp_path / "broker") as broker:
        dash = await Dashboard.start(
            broker.url,
            tmp_path / "dashboard.log",
            *("--username", "dashboard", "--password-file", str(dash_pw)),
        )
        try:
            await until(
                "the dashboard connected",
                lambda: snapshot(dash)["broker"]["connected"],
                10,
            )

            def publish(user: str, name: str, payload: dict[str, Any]) -> str:
                p = subprocess.run(
                    [
                        *(pub, "-h", "127.0.0.1", "-p", str(broker.port), "-V", "5", "-q", "1"),
                        *("-u", user, "-P", users[user], "-r"),
                        *("-t", topic("or-1", name, "hospital-a"), "-m", json.dumps(payload)),
                    ],
                    capture_output=True,
                    text=True,
                    timeout=10,
                    check=True,
                )
                return p.stdout + p.stderr

            assert publish("iortd-hospital-a-or-1", "status", status("hospital-a", "or-1")) == ""
            assert publish("iortd-hospital-a-or-1", "interlocks", interlocks(1, "door")) == ""
            forged = interlocks(U64_MAX)
            for rogue in ("dashboard", "iortd-hospital-a-or-2"):
                out = publish(rogue, "interlocks", forged)
                assert "Not authorized" in out, f"{rogue}: {out!r}"
            # Ordering shows the absence: the daemon's next message arrives, and nothing
            # the rogues sent arrived before it (no reject, no forged state).
            assert publish("iortd-hospital-a-or-1", "interlocks", interlocks(2, "door")) == ""

            def arrived() -> dict[str, Any] | None:
                snap = snapshot(dash, "?room=hospital-a/or-1")
                room = snap["rooms"].get("hospital-a/or-1")
                il = room and room["retained"].get("interlocks")
                return snap if il and il["payload"]["seq"] == 2 else None

            snap = await until("the daemon's interlocks seq 2", arrived, 10)
            assert snap["diagnostics"]["rejected"] == 0
            assert snap["diagnostics"]["accepted"] == 3
            assert snap["rooms"]["hospital-a/or-1"]["retained"]["interlocks"]["payload"][
                "interlocks"
            ]["door"] == ("tripped")
        finally:
            assert await dash.stop() == 0


def _sse(event: str, data: dict[str, Any]) -> str:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n"


def _held(payload: dict[str, Any]) -> dict[str, Any]:
    return {"payload": payload, "age_ms": 0}


@pytest.mark.browser
async def test_the_page_draws_each_room_and_section_in_isolation(
    tmp_path: Path, broker: Mosquitto
) -> None:
    """What the server would never pass (it validates), handed to the page directly by
    Playwright in place of the server's stream: a room whose data throws shows DISPLAY
    ERROR on its own card, never LIVE, and the room beside it is drawn and updated; on a
    room page, a part that throws is named and the other parts are drawn."""
    dash = await Dashboard.start(broker.url, tmp_path / "dashboard.log")
    config = {"stale_after_s": 5, "history_points": 100, "tick_s": 1, "age_out_s": 60}
    config["page_size"] = 48
    bad_il = {**interlocks(1), "interlocks": dict.fromkeys(IL_NAMES, 1), "all_clear": False}

    def room(name: str, **retained: dict[str, Any]) -> dict[str, Any]:
        return {
            "site": SITE,
            "room": name,
            "retained": {
                "status": _held(status(SITE, name)),
                **{k: _held(v) for k, v in retained.items()},
            },
            "telemetry": _held(telemetry(1, 0.5)),
            "history": [],
            "events": [],
            "rejected": {},
            "last_valid_age_ms": 0,
        }

    snap = {
        "config": config,
        "broker": {"connected": True, "reason": "connected", "url": broker.url, "age_ms": 0},
        "sites": {SITE: 2},
        "rooms": {
            f"{SITE}/a-bad": room("a-bad", interlocks=bad_il),
            f"{SITE}/b-good": room("b-good"),
        },
    }
    update = {"room": f"{SITE}/b-good", "name": "telemetry", "payload": telemetry(2, 0.75)}
    body = "retry: 600000\n\n" + _sse("snapshot", snap) + _sse("msg", update)
    broken_delivery = env(1, delivery={"delivery_id": "d", "phase": "IRRADIATING", "gaps": 5})
    # The applicator panel's data that throws (a tilt no schema passes): named, and the
    # rest of the page drawn.
    bad_room = room("a-bad", delivery=broken_delivery)
    bad_room["applicator"] = _held(
        env(1, device="stand", state="READY", seated="yes", brakes_engaged="yes", tilt_deg={})
    )
    # An alarm list whose rows are not a list (issue 19): named, the rest drawn.
    bad_room["alarms"] = {"rows": 5, "unacknowledged": 1, "standing": 1, "age_ms": 0}
    room_snap = {**snap, "rooms": {f"{SITE}/a-bad": bad_room}}
    room_body = "retry: 600000\n\n" + _sse("snapshot", {**room_snap, "only": f"{SITE}/a-bad"})
    rec = Recorder()
    try:
        async with chromium() as browser:
            page = await browser.new_page(viewport={"width": 1500, "height": 1000})
            rec.attach(page)

            async def events(route: Any) -> None:
                text = room_body if "room=" in route.request.url else body
                await route.fulfill(status=200, content_type="text/event-stream", body=text)

            await page.route("**/events*", events)
            await page.goto(dash.url, wait_until="domcontentloaded", timeout=15_000)
            bad = page.locator(f'section.card[data-room="{SITE}/a-bad"]')
            good = page.locator(f'section.card[data-room="{SITE}/b-good"]')
            await expect(bad).to_have_attribute("data-error", "true", timeout=5_000)
            await expect(bad).to_contain_text("DISPLAY ERROR")
            await expect(bad).to_have_attribute("data-live", "false")
            await expect(good.locator(".big")).to_have_text("0.75", timeout=5_000)
            await expect(good).not_to_have_attribute("data-error", "true")
            await shot(page, "23-overview-one-room-cannot-be-drawn")

            await page.goto(dash.url + f"room/{SITE}/a-bad", wait_until="domcontentloaded")
            await expect(page.locator("#display-error")).to_contain_text(
                "delivery facts", timeout=5_000
            )
            await expect(page.locator("#display-error")).to_contain_text("applicator")
            await expect(page.locator("#display-error")).to_contain_text("alarm list")
            await expect(page.locator("#apl-seated")).to_contain_text("SEATED")
            await expect(page.locator("#dose-primary")).to_have_text("0.50")
            await expect(page.locator("#all-clear")).to_contain_text("No interlock report")
            await shot(page, "24-room-one-part-cannot-be-drawn")
            assert rec.errors == [], f"the page reported errors: {rec.errors}"
    finally:
        assert await dash.stop() == 0
