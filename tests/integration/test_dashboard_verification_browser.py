"""The verification panel in a real browser (issue 18, item 3): retained ``delivery``
payloads with a ``verification`` object, published to a real Mosquitto, validated by a
real `iort-dashboard` and drawn by headless Debian Chromium. Before beam-on the outcome is
LARGE and a word as well as a colour (NOT CHECKED, VERIFIED, NOT VERIFIED with one plain
line per reason, VERIFIED WITH OVERRIDE with the overridden item); at beam-on it turns
compact and a NOT VERIFIED stays red; an override made after beam-on says so; the
overview's card says the same; a dashboard
started after the last message (as after a restart) shows the retained outcome at once;
no request leaves the dashboards' hosts and the page reports no error."""

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
from playwright.async_api import Locator, expect

from iortd.daemon.mqtt.broker import BrokerOptions, Mosquitto

pytestmark = [pytest.mark.integration, pytest.mark.browser]

SITE, ROOM = "hospital-v", "or-5"
DELIVERY = "or-5-20261126T100000000000Z"
BASE = f"iort/v1/{SITE}/{ROOM}/"
SPH40 = {"type": "spherical", "diameter_mm": 40.0, "serial": "APL-40-0042"}
SPH30 = {"type": "spherical", "diameter_mm": 30.0, "serial": "APL-30-0007"}


def now_ts(ago_s: float = 0.0) -> str:
    return (datetime.now(UTC) - timedelta(seconds=ago_s)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def env(seq: int, **data: Any) -> dict[str, Any]:
    return {
        "schema": "iort/v1",
        "session": 1,
        "seq": seq,
        "ts": now_ts(),
        "sim": True,
        "historical": False,
        **data,
    }


def verification(outcome: str, **kw: Any) -> dict[str, Any]:
    return {
        "outcome": outcome,
        "at": now_ts(),
        "trigger": "ready",
        "reasons": [],
        "overridden": [],
        "prescription_sha256": "ab" * 32,
        "treatment_id": "T-0042",
        "plan_id": "P-0042-1",
        "prescribed_dose_gy": 20.0,
        "applicator_code": "SPH40",
        "expected_time_s": 1380.0,
        "planned_time_s": 1380.0,
        "preset_gy": 20.0,
    } | kw


def delivery(seq: int, phase: str, v: dict[str, Any] | None, **kw: Any) -> dict[str, Any]:
    d = {
        "delivery_id": DELIVERY,
        "phase": phase,
        "joined_in_progress": False,
        "preset_gy": 20.0,
        "delivered_primary_gy": 0.0,
        "delivered_secondary_gy": 0.0,
        "remaining_gy": 20.0,
        "expected_rate_gy_min": 0.87,
        "planned_time_s": 1380.0,
        "backup_timer_limit_s": 1518.0,
        "beam_on_s": 0.0,
        "elapsed_s": 0.0,
        "applicator": SPH40,
        "segments": [],
        "interruptions": [],
        "gaps": [],
        "termination": None,
        "termination_reason": None,
        "started": now_ts(),
        "simulated": True,
        "dose_rate_gy_min": 0.0,
        "estimated_remaining_s": None,
        "verification": v,
    } | kw
    return env(seq, delivery=d)


def telemetry(seq: int, state: str) -> dict[str, Any]:
    on = state == "IRRADIATING"
    return env(
        seq,
        device="source",
        at=now_ts(),
        state=state,
        phase=state,
        delivery_id=DELIVERY,
        dose_rate_gy_min=0.87 if on else 0.0,
        dose_primary_gy=0.1 if on else 0.0,
        dose_secondary_gy=0.1 if on else 0.0,
        preset_gy=20.0,
        remaining_gy=19.9 if on else 20.0,
        beam_on_s=7.0 if on else 0.0,
        elapsed_s=7.0 if on else 0.0,
        estimated_remaining_s=1373.0 if on else None,
        kv=50.0 if on else 0.0,
        ua=40.0 if on else 0.0,
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
        identifier=f"verif-test-{uuid.uuid4().hex[:8]}",
        protocol=aiomqtt.ProtocolVersion.V5,
        timeout=10,
    )
    async with c:
        yield c


async def font_px(node: Locator) -> float:
    return float((await node.evaluate("e => getComputedStyle(e).fontSize")).removesuffix("px"))


async def test_the_verification_outcome_is_large_before_beam_on_and_stays_after(
    tmp_path: Path, broker: Mosquitto
) -> None:
    rec = Recorder()
    seq = {"delivery": 0, "telemetry": 0}
    # The dashboard and Chromium start side by side (each takes a second or so).
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

    async def publish(mq: aiomqtt.Client, phase: str, v: dict[str, Any] | None, **kw: Any) -> None:
        seq["delivery"] += 1
        seq["telemetry"] += 1
        d = delivery(seq["delivery"], phase, v, **kw)
        await mq.publish(BASE + "delivery", orjson.dumps(d), qos=1, retain=True)
        t = telemetry(seq["telemetry"], phase)
        await mq.publish(BASE + "telemetry", orjson.dumps(t), qos=1)

    try:
        async with stack, client(broker.port) as mq:
            status = env(0, online=True, software_version="0.1.0", site=SITE, room=ROOM)
            await mq.publish(BASE + "status", orjson.dumps(status), qos=1, retain=True)
            await publish(mq, "PREPARATORY", None)
            page = await browser.new_page(viewport={"width": 1500, "height": 1200})
            rec.attach(page)
            await page.goto(dash.url + f"room/{SITE}/{ROOM}", wait_until="domcontentloaded")
            panel = page.locator("#verification")
            word = panel.locator(".verif-text")
            reasons = panel.locator(".verif-reasons li")

            # No check yet (or verification off at the site): neutral, no alarm of ours.
            await expect(panel).to_have_attribute("data-outcome", "NOT_CHECKED", timeout=10_000)
            await expect(word).to_have_text("NOT CHECKED")
            await expect(panel).to_have_attribute("data-size", "large")

            await publish(mq, "READY", verification("VERIFIED"))
            await expect(word).to_have_text("VERIFIED")
            await expect(panel).to_have_attribute("data-tone", "ok")
            await expect(panel).to_have_attribute("data-size", "large")
            assert await font_px(word) >= 40, "the outcome is large before beam-on"
            await expect(panel.locator(".verif-rx")).to_have_text(
                "Treatment T-0042 · plan P-0042-1 · prescribed 20.00 Gy · applicator SPH40"
            )
            await expect(panel.locator(".verif-time")).to_have_text(
                "Time: planned 23:00 (console), expected 23:00 (independent)"
            )
            await expect(panel.locator(".verif-when")).to_contain_text(
                "when the console became ready"
            )
            await expect(reasons).to_have_count(0)
            await shot(page, "30-verification-verified")

            # The wrong applicator and a preset off the prescription: each in plain words.
            # (made a minute ago: the console has been READY since, the beam comes on later)
            bad = verification(
                "NOT_VERIFIED", reasons=["applicator", "dose"], preset_gy=25.0, at=now_ts(60)
            )
            await publish(mq, "READY", bad, applicator=SPH30, preset_gy=25.0)
            await expect(word).to_have_text("NOT VERIFIED")
            await expect(panel).to_have_attribute("data-tone", "bad")
            await expect(reasons).to_have_count(2)
            await expect(panel.locator('li[data-item="applicator"]')).to_have_text(
                "applicator: console spherical 30 mm (s/n APL-30-0007), prescribed SPH40"
            )
            await expect(panel.locator('li[data-item="dose"]')).to_have_text(
                "dose: console preset 25.00 Gy, prescribed 20.00 Gy"
            )
            await shot(page, "31-verification-not-verified")

            # A physicist's signed override of the planned time: amber, the item named.
            ovr = verification(
                "VERIFIED_OVR", trigger="override", reasons=["time"], overridden=["time"],
                planned_time_s=1500.0,
            )  # fmt: skip
            await publish(mq, "READY", ovr, planned_time_s=1500.0)
            await expect(word).to_have_text("VERIFIED WITH OVERRIDE")
            await expect(panel).to_have_attribute("data-tone", "warn")
            await expect(reasons).to_have_text(
                [
                    "overridden — time: console planned 25:00, expected 23:00 from the "
                    "dose-rate table (+8.7 %)"
                ]
            )
            await expect(panel.locator(".verif-when")).to_contain_text("override")

            # Beam-on with a NOT VERIFIED check: compact, and still red with its reasons.
            await publish(mq, "IRRADIATING", bad, applicator=SPH30, preset_gy=25.0, beam_on_s=7.0)
            await expect(panel).to_have_attribute("data-size", "compact")
            await expect(word).to_have_text("NOT VERIFIED")
            await expect(panel).to_have_attribute("data-tone", "bad")
            await expect(reasons).to_have_count(2)
            assert await font_px(word) < 40, "compact once the beam is on"
            await expect(panel.locator(".verif-late")).to_be_hidden()  # made at READY
            await shot(page, "32-verification-beam-on-not-verified")

            # An override signed after beam-on is shown as what it is: not the check that
            # governed beam-on (made later than the delivery's ts less its beam-on time).
            late_ovr = verification(
                "VERIFIED_OVR", trigger="override", reasons=["dose"], overridden=["dose"],
                preset_gy=25.0,
            )  # fmt: skip
            await publish(
                mq, "IRRADIATING", late_ovr, applicator=SPH30, preset_gy=25.0, beam_on_s=7.0
            )
            await expect(word).to_have_text("VERIFIED WITH OVERRIDE")
            await expect(panel.locator(".verif-late")).to_have_text(
                "made after the beam came on: the check that governed beam-on is in the audit log"
            )
            # A dashboard (re)started now that nothing more is published has only the
            # broker's retained store to go by: it must show the outcome at once. (A second
            # one, started here so that its start-up overlaps the overview's check.)
            late = asyncio.ensure_future(Dashboard.start(broker.url, tmp_path / "dashboard2.log"))

            await page.goto(dash.url, wait_until="domcontentloaded")
            card = page.locator(f'section.card[data-room="{SITE}/{ROOM}"] .verif')
            await expect(card).to_have_attribute("data-outcome", "VERIFIED_OVR", timeout=10_000)
            await expect(card).to_have_attribute("data-size", "compact")
            await expect(card.locator(".verif-text")).to_have_text("VERIFIED WITH OVERRIDE")
            await expect(card.locator('li[data-item="dose"]')).to_contain_text("25.00 Gy")
            await expect(card.locator(".verif-late")).to_contain_text("after the beam came on")
            await shot(page, "33-verification-overview-card")

            second = await late
            await page.goto(second.url + f"room/{SITE}/{ROOM}", wait_until="domcontentloaded")
            await expect(word).to_have_text("VERIFIED WITH OVERRIDE", timeout=5_000)
            await expect(reasons).to_have_count(1)
            await expect(page.locator("#display-error")).to_be_hidden()
        own = {dash.netloc, second.netloc}
        assert [u for u in rec.requests if urlsplit(u).netloc not in own] == []
        assert rec.errors == [], f"the page reported errors: {rec.errors}"
    finally:
        if late is not None:
            await asyncio.wait({late})
            if not late.cancelled() and late.exception() is None:
                await late.result().stop()
        await dash.stop()
