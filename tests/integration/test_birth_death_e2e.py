"""Birth and death with the session, on a real Mosquitto with `iortd run` (issue 22).

A will that arrives after the next birth: the first run's connection is held half-open
and dropped after the second run's birth, so the broker publishes the first session's
will late, retained, over the second session's birth. The first run's will is the exact
bytes that run registered (its clean shutdown publishes that same offline record); the
held connection carries it, and is dropped without DISCONNECT the way the daemon's own
link does it (daemon/mqtt/link.py ``drop_socket``).

What must hold: a consumer that keeps the newest ``(session, seq)`` (mqttobs.current_status,
the dashboard) still sees the second session online; the daemon sees its status overwritten
by the older will and publishes its birth again, so that a consumer connecting afterwards
gets the second session's birth as the retained status, not the first one's death.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from pathlib import Path

import aiomqtt
import pytest
from daemonproc import Daemon, Site
from mqttobs import Message, Observer, current_status, schema_errors

from iortd.daemon.mqtt.broker import BrokerOptions, Mosquitto
from iortd.daemon.mqtt.link import drop_socket

pytestmark = pytest.mark.integration

STATUS = "iort/v1/test-site/or-7/status"


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Mosquitto]:
    with Mosquitto(BrokerOptions(), tmp_path / "broker") as b:
        yield b


def births(obs: Observer, session: int) -> list[Message]:
    return [
        m
        for m in obs.of("status")
        if m.payload["session"] == session and m.payload["online"] is True
    ]


async def test_a_late_will_never_marks_the_newer_session_offline(
    make_site: Callable[..., Site], broker: Mosquitto
) -> None:
    site = make_site(speed=10, poll=0.05, mqtt=f'url = "{broker.url}"\nkeepalive_s = 5')
    obs = await Observer(broker.port, topic=STATUS).start()
    held: aiomqtt.Client | None = None
    second: Daemon | None = None
    try:
        first = await Daemon.follow(site)
        try:
            await obs.wait_for(lambda m: m.payload.get("online") is True, "first birth")
        finally:
            assert await first.stop() == 0
        will = await obs.wait_for(lambda m: m.payload.get("online") is False, "first death")
        assert will.payload["session"] == 1
        assert will.payload["config_hash"] == hashlib.sha256(site.config.read_bytes()).hexdigest()
        assert will.payload["origin"]

        # The first run's connection, held half-open with the will it registered.
        held = aiomqtt.Client(
            "127.0.0.1",
            broker.port,
            identifier="held-first-run",
            protocol=aiomqtt.ProtocolVersion.V5,
            will=aiomqtt.Will(STATUS, will.raw.encode(), qos=1, retain=True),
        )
        await held.__aenter__()

        second = await Daemon.follow(site)
        birth = await obs.wait_for(
            lambda m: m.payload.get("session") == 2 and m.payload.get("online") is True,
            "second birth",
        )
        drop_socket(held)  # the broker now publishes the first session's will, late
        held = None
        await obs.wait_for(
            lambda m: sum(x.raw == will.raw for x in obs.messages) >= 2, "the late will"
        )
        now = current_status(obs.messages, STATUS)
        assert now is not None
        assert (now.payload["session"], now.payload["online"]) == (2, True), now.raw

        await second.seen(lambda r: r.get("event") == "mqtt_birth_republished", "republished")
        await obs.wait_for(lambda m: len(births(obs, 2)) >= 2, "the birth again")
        again = births(obs, 2)[-1]
        assert again.payload["seq"] == birth.payload["seq"]  # the same birth, not a new one

        late = await Observer(broker.port, topic=STATUS).start()
        try:
            first_seen = await late.wait_for(lambda m: True, "retained status")
            assert first_seen.retained
            assert (first_seen.payload["session"], first_seen.payload["online"]) == (2, True)
        finally:
            await late.stop()
        assert schema_errors(obs.messages) == []
    finally:
        if held is not None:
            drop_socket(held)
        if second is not None:
            assert await second.stop() == 0
        await obs.stop()
