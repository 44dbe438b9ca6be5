"""The dashboard's login in headless Chromium and over HTTPS (issue 19 item 2, Done when):
a real `iort-dashboard` with an account store made by the test (low argon2 cost).

* without a login nothing of the rooms is fetched; a wrong password gets the one message,
  the immediate retry is held back ("wait N s") and not judged; the right password, once
  the wait is over, shows who is logged in and opens the stream; logout ends it;
* a room display (its address in ``--anonymous-view``) sees the rooms without a login;
* over TLS (a certificate the test makes): the page and the API answer over https, the
  session cookie is ``Secure``, and a state-changing request without a session or a CSRF
  token is refused.

No broker is needed for any of this: the dashboard is given a closed port and shows
OFFLINE, which is beside the point here.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import ssl
from pathlib import Path
from urllib.parse import urlencode, urlsplit

import pytest
from dashproc import PW_PHYS, Dashboard, Recorder, chromium, make_accounts, shot
from playwright.async_api import expect
from tlscerts import make_tls_files

pytestmark = [pytest.mark.integration, pytest.mark.browser]

NO_BROKER = "mqtt://127.0.0.1:9"


async def test_login_back_off_logout_and_a_room_display_in_chromium(tmp_path: Path) -> None:
    users, display_users = await asyncio.gather(
        asyncio.to_thread(make_accounts, tmp_path / "users"),
        asyncio.to_thread(make_accounts, tmp_path / "display-users"),
    )
    dash, display = await asyncio.gather(
        Dashboard.start(NO_BROKER, tmp_path / "dash.log", "--users-dir", str(users)),
        Dashboard.start(
            NO_BROKER, tmp_path / "display.log", "--users-dir", str(display_users),
            "--anonymous-view", "127.0.0.1/32",
        ),
    )  # fmt: skip
    try:
        async with chromium() as browser:
            # the room's own display (its address listed): sees without a login
            room_page = await browser.new_page()
            room_rec = Recorder()
            room_rec.attach(room_page)
            await room_page.goto(display.url, wait_until="domcontentloaded", timeout=15_000)
            await expect(room_page.locator("#login-who")).to_have_text("not logged in")
            await expect(room_page.locator("#login-form")).to_be_hidden()
            await expect(room_page.locator("#login-open")).to_be_visible()
            await expect(room_page.locator("#link")).not_to_have_text("connecting…")
            assert any("/events" in u for u in room_rec.requests)

            # any other client: the form, and nothing of the rooms fetched
            page = await browser.new_page()
            rec = Recorder()
            rec.attach(page)
            await page.goto(dash.url, wait_until="domcontentloaded", timeout=15_000)
            form = page.locator("#login-form")
            await expect(form).to_be_visible(timeout=10_000)
            await expect(page.locator("#login-who")).to_have_text("not logged in")
            await expect(page.locator("#link")).to_have_text("Log in to see the rooms")
            assert not any("/events" in u or "/api/snapshot" in u for u in rec.requests)
            await shot(page, "login-form")

            await page.fill("#login-holder", "phys-anna")
            await page.fill("#login-password", "not the right password at all")
            await page.click("#login-submit")
            msg = page.locator("#login-message")
            await expect(msg).to_contain_text("unknown user, wrong password", timeout=10_000)
            await page.fill("#login-password", PW_PHYS)
            await page.click("#login-submit")  # at once: held back, not judged
            await expect(msg).to_contain_text("wait", timeout=10_000)
            await shot(page, "login-back-off")

            # the wait (1 s after one failure) ends: then the attempt is judged
            who = page.locator("#login-who")
            async with asyncio.timeout(15):
                while True:
                    await page.click("#login-submit")
                    try:
                        await expect(who).to_contain_text("phys-anna", timeout=1_500)
                        break
                    except AssertionError:
                        await expect(msg).to_contain_text("wait", timeout=5_000)
            await expect(who).to_contain_text("A. Example, MPE")
            await expect(who).to_contain_text("physicist")
            await expect(page.locator("#link")).not_to_have_text("Log in to see the rooms")
            assert any("/events" in u for u in rec.requests)
            await shot(page, "login-done")

            await page.click("#logout")
            await expect(page.locator("#login-form")).to_be_visible(timeout=10_000)
            await expect(who).to_have_text("not logged in")
            assert not rec.foreign(dash.netloc)
            assert not room_rec.foreign(display.netloc)
            # the browser reports the refused logins (401, 429) as console errors; nothing else
            unexpected = [e for e in rec.errors_but_link_loss(dash.netloc) if "/api/login" not in e]
            assert not unexpected, unexpected
    finally:
        assert await dash.stop() == 0
        assert await display.stop() == 0
    logged = [r.get("event") for r in dash.log_records()]
    for event in ("login_failed", "login", "logout"):
        assert event in logged, logged
    text = dash.log.read_text("utf-8")
    assert PW_PHYS not in text
    assert "not the right password" not in text


def _https(
    port: int, ctx: ssl.SSLContext, method: str, path: str, body: str = "",
    headers: dict[str, str] | None = None,
) -> tuple[int, list[tuple[str, str]], dict[str, object]]:  # fmt: skip
    conn = http.client.HTTPSConnection("localhost", port, context=ctx, timeout=10)
    try:
        conn.request(method, path, body=body or None, headers=headers or {})
        resp = conn.getresponse()
        data = resp.read()
        return resp.status, resp.getheaders(), json.loads(data) if data else {}
    finally:
        conn.close()


async def test_over_tls_the_cookie_is_secure_and_unguarded_posts_are_refused(
    tmp_path: Path,
) -> None:
    users = await asyncio.to_thread(make_accounts, tmp_path / "users")
    tls = make_tls_files(tmp_path / "tls")
    dash = await Dashboard.start(
        NO_BROKER, tmp_path / "dash.log", "--users-dir", str(users),
        "--tls-cert", str(tls.server_cert), "--tls-key", str(tls.server_key),
    )  # fmt: skip
    try:
        assert dash.url.startswith("https://")
        port = dash.port
        ctx = ssl.create_default_context(cafile=str(tls.ca))
        origin = f"https://localhost:{port}"

        def run() -> None:
            status, heads, info = _https(port, ctx, "GET", "/api/session")
            assert status == 200
            assert info["auth"] is True
            assert info["session"] is None
            pre = next(v for k, v in heads if k.lower() == "set-cookie")
            assert "Secure" in pre
            assert "HttpOnly" in pre
            cookie = pre.split(";")[0]
            # no session, no token: refused
            status, _, _ = _https(port, ctx, "POST", "/api/logout", headers={"origin": origin})
            assert status == 401
            # a client on the host cannot re-label the request through proxy headers: an
            # http:// origin stays cross-origin over https (uvicorn's proxy headers are off)
            forged = {
                "origin": f"http://localhost:{port}",
                "x-forwarded-proto": "http",
                "x-forwarded-for": "10.20.30.41",
            }
            status, _, refusal = _https(port, ctx, "POST", "/api/logout", headers=forged)
            assert (status, refusal.get("reason")) == (403, "cross_origin")
            form = urlencode({"holder": "phys-anna", "password": PW_PHYS})
            heads_in = {
                "origin": origin,
                "content-type": "application/x-www-form-urlencoded",
                "cookie": cookie,
            }
            status, _, _ = _https(port, ctx, "POST", "/api/login", form, heads_in)
            assert status == 403  # no CSRF token
            token = str(info["login_csrf"])
            heads_in["x-csrf-token"] = token
            status, heads, body = _https(port, ctx, "POST", "/api/login", form, heads_in)
            assert status == 200, body
            sess = next(
                v for k, v in heads if k.lower() == "set-cookie" and v.startswith("iort_session=")
            )
            assert "Secure" in sess
            assert "SameSite=Strict" in sess
            session_cookie = sess.split(";")[0]
            csrf = body["session"]["csrf"]  # type: ignore[index]
            out = {"origin": origin, "cookie": session_cookie}
            assert _https(port, ctx, "POST", "/api/logout", headers=out)[0] == 403  # no token
            out["x-csrf-token"] = csrf
            assert _https(port, ctx, "POST", "/api/logout", headers=out)[0] == 200

        await asyncio.to_thread(run)
        # a plain-HTTP client on the TLS port gets nothing served
        assert urlsplit(dash.url).scheme == "https"
    finally:
        assert await dash.stop() == 0
