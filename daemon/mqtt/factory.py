"""The MQTT sink as a plug-in: :class:`MqttSinkFactory`, entry point ``mqtt`` of
``iort.sinks`` (pyproject.toml), found and built like any other sink
(daemon/sink_registry.py). Its options are the ``[mqtt]`` table, validated by the config's
own model so that a bad key is named as ``options.<key>``; the password is read when the
sink is built, and a password that cannot be read refuses the start naming its key.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import ValidationError

from iortd.daemon.config import MqttConfig, SiteConfig
from iortd.daemon.mqtt.link import settings_from_config
from iortd.daemon.mqtt.sink import MqttSink
from iortd.daemon.sinks import SinkConfigError, SinkContext, SinkOptionError, SinkSpec

__all__ = ["MqttSinkFactory"]


class MqttSinkFactory:
    """The MQTT sink as a plug-in (entry point ``mqtt`` of ``iort.sinks``), built like any
    other sink. Its options are the ``[mqtt]`` table, which configures it (one broker
    connection and one outbox per daemon; ``[[sinks]]`` with ``type = "mqtt"`` is
    refused). The context's ``state_dir`` is its outbox directory, ``origin`` gives the
    client id, ``verifier`` says which retained checkpoints are its own."""

    name = "mqtt"

    def validate(self, options: Mapping[str, Any]) -> None:
        try:
            MqttConfig.model_validate(dict(options))
        except ValidationError as exc:
            err = exc.errors(include_url=False)[0]
            key = ".".join(str(p) for p in err["loc"])
            raise SinkOptionError(f"options.{key}", str(err["msg"])) from None

    def create(self, spec: SinkSpec, context: SinkContext) -> MqttSink:
        self.validate(spec.options)
        mqtt = MqttConfig.model_validate(dict(spec.options))
        try:
            # The password is read now: it may have gone since check-config.
            settings = settings_from_config(
                mqtt, SiteConfig(id=context.site, room=context.room), origin=context.origin
            )
        except (OSError, KeyError, ValueError) as exc:
            what = "password_env" if isinstance(exc, KeyError) else "password_file"
            raise SinkConfigError(f"mqtt.{what}: cannot read the password: {exc}") from None
        return MqttSink(
            settings,
            context.state_dir,
            site=context.site,
            room=context.room,
            simulated=context.simulated,
            verifier=context.verifier,
            outbox_max_bytes=mqtt.outbox_max_bytes,
            reconnect_max_s=mqtt.reconnect_max_s,
            replay_retention_s=mqtt.replay_retention_s,
            replay_rate=mqtt.replay_rate,
            replay_max_per_minute=mqtt.replay_max_per_minute,
            config_hash=context.config_hash or None,
            origin=context.origin or None,
        )
