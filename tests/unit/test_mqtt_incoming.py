"""The MQTT sink's incoming drops (daemon/mqtt/link.py): counted over the run, logged
rate-limited (the first at once, then one line per DROP_LOG_EVERY_S with the count), and
on /metrics as ``iortd_mqtt_incoming_dropped_total``. The bound itself, against a real
broker: tests/integration/test_mqtt_bounds.py."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import aiomqtt
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector
from structlog.testing import capture_logs

from iortd.daemon.metrics import DaemonCollector, MetricsSink
from iortd.daemon.mqtt.link import (
    DROP_LOG_EVERY_S,
    INCOMING_MAX_BYTES,
    INCOMING_MAX_MESSAGES,
    IncomingDrops,
)
from iortd.daemon.mqtt.sink import MqttSink
from iortd.kernel.broker import BrokerSettings


def test_drops_are_counted_and_logged_rate_limited() -> None:
    now = [100.0]
    drops = IncomingDrops(clock=lambda: now[0])
    with capture_logs() as logs:
        for _ in range(1000):
            drops.drop("iort/v1/h/or-5/cmd/ping")
        now[0] += DROP_LOG_EVERY_S
        drops.drop("iort/v1/h/or-5/cmd/ping")
    assert drops.dropped == 1001
    lines = [e for e in logs if e["event"] == "mqtt_incoming_dropped"]
    assert [(e["dropped"], e["dropped_total"]) for e in lines] == [(1, 1), (1000, 1001)]


class _Sinks(Collector):
    def __init__(self, inner: DaemonCollector) -> None:
        self.inner = inner

    def collect(self) -> Any:
        return self.inner._sinks(0.0)


def test_the_drops_are_on_metrics(tmp_path: Path) -> None:
    sink = MqttSink(
        BrokerSettings("127.0.0.1", 1883, tls=False, client_id="iortd-s-r-0"),
        tmp_path / "outbox",
        site="s",
        room="r",
        simulated=True,
    )
    for _ in range(7):
        sink.incoming.drop("iort/v1/s/r/cmd/ping")
    queued = cast(Any, SimpleNamespace(name="mqtt", inner=sink, dropped_total=0, pending=0))
    health = cast(Any, SimpleNamespace(audit=SimpleNamespace(head=(0, ""))))
    registry = CollectorRegistry()
    registry.register(_Sinks(DaemonCollector(health, MetricsSink(), [queued])))
    got = {
        s.name: s.value
        for family in text_string_to_metric_families(generate_latest(registry).decode())
        for s in family.samples
    }
    assert got["iortd_mqtt_incoming_dropped_total"] == 7


def test_the_queue_holds_at_most_its_bytes() -> None:
    drops = IncomingDrops()
    queue = drops.queue_type()(maxsize=INCOMING_MAX_MESSAGES)
    big = INCOMING_MAX_BYTES // 4
    for i in range(6):
        queue.put_nowait(message(f"iort/v1/s/r/cmd/k{i}", b"x" * big))
    assert (queue.qsize(), drops.arrived, drops.dropped) == (4, 6, 2)
    assert queue.get_nowait().topic.value == "iort/v1/s/r/cmd/k0"
    queue.put_nowait(message("iort/v1/s/r/cmd/again", b"x" * big))  # room again
    assert (queue.qsize(), drops.dropped) == (4, 2)


def message(topic: str, payload: bytes) -> aiomqtt.Message:
    return aiomqtt.Message(topic, payload, qos=1, retain=False, mid=1, properties=None)
