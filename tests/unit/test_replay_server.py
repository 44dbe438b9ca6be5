"""Serving a replay request (daemon/mqtt/replay.py, issue 22): the body, the rate limits,
what is held going out again as it was, what is not declared ``not_held`` on ``skip``;
and the sink's side (daemon/mqtt/sink.py ``serve_replay``) on a real outbox, no broker."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import orjson
import pytest
from test_mqtt_outbox import add, journaled

from iortd.auditlog.command import ALL_ROLES, ROLES_FOR_KIND
from iortd.auditlog.keyring import ROLES
from iortd.daemon.mqtt.outbox import Outbox
from iortd.daemon.mqtt.payloads import Envelope
from iortd.daemon.mqtt.replay import (
    MAX_SPAN,
    ReplayRange,
    ReplayRefused,
    ReplayServer,
    missing_runs,
    parse_range,
)
from iortd.daemon.mqtt.sink import MqttSink
from iortd.kernel.broker import BrokerSettings

GOOD = {"topic": "telemetry", "session": 1, "first": 0, "last": 9}


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        ({**GOOD, "extra": 1}, "malformed_body"),
        ({k: v for k, v in GOOD.items() if k != "last"}, "malformed_body"),
        ({**GOOD, "topic": "status"}, "malformed_body"),
        ({**GOOD, "topic": "skip"}, "malformed_body"),
        ({**GOOD, "session": 0}, "malformed_body"),
        ({**GOOD, "session": True}, "malformed_body"),
        ({**GOOD, "first": 5, "last": 4}, "malformed_body"),
        ({**GOOD, "first": -1}, "malformed_body"),
        ({**GOOD, "last": 2**64}, "malformed_body"),
        ({**GOOD, "first": 0, "last": MAX_SPAN}, "span_too_large"),
    ],
)
def test_a_body_that_is_no_range_is_refused(body: dict[str, Any], reason: str) -> None:
    with pytest.raises(ReplayRefused) as exc:
        parse_range(body)
    assert exc.value.reason == reason


def test_the_replay_role_signs_replays_and_nothing_else() -> None:
    assert "replay" in ROLES
    assert ROLES_FOR_KIND["replay"] == {"replay", "physicist", "admin"}
    assert [k for k, roles in ROLES_FOR_KIND.items() if "replay" in roles] == ["replay"]
    assert "replay" not in ALL_ROLES  # not even ping


def test_missing_runs() -> None:
    assert missing_runs(0, 9, []) == [(0, 9)]
    assert missing_runs(0, 9, list(range(10))) == []
    assert missing_runs(0, 9, [0, 3, 4, 9]) == [(1, 2), (5, 8)]
    assert missing_runs(5, 7, [6]) == [(5, 5), (7, 7)]


def test_requests_beyond_the_minute_are_refused_then_admitted_again() -> None:
    clock = Clock()
    server = ReplayServer(rate_per_s=100, max_per_minute=3, monotonic=clock)
    for _ in range(3):
        server.admit()
        clock.t += 1
    with pytest.raises(ReplayRefused, match="rate_limited"):
        server.admit()
    clock.t += 58  # the first request is a minute old
    server.admit()


async def _outbox(tmp_path: Path) -> tuple[Outbox, asyncio.Task[None]]:
    ob = await Outbox.open(tmp_path / "mqtt-outbox", 1024 * 1024, retention_s=3600.0)
    return ob, asyncio.create_task(ob.run())


async def test_held_messages_queue_at_the_rate_and_the_rest_is_declared(tmp_path: Path) -> None:
    ob, task = await _outbox(tmp_path)
    recs = [add(ob, "telemetry", i) for i in range(50)]
    await journaled(ob, recs[-1])
    for r in recs:
        ob.ack(r)
    await ob.close()
    await task
    for seg in (tmp_path / "mqtt-outbox").glob("outbox-*.jsonl"):  # 10..19 no longer held
        lines = seg.read_bytes().splitlines(keepends=True)
        keep = [x for x in lines if not 10 <= orjson.loads(x)["p"]["seq"] < 20]
        seg.write_bytes(b"".join(keep))
    ob, task = await _outbox(tmp_path)
    clock = Clock()
    woken: list[int] = []
    server = ReplayServer(
        rate_per_s=10, max_per_minute=10, wake=lambda: woken.append(1), monotonic=clock
    )
    skip_seqs = iter(range(100))

    def env() -> Envelope:
        return Envelope(next(skip_seqs), ob.session, "2026-01-01T00:00:00.000000Z")

    server.handed["telemetry"] = 49
    served = await server.serve(ob, ReplayRange("telemetry", 1, 5, 60), env)
    assert served.judged_last == 49  # nothing said of seqs not handed out yet
    assert served.served == 35  # 5..49 but 10..19
    assert served.skipped == ((10, 19),)
    (skip,) = [r for r in ob.pending if r.topic == "skip"]
    assert skip.payload["skipped"] == {
        "topic": "telemetry", "session": 1, "first": 10, "last": 19, "reason": "not_held",
    }  # fmt: skip
    assert woken
    clock.t += 1.0
    first = server.take(16)
    assert len(first) == 10  # one second's worth at 10/s
    assert [r.seq for r in first] == list(range(5, 10)) + list(range(20, 25))
    assert first[0].wire(historical=True) == recs[5].wire(historical=True)
    assert orjson.loads(first[0].wire(historical=True))["historical"] is True
    assert server.take(16) == []
    assert server.next_due() == pytest.approx(0.1)
    with pytest.raises(ReplayRefused, match="unknown_session"):
        await server.serve(ob, ReplayRange("telemetry", 3, 0, 1), env)
    await ob.close()
    await task


async def test_the_sink_declares_what_is_not_held_on_skip(tmp_path: Path) -> None:
    settings = BrokerSettings(host="127.0.0.1", port=1, tls=False, client_id="t", keepalive_s=5)
    sink = MqttSink(
        settings, tmp_path / "mqtt-outbox", site="s", room="r", simulated=True,
        replay_retention_s=3600.0,
    )  # fmt: skip
    await sink.start()
    task = asyncio.create_task(sink.outbox.run())
    ob = sink.outbox
    for i in range(5):
        sink._env("telemetry")  # handed out, never published (as if thinned)
        del i
    served = await sink.serve_replay(ReplayRange("telemetry", ob.session, 0, 100))
    assert served.judged_last == 4
    skips = [r for r in ob.pending if r.topic == "skip"]
    assert len(skips) == 1
    assert skips[0].payload["skipped"] == {
        "topic": "telemetry", "session": ob.session, "first": 0, "last": 4, "reason": "not_held",
    }  # fmt: skip
    await ob.close()
    await task
