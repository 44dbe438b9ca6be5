"""The applicator topic over a real Mosquitto (issue 16, B2c): the MQTT sink, given
applicator readings, publishes them on ``{prefix}/v1/{site}/{room}/applicator``, QoS 1,
not retained, valid against the published schema, ``seq`` counting from 0; an
independent ``mosquitto_sub`` sees them. (The daemon feeding the sink its readings is
the applicator rules' work; here the sink is driven directly.)"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from mqttobs import Observer, schema_errors

from iortd.daemon.mqtt.broker import BrokerOptions, Mosquitto
from iortd.daemon.mqtt.sink import MqttSink
from iortd.daemon.sinks import ApplicatorSample
from iortd.kernel.broker import BrokerSettings
from iortd.kernel.types import ApplicatorIdentity, ApplicatorReading, ApplicatorState, Tristate

pytestmark = pytest.mark.integration


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Mosquitto]:
    with Mosquitto(BrokerOptions(), tmp_path / "broker") as b:
        yield b


def sample(i: int, brakes: Tristate = Tristate.YES) -> ApplicatorSample:
    r = ApplicatorReading(
        mono_ns=i,
        utc=datetime.now(UTC),
        applicator=ApplicatorIdentity("spherical", 40.0, "APL-40-0042"),
        simulated=True,
        state=ApplicatorState.READY,
        seated=Tristate.YES,
        source_locked=Tristate.YES,
        brakes_engaged=brakes,
        displacement_mm=(0.1 * i, 0.0, 0.0),
        displacement_magnitude_mm=0.1 * i,
        tilt_deg=0.2,
        lock_counter=1,
        seat_counter=1,
        heartbeat=i,
    )
    return ApplicatorSample("stand", r, None, None, None)


async def test_the_sink_publishes_applicator_readings(tmp_path: Path, broker: Mosquitto) -> None:
    obs = await Observer(broker.port).start()
    settings = BrokerSettings("127.0.0.1", broker.port, tls=False, client_id="iortd-h-or-5-t")
    sink = MqttSink(settings, tmp_path / "mqtt-outbox", site="h", room="or-5", simulated=True)
    await sink.start()
    run = asyncio.create_task(sink.run())
    try:
        async with asyncio.timeout(10):
            await sink.connected.wait()
        for i in range(3):
            await sink.applicator(sample(i, Tristate.UNKNOWN if i == 2 else Tristate.YES))
        last = await obs.wait_for(
            lambda m: m.name == "applicator" and m.payload["seq"] == 2, "applicator seq 2", 10
        )
        msgs = [m for m in obs.messages if m.name == "applicator"]
        assert [m.payload["seq"] for m in msgs] == [0, 1, 2]
        assert not any(m.retained for m in msgs)
        assert last.topic == "iort/v1/h/or-5/applicator"
        assert last.payload["brakes_engaged"] == "unknown"
        assert last.payload["historical"] is False
        assert schema_errors(msgs) == []
    finally:
        await sink.aclose()
        async with asyncio.timeout(10):
            await run
        await obs.stop()
