"""The room's alarm list in a real browser (issue 19, item 3, the reading side): retained
``alarms`` payloads published to a real Mosquitto, validated by a real `iort-dashboard`
and drawn by headless Debian Chromium. An unacknowledged, standing HIGH alarm is first,
with its severity in words and an icon, STANDING and NOT ACKNOWLEDGED, and counted on the
overview's card; the same raising acknowledged by "B. Operator, RTT" says so, by name,
holder and time, in the same row (its id unchanged); a dashboard restarted after the last
message shows it at once from the broker's retained store. No request leaves the
dashboards' hosts and the page reports no error."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiomqtt
import orjson
import pytest
from dashproc import Dashboard, Recorder, chromium, shot
from playwright.async_api import expect

from iortd.daemon.mqtt.broker import BrokerOptions, Mosquitto

pytestmark = [pytest.mark.integration, pytest.mark.browser]

SITE, ROOM = "hospital-w", "or-6"
DELIVERY = "or-6-20261126T100000000000Z"
BASE = f"iort/v1/{SITE}/{ROOM}/"
BOB = "B. Operator, RTT"


def ts(ago_s: float = 0.0) -> str:
    return (datetime.now(UTC) - timedelta(seconds=ago_s)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def env(seq: int, **data: Any) -> dict[str, Any]:
    return {
        "schema": "iort/v1",
        "session": 1,
        "seq": seq,
        "ts": ts(),
        "sim": True,
        "historical": False,
        **data,
    }


RAISED, CLEARED_RAISED, CLEARED, ACKED = ts(50), ts(120), ts(100), ts(5)
DOOR = {
    "key": "interlock_tripped:door",
    "code": "interlock_tripped",
    "severity": "high",
    "message": "interlock door tripped with beam on",
    "raised_at": RAISED,
    "cleared_at": None,
    "delivery_id": DELIVERY,
    "acknowledged": None,
}
RATE = {
    "key": "dose_rate_deviation",
    "code": "dose_rate_deviation",
    "severity": "medium",
    "message": "dose rate 1.21 Gy/min is 19 % from expected (for 5.0 s)",
    "raised_at": CLEARED_RAISED,
    "cleared_at": CLEARED,
    "delivery_id": DELIVERY,
    "acknowledged": None,
}


# Cleared before anyone acknowledged it, in the delivery before this one.
EARLIER = "or-6-20261126T080000000000Z"
GAP = {
    **RATE,
    "key": "monitor_gap",
    "code": "monitor_gap",
    "severity": "low",
    "message": "no reading from the console for 3.0 s",
    "raised_at": ts(300),
    "cleared_at": ts(290),
    "delivery_id": EARLIER,
}


def telemetry(seq: int) -> dict[str, Any]:
    return env(
        seq,
        device="source",
        at=ts(),
        state="INTERRUPTED",
        phase="INTERRUPTED",
        delivery_id=DELIVERY,
        dose_rate_gy_min=0.0,
        dose_primary_gy=4.0,
        dose_secondary_gy=4.0,
        preset_gy=20.0,
        remaining_gy=16.0,
        beam_on_s=300.0,
        elapsed_s=320.0,
        estimated_remaining_s=1100.0,
        kv=0.0,
        ua=0.0,
    )


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Mosquitto]:
    with Mosquitto(BrokerOptions(), tmp_path / "broker") as b:
        yield b


@contextlib.asynccontextmanager
async def client(port: int) -> AsyncIterator[aiomqtt.Client]:
    c = aiomqtt.Client(
        "127.0.0.1",
        port,
        identifier=f"alarms-test-{uuid.uuid4().hex[:8]}",
        protocol=aiomqtt.ProtocolVersion.V5,
        timeout=10,
    )
    async with c:
        yield c


def hms(t: str) -> str:
    return t[11:19] + " UTC"


async def test_the_alarm_list_shows_who_acknowledged_and_survives_a_restart(
    tmp_path: Path, broker: Mosquitto
) -> None:
    rec = Recorder()
    stack = AsyncExitStack()
    started = await asyncio.gather(
        Dashboard.start(broker.url, tmp_path / "dashboard.log", "--stale-after", "30"),
        stack.enter_async_context(chromium()),
        return_exceptions=True,
    )
    dash, browser = started
    if not isinstance(dash, Dashboard) or isinstance(browser, BaseException):
        if isinstance(dash, Dashboard):
            await dash.stop()
        await stack.aclose()
        raise next(x for x in started if isinstance(x, BaseException))
    late: asyncio.Future[Dashboard] | None = None
    try:
        async with stack, client(broker.port) as mq:
            status = env(1, online=True, software_version="0.1.0", site=SITE, room=ROOM)
            await mq.publish(BASE + "status", orjson.dumps(status), qos=1, retain=True)
            first = env(1, alarms=[GAP, RATE, DOOR], omitted=0)  # the daemon's order: oldest first
            await mq.publish(BASE + "alarms", orjson.dumps(first), qos=1, retain=True)

            # The room page and the overview, side by side.
            page, overview = [
                await browser.new_page(viewport={"width": 1500, "height": 1200}) for _ in "12"
            ]
            rec.attach(page)
            rec.attach(overview)
            await asyncio.gather(
                page.goto(dash.url + f"room/{SITE}/{ROOM}", wait_until="domcontentloaded"),
                overview.goto(dash.url, wait_until="domcontentloaded"),
            )
            rows = page.locator("#alarm-list > li[data-alarm-id]")
            await expect(rows).to_have_count(3, timeout=10_000)
            top = rows.nth(0)
            # The dashboard is subscribed now: a live sample makes the room LIVE.
            await mq.publish(BASE + "telemetry", orjson.dumps(telemetry(1)), qos=1)
            door_id = orjson.dumps([DOOR["key"], RAISED, DELIVERY]).decode()
            await expect(top).to_have_attribute("data-alarm-id", door_id)
            await expect(top).to_have_attribute("data-severity", "high")
            await expect(top).to_have_attribute("data-acknowledged", "false")
            await expect(top.locator(".sev")).to_have_text("HIGH")
            await expect(top.locator(".sev-icon svg")).to_have_count(1)  # never colour alone
            await expect(top.locator(".alarm-msg")).to_have_text(str(DOOR["message"]))
            await expect(top.locator(".alarm-times")).to_have_text(
                f"raised {hms(RAISED)} · STANDING"
            )
            await expect(top.locator(".alarm-ack")).to_have_text("NOT ACKNOWLEDGED")
            await expect(top.locator(".alarm-actions")).to_have_count(1)  # the button's place
            # a dashboard without logins acknowledges nothing: no button (ack.js)
            await expect(top.locator(".alarm-actions button")).to_have_count(0)
            await expect(rows.nth(1).locator(".alarm-times")).to_have_text(
                f"raised {hms(CLEARED_RAISED)} · cleared {hms(CLEARED)}"
            )
            await expect(top.locator(".alarm-delivery")).to_be_hidden()  # this delivery's
            await expect(rows.nth(2)).to_have_attribute("data-severity", "low")
            await expect(rows.nth(2).locator(".alarm-delivery")).to_have_text(
                f"earlier delivery {EARLIER}"
            )
            await expect(page.locator("#alarm-list-summary")).to_have_text(
                "3 not acknowledged · 1 standing"
            )
            await expect(page.locator("#live-word")).to_have_text("LIVE")
            await shot(page, "40-alarms-unacknowledged")
            # The overview's card counts what waits for someone.
            card = overview.locator(f'section.card[data-room="{SITE}/{ROOM}"] .card-alarms')
            await expect(card).to_have_text("Alarms: 3 not acknowledged (1 HIGH standing)")
            await expect(card).to_have_attribute("data-unacknowledged", "3")

            # A person typing in a row (as into an acknowledgement's comment) keeps the
            # focus and every key when a new alarm arrives above that row.
            typing = rows.nth(2).locator(".alarm-actions")
            await typing.evaluate(
                "(n) => { const i = document.createElement('input'); i.id = 'typing';"
                " n.append(i); i.focus(); }"
            )
            await page.keyboard.type("checked ")
            arrived = {**DOOR, "key": "interlock_tripped:key", "raised_at": ts(1)}
            more = env(2, alarms=[GAP, RATE, DOOR, arrived], omitted=0)
            await mq.publish(BASE + "alarms", orjson.dumps(more), qos=1, retain=True)
            await expect(rows).to_have_count(4)
            await page.keyboard.type("the channels")
            await expect(page.locator("#typing")).to_be_focused()
            await expect(page.locator("#typing")).to_have_value("checked the channels")

            # An operator acknowledges the door alarm: the daemon republishes the list,
            # and both pages follow it live.
            acked = {**DOOR, "acknowledged": {"by": "op-bob", "name": BOB, "at": ACKED}}
            last = env(3, alarms=[GAP, RATE, acked], omitted=0)
            await mq.publish(BASE + "alarms", orjson.dumps(last), qos=1, retain=True)
            # A dashboard started after the last message has only the broker's retained
            # store to go by (started now so that its start-up overlaps the checks).
            late = asyncio.ensure_future(Dashboard.start(broker.url, tmp_path / "dashboard2.log"))
            await expect(top).to_have_attribute("data-acknowledged", "true")
            await expect(top).to_have_attribute("data-alarm-id", door_id)
            want = f"acknowledged by {BOB} (op-bob) at {hms(ACKED)}"
            await expect(top.locator(".alarm-ack")).to_have_text(want)
            await expect(top.locator(".alarm-times")).to_have_text(
                f"raised {hms(RAISED)} · STANDING"
            )
            await expect(card).to_have_text("Alarms: 2 not acknowledged")
            await shot(page, "41-alarms-acknowledged")

            # The first dashboard goes (killed: nothing of it survives), the page turns to
            # the restarted one, which shows the list at once.
            await dash.kill()
            second = await late
            await page.goto(second.url + f"room/{SITE}/{ROOM}", wait_until="domcontentloaded")
            await expect(top.locator(".alarm-ack")).to_have_text(want, timeout=5_000)
            await expect(rows).to_have_count(3)
            await expect(rows.nth(1).locator(".alarm-ack")).to_have_text("NOT ACKNOWLEDGED")
            await expect(page.locator("#display-error")).to_be_hidden()
            await shot(page, "42-alarms-after-restart")
        own = {dash.netloc, second.netloc}
        assert [u for u in rec.requests if urlsplit(u).netloc not in own] == []
        assert rec.errors_but_link_loss(dash.netloc) == [], f"page errors: {rec.errors}"
    finally:
        if late is not None:
            await asyncio.wait({late})
            if not late.cancelled() and late.exception() is None:
                await late.result().stop()
        await dash.kill()
