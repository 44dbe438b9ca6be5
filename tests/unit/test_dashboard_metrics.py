"""The dashboard's own /metrics: viewers connected, messages received and rejected per topic
kind, rooms known and the broker connection, parsed with prometheus_client's text parser;
behind the same Host check as every other route."""

from __future__ import annotations

import asyncio
from collections.abc import MutableMapping
from typing import Any

import aiomqtt
import orjson
from prometheus_client.parser import text_string_to_metric_families

from iortd.dashboard.app import build_app
from iortd.dashboard.hub import Hub
from iortd.dashboard.mqtt import incoming_queue
from iortd.dashboard.state import Rejected, Rooms

TS = "2026-11-26T10:00:00.000000Z"


def status(room: str, seq: int = 1) -> bytes:
    return orjson.dumps(
        {
            "schema": "iort/v1",
            "session": 1,
            "seq": seq,
            "ts": TS,
            "sim": True,
            "historical": False,
            "online": True,
            "software_version": "0.1.0",
            "site": "site-a",
            "room": room,
        }
    )


async def call(app: Any, path: str, host: str = "127.0.0.1") -> tuple[int, bytes]:
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", host.encode())],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8080),
    }
    sent: list[MutableMapping[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: MutableMapping[str, Any]) -> None:
        sent.append(message)

    async with asyncio.timeout(5):
        await app(scope, receive, send)
    return sent[0]["status"], b"".join(m.get("body", b"") for m in sent[1:])


def samples(body: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(body.decode())
        for s in fam.samples
    }


async def test_metrics_count_viewers_messages_by_kind_rooms_and_the_broker() -> None:
    rooms = Rooms("iort")
    hub = Hub(rooms, "mqtt://127.0.0.1:1883", clock=lambda: 0.0)
    app = build_app(hub, stale_after_s=5, history_points=100)
    queue = incoming_queue(rooms, lambda _t, _e: None)()
    arriving = [
        ("iort/v1/site-a/or-1/status", status("or-1")),
        ("iort/v1/site-a/or-2/status", status("or-2")),
        ("iort/v1/site-a/or-1/telemetry", b"not json"),
        ("iort/v1/site-a/or-1/cmd/ack", b"{}"),  # a command: passed over, not rejected
        ("iort/v1/site-a/or-1/wrong", b"{}"),
        ("elsewhere/x", b"{}"),
    ]
    for topic, payload in arriving:
        queue.put_nowait(aiomqtt.Message(topic, payload, 1, False, 1, None))
    while not queue.empty():  # what the consumer does with each (dashboard/mqtt.py)
        msg = queue.get_nowait()
        raw = msg.payload if isinstance(msg.payload, bytes) else b""
        try:
            accepted = rooms.receive(msg.topic.value, raw, 0.0)
        except Rejected:
            continue
        if accepted is not None:
            hub.message(accepted)
    hub.subscribe(None)
    hub.subscribe("site-a/or-1")
    hub.set_broker(True, "connected")

    code, body = await call(app, "/metrics")
    assert code == 200
    got = samples(body)
    assert got["iort_dashboard_viewers", ()] == 2
    assert got["iort_dashboard_rooms", ()] == 2
    assert got["iort_dashboard_broker_connected", ()] == 1
    received = {k[1][0][1]: v for k, v in got.items() if k[0] == "iort_dashboard_received_total"}
    rejected = {k[1][0][1]: v for k, v in got.items() if k[0] == "iort_dashboard_rejected_total"}
    assert received == {"status": 2, "telemetry": 1, "cmd": 1, "other": 2}
    assert rejected == {"telemetry": 1, "other": 2}

    hub.set_broker(False, "the connection ended")
    assert samples((await call(app, "/metrics"))[1])["iort_dashboard_broker_connected", ()] == 0


async def test_metrics_are_behind_the_host_check() -> None:
    hub = Hub(Rooms("iort"), "mqtt://127.0.0.1:1883", clock=lambda: 0.0)
    app = build_app(hub, stale_after_s=5, history_points=100)
    code, _ = await call(app, "/metrics", host="evil.example")
    assert code == 400
