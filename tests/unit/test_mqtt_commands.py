"""The MQTT sink's side of commands (daemon/mqtt/sink.py): a refused or failing ``cmd/#``
subscription is logged and never raised (the link goes on publishing), and each message on
``cmd/KIND`` reaches ``on_command`` with its kind and retain flag; one that makes the
intake fail does not end the link."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import aiomqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.reasoncodes import ReasonCode
from structlog.testing import capture_logs

from iortd.daemon.mqtt.sink import MqttSink
from iortd.kernel.broker import BrokerSettings


def sink(tmp_path: Path) -> MqttSink:
    return MqttSink(
        BrokerSettings("127.0.0.1", 1883, tls=False, client_id="iortd-s-r-0"),
        tmp_path / "outbox",
        site="hospital-a",
        room="or-1",
        simulated=True,
    )


class FakeClient:
    def __init__(self, result: Any) -> None:
        self.result = result
        self.topics: list[str] = []

    async def subscribe(self, topic: str, qos: int, timeout: float) -> Any:  # noqa: ASYNC109 - aiomqtt's signature
        self.topics.append(topic)
        if isinstance(self.result, Exception):
            raise self.result
        return self.result


@pytest.mark.parametrize(
    ("result", "event"),
    [
        ([ReasonCode(PacketTypes.SUBACK, identifier=0x87)], "mqtt_command_subscribe_refused"),
        ([0x80], "mqtt_command_subscribe_refused"),
        (aiomqtt.MqttError("Operation timed out"), "mqtt_command_subscribe_failed"),
        ([ReasonCode(PacketTypes.SUBACK, identifier=1)], "mqtt_command_subscribed"),
    ],
)
async def test_a_subscription_failure_is_logged_not_raised(
    tmp_path: Path, result: Any, event: str
) -> None:
    s = sink(tmp_path)
    client = FakeClient(result)
    with capture_logs() as logs:
        await s._subscribe_commands(cast(aiomqtt.Client, client))
    assert client.topics == ["iort/v1/hospital-a/or-1/cmd/#"]
    assert [e["event"] for e in logs] == [event]


def message(topic: str, payload: Any, retain: bool = False) -> aiomqtt.Message:
    return cast(
        aiomqtt.Message,
        SimpleNamespace(topic=aiomqtt.Topic(topic), payload=payload, retain=retain),
    )


def test_each_command_reaches_on_command_and_a_failing_one_ends_nothing(tmp_path: Path) -> None:
    s = sink(tmp_path)
    got: list[tuple[str, bytes, bool]] = []

    def on_command(kind: str, raw: bytes, retained: bool) -> None:
        if raw == b"boom":
            raise RuntimeError("a bug in the intake")
        got.append((kind, raw, retained))

    s.on_command = on_command
    s._command(message("iort/v1/hospital-a/or-1/cmd/ping", b"{}", retain=True))
    s._command(message("iort/v1/hospital-a/or-1/cmd/prescription", None))
    with capture_logs() as logs:
        s._command(message("iort/v1/hospital-a/or-1/cmd/ping", b"boom"))
    assert got == [("ping", b"{}", True), ("prescription", b"", False)]
    assert [e["event"] for e in logs] == ["mqtt_command_failed"]
