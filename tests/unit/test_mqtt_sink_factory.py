"""The MQTT sink as a plug-in: found through ``iort.sinks`` like any sink, its options the
``[mqtt]`` table, built by the same ``open_sinks`` as ``[[sinks]]``, with the same
messages as before for a password it cannot read or an outbox it cannot use."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from iortd.daemon.config import MqttConfig
from iortd.daemon.mqtt.factory import MqttSinkFactory
from iortd.daemon.mqtt.sink import MqttSink
from iortd.daemon.sink_registry import SinkRegistry, open_sinks
from iortd.daemon.sinks import SinkConfigError, SinkOptionError


def mqtt_options(**kw: Any) -> dict[str, Any]:
    return {**MqttConfig().model_dump(exclude={"enabled"}), **kw}


def test_the_installed_registry_builds_the_mqtt_sink_through_its_factory() -> None:
    factory = SinkRegistry.from_entry_points().get("mqtt")
    assert isinstance(factory, MqttSinkFactory)


@pytest.mark.parametrize(
    ("options", "key"),
    [
        ({"url": "tcp://h"}, "options.url"),
        ({"keepalive_s": 0}, "options.keepalive_s"),
        ({"pasword_file": "/x"}, "options.pasword_file"),
        # The cap of the reconnect backoff cannot be below its first step (0.5 s).
        ({"reconnect_max_s": 0.4}, "options.reconnect_max_s"),
        ({"reconnect_max_s": 3601}, "options.reconnect_max_s"),
    ],
)
def test_its_options_are_the_mqtt_table(options: dict[str, Any], key: str) -> None:
    with pytest.raises(SinkOptionError) as excinfo:
        MqttSinkFactory().validate(options)
    assert excinfo.value.key == key


async def open_mqtt(tmp_path: Path, **options: Any) -> list[Any]:
    return await open_sinks(
        (),
        SinkRegistry.from_entry_points(),
        mqtt=mqtt_options(**options),
        site="site",
        room="or-1",
        simulated=True,
        log_directory=tmp_path / "log",
        origin="site/or-1/abc",
        verifier=None,
    )


async def test_open_sinks_starts_it_with_its_outbox_where_it_always_was(tmp_path: Path) -> None:
    (tmp_path / "log").mkdir()
    [q] = await open_mqtt(tmp_path)
    try:
        sink = q.inner
        assert isinstance(sink, MqttSink)
        assert (q.name, q.overflow, q.queue_size) == ("mqtt", "block", 10_000)
        assert (tmp_path / "log" / "mqtt-outbox").is_dir()
        assert sink.settings.client_id is not None
        assert sink.settings.client_id.startswith("iortd-site-or-1-")
    finally:
        await q.aclose()


async def test_the_reconnect_cap_reaches_the_sink(tmp_path: Path) -> None:
    """``[mqtt] reconnect_max_s`` caps the sink's reconnect backoff; 10 s by default (the
    integration test of a broker outage checks the waits the daemon logs against it)."""
    (tmp_path / "log").mkdir()
    assert MqttConfig().reconnect_max_s == 10.0
    [q] = await open_mqtt(tmp_path, reconnect_max_s=2.5)
    try:
        assert isinstance(q.inner, MqttSink)
        assert q.inner.reconnect_max_s == 2.5
    finally:
        await q.aclose()


async def test_a_password_it_cannot_read_is_named_as_before(tmp_path: Path) -> None:
    with pytest.raises(SinkConfigError, match=r"^mqtt\.password_file: cannot read the password"):
        await open_mqtt(tmp_path, password_file=tmp_path / "gone")


async def test_an_outbox_it_cannot_use_is_named_as_before(tmp_path: Path) -> None:
    (tmp_path / "log").mkdir()
    (tmp_path / "log" / "mqtt-outbox").write_text("not a directory")
    with pytest.raises(SinkConfigError, match=r"^mqtt outbox: "):
        await open_mqtt(tmp_path)
