"""What a publisher on the broker can make the MQTT clients hold (review of issue 18):

* the daemon's client asks, on CONNECT, for an MQTT 5 Maximum Packet Size: a 1 MiB
  publish on ``cmd/`` is discarded by the broker and never reaches the command intake,
  and the link stays up (a small command after it arrives on the same connection);
* its incoming queue is bounded: a flood on ``cmd/#`` while nobody takes from the queue
  leaves at most the bound waiting, and the rest is counted and logged as dropped;
* the dashboard's client asks for a Maximum Packet Size too.

Real Mosquitto (2.0, which honours a client's Maximum Packet Size); the sink runs in
process, as in test_mqtt_applicator_stream.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import aiomqtt
import pytest
from structlog.testing import capture_logs

from iortd.daemon.mqtt import link
from iortd.daemon.mqtt.broker import BrokerOptions, Mosquitto
from iortd.daemon.mqtt.sink import MqttSink
from iortd.kernel.broker import BrokerSettings

pytestmark = pytest.mark.integration

CMD = "iort/v1/h/or-5/cmd/"


async def until(cond: Callable[[], bool], what: str, within_s: float = 10) -> None:
    """A bounded poll (no event is there to wait on), failing with what was awaited."""
    try:
        async with asyncio.timeout(within_s):
            while not cond():  # noqa: ASYNC110 - no event for it
                await asyncio.sleep(0.01)
    except TimeoutError:
        raise AssertionError(f"not within {within_s} s: {what}") from None


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Mosquitto]:
    with Mosquitto(BrokerOptions(), tmp_path / "broker") as b:
        yield b


async def test_a_packet_over_the_limit_never_reaches_the_intake(
    tmp_path: Path, broker: Mosquitto
) -> None:
    settings = BrokerSettings("127.0.0.1", broker.port, tls=False, client_id="iortd-h-or-5-b")
    sink = MqttSink(settings, tmp_path / "outbox", site="h", room="or-5", simulated=True)
    got: list[tuple[str, int]] = []
    small = asyncio.Event()

    def on_command(kind: str, raw: bytes, retained: bool) -> None:
        got.append((kind, len(raw)))
        if kind == "ping":
            small.set()

    sink.on_command = on_command
    await sink.start()
    with capture_logs() as logs:
        run = asyncio.create_task(sink.run())
        try:
            async with asyncio.timeout(10):
                await sink.connected.wait()
            await until(
                lambda: any(e["event"] == "mqtt_command_subscribed" for e in logs),
                "the sink subscribed to cmd/#",
            )
            async with aiomqtt.Client("127.0.0.1", broker.port, identifier="rogue") as rogue:
                await rogue.publish(CMD + "prescription", b"x" * (1024 * 1024), qos=1)
                await rogue.publish(CMD + "ping", b"{}", qos=1)
            async with asyncio.timeout(10):
                await small.wait()
            assert got == [("ping", 2)], "the 1 MiB command reached the intake"
            assert sink.connected.is_set()
            assert not [e for e in logs if e["event"] == "mqtt_connection_lost"]
        finally:
            await sink.aclose()
            async with asyncio.timeout(10):
                await run


async def test_a_flood_waits_bounded_and_what_is_dropped_is_counted(broker: Mosquitto) -> None:
    """Nobody takes from the queue (a consumer held up): what waits stays at the bound."""
    bound = link.INCOMING_MAX_MESSAGES
    flood = bound + 200
    drops = link.IncomingDrops()
    settings = BrokerSettings("127.0.0.1", broker.port, tls=False, client_id="iortd-h-or-5-f")
    will = aiomqtt.Will("iort/v1/h/or-5/status", b"{}", qos=1, retain=True)
    client = link.new_client(settings, will=will, tls=None, drops=drops)
    with capture_logs() as logs:
        async with client:
            await client.subscribe(CMD + "#", qos=1, timeout=10)
            # mosquitto_pub -l: a message per line of its input, as fast as it can; QoS 0,
            # or Mosquitto's own queue for us (max_queued_messages, 1000) would drop first.
            pub = shutil.which("mosquitto_pub")
            assert pub is not None, "mosquitto_pub is missing: apt-get install mosquitto-clients"
            lines = "".join(f"{i}\n" for i in range(flood)).encode()
            proc = await asyncio.create_subprocess_exec(
                *(pub, "-h", "127.0.0.1", "-p", str(broker.port), "-q", "0", "-l"),
                *("-t", CMD + "ping"),
                stdin=asyncio.subprocess.PIPE,
            )
            try:
                async with asyncio.timeout(20):
                    await proc.communicate(lines)
            finally:
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()
            assert proc.returncode == 0
            await until(lambda: drops.arrived == flood, f"{flood} messages arrived")
            assert len(client.messages) == bound
            assert drops.dropped == flood - bound
            first = await anext(aiter(client.messages))
            assert first.payload == b"0", "the oldest are kept, the newest dropped"
            with contextlib.suppress(aiomqtt.MqttError):
                await client.unsubscribe(CMD + "#", timeout=5)
    dropped = [e for e in logs if e["event"] == "mqtt_incoming_dropped"]
    assert dropped, "the drops are logged"
    assert len(dropped) < 5, "rate-limited, not a line per message"
