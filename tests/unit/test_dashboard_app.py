"""The dashboard's web app called as ASGI, in process: only allowed ``Host`` headers are
served (a DNS-rebinding page must not read the snapshot), and the security headers go on
the refusal too."""

from __future__ import annotations

import asyncio
from collections.abc import MutableMapping
from typing import Any

import orjson
import pytest

from iortd.dashboard.app import build_app, host_name
from iortd.dashboard.hub import Hub
from iortd.dashboard.state import Rooms


async def get(path: str, host: str | None, **kw: Any) -> tuple[int, dict[str, str], bytes]:
    rooms = Rooms("iort")
    app = build_app(Hub(rooms, "mqtt://127.0.0.1:1883", clock=lambda: 0.0), **kw)
    path, _, query = path.partition("?")
    headers = [] if host is None else [(b"host", host.encode())]
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": query.encode(),
        "root_path": "",
        "headers": headers,
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8080),
    }
    sent: list[MutableMapping[str, Any]] = []
    requested = False
    never = asyncio.Event()

    async def receive() -> dict[str, Any]:
        # The request once; then, as a client that stays connected, nothing (a file
        # response listens for a disconnect while it sends).
        nonlocal requested
        if requested:
            await never.wait()
        requested = True
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: MutableMapping[str, Any]) -> None:
        sent.append(message)

    async with asyncio.timeout(5):
        await app(scope, receive, send)
    start = sent[0]
    body = b"".join(m.get("body", b"") for m in sent[1:])
    heads = {k.decode().lower(): v.decode() for k, v in start["headers"]}
    return start["status"], heads, body


@pytest.mark.parametrize(
    "host", ["evil.example", "evil.example:8080", "127.0.0.1.evil.example", "[::2]:8080", None]
)
async def test_a_request_naming_another_host_gets_400_and_no_snapshot(host: str | None) -> None:
    status, headers, body = await get("/api/snapshot", host, stale_after_s=5, history_points=100)
    assert status == 400
    assert b"rooms" not in body
    assert headers["content-security-policy"].startswith("default-src 'none'")


@pytest.mark.parametrize("host", ["127.0.0.1:8080", "localhost:8080", "LOCALHOST", "[::1]:8080"])
async def test_the_loopback_names_are_served_by_default(host: str) -> None:
    status, _, body = await get("/api/snapshot", host, stale_after_s=5, history_points=100)
    assert status == 200
    assert "rooms" in orjson.loads(body)


async def test_a_configured_host_is_served_and_the_defaults_are_not_replaced() -> None:
    kw: dict[str, Any] = {
        "stale_after_s": 5,
        "history_points": 100,
        "allowed_hosts": ["localhost", "dashboard.hospital.example", "::1"],
    }
    assert (await get("/", "dashboard.hospital.example:8080", **kw))[0] == 200
    assert (await get("/", "[::1]:8080", **kw))[0] == 200
    assert (await get("/", "evil.example", **kw))[0] == 400


def test_host_names_are_compared_without_port_and_case() -> None:
    assert host_name("Example.ORG:80") == "example.org"
    assert host_name("[::1]:8080") == "[::1]"
    assert host_name("::1") == "[::1]"
    assert host_name("127.0.0.1") == "127.0.0.1"


async def test_a_browser_stream_that_falls_behind_is_bounded_in_bytes_and_closed() -> None:
    """Each browser's queue holds at most QUEUE_BYTES of payloads: a browser that cannot
    keep up with large messages is cut off (it reconnects to a fresh snapshot) rather
    than held in memory."""
    rooms = Rooms("iort")
    hub = Hub(rooms, "mqtt://127.0.0.1:1883", clock=lambda: 0.0)
    sub = hub.subscribe(None)
    message = b"x" * 200_000
    data = orjson.dumps(
        {
            "schema": "iort/v1",
            "session": 1,
            "seq": 0,
            "ts": "2026-11-26T10:00:00.000000Z",
            "sim": True,
            "historical": False,
            "kind": "daemon_notice",
            "delivery_id": None,
            "at": "2026-11-26T10:00:00.000000Z",
            "severity": "info",
            "message": message.decode(),
        }
    )
    for seq in range(1, 200):  # 40 MB in all, far below the 5000-message bound
        acc = rooms.receive("iort/v1/s/r/events", data.replace(b'"seq":0', b'"seq":%d' % seq), 0.0)
        assert acc is not None
        hub.message(acc)
    assert sub.dropped, "the stream was closed"
    assert sub.queue.qsize() == 1
    assert (await sub.next()).event == "closed"
