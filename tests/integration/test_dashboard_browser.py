"""The dashboard in a real browser, fed by a real daemon and simulator through a real
Mosquitto: headless Debian Chromium driven by Playwright.

* one room over the production path (`iort-sim serve` on a pty playing the
  door-mid-delivery scenario, with a short self-test and the scenario moved earlier to
  match, `iortd run` with the `serial-xrs` driver): the delivered
  dose rises, the door interlock trips, the delivery is interrupted and resumes, it ends
  NORMAL; a hung daemon (no telemetry, connection still open) turns the page STALE within
  the bound, and killing it OFFLINE (the broker's Last Will);
* two simulated rooms on one broker: the overview shows both, each room page only its
  own; a killed daemon turns its room (only) OFFLINE within the bound; a dead dashboard
  is shown as not live by the page itself; a restarted dashboard shows the current state
  again from retained topics at once; a dashboard without a broker shows OFFLINE.

In both, every request the page makes goes to the dashboard's own host and port (the
first with the page's Content-Security-Policy set aside, so that nothing hides behind
it; the second with it, where a blocked request would show as a console error).
Screenshots of each moment go to test-artifacts/dashboard/.
"""

from __future__ import annotations

import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from daemonproc import Daemon, Site
from dashproc import Dashboard, Recorder, chromium, number, shot, wait_number
from playwright.async_api import Page, ViewportSize, expect
from simproc import SERIAL_XRS_DEVICE, Simulator, fast_console

from iortd.auditlog.note import generate_keypair, write_keypair
from iortd.daemon.mqtt.broker import BrokerOptions, Mosquitto

pytestmark = [pytest.mark.integration, pytest.mark.browser]

STALE_AFTER_S = 2.0
# The daemon's: its Last Will fires within 1.5 x this after a kill, well after the stale
# bound, so that STALE (no telemetry) is seen on its own before OFFLINE (the will).
KEEPALIVE_S = 4
VIEWPORT: ViewportSize = {"width": 1500, "height": 1000}

SERIAL_SITE = (
    """
[site]
id = "hospital-b"
room = "{room}"
[log]
directory = "log"
signing_key_file = "keys/k.key"
[health]
listen = ""
[mqtt]
url = "{broker}"
keepalive_s = {keepalive}
[tolerances]
stale_after_polls = 5
"""
    + SERIAL_XRS_DEVICE
)

SIM_SITE = """
[site]
id = "hospital-b"
room = "{room}"
[log]
directory = "log"
signing_key_file = "keys/k.key"
group_commit_ms = 50
[health]
listen = ""
[mqtt]
url = "{broker}"
keepalive_s = {keepalive}
[simulation]
speed = {speed}
seed = {seed}
[tolerances]
stale_after_polls = 5
[[devices]]
name = "source-1"
driver = "sim"
poll_interval_s = 0.05
timeout_s = 1.0
[devices.options]
profile = "axxent"
applicator = "BAL34"
preset_gy = {preset}
start_delay_s = 2.0
"""


def write_site(directory: Path, template: str, **values: object) -> Site:
    directory.mkdir(parents=True)
    _, pub = write_keypair(generate_keypair("k"), directory / "keys")
    cfg = directory / "site.toml"
    cfg.write_text(template.format(keepalive=KEEPALIVE_S, **values), encoding="utf-8")
    return Site(cfg, directory / "log", pub)


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Mosquitto]:
    with Mosquitto(BrokerOptions(), tmp_path / "broker") as b:
        yield b


async def open_page(page: Page, url: str) -> None:
    await page.goto(url, wait_until="domcontentloaded", timeout=15_000)


async def test_one_delivery_through_the_serial_path_as_a_physicist_sees_it(
    tmp_path: Path, broker: Mosquitto
) -> None:
    # The Axxent-like console with a 2 s self-test, playing door-mid-delivery moved 8 s
    # earlier to match; its clock starts at the daemon's first poll, which comes once the
    # page is open (simproc.fast_console): the page sees the whole delivery, 8 s sooner.
    sim = await Simulator.start(
        *fast_console(tmp_path / "sim", "door-mid-delivery"),
        *("--applicator", "BAL34", "--preset", "0.5", "--start-delay", "1", "--seed", "5"),
    )
    dash = await Dashboard.start(
        broker.url, tmp_path / "dashboard.log", "--stale-after", str(STALE_AFTER_S)
    )
    site = write_site(
        tmp_path / "or-5", SERIAL_SITE, room="or-5", broker=broker.url, port=sim.device
    )
    daemon: Daemon | None = None
    rec = Recorder()
    try:
        async with chromium() as browser:
            # The page's Content-Security-Policy is set aside here, so that a request to
            # another host would really be made and recorded (the other test keeps it).
            page = await browser.new_page(viewport=VIEWPORT, bypass_csp=True)
            rec.attach(page)
            await open_page(page, dash.url + "room/hospital-b/or-5")
            daemon = await Daemon.follow(site)
            await expect(page.locator("#sim-banner")).to_be_visible(timeout=15_000)
            await expect(page.locator("#sim-banner")).to_contain_text("SIMULATED")

            # The dose counts upward while the beam is on.
            await expect(page.locator("#beam-state")).to_have_attribute(
                "data-beam", "on", timeout=30_000
            )
            first = await wait_number(page, "#dose-primary", 0.01, "dose counting")
            await wait_number(page, "#dose-primary", first, "dose rising", within_s=10)
            assert await number(page, "#dose-primary") > first > 0
            await expect(page.locator("#beam-state")).to_contain_text("BEAM ON")
            await expect(page.locator("#live-word")).to_have_text("LIVE")
            await expect(page.locator("#plot-dose path.series")).to_have_count(1)
            await shot(page, "01-room-dose-rising")

            # The scenario opens the door: its interlock trips, the beam is interrupted.
            door = page.locator('#interlocks li[data-interlock="door"]')
            await expect(door).to_have_attribute("data-state", "tripped", timeout=20_000)
            await expect(door).to_contain_text("TRIPPED")
            await expect(page.locator("#all-clear")).to_contain_text("NOT CLEAR")
            await expect(page.locator("#beam-state")).to_have_attribute(
                "data-beam", "interrupted", timeout=5_000
            )
            await expect(page.locator("#beam-state")).to_contain_text("INTERRUPTED")
            await expect(page.locator("#alarms")).to_contain_text("door", timeout=5_000)
            # The daemon's retained alarm list has it too, not acknowledged (a real
            # daemon's alarms payload passes the dashboard's checks; issue 19).
            door_row = page.locator('#alarm-list li[data-alarm-id*="interlock_tripped:door"]')
            await expect(door_row.first).to_have_attribute(
                "data-acknowledged", "false", timeout=5_000
            )
            await expect(door_row.first.locator(".alarm-ack")).to_have_text("NOT ACKNOWLEDGED")
            await shot(page, "02-room-door-tripped-interrupted")

            # Closed and resumed: beam on again, the interruption recorded.
            await expect(door).to_have_attribute("data-state", "ok", timeout=10_000)
            await expect(page.locator("#beam-state")).to_have_attribute(
                "data-beam", "on", timeout=10_000
            )
            await expect(page.locator("#interruptions")).to_contain_text("door", timeout=5_000)
            await shot(page, "03-room-resumed")

            # The end: terminated NORMAL, the whole preset delivered.
            await expect(page.locator("#termination")).to_contain_text("NORMAL", timeout=40_000)
            await expect(page.locator("#beam-state")).to_contain_text("BEAM OFF")
            assert await number(page, "#dose-primary") >= 0.49
            # The lists and plots are redrawn together: once this shows the end, so do they.
            await expect(page.locator("#termination-fact")).to_contain_text("NORMAL")
            await shot(page, "04-room-terminated-normal")

            # The daemon hangs (SIGSTOP: its connection stays open, so no Last Will yet):
            # no telemetry, so STALE within the bound, greyed, with the age shown.
            await daemon.seen(
                lambda r: r.get("event") == "delivery_terminated", "the delivery's end"
            )
            daemon.proc.send_signal(signal.SIGSTOP)
            hung = time.monotonic()
            await expect(page.locator("#live-word")).to_have_text(
                "STALE", timeout=int((STALE_AFTER_S + 1.5) * 1000)
            )
            noticed = time.monotonic() - hung
            assert noticed <= STALE_AFTER_S + 1.5, f"stale shown {noticed:.1f} s after the hang"
            await expect(page.locator("#room")).to_have_attribute("data-live", "false")
            await expect(page.locator("#staleness")).to_be_visible()
            await expect(page.locator("#staleness")).to_contain_text("STALE — NOT LIVE: no data")
            await expect(page.locator("#age")).to_contain_text(re.compile(r"last message \d"))
            await shot(page, "05-room-stale-daemon-hung")

            # Killed: the broker publishes its Last Will (status offline) and the page
            # says OFFLINE.
            daemon.proc.send_signal(signal.SIGKILL)
            await expect(page.locator("#live-word")).to_have_text(
                "OFFLINE", timeout=int(KEEPALIVE_S * 1.5 * 1000 + 3000)
            )
            await expect(page.locator("#staleness")).to_contain_text("daemon is offline")
            await shot(page, "06-room-offline-daemon-killed")
            assert rec.errors == [], f"the page reported errors: {rec.errors}"
    finally:
        if daemon is not None:
            await daemon.ensure_dead()
        await sim.stop()
        code = await dash.stop()
    assert code == 0, "the dashboard stops cleanly on SIGTERM"
    assert rec.requests, "requests were recorded"
    assert rec.foreign(dash.netloc) == [], "the page asked another host"


async def test_two_rooms_on_one_broker_and_a_restarted_dashboard(
    tmp_path: Path, broker: Mosquitto
) -> None:
    # Two simulated rooms; a short preset at x20 so that each delivery ends in seconds.
    sites = [
        write_site(
            tmp_path / room,
            SIM_SITE,
            room=room,
            broker=broker.url,
            speed=20,
            seed=seed,
            preset=preset,
        )
        for room, seed, preset in (("or-7", 3, 0.6), ("or-8", 4, 1.2))
    ]
    dash = await Dashboard.start(
        broker.url, tmp_path / "dashboard.log", "--stale-after", str(STALE_AFTER_S)
    )
    daemons = [await Daemon.follow(s) for s in sites]
    rec = Recorder()
    dash2: Dashboard | None = None
    try:
        for d in daemons:
            await d.seen(
                lambda r: r.get("event") == "delivery_terminated",
                "the delivery's end",
                within_s=60,
            )
        async with chromium() as browser:
            page = await browser.new_page(viewport=VIEWPORT)
            rec.attach(page)
            await open_page(page, dash.url)
            cards = page.locator("#cards section.card")
            await expect(cards).to_have_count(2, timeout=10_000)
            or7 = page.locator('section.card[data-room="hospital-b/or-7"]')
            or8 = page.locator('section.card[data-room="hospital-b/or-8"]')
            for card, preset in ((or7, "0.60"), (or8, "1.20")):
                await expect(card).to_contain_text("SIMULATED")
                await expect(card).to_contain_text("Terminated NORMAL")
                await expect(card).to_contain_text(f"of {preset} Gy")
                await expect(card).to_have_attribute("data-live", "true")
            await shot(page, "07-overview-two-rooms")

            # Keyboard: Tab reaches the room links; Enter opens that room's page.
            await page.keyboard.press("Tab")  # the skip link
            await page.keyboard.press("Tab")  # "All rooms"
            await page.keyboard.press("Tab")
            await expect(page.locator("#card-hospital-b\\/or-7")).to_be_focused()
            await page.keyboard.press("Enter")
            await page.wait_for_url(re.compile(r"/room/hospital-b/or-7$"))
            await expect(page.locator("#room")).to_have_attribute("data-room", "hospital-b/or-7")
            await expect(page.locator("#termination")).to_contain_text("NORMAL")
            await expect(page.locator("#preset")).to_have_text("0.60")
            await expect(page.locator("#facts")).to_contain_text("or-7-")
            await expect(page.locator("#main")).not_to_contain_text("or-8")

            await open_page(page, dash.url + "room/hospital-b/or-8")
            await expect(page.locator("#preset")).to_have_text("1.20", timeout=10_000)
            await expect(page.locator("#facts")).to_contain_text("or-8-")
            await expect(page.locator("#main")).not_to_contain_text("or-7")
            await shot(page, "08-room-or-8-only")

            # Room or-8's daemon is killed: its page is not live within the bound (the
            # broker's Last Will comes at once), and the overview keeps the rooms apart.
            daemons[1].proc.send_signal(signal.SIGKILL)
            killed = time.monotonic()
            await expect(page.locator("#room")).to_have_attribute(
                "data-live", "false", timeout=int((STALE_AFTER_S + 1.5) * 1000)
            )
            assert time.monotonic() - killed <= STALE_AFTER_S + 1.5
            await expect(page.locator("#live-word")).to_have_text("OFFLINE")
            await expect(page.locator("#staleness")).to_contain_text("the daemon is offline")
            await open_page(page, dash.url)
            await expect(or8).to_have_attribute("data-live", "false", timeout=5_000)
            await expect(or8).to_contain_text("OFFLINE")
            await expect(or7).to_have_attribute("data-live", "true")
            await shot(page, "09-overview-one-room-offline")
            await open_page(page, dash.url + "room/hospital-b/or-7")
            await expect(page.locator("#room")).to_have_attribute(
                "data-live", "true", timeout=10_000
            )

            # The dashboard dies: the page, on its own clock, shows the data is not live.
            await dash.kill()
            await expect(page.locator("#room")).to_have_attribute(
                "data-live", "false", timeout=int((STALE_AFTER_S + 4.0) * 1000)
            )
            await expect(page.locator("#link")).to_contain_text("NO CONNECTION")
            await shot(page, "10-room-dashboard-server-gone")

            # A new dashboard on the same port: the page reconnects by itself and shows
            # the current state at once, rebuilt from the retained topics.
            dash2 = await Dashboard.start(
                broker.url,
                tmp_path / "dashboard2.log",
                "--stale-after",
                str(STALE_AFTER_S),
                port=dash.port,
            )
            await expect(page.locator("#room")).to_have_attribute(
                "data-live", "true", timeout=10_000
            )
            await expect(page.locator("#termination")).to_contain_text("NORMAL")
            await expect(page.locator("#preset")).to_have_text("0.60")
            await expect(page.locator('#interlocks li[data-state="ok"]')).to_have_count(10)

            # The dashboard loses its broker: every room is offline, never frozen as live.
            await broker.stop()
            await expect(page.locator("#live-word")).to_have_text("OFFLINE", timeout=10_000)
            await expect(page.locator("#staleness")).to_contain_text("no broker connection")
            await shot(page, "11-room-dashboard-lost-broker")
            errors = rec.errors_but_link_loss(dash.netloc)
            assert errors == [], f"the page reported errors: {errors}"
    finally:
        for d in daemons:
            await d.ensure_dead()
        await dash.kill()
        if dash2 is not None:
            assert await dash2.stop() == 0
    assert rec.foreign(dash.netloc) == [], "the page asked another host"
    assert any("/events?room=hospital-b%2For-7" in u for u in rec.requests), (
        "a room page follows only its own room"
    )
