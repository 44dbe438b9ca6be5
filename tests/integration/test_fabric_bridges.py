"""The fabric `iortd fabric-config` writes, run for real: a central Mosquitto and two site
Mosquittos started from the generated files, bridged over TLS with client certificates.

What must hold (docs/fabric.md): a room's message reaches the centre; a command from the
centre reaches that room, once; a room cannot publish as another room or send a command,
and a site's bridge account cannot publish another site's topics at the centre; the bridge
state notification goes to 0 when the central broker goes away and back to 1 when it
returns, and what a room published in between arrives at the centre; a real daemon with
its generated account publishes everything it publishes without a refusal.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from daemonproc import Daemon, Site
from fabricproc import Fabric, Tap, start_fabric

pytestmark = pytest.mark.integration


@pytest.fixture
def fabric(tmp_path: Path):  # type: ignore[no-untyped-def]
    f = start_fabric(tmp_path, {"site-a": ["or-1", "or-2"], "site-b": ["or-1"]})
    yield f
    f.stop()


async def test_room_to_centre_and_command_back(fabric: Fabric) -> None:
    await fabric.wait_bridges_up()
    central = Tap(fabric.central.port, fabric.login("central", "observer"), ["iort/v1/#"])
    room = Tap(
        fabric.sites["site-a"].port,
        fabric.room_login("site-a", "or-1"),
        ["iort/v1/site-a/or-1/cmd/#"],
    )
    # The dashboard at the centre over the TLS listener, with its generated password.
    dash = Tap(fabric.central_tls_port, fabric.login("central", "dashboard"), ca=fabric.ca)
    async with central, room, dash:
        await room.publish("iort/v1/site-a/or-1/telemetry", b'{"n": 1}')
        await central.wait_for("iort/v1/site-a/or-1/telemetry", b'{"n": 1}')

        await dash.publish("iort/v1/site-a/or-1/cmd/ack", b'{"cmd": 1}')
        await room.wait_for("iort/v1/site-a/or-1/cmd/ack", b'{"cmd": 1}')
        # A marker after it: the command was not echoed back to the centre by the bridge.
        await room.publish("iort/v1/site-a/or-1/events", b'{"after": 1}')
        await central.wait_for("iort/v1/site-a/or-1/events", b'{"after": 1}')
        assert len(central.on("iort/v1/site-a/or-1/cmd/ack")) == 1, central.messages
        assert len(room.on("iort/v1/site-a/or-1/cmd/ack")) == 1, room.messages


async def test_acl_keeps_rooms_and_sites_to_their_own_topics(fabric: Fabric) -> None:
    await fabric.wait_bridges_up()
    site_obs = Tap(fabric.sites["site-a"].port, fabric.login("site-a", "observer"), ["iort/#"])
    central = Tap(fabric.central.port, fabric.login("central", "observer"), ["iort/#"])
    room = Tap(fabric.sites["site-a"].port, fabric.room_login("site-a", "or-1"))
    tls = Path(fabric.ca).parent
    # A site's bridge identity (its certificate) connecting to the centre by itself.
    bridge_a = Tap(
        fabric.spec.central.bridge_port,
        ("", ""),
        ca=fabric.ca,
        cert=(tls / "bridge-site-a.pem", tls / "bridge-site-a.key"),
    )
    # What a room may read: its own status, checkpoint and commands; not another room's.
    own = "iort/v1/site-a/or-1/"
    reader = Tap(
        fabric.sites["site-a"].port,
        fabric.room_login("site-a", "or-1"),
        [own + "status", own + "audit/checkpoint", "iort/v1/site-a/or-2/#"],
    )
    other = Tap(fabric.sites["site-a"].port, fabric.room_login("site-a", "or-2"))
    async with site_obs, central, room, bridge_a, reader, other:
        await other.publish("iort/v1/site-a/or-2/status", b'{"or-2": 1}', retain=True)
        await room.publish(own + "status", b'{"own": 1}', retain=True)
        await room.publish(own + "audit/checkpoint", b'{"own": 2}', retain=True)
        await reader.wait_for(own + "status", b'{"own": 1}')
        await reader.wait_for(own + "audit/checkpoint", b'{"own": 2}')
        await site_obs.wait_for("iort/v1/site-a/or-2/status", b'{"or-2": 1}')
        forged = [
            "iort/v1/site-a/or-2/telemetry",  # another room of its site
            "iort/v1/site-b/or-1/status",  # a room of another site
            "iort/v1/site-a/or-1/cmd/prescription",  # a command, even to itself
            "iort/v1/site-a/or-2/cmd/ack",
            "iort/v1/site-a/_bridge/state",  # the site's link state
        ]
        for t in forged:
            await room.publish(t, b'{"forged": 1}')
        await bridge_a.publish("iort/v1/site-b/or-1/status", b'{"forged": 2}')
        # Markers published after them on the same connections (QoS 1, in order).
        await room.publish("iort/v1/site-a/or-1/events", b'{"marker": 1}')
        await bridge_a.publish("iort/v1/site-a/or-9/events", b'{"marker": 2}')
        await site_obs.wait_for("iort/v1/site-a/or-1/events", b'{"marker": 1}')
        await central.wait_for("iort/v1/site-a/or-1/events", b'{"marker": 1}')
        await central.wait_for("iort/v1/site-a/or-9/events", b'{"marker": 2}')
        leaked = [m for m in site_obs.messages + central.messages if b"forged" in m.payload]
        assert leaked == [], leaked
        assert [m for m in reader.messages if "or-2" in m.topic] == []


async def test_bridge_state_flips_with_the_central_broker(fabric: Fabric) -> None:
    await fabric.wait_bridges_up()
    topic = "iort/v1/site-a/or-1/telemetry"
    login = fabric.login("central", "observer")
    # A durable session at the centre, so that it receives what arrives while it is away.
    async with Tap(fabric.central.port, login, [topic], client_id="obs-durable", clean=False):
        pass
    fabric.central.stop_sync()
    await fabric.wait_bridge_states("site-a", {"site-a": "0"}, within_s=15)
    async with Tap(fabric.sites["site-a"].port, fabric.room_login("site-a", "or-1")) as room:
        for n in range(5):
            await room.publish(topic, b'{"outage": %d}' % n)
    fabric.central.restart_sync()
    await fabric.wait_bridge_states("site-a", {"site-a": "1"}, within_s=15)
    await fabric.wait_bridges_up(within_s=15)
    async with Tap(fabric.central.port, login, client_id="obs-durable", clean=False) as obs:
        await obs.wait_for(topic, b'{"outage": 4}')
        got = [m.payload for m in obs.on(topic)]
    assert got == [b'{"outage": %d}' % n for n in range(5)]


async def test_a_real_daemon_through_the_generated_acl(
    make_site: Callable[..., Site], tmp_path: Path
) -> None:
    """`iortd run` with its generated account on its site broker: everything it publishes
    is allowed by the room's ACL (no refusal logged), it may read back its status and
    checkpoint, and its stream arrives at the centre."""
    f = start_fabric(tmp_path / "fab", {"test-site": ["or-7"]})
    try:
        await f.wait_bridges_up()
        site = make_site(
            speed=60, poll=0.05, mqtt=f.mqtt_section("test-site", "or-7"), checkpoint_s=1
        )
        base = "iort/v1/test-site/or-7"
        async with Tap(f.central.port, f.login("central", "observer"), [f"{base}/#"]) as tap:
            daemon = await Daemon.follow(site)
            try:
                for name in ("status", "telemetry", "audit/checkpoint", "interlocks"):
                    await tap.wait_for_topic(f"{base}/{name}")
                await daemon.seen(lambda r: r.get("event") == "mqtt_connected", "connected")
            finally:
                assert await daemon.stop() == 0
        refused = [
            r for r in daemon.lines if "refused" in str(r.get("event")) or r.get("level") == "error"
        ]
        assert refused == [], refused
    finally:
        f.stop()
