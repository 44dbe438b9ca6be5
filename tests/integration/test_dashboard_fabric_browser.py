"""One view of every room (issue 22): the dashboard pointed at the central broker of a real
fabric (a central Mosquitto and two site Mosquittos from `iortd fabric-config`'s files,
bridged over TLS: tests/integration/fabricproc.py), in headless Debian Chromium.

Three rooms publish their status and telemetry to their own site's broker with their own
accounts; the dashboard reads the centre over TLS with its generated password. The
overview shows both sites, each with its rooms under it and its link up. Then site-b's
broker stops: the central broker publishes site-b's bridge will (``0``), and the page says
"SITE LINK DOWN since T" for site-b, shows each of its rooms as UNKNOWN because of the
link (not OFFLINE, not merely STALE), while site-a's room stays LIVE. Screenshots go to
test-artifacts/dashboard/.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
from dashproc import Dashboard, Recorder, chromium, shot
from fabricproc import Fabric, Tap, start_fabric
from playwright.async_api import Page, expect

from iortd.daemon.mqtt.payloads import Envelope, status_payload

pytestmark = [pytest.mark.integration, pytest.mark.browser]

ROOMS = {"site-a": ["or-1"], "site-b": ["or-1", "or-2"]}
STALE_AFTER_S = 2.0


def _ts() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def telemetry(seq: int) -> dict[str, Any]:
    ts = _ts()
    return {
        "schema": "iort/v1",
        "session": 1,
        "seq": seq,
        "ts": ts,
        "sim": True,
        "historical": False,
        "device": "source-1",
        "at": ts,
        "state": "READY",
        "phase": None,
        "delivery_id": None,
        "dose_rate_gy_min": 0.0,
        "dose_primary_gy": 0.0,
        "dose_secondary_gy": 0.0,
        "preset_gy": 20.0,
        "remaining_gy": None,
        "beam_on_s": 0.0,
        "elapsed_s": None,
        "estimated_remaining_s": None,
        "kv": 0.0,
        "ua": 0.0,
    }


async def room_publisher(fabric: Fabric, site: str, room: str, started: asyncio.Event) -> None:
    """The room's status once (retained), then telemetry every 0.3 s until its broker
    goes (then it ends: nothing to publish to)."""
    base = f"iort/v1/{site}/{room}"
    with contextlib.suppress(aiomqtt.MqttError):
        async with Tap(fabric.sites[site].port, fabric.room_login(site, room)) as tap:
            birth = status_payload(Envelope(0, 1, _ts(), sim=True), True, "test", site, room)
            await tap.publish(f"{base}/status", json.dumps(birth).encode(), retain=True)
            seq = 0
            while True:
                await tap.publish(f"{base}/telemetry", json.dumps(telemetry(seq)).encode())
                started.set()
                seq += 1
                await asyncio.sleep(0.3)  # the room's sample rate, not a wait for anything


@pytest.fixture
def fabric(tmp_path: Path) -> Iterator[Fabric]:
    f = start_fabric(tmp_path / "fabric", ROOMS)
    yield f
    f.stop()


async def card_live(page: Page, key: str) -> str | None:
    return await page.get_attribute(f'.card[data-room="{key}"]', "data-live")


async def test_central_dashboard_shows_sites_and_a_site_link_down(
    fabric: Fabric, tmp_path: Path
) -> None:
    await fabric.wait_bridges_up()
    started = {k: asyncio.Event() for k in ("site-a/or-1", "site-b/or-1", "site-b/or-2")}
    pubs = [
        asyncio.create_task(room_publisher(fabric, s, r, started[f"{s}/{r}"]))
        for s, rooms in ROOMS.items()
        for r in rooms
    ]
    secret = fabric.files.central.passwords["dashboard"]
    dash = await Dashboard.start(
        f"mqtts://127.0.0.1:{fabric.central_tls_port}",
        tmp_path / "dashboard.log",
        *("--ca-file", str(fabric.ca), "--username", "dashboard"),
        *("--password-file", str(secret), "--stale-after", str(STALE_AFTER_S)),
    )
    try:
        async with asyncio.timeout(20):
            for e in started.values():
                await e.wait()
        async with chromium() as browser:
            page = await browser.new_page(viewport={"width": 1500, "height": 1000})
            rec = Recorder()
            rec.attach(page)
            await page.goto(dash.url)
            for site in ROOMS:
                head = page.locator(f'.site-head[data-site="{site}"]')
                await expect(head).to_have_attribute("data-link", "up", timeout=20_000)
            for key in started:
                await expect(page.locator(f'.card[data-room="{key}"]')).to_have_attribute(
                    "data-live", "true", timeout=20_000
                )
            # Grouped by site: each heading comes before its own rooms' cards.
            order = await page.eval_on_selector_all(
                "#cards > *", "ns => ns.map(n => n.dataset.site || n.dataset.room)"
            )
            assert order == ["site-a", "site-a/or-1", "site-b", "site-b/or-1", "site-b/or-2"]
            await shot(page, "fabric-two-sites-up")

            await asyncio.to_thread(fabric.sites["site-b"].stop_sync)
            head_b = page.locator('.site-head[data-site="site-b"]')
            await expect(head_b).to_have_attribute("data-link", "down", timeout=15_000)
            await expect(head_b).to_contain_text("SITE LINK DOWN since ")
            for key in ("site-b/or-1", "site-b/or-2"):
                card = page.locator(f'.card[data-room="{key}"]')
                await expect(card.locator(".live-word")).to_have_text("UNKNOWN", timeout=5_000)
                await expect(card.locator(".age")).to_contain_text("site link down since")
                assert await card_live(page, key) == "false"
            # site-a's room is untouched: LIVE on every check across a stale bound.
            for _ in range(int(STALE_AFTER_S / 0.5) + 1):
                assert await card_live(page, "site-a/or-1") == "true"
                await page.wait_for_timeout(500)
            await expect(page.locator('.site-head[data-site="site-a"]')).to_have_attribute(
                "data-link", "up"
            )
            await shot(page, "fabric-site-b-link-down")

            await page.goto(dash.url + "room/site-b/or-1")
            await expect(page.locator("#staleness")).to_contain_text(
                "UNKNOWN — NOT LIVE: site link down since", timeout=10_000
            )
            await shot(page, "fabric-room-of-site-down")
            events = [(r.get("event"), r.get("site")) for r in dash.log_records()]
            assert ("site_link_down", "site-b") in events, events
            assert rec.errors_but_link_loss(dash.netloc) == []
            assert rec.foreign(dash.netloc) == []
    finally:
        for t in pubs:
            t.cancel()
        await asyncio.gather(*pubs, return_exceptions=True)
        assert await dash.stop() == 0
