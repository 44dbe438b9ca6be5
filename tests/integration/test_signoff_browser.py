"""A physicist's electronic sign-off end to end (issue 19 item 4, Done when): a real
`iortd run` (sim driver, a short delivery at speed 300) over a real Mosquitto, a real
`iort-dashboard` with an account store, headless Chromium.

The physicist logs in, the delivery ends, the Sign-off panel appears once the daemon has
published the delivery's record; the physicist signs it "approved" (ID and password: the
first signing of the session) and the page says RECORDED on the daemon's word. Then the log
holds ``delivery_signed``, ``iort-audit verify --keyring`` checks the signature and the
record, and ``iort-audit report --keyring`` shows the printed name, the meaning and
"valid". A viewer sees no Sign-off panel, and a POST from the viewer's page (without the
CSRF token, then with it) is refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import aiomqtt
import pytest
from daemonproc import Daemon, Site
from dashproc import PW_PHYS, PW_VIEWER, Dashboard, Recorder, chromium, make_accounts, shot
from playwright.async_api import Page, expect

from iortd.auditlog.writer import segment_paths
from iortd.daemon.mqtt.broker import BrokerOptions, Mosquitto
from iortd.users.keyring import keyring_bytes
from iortd.users.store import load_store

pytestmark = [pytest.mark.integration, pytest.mark.browser]

BIN = Path(sys.executable).parent
ROOM = "test-site/or-7"


async def _login(page: Page, url: str, holder: str, password: str) -> None:
    await page.goto(url, wait_until="domcontentloaded", timeout=15_000)
    await expect(page.locator("#login-form")).to_be_visible(timeout=10_000)
    await page.fill("#login-holder", holder)
    await page.fill("#login-password", password)
    await page.click("#login-submit")
    await expect(page.locator("#login-who")).to_contain_text(holder, timeout=10_000)


def _run(*argv: str) -> tuple[int, str]:
    p = subprocess.run(
        [str(BIN / "iort-audit"), *argv], capture_output=True, text=True, timeout=60, check=False
    )
    return p.returncode, p.stdout + p.stderr


async def test_a_physicist_signs_off_a_delivery_in_chromium(
    tmp_path: Path, make_site: Callable[..., Site]
) -> None:
    users = await asyncio.to_thread(make_accounts, tmp_path / "users")
    ring = tmp_path / "keyring.toml"
    ring.write_bytes(keyring_bytes(load_store(users))[0])  # what iort-users writes
    with Mosquitto(BrokerOptions(), tmp_path / "broker") as broker:
        site = make_site(speed=300, mqtt=f'url = "{broker.url}"\nkeepalive_s = 2')
        text = site.config.read_text().replace(
            "start_delay_s = 5.0", "start_delay_s = 1.0\npreset_gy = 2.0"
        )
        site.config.write_text(text + f'\n[commands]\nkeyring = "{ring}"\n')
        dash = await Dashboard.start(broker.url, tmp_path / "dash.log", "--users-dir", str(users))
        daemon: Daemon | None = None
        wire: list[bytes] = []  # every payload on the room's topics, commands included
        listening = asyncio.Event()
        tap = asyncio.create_task(_tap(broker.port, wire, listening))
        try:
            async with asyncio.timeout(10):
                await listening.wait()
            async with chromium() as browser:
                page = await browser.new_page()
                rec = Recorder()
                rec.attach(page)
                await _login(page, dash.url + "room/" + ROOM, "phys-anna", PW_PHYS)
                daemon = await Daemon.follow(site)
                panel = page.locator("#signoff")
                # the delivery ends and its covering checkpoint is signed: the record is out
                await expect(panel).to_be_visible(timeout=30_000)
                await page.click("#signoff-open")
                await page.select_option("#signoff-meaning", "approved")
                await page.fill("#signoff-holder", "phys-anna")
                await page.fill("#signoff-password", PW_PHYS)
                await page.click("#signoff-submit")
                result = page.locator("#signoff-result")
                await expect(result).to_contain_text("RECORDED — sign-off recorded", timeout=15_000)
                await expect(result).to_contain_text("approved by A. Example, MPE (phys-anna)")
                await shot(page, "signoff-recorded")

                viewer = await browser.new_page()
                await _login(viewer, dash.url + "room/" + ROOM, "viewer-vic", PW_VIEWER)
                await expect(viewer.locator("#beam-state")).not_to_be_empty(timeout=10_000)
                await expect(viewer.locator("#signoff")).to_be_hidden()
                forged = (
                    "(csrf) => fetch('/api/signoff', {method: 'POST', credentials: 'same-origin',"
                    " headers: {'content-type': 'application/x-www-form-urlencoded',"
                    " 'x-csrf-token': csrf}, body: 'room=test-site/or-7&delivery_id=x&"
                    "meaning=approved&holder=viewer-vic&password=x'}).then((r) => r.status)"
                )
                assert await viewer.evaluate(forged, "") == 403  # no CSRF token
                token = await viewer.evaluate("() => window.iortSession().session.csrf")
                assert await viewer.evaluate(forged, token) == 403  # not a physicist
                assert not rec.foreign(dash.netloc)
        finally:
            tap.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await tap
            if daemon is not None:
                assert await daemon.stop() == 0
            assert await dash.stop() == 0
    entries = [
        json.loads(line)
        for path in segment_paths(site.log_dir)
        for line in path.read_text().splitlines()
    ]
    [signed] = [e for e in entries if e["type"] == "delivery_signed"]
    assert (signed["data"]["meaning"], signed["data"]["by"]) == ("approved", "phys-anna")
    rc, out = await asyncio.to_thread(
        _run, "verify", str(site.log_dir), "--pubkey", str(site.pubkey), "--keyring", str(ring)
    )
    assert rc == 0, out
    assert "1 sign-off: 1 signature(s) valid against the keyring" in out
    html = tmp_path / "report.html"
    did = signed["data"]["delivery_id"]
    rc, out = await asyncio.to_thread(
        _run, "report", str(site.log_dir), "--delivery", did, "--out", str(html),
        "--pubkey", str(site.pubkey), "--keyring", str(ring),
    )  # fmt: skip
    assert rc == 0, out
    page_text = html.read_text()
    assert "A. Example, MPE" in page_text
    assert ">approved<" in page_text
    assert "valid (checked against the keyring)" in page_text
    # no password in the dashboard's log, the daemon's log or the audit log
    assert PW_PHYS not in dash.log.read_text("utf-8")
    assert daemon is not None
    assert PW_PHYS not in json.dumps(daemon.lines)
    assert PW_PHYS not in "".join(p.read_text() for p in segment_paths(site.log_dir))
    # nor a password, a password hash or a sealed key on MQTT (the signed commands
    # included), in the logs or the audit log
    assert any(b"/cmd/signoff" in w for w in wire), "the tap saw the sign-off command"
    store = json.loads((users / "users.json").read_text())
    secrets = [PW_PHYS, PW_VIEWER, "$argon2id$"]
    for u in store["users"]:
        secrets.append(u["password_hash"])
        for k in u["keys"]:  # a sealed key's salt, nonce and ciphertext
            secrets += [
                v for v in (k.get("sealed") or {}).values() if isinstance(v, str) and len(v) >= 16
            ]
    said = b"".join(wire).decode("utf-8", "replace")
    logs = dash.log.read_text("utf-8") + json.dumps(daemon.lines)
    audit_log = "".join(p.read_text() for p in segment_paths(site.log_dir))
    for secret in secrets:
        assert secret not in said, "a secret on MQTT"
        assert secret not in logs, "a secret in a log"
        assert secret not in audit_log, "a secret in the audit log"


async def _tap(port: int, wire: list[bytes], listening: asyncio.Event) -> None:
    """Every message on iort/# (topic and payload), until cancelled."""
    async with aiomqtt.Client("127.0.0.1", port, identifier="secrets-tap") as client:
        await client.subscribe("iort/#")
        listening.set()
        async for m in client.messages:
            payload = m.payload if isinstance(m.payload, bytes) else str(m.payload).encode()
            wire.append(str(m.topic).encode() + b" " + payload)
