"""A stalled disk does not reach the live samples (issue 21), over a real Mosquitto and an
independent subscriber (``mosquitto_sub``): every fsync of the outbox's journal takes
STALL_S (a disk busy with a backup, say), and the MQTT sink, driven directly as in
test_mqtt_applicator_stream.py, still gets each sample to the subscriber in a fraction of
that, while an event, journal-first, waits for its fsync."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from mqttobs import Message, Observer, schema_errors
from test_mqtt_applicator_stream import sample

from iortd.daemon.mqtt.broker import BrokerOptions, Mosquitto
from iortd.daemon.mqtt.sink import MqttSink
from iortd.kernel.broker import BrokerSettings

pytestmark = pytest.mark.integration

STALL_S = 1.5
SAMPLES = 10


def _applicator(seq: int) -> Callable[[Message], bool]:
    return lambda m: m.name == "applicator" and m.payload["seq"] == seq


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Mosquitto]:
    with Mosquitto(BrokerOptions(), tmp_path / "broker") as b:
        yield b


async def test_samples_do_not_wait_for_a_stalled_journal_and_events_do(
    tmp_path: Path, broker: Mosquitto, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = os.fsync
    stalled: list[float] = []

    def slow_fsync(fd: int) -> None:
        # Only the journal's segments, and never on the event loop (it never fsyncs).
        if os.path.basename(os.readlink(f"/proc/self/fd/{fd}")).startswith("outbox-"):
            assert threading.current_thread() is not threading.main_thread()
            time.sleep(STALL_S)
            stalled.append(STALL_S)
        real(fd)

    monkeypatch.setattr(os, "fsync", slow_fsync)
    obs = await Observer(broker.port).start()
    settings = BrokerSettings("127.0.0.1", broker.port, tls=False, client_id="iortd-h-or-6-t")
    sink = MqttSink(settings, tmp_path / "mqtt-outbox", site="h", room="or-6", simulated=True)
    await sink.start()
    run = asyncio.create_task(sink.run())
    took: list[float] = []
    try:
        async with asyncio.timeout(10):
            await sink.connected.wait()
        for i in range(SAMPLES):
            t0 = time.monotonic()
            await sink.applicator(sample(i))
            await obs.wait_for(_applicator(i), f"sample {i}")
            took.append(time.monotonic() - t0)
        t0 = time.monotonic()
        await sink.notice("info", "an event: journal-first")
        await obs.wait_for(lambda m: m.name == "events", "the notice", within_s=5 * STALL_S + 10)
        event_took = time.monotonic() - t0
    finally:
        await sink.aclose()
        async with asyncio.timeout(30):
            await run
        await obs.stop()
    assert stalled, "the journal was written (and stalled) while the samples went out"
    # Each sample in well under one stalled fsync (half of it: a loaded CI machine).
    assert max(took) < STALL_S / 2, [round(t, 3) for t in took]
    assert event_took >= STALL_S * 0.9, event_took
    assert schema_errors(obs.messages) == []
