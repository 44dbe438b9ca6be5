"""The dashboard's login over its real ASGI app, in process, with a real account store (low
argon2 cost, users/kdf.py's TEST_COST) and a real access record: login and the cookie,
one answer for every failure, the back-off (429, Retry-After, on the test's clock), logout,
CSRF and same-origin on every state-changing request, the role table, the data endpoints
behind a session unless the client may see without one, a disabled account losing its
session at the next request, and the access record (no password in it)."""

from __future__ import annotations

import asyncio
import re
import threading
from collections.abc import AsyncIterator, MutableMapping
from dataclasses import dataclass, field
from http.cookies import SimpleCookie
from ipaddress import ip_network
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import orjson
import pytest
from starlette.responses import JSONResponse
from starlette.routing import request_response

from iortd.auditlog.verify import collect_files, iter_entries
from iortd.dashboard import cli
from iortd.dashboard import login as login_mod
from iortd.dashboard.app import build_app
from iortd.dashboard.hub import Hub
from iortd.dashboard.login import Auth, AuthSettings
from iortd.dashboard.state import Rooms
from iortd.users.access import ACCESS_DIR, ACCESS_TYPES, AccessRecord
from iortd.users.changes import open_session
from iortd.users.kdf import TEST_COST
from iortd.users.store import load_store

PW_ADMIN = "violet harbour lantern 42"
PW_ANNA = "seven quiet birches by the lake"
PW_VIC = "a viewer who watches the screens"
PW_TEMP = "temporary-but-long-enough-1"
ORIGIN = "http://127.0.0.1:8080"


def make_store(d: Path) -> Path:
    s = open_session(d, cost=TEST_COST, create=True)
    try:
        s.init("admin-eva", "E. Admin", set(), PW_ADMIN)
        admin = s.admin("admin-eva", PW_ADMIN)
        s.add(admin, "phys-anna", "A. Example, MPE", {"physicist"}, None, PW_TEMP)
        s.add(admin, "viewer-vic", "V. Viewer", {"viewer"}, None, PW_TEMP)
    finally:
        s.close()
    for holder, pw in (("phys-anna", PW_ANNA), ("viewer-vic", PW_VIC)):
        s = open_session(d, cost=TEST_COST)
        try:
            s.passwd(holder, PW_TEMP, pw)
        finally:
            s.close()
    return d


def disable(d: Path, holder: str) -> None:
    s = open_session(d, cost=TEST_COST)
    try:
        s.set_state(s.admin("admin-eva", PW_ADMIN), holder, enable=False, reason="left")
    finally:
        s.close()


@dataclass
class Clock:
    t: float = 1000.0

    def __call__(self) -> float:
        return self.t


@dataclass
class Browser:
    """Cookies kept like a browser's, requests as ASGI calls."""

    app: Any
    client: str = "10.1.2.3"
    cookies: dict[str, str] = field(default_factory=dict)

    async def call(
        self, method: str, path: str, *, body: bytes = b"", headers: dict[str, str] | None = None
    ) -> tuple[int, dict[str, list[str]], Any]:
        heads = {"host": "127.0.0.1:8080", **(headers or {})}
        if self.cookies:
            heads["cookie"] = "; ".join(f"{k}={v}" for k, v in self.cookies.items())
        path, _, query = path.partition("?")
        scope = {
            "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
            "method": method, "scheme": "http", "path": path, "raw_path": path.encode(),
            "query_string": query.encode(), "root_path": "",
            "headers": [(k.encode(), v.encode()) for k, v in heads.items()],
            "client": (self.client, 50000), "server": ("127.0.0.1", 8080),
        }  # fmt: skip
        sent: list[MutableMapping[str, Any]] = []
        chunks = [body]
        never = asyncio.Event()

        async def receive() -> dict[str, Any]:
            if chunks:
                return {"type": "http.request", "body": chunks.pop(), "more_body": False}
            await never.wait()
            return {"type": "http.disconnect"}

        async def send(message: MutableMapping[str, Any]) -> None:
            sent.append(message)

        async with asyncio.timeout(10):
            await self.app(scope, receive, send)
        start = sent[0]
        got: dict[str, list[str]] = {}
        for k, v in start["headers"]:
            got.setdefault(k.decode().lower(), []).append(v.decode())
        for raw in got.get("set-cookie", []):
            c = SimpleCookie()
            c.load(raw)
            for name, morsel in c.items():
                if morsel["max-age"] == "0":
                    self.cookies.pop(name, None)
                else:
                    self.cookies[name] = morsel.value
        data = b"".join(m.get("body", b"") for m in sent[1:])
        try:
            parsed = orjson.loads(data) if data else None
        except orjson.JSONDecodeError:
            parsed = data
        return start["status"], got, parsed

    async def login(
        self, holder: str, password: str, **kw: Any
    ) -> tuple[int, dict[str, list[str]], Any]:
        _, _, info = await self.call("GET", "/api/session")
        token = kw.pop("token", info["login_csrf"])
        return await self.call(
            "POST",
            "/api/login",
            body=urlencode({"holder": holder, "password": password}).encode(),
            headers={
                "content-type": "application/x-www-form-urlencoded",
                "origin": kw.pop("origin", ORIGIN),
                "x-csrf-token": token,
            },
        )


@dataclass
class Rig:
    auth: Auth
    app: Any
    clock: Clock
    users: Path

    def browser(self, client: str = "10.1.2.3") -> Browser:
        return Browser(self.app, client)

    def entries(self) -> list[dict[str, Any]]:
        files = collect_files([self.users / ACCESS_DIR])
        entries = [orjson.loads(line) for _, _, line in iter_entries(files)]
        return [e for e in entries if e["type"] in ACCESS_TYPES]


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    users = await asyncio.to_thread(make_store, tmp_path / "users")  # iort-users runs its own loop
    record = await AccessRecord.open(users / ACCESS_DIR)
    task = asyncio.create_task(record.run())
    clock = Clock()
    settings = AuthSettings(
        users, idle_s=900, max_s=43200, anonymous_view=(ip_network("10.9.0.0/24"),)
    )
    auth = Auth(settings, load_store(users), record, clock=clock)
    hub = Hub(Rooms("iort"), "mqtt://127.0.0.1:1883", clock=lambda: 0.0)
    app = build_app(hub, stale_after_s=5, history_points=100, auth=auth)
    try:
        yield Rig(auth, app, clock, users)
    finally:
        await record.close()
        await task


async def test_login_sets_an_httponly_strict_cookie_and_shows_the_session(rig: Rig) -> None:
    b = rig.browser()
    assert (await b.call("GET", "/api/snapshot"))[0] == 401  # no session, not a room display
    status, heads, body = await b.login("phys-anna", PW_ANNA)
    assert status == 200, body
    cookie = next(c for c in heads["set-cookie"] if c.startswith("iort_session="))
    assert "HttpOnly" in cookie
    assert "SameSite=Strict" in cookie
    assert "Path=/" in cookie
    assert "Secure" not in cookie  # no TLS here
    sid = b.cookies["iort_session"]
    assert sid not in orjson.dumps(body).decode()  # the id only in the cookie
    _, _, info = await b.call("GET", "/api/session")
    assert info["session"]["holder"] == "phys-anna"
    assert info["session"]["name"] == "A. Example, MPE"
    assert info["session"]["roles"] == ["physicist"]
    assert (await b.call("GET", "/api/snapshot"))[0] == 200
    # the physicist's key is held for the session, in memory
    (s,) = rig.auth.book.of("phys-anna")
    assert s.signer is not None
    assert s.signer.name == "phys-anna"


async def test_a_second_login_rotates_the_id(rig: Rig) -> None:
    b = rig.browser()
    await b.login("viewer-vic", PW_VIC)
    first = b.cookies["iort_session"]
    await b.login("viewer-vic", PW_VIC)
    assert b.cookies["iort_session"] != first
    assert first not in rig.auth.book
    assert len(rig.auth.book) == 1


async def test_every_failure_gets_one_answer_and_the_back_off_grows(rig: Rig) -> None:
    b = rig.browser()
    s1, h1, wrong = await b.login("phys-anna", "not the right password at all")
    assert (s1, h1["retry-after"]) == (401, ["1"])
    rig.clock.t += 1
    s2, _, unknown = await b.login("nobody-here", PW_ANNA)
    assert s2 == 401
    assert (
        wrong["error"] == unknown["error"] == "unknown user, wrong password, or account not active"
    )
    # the second failure from this address: 2 s before the next attempt is judged
    status, heads, body = await b.login("phys-anna", PW_ANNA)
    assert status == 429
    assert heads["retry-after"] == ["2"]
    assert body["retry_after_s"] == 2
    assert "iort_session" not in b.cookies
    # another address, same holder: the holder's own back-off (1 s) has passed
    other = rig.browser("10.7.7.7")
    rig.clock.t += 1
    assert (await other.login("phys-anna", PW_ANNA))[0] == 200
    rig.clock.t += 2
    assert (await b.login("phys-anna", PW_ANNA))[0] == 200  # judged, and a success clears it
    assert rig.auth.backoff.failures("ip:10.1.2.3") == 0


async def test_the_holder_backs_off_across_addresses(rig: Rig) -> None:
    for i in range(3):
        await rig.browser(f"10.5.0.{i}").login("phys-anna", "not the right password at all")
        rig.clock.t += 0.1 if i < 2 else 0
    status, _, body = await rig.browser("10.5.0.99").login("phys-anna", PW_ANNA)
    assert status == 429, body


async def test_logout_ends_the_session_and_needs_its_csrf_token(rig: Rig) -> None:
    b = rig.browser()
    _, _, body = await b.login("phys-anna", PW_ANNA)
    csrf = body["session"]["csrf"]
    heads = {"origin": ORIGIN}
    assert (await b.call("POST", "/api/logout", headers=heads))[0] == 403  # no token
    assert (await b.call("POST", "/api/logout", headers={**heads, "x-csrf-token": "x" * 43}))[
        0
    ] == 403
    evil = {"origin": "http://evil.example", "x-csrf-token": csrf}
    assert (await b.call("POST", "/api/logout", headers=evil))[0] == 403
    assert (await b.call("POST", "/api/logout", headers={"x-csrf-token": csrf}))[
        0
    ] == 403  # no origin
    assert (await b.call("GET", "/api/logout"))[0] == 405  # GET never changes state
    assert len(rig.auth.book) == 1
    ref = {"referer": ORIGIN + "/room/a/b", "x-csrf-token": csrf}
    status, _, _ = await b.call("POST", "/api/logout", headers=ref)
    assert status == 200
    assert len(rig.auth.book) == 0
    assert "iort_session" not in b.cookies
    assert (await b.call("GET", "/api/snapshot"))[0] == 401
    assert rig.auth.refused["csrf"] == 2
    assert rig.auth.refused["cross_origin"] == 2


async def test_login_needs_its_csrf_token_and_same_origin(rig: Rig) -> None:
    b = rig.browser()
    assert (
        await b.login(
            "phys-anna",
            PW_ANNA,
            token="made.up",  # noqa: S106 - a CSRF token, not a password
        )
    )[0] == 403
    assert (await b.login("phys-anna", PW_ANNA, origin="http://evil.example"))[0] == 403
    # a token from another browser (its cookie is not ours)
    _, _, theirs = await rig.browser("10.4.4.4").call("GET", "/api/session")
    assert (await b.login("phys-anna", PW_ANNA, token=theirs["login_csrf"]))[0] == 403
    assert len(rig.auth.book) == 0
    assert rig.auth.backoff.failures("ip:10.1.2.3") == 0  # refused before judging


async def test_the_role_table_is_enforced_on_each_action(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(login_mod.ACTIONS, "sign", frozenset({"physicist"}))

    async def sign(request: Any, s: Any) -> Any:
        return JSONResponse({"signed_by": s.holder})

    guarded = request_response(rig.auth.action("sign", sign))
    for holder, pw, want in (("viewer-vic", PW_VIC, 403), ("phys-anna", PW_ANNA, 200)):
        b = rig.browser()
        _, _, body = await b.login(holder, pw)
        b.app = guarded  # the same cookies, sent to the guarded endpoint
        heads = {"origin": ORIGIN, "x-csrf-token": body["session"]["csrf"]}
        status, _, got = await b.call("POST", "/api/sign", headers=heads)
        assert status == want, got
    with pytest.raises(KeyError):
        rig.auth.action("not-in-the-table", sign)


async def test_a_room_display_sees_without_login_and_others_do_not(rig: Rig) -> None:
    display = rig.browser("10.9.0.17")
    assert (await display.call("GET", "/api/snapshot"))[0] == 200
    _, _, info = await display.call("GET", "/api/session")
    assert info["auth"] is True
    assert info["anonymous_view"] is True
    assert info["session"] is None
    corridor = rig.browser("10.9.1.17")
    assert (await corridor.call("GET", "/api/snapshot"))[0] == 401
    assert (await corridor.call("GET", "/events"))[0] == 401
    assert (await corridor.call("GET", "/"))[0] == 200  # the page itself holds no data


async def test_a_disabled_account_loses_its_session_at_the_next_request(rig: Rig) -> None:
    b = rig.browser()
    await b.login("phys-anna", PW_ANNA)
    await asyncio.to_thread(disable, rig.users, "phys-anna")
    rig.clock.t += 1.5  # the store is looked at once a second at most
    assert (await b.call("GET", "/api/snapshot"))[0] == 401
    assert len(rig.auth.book) == 0


async def test_idle_expiry_is_recorded_and_nothing_secret_is(rig: Rig) -> None:
    b = rig.browser()
    await b.login("phys-anna", "not the right password at all")
    rig.clock.t += 1
    await b.login("nobody-typed-this", "some other secret password")
    rig.clock.t += 2
    _, _, body = await b.login("phys-anna", PW_ANNA)
    sid, csrf = b.cookies["iort_session"], body["session"]["csrf"]
    rig.clock.t += 901
    assert (await b.call("GET", "/api/snapshot"))[0] == 401
    types = [(e["type"], e["data"].get("holder"), e["data"].get("reason")) for e in rig.entries()]
    assert types == [
        ("login_failed", "phys-anna", None),
        ("login_failed", None, None),
        ("login", "phys-anna", None),
        ("session_ended", "phys-anna", "idle"),
    ]
    login = rig.entries()[2]["data"]
    assert login["client"] == "10.1.2.3"
    assert login["sig"]
    assert login["by_key"]
    text = b"".join(p.read_bytes() for p in (rig.users / ACCESS_DIR).iterdir() if p.is_file())
    for secret in (
        PW_ANNA,
        "not the right password",
        "some other secret",
        "nobody-typed-this",
        sid,
        csrf,
    ):
        assert secret.encode() not in text, secret


async def test_a_peek_is_not_activity_and_an_open_stream_ends_with_its_session(rig: Rig) -> None:
    b = rig.browser()
    await b.login("viewer-vic", PW_VIC)
    rig.clock.t += 800
    _, _, peek = await b.call("GET", "/api/session?peek=1")
    assert peek["session"]["holder"] == "viewer-vic"
    rig.clock.t += 100  # 900 s after the login: the peek did not restart the idle clock
    _, _, gone = await b.call("GET", "/api/session?peek=1")
    assert gone["session"] is None

    await b.login("viewer-vic", PW_VIC)
    stream = asyncio.create_task(b.call("GET", "/events"))
    done, _ = await asyncio.wait({stream}, timeout=0.3)
    assert not done, "the stream should stay open while the session lives"
    rig.clock.t += 901
    await rig.auth.sweep()
    status, _, _ = await asyncio.wait_for(stream, timeout=5)  # ends at its next tick (1 s)
    assert status == 200
    assert len(rig.auth.book) == 0


async def test_a_stop_ends_every_session_on_the_record(rig: Rig) -> None:
    await rig.browser().login("phys-anna", PW_ANNA)
    await rig.browser("10.3.3.3").login("viewer-vic", PW_VIC)
    await rig.auth.end_all("stopped")
    assert len(rig.auth.book) == 0
    ended = [(e["data"]["holder"], e["data"]["reason"]) for e in rig.entries()[2:]]
    assert ended == [("phys-anna", "stopped"), ("viewer-vic", "stopped")]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--anonymous-view", "10.0.0.0/8"], "--anonymous-view: only with --users-dir"),
        (["--users-dir", "U", "--anonymous-view", "room-7"], "--anonymous-view: 'room-7'"),
        (["--users-dir", "U", "--session-idle", "30"], "--session-idle: must be 60..86400"),
        (["--users-dir", "U", "--session-idle", "900", "--session-max", "600"], "--session-max"),
        (["--users-dir", "missing"], "--users-dir: --dir"),
        (["--tls-cert", "c.pem"], "--tls-cert and --tls-key go together"),
        (["--tls-cert", "c.pem", "--tls-key", "nothing.key"], "--tls-key: cannot read"),
        (["--tls-cert", "c.pem", "--tls-key", "open.key"], "readable by others"),
        (["--tls-cert", "c.pem", "--tls-key", "k.key"], "not a PEM certificate and its key"),
    ],
)
def test_login_and_tls_flags_are_checked_at_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, argv: list[str], message: str
) -> None:
    monkeypatch.chdir(tmp_path)
    make_store(tmp_path / "U")
    (tmp_path / "c.pem").write_text("not a certificate\n")
    (tmp_path / "k.key").write_text("not a key\n")
    (tmp_path / "k.key").chmod(0o600)
    (tmp_path / "open.key").write_text("not a key\n")
    (tmp_path / "open.key").chmod(0o644)
    args = cli._parser().parse_args(["--broker", "mqtt://127.0.0.1", *argv])
    with pytest.raises(cli.UsageError, match=re.escape(message)):
        cli.auth_from_args(args, secure=cli.tls_from_args(args) is not None)


def test_the_login_flags_make_their_settings(tmp_path: Path) -> None:
    make_store(tmp_path / "U")
    argv = ["--broker", "mqtt://127.0.0.1", "--users-dir", str(tmp_path / "U")]
    argv += ["--anonymous-view", "10.20.30.41", "--anonymous-view", "fd00::/8"]
    got = cli.auth_from_args(cli._parser().parse_args(argv), secure=True)
    assert got is not None
    settings, store = got
    assert settings.anonymous_view == (ip_network("10.20.30.41/32"), ip_network("fd00::/8"))
    assert (settings.idle_s, settings.max_s, settings.secure) == (900, 43200, True)
    assert "phys-anna" in store.users


async def test_logins_and_refusals_are_counted_in_the_metrics(rig: Rig) -> None:
    b = rig.browser()
    await b.login("phys-anna", "not the right password at all")
    await b.login("phys-anna", PW_ANNA, token="x.y")  # noqa: S106 - a CSRF token
    rig.clock.t += 1
    await b.login("phys-anna", PW_ANNA)
    status, _, text = await b.call("GET", "/metrics")
    assert status == 200
    body = text.decode()
    assert 'iort_dashboard_logins_total{outcome="failed"} 1.0' in body
    assert 'iort_dashboard_logins_total{outcome="ok"} 1.0' in body
    assert 'iort_dashboard_requests_refused_total{reason="csrf"} 1.0' in body
    assert "iort_dashboard_sessions 1.0" in body
    assert "phys-anna" not in body


async def test_someone_elses_failures_do_not_keep_the_users_own_browser_out(rig: Rig) -> None:
    mine = rig.browser("10.1.1.1")
    await mine.login("phys-anna", PW_ANNA)
    assert "iort_device" in mine.cookies
    _, _, body = await mine.call("GET", "/api/session")
    await mine.call(
        "POST",
        "/api/logout",
        headers={"origin": ORIGIN, "x-csrf-token": body["session"]["csrf"]},
    )
    attacker = rig.browser("10.6.6.6")
    for _ in range(6):  # the holder's back-off climbs to 32 s
        await attacker.login("phys-anna", "guessing at her password now")
        rig.clock.t += rig.auth.backoff.wait_s("holder:phys-anna", rig.clock.t) + 0.01
    rig.clock.t -= 20  # in the middle of the holder's wait
    assert rig.auth.backoff.wait_s("holder:phys-anna", rig.clock.t) > 0
    assert (await rig.browser("10.2.2.2").login("phys-anna", PW_ANNA))[0] == 429
    status, _, got = await mine.login("phys-anna", PW_ANNA)  # her own workstation
    assert status == 200, got
    # a forged or another holder's device cookie is no exemption
    stranger = rig.browser("10.3.3.3")
    stranger.cookies["iort_device"] = mine.cookies["iort_device"].replace("phys-anna", "viewer-vic")
    await stranger.call("GET", "/api/session")
    assert rig.auth.devices.check(stranger.cookies["iort_device"], "viewer-vic") is None


async def test_parallel_attempts_do_not_slip_past_the_back_off(rig: Rig) -> None:
    """A second attempt for the same holder or from the same address while the first is
    being judged is not judged: otherwise parallel requests would each be checked before
    the first failure counted."""
    gate, entered = threading.Event(), threading.Event()
    real = rig.auth.unlock

    def slow_unlock(store: Any, holder: str, password: str) -> Any:
        entered.set()
        gate.wait(5)
        return real(store, holder, password)

    rig.auth.unlock = slow_unlock
    first = asyncio.create_task(rig.browser("10.8.0.1").login("phys-anna", "guess number one!!"))
    assert await asyncio.to_thread(entered.wait, 5), "the first attempt was never judged"
    status, heads, _ = await rig.browser("10.8.0.2").login("phys-anna", "guess number two!!")
    status_ip, _, _ = await rig.browser("10.8.0.1").login("viewer-vic", "guess number three")
    gate.set()
    assert (await first)[0] == 401
    assert (status, heads["retry-after"]) == (429, ["1"])
    assert status_ip == 429
    assert rig.auth.logins["failed"] == 1
