"""Acknowledging an alarm from the dashboard, end to end (issue 19, Done when: "viewer
cannot acknowledge, operator acknowledges an alarm that then shows 'acknowledged by' on the
dashboard and in the report"): a real `iortd run` (sim driver, a short delivery at speed
300) over a real Mosquitto, a real `iort-dashboard` with an account store, headless
Chromium.

The site's dose-channel tolerance is set below what the simulated console's two channels
agree to (as tests/integration/test_alarm_ack_e2e.py does), so the delivery raises
``dose_channel_disagreement``, which stands. A viewer logs in: the alarm's row has no
Acknowledge button, and a POST from the viewer's page is refused (403 without the CSRF
token, 403 with it: the role). An operator logs in, opens the row's form with the keyboard,
adds a comment and confirms: the page says ACKNOWLEDGED on the daemon's word, and the row
says "acknowledged by O. Operator, RTT (op-otto) at T" from the retained ``alarms`` topic.
Then the log holds ``alarm_acknowledged`` by the operator, and ``iort-audit report`` shows
who acknowledged it and when.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import pytest
from daemonproc import Daemon, Site
from dashproc import PW_OPER, PW_VIEWER, Dashboard, Recorder, chromium, make_accounts, shot
from playwright.async_api import expect
from test_signoff_browser import ROOM, _login, _run

from iortd.auditlog.writer import segment_paths
from iortd.daemon.mqtt.broker import BrokerOptions, Mosquitto
from iortd.users.keyring import keyring_bytes
from iortd.users.store import load_store

pytestmark = [pytest.mark.integration, pytest.mark.browser]

KEY = "dose_channel_disagreement"
ROW = f"#alarm-list li[data-alarm-id^='{json.dumps([KEY])[:-1]},']"  # that key's raising
COMMENT = "channels checked against the console"


async def test_a_viewer_cannot_and_an_operator_acknowledges_an_alarm_in_chromium(
    tmp_path: Path, make_site: Callable[..., Site]
) -> None:
    users = await asyncio.to_thread(make_accounts, tmp_path / "users")
    ring = tmp_path / "keyring.toml"
    ring.write_bytes(keyring_bytes(load_store(users))[0])  # what iort-users writes
    with Mosquitto(BrokerOptions(), tmp_path / "broker") as broker:
        site = make_site(speed=300, mqtt=f'url = "{broker.url}"\nkeepalive_s = 2')
        text = (
            site.config.read_text()
            .replace("start_delay_s = 5.0", "start_delay_s = 1.0\npreset_gy = 2.0")
            .replace(
                "stale_after_polls = 5\n",
                "stale_after_polls = 5\ndose_channel_rel = 0.0001\ndose_channel_abs_gy = 0.0\n",
            )
        )
        site.config.write_text(text + f'\n[commands]\nkeyring = "{ring}"\n')
        dash = await Dashboard.start(broker.url, tmp_path / "dash.log", "--users-dir", str(users))
        daemon: Daemon | None = None
        try:
            async with chromium() as browser:
                daemon = await Daemon.follow(site)
                viewer = await browser.new_page()
                await _login(viewer, dash.url + "room/" + ROOM, "viewer-vic", PW_VIEWER)
                row = viewer.locator(ROW)
                await expect(row).to_have_attribute("data-acknowledged", "false", timeout=30_000)
                await expect(row.locator(".alarm-ack")).to_have_text("NOT ACKNOWLEDGED")
                await expect(row.locator("button")).to_have_count(0)  # no button for a viewer
                alarm_id = json.loads(await row.get_attribute("data-alarm-id") or "null")
                forged = (
                    "([csrf, body]) => fetch('/api/ack', {method: 'POST', credentials: "
                    "'same-origin', headers: {'content-type': "
                    "'application/x-www-form-urlencoded', 'x-csrf-token': csrf}, body})"
                    ".then((r) => r.status)"
                )
                form = (
                    f"room={ROOM}&alarm_key={KEY}&raised_at={alarm_id[1]}"
                    f"&delivery_id={alarm_id[2] or ''}"
                )
                assert await viewer.evaluate(forged, ["", form]) == 403  # no CSRF token
                token = await viewer.evaluate("() => window.iortSession().session.csrf")
                assert await viewer.evaluate(forged, [token, form]) == 403  # not an operator

                page = await browser.new_page()
                rec = Recorder()
                rec.attach(page)
                await _login(page, dash.url + "room/" + ROOM, "op-otto", PW_OPER)
                await daemon.seen(lambda r: r.get("event") == "mqtt_command_subscribed", "cmd/#")
                row = page.locator(ROW)
                button = row.locator(".alarm-ack-open")
                await expect(button).to_be_visible(timeout=10_000)
                # the keyboard alone: focus the button, Enter opens the form (its comment
                # field takes the focus), Enter in the field confirms
                await button.focus()
                await page.keyboard.press("Enter")
                comment = row.locator(".alarm-ack-comment")
                await expect(comment).to_be_focused()
                await page.keyboard.type(COMMENT)
                await page.keyboard.press("Enter")
                result = page.locator("#alarm-ack-result")
                await expect(result).to_contain_text(
                    f"ACKNOWLEDGED — alarm {KEY} raised {alarm_id[1]} acknowledged by "
                    "O. Operator, RTT (op-otto)",
                    timeout=15_000,
                )
                await expect(row).to_have_attribute("data-acknowledged", "true", timeout=5_000)
                await expect(row.locator(".alarm-ack")).to_contain_text(
                    "acknowledged by O. Operator, RTT (op-otto) at "
                )
                await expect(button).to_be_hidden()
                await shot(page, "alarm-acknowledged")
                # the viewer's page shows it too, from the same retained topic
                await expect(viewer.locator(ROW + " .alarm-ack")).to_contain_text(
                    "acknowledged by O. Operator, RTT (op-otto)"
                )
                assert not rec.foreign(dash.netloc)
                assert rec.errors == []
        finally:
            if daemon is not None:
                assert await daemon.stop() == 0
            assert await dash.stop() == 0
    entries = [
        json.loads(line)
        for path in segment_paths(site.log_dir)
        for line in path.read_text().splitlines()
    ]
    [acked] = [e for e in entries if e["type"] == "alarm_acknowledged"]
    d = acked["data"]
    assert (d["key"], d["by"], d["name"]) == (KEY, "op-otto", "O. Operator, RTT")
    assert (d["raised_at"], d["delivery_id"], d["comment"]) == (alarm_id[1], alarm_id[2], COMMENT)
    assert [e for e in entries if e["type"] == "ack_refused"] == []
    html = tmp_path / "report.html"
    rc, out = await asyncio.to_thread(
        _run, "report", str(site.log_dir), "--delivery", d["delivery_id"], "--out", str(html),
        "--pubkey", str(site.pubkey),
    )  # fmt: skip
    assert rc == 0, out
    report = html.read_text("utf-8")
    at = datetime.fromisoformat(acked["ts"])
    assert "acknowledged by" in report
    assert f"O. Operator, RTT (op-otto), {at:%Y-%m-%d %H:%M:%S}" in report
    assert COMMENT in report
    assert PW_OPER not in dash.log.read_text("utf-8")
    assert PW_OPER not in "".join(p.read_text() for p in segment_paths(site.log_dir))
