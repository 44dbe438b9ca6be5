"""The applicator panel in a real browser (issue 16, B2c): messages published to a real
Mosquitto on the ``applicator`` topic are validated by a real `iort-dashboard` and drawn
by headless Debian Chromium: the applicator's identity, seated, locked, brakes, the
displacement with its trace and the tolerance line; ``unknown`` shown as unknown (never
as OK); the panel STALE on its own when the reader's messages stop while the source's
telemetry goes on; no request leaves the dashboard's host."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiomqtt
import orjson
import pytest
from dashproc import Dashboard, Recorder, chromium, shot
from playwright.async_api import expect

from iortd.daemon.mqtt.broker import BrokerOptions, Mosquitto

pytestmark = [pytest.mark.integration, pytest.mark.browser]

STALE_AFTER_S = 1.5
SITE, ROOM = "hospital-c", "or-3"
DELIVERY = "or-3-20261126T100000000000Z"


def now_ts() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def env(seq: int, **data: Any) -> dict[str, Any]:
    t = now_ts()
    return {
        "schema": "iort/v1",
        "session": 1,
        "seq": seq,
        "ts": t,
        "sim": True,
        "historical": False,
        **data,
    }


def telemetry(seq: int) -> dict[str, Any]:
    return env(
        seq,
        device="source",
        at=now_ts(),
        state="IRRADIATING",
        phase="IRRADIATING",
        delivery_id=DELIVERY,
        dose_rate_gy_min=0.8,
        dose_primary_gy=seq / 100,
        dose_secondary_gy=seq / 100,
        preset_gy=20.0,
        remaining_gy=20.0 - seq / 100,
        beam_on_s=seq / 10,
        elapsed_s=seq / 10,
        estimated_remaining_s=100.0,
        kv=50.0,
        ua=40.0,
    )


def applicator(seq: int, mag: float, **kw: Any) -> dict[str, Any]:
    return (
        env(
            seq,
            device="stand",
            at=now_ts(),
            delivery_id=DELIVERY,
            applicator={"type": "spherical", "diameter_mm": 40.0, "serial": "APL-40-0042"},
            uses_left=17,
            state="READY",
            fault=None,
            seated="yes",
            source_locked="yes",
            brakes_engaged="yes",
            displacement_mm={"x": mag, "y": 0.0, "z": 0.0},
            displacement_magnitude_mm=mag,
            displacement_from_beam_on_mm=mag / 2,
            peak_displacement_mm=mag,
            tilt_deg=0.25,
            lock_counter=5,
            seat_counter=3,
            heartbeat=seq,
            tolerance_mm=2.0,
        )
        | kw
    )


def event(seq: int, kind: str, **data: Any) -> dict[str, Any]:
    """A schema-valid ``events`` message as the daemon sends it (docs/schemas/v1)."""
    return env(seq, kind=kind, delivery_id=DELIVERY, at=now_ts(), **data)


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Mosquitto]:
    with Mosquitto(BrokerOptions(), tmp_path / "broker") as b:
        yield b


@contextlib.asynccontextmanager
async def client(port: int) -> AsyncIterator[aiomqtt.Client]:
    c = aiomqtt.Client(
        "127.0.0.1",
        port,
        identifier=f"apl-test-{uuid.uuid4().hex[:8]}",
        protocol=aiomqtt.ProtocolVersion.V5,
        timeout=10,
    )
    async with c:
        yield c


async def test_the_applicator_panel_shows_the_reader_unknown_and_stale(
    tmp_path: Path, broker: Mosquitto
) -> None:
    dash = await Dashboard.start(
        broker.url, tmp_path / "dashboard.log", "--stale-after", str(STALE_AFTER_S)
    )
    base = f"iort/v1/{SITE}/{ROOM}/"
    rec = Recorder()
    try:
        async with client(broker.port) as mq, chromium() as browser:
            status = env(0, online=True, software_version="0.1.0", site=SITE, room=ROOM)
            await mq.publish(base + "status", orjson.dumps(status), qos=1, retain=True)
            tel_seq = 0

            async def source_tick() -> None:
                nonlocal tel_seq
                tel_seq += 1
                await mq.publish(base + "telemetry", orjson.dumps(telemetry(tel_seq)), qos=1)

            for i in range(1, 13):
                await mq.publish(base + "applicator", orjson.dumps(applicator(i, i / 10)), qos=1)
                await source_tick()

            page = await browser.new_page(viewport={"width": 1500, "height": 1400})
            rec.attach(page)
            await page.goto(dash.url + f"room/{SITE}/{ROOM}", wait_until="domcontentloaded")
            panel = page.locator("#applicator-panel")
            await expect(page.locator("#apl-identity")).to_contain_text(
                "spherical, 40 mm, s/n APL-40-0042, 17 uses left", timeout=10_000
            )
            await expect(page.locator("#apl-seated")).to_have_attribute("data-state", "ok")
            await expect(page.locator("#apl-seated")).to_contain_text("SEATED")
            await expect(page.locator("#apl-locked")).to_contain_text("LOCKED")
            await expect(page.locator("#apl-brakes")).to_contain_text("ENGAGED")
            await expect(page.locator("#apl-displacement")).to_contain_text("1.20")
            await expect(page.locator("#apl-displacement")).to_contain_text("tolerance 2.00")
            await expect(page.locator("#apl-tilt")).to_have_text("0.25")
            await expect(page.locator("#plot-applicator")).to_have_attribute("data-points", "12")
            await expect(page.locator("#plot-applicator")).to_have_attribute("data-tolerance", "2")
            await expect(page.locator("#plot-applicator line.tolerance")).to_have_count(1)

            # The reader cannot tell: shown as unknown, never as OK; brakes released: bad.
            unsure = applicator(
                13, 1.3, seated="unknown", source_locked="unknown", brakes_engaged="no"
            )
            await mq.publish(base + "applicator", orjson.dumps(unsure), qos=1)
            await source_tick()
            await expect(page.locator("#apl-seated")).to_have_attribute("data-state", "unknown")
            await expect(page.locator("#apl-seated")).to_contain_text("UNKNOWN")
            await expect(page.locator("#apl-locked")).to_contain_text("UNKNOWN")
            await expect(page.locator("#apl-brakes")).to_have_attribute("data-state", "bad")
            await expect(page.locator("#apl-brakes")).to_contain_text("RELEASED")
            # Live on a fresh reading (checked here, not after the page's load: on a loaded
            # machine the first twelve may be older than the stale bound by then).
            await expect(panel).to_have_attribute("data-live", "true")
            await shot(page, "20-applicator-panel-unknown")

            # The daemon's applicator alarm and its monitor interlock reach the panel itself
            # (its header in the alarm colour, naming the alarm), as well as the alarm list.
            await expect(page.locator("#apl-monitor")).to_have_attribute("data-state", "unknown")
            await expect(page.locator("#apl-alarm")).to_be_hidden()
            msg = (
                "applicator displaced 2.60 mm with the beam on (from the stand's lock 2.60 mm, "
                "from beam-on 1.30 mm; tolerance 2 mm)"
            )
            raised = event(
                1, "alarm_raised", code="applicator_displaced", key="applicator_displaced",
                severity="high", message=msg,
            )  # fmt: skip
            tripped = event(
                2, "monitor_interlock_changed", device="stand", interlock="applicator",
                **{"from": "unknown", "to": "tripped"}, cause="brakes released with the beam on",
            )  # fmt: skip
            for m in (raised, tripped):
                await mq.publish(base + "events", orjson.dumps(m), qos=1)
            await mq.publish(
                base + "applicator",
                orjson.dumps(
                    applicator(
                        14, 2.6, seated="unknown", source_locked="unknown", brakes_engaged="no"
                    )
                ),
                qos=1,
            )
            await source_tick()
            await expect(panel).to_have_attribute("data-alarm", "high")
            await expect(page.locator("#apl-alarm")).to_be_visible()
            await expect(page.locator("#apl-alarm")).to_contain_text("applicator_displaced")
            await expect(page.locator("#apl-alarm")).to_contain_text("displaced 2.60 mm")
            await expect(page.locator("#apl-monitor")).to_have_attribute("data-state", "bad")
            await expect(page.locator("#apl-monitor")).to_contain_text("TRIPPED")
            listed = page.locator("#alarms li[data-kind=alarm_raised]")
            await expect(listed).to_contain_text(msg)
            await expect(listed).to_contain_text("ACTIVE")
            await shot(page, "22-applicator-panel-alarm")

            cleared = event(
                3, "alarm_cleared", code="applicator_displaced", key="applicator_displaced"
            )
            await mq.publish(base + "events", orjson.dumps(cleared), qos=1)
            await source_tick()
            await expect(panel).to_have_attribute("data-alarm", "")
            await expect(page.locator("#apl-alarm")).to_be_hidden()
            await expect(listed).to_contain_text("CLEARED")
            # The interlock has not come back: it is still shown tripped, never as OK.
            await expect(page.locator("#apl-monitor")).to_contain_text("TRIPPED")

            # The reader falls silent while the source goes on: the panel alone is stale.
            stale_seen = asyncio.create_task(
                expect(panel).to_have_attribute(
                    "data-live", "false", timeout=int((STALE_AFTER_S + 3) * 1000)
                )
            )
            while not stale_seen.done():
                await source_tick()
                await asyncio.wait({stale_seen}, timeout=0.2)
            await stale_seen
            await expect(page.locator("#apl-live")).to_have_text("STALE")
            await expect(page.locator("#room")).to_have_attribute("data-live", "true")
            await shot(page, "21-applicator-panel-stale")

            await page.goto(dash.url, wait_until="domcontentloaded")
            card = page.locator(f'section.card[data-room="{SITE}/{ROOM}"]')
            await expect(card).to_contain_text("brakes RELEASED", timeout=10_000)
            await expect(card).to_contain_text("Applicator UNKNOWN")
        assert rec.foreign(dash.netloc) == []
        assert rec.errors_but_link_loss(dash.netloc) == []
    finally:
        await dash.stop()
