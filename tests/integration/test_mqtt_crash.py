"""The live stream's publishing path under SIGKILL, against the real daemon, a real
Mosquitto and an independent subscriber (``mosquitto_sub``).

Samples go out from memory within a durable block of seqs, events once journaled
(daemon/mqtt/outbox.py). Fifty daemons on one log and outbox are killed at many points
(during the start, at the broker connection, in the stream); the start
after the last, the console script, stops cleanly. Then, over everything the subscriber
received:

* no ``seq`` of ``telemetry``, ``events`` or ``skip`` carries two contents (the same
  (session, seq) replayed is the same message; no run reuses another's seq);
* every seq of ``telemetry`` and ``events`` from the first to the last is either
  received or declared in a ``skip`` (``unpublished``): nothing a consumer would count
  as lost;
* every message validates against its published schema.

Kill points: anywhere in the first quarter second of a start (config, the audit log's and
the outbox's recovery, the previous run's skips being journaled, the first connection),
at the broker connection, and up to a quarter second into the stream.

The daemons are forked from a process that has imported the daemon once (forkdaemon.py),
as in test_audit_crash.py.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest
from daemonproc import Daemon, Site
from forkdaemon import ForkServer
from mqttobs import Observer, contents, declared, schema_errors, unaccounted

from iortd.daemon.mqtt.broker import BrokerOptions, Mosquitto

pytestmark = pytest.mark.integration

CRASH_RUNS = 50


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Mosquitto]:
    with Mosquitto(BrokerOptions(), tmp_path / "broker") as b:
        yield b


@pytest.fixture
async def observer(broker: Mosquitto) -> AsyncIterator[Observer]:
    obs = await Observer(broker.port).start()
    try:
        yield obs
    finally:
        await obs.stop()


async def _kill_at_random(forks: ForkServer, site: Site, rng: random.Random) -> str:
    """One forked start, killed at a random point; which kind of point."""
    d = await forks.start_daemon(site)
    try:
        where = rng.choice(("start", "connected", "streaming", "streaming"))
        if where == "start":
            # Anywhere in the start: the config, the audit log's and the outbox's recovery
            # (the previous run's skips being journaled), the first connection.
            await asyncio.sleep(rng.uniform(0.0, 0.25))  # a random kill point, on purpose
        else:
            await d.wait_for(lambda r: r.get("event") == "mqtt_connected", "mqtt_connected")
        if where == "streaming":
            await asyncio.sleep(rng.uniform(0.0, 0.25))  # a random kill point, on purpose
        await d.kill()
    finally:
        await d.ensure_dead()
    return where


@pytest.mark.timeout(300)
async def test_sigkill_at_many_points_never_reuses_a_seq_and_loses_nothing_undeclared(
    make_site: Callable[..., Site], broker: Mosquitto, observer: Observer, tmp_path: Path
) -> None:
    site = make_site(speed=300, poll=0.01, mqtt=f'url = "{broker.url}"\nkeepalive_s = 2')
    rng = random.Random(20261206)  # noqa: S311 - reproducible kill points, not crypto
    forks = await ForkServer.start(tmp_path)
    points: list[str] = []
    try:
        for _ in range(CRASH_RUNS):
            points.append(await _kill_at_random(forks, site, rng))
    finally:
        await forks.stop()
    d = await Daemon.start(site)  # the console script, as an operator would start it
    try:
        online = await d.wait_for(lambda r: r.get("event") == "mqtt_connected", "final start")
        last = online["session"]
        await observer.wait_for(
            lambda m: m.name == "telemetry" and m.payload["session"] == last, "final telemetry"
        )
        assert await d.stop() == 0
    finally:
        await d.ensure_dead()
    await observer.wait_for(
        lambda m: m.name == "status" and m.payload["session"] == last and not m.payload["online"],
        "the final run's offline status",
    )

    assert points.count("streaming") >= CRASH_RUNS // 4, points
    msgs = observer.messages
    assert schema_errors(msgs) == []
    for name in ("telemetry", "events", "skip"):
        reused = {seq: c for seq, c in contents(msgs, name).items() if len(c) > 1}
        assert not reused, f"{name}: a seq with two contents: {list(reused.items())[:3]}"
    for name in ("telemetry", "events"):
        lost = unaccounted(msgs, name)
        assert not lost, f"{name}: {len(lost)} seqs neither received nor declared: {lost[:10]}"
    skips = declared(msgs)
    assert all(s["reason"] == "unpublished" for s in skips)
    assert {s["topic"] for s in skips} == {"telemetry"}, "events are never skipped"
    sessions = {m.payload["session"] for m in msgs if m.name == "telemetry"}
    assert len(sessions) > CRASH_RUNS // 2, "most runs must have published telemetry"
    assert len(skips) >= len(sessions) - 1 - points.count("start")
