"""Session takeover detection (daemon/mqtt/link.py), from the exceptions aiomqtt raises."""

from __future__ import annotations

import aiomqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.reasoncodes import ReasonCode

from iortd.daemon.mqtt.link import SHORT_LIVED_STREAK, client_id_for, takeover_reason


def _lost(reason: int | str) -> aiomqtt.MqttError:
    """What the sink catches when the link drops: aiomqtt's iteration error, caused by the
    disconnect's MqttCodeError (as aiomqtt 2.5 raises it)."""
    code = (
        ReasonCode(PacketTypes.DISCONNECT, identifier=reason)
        if isinstance(reason, int)
        else ReasonCode(PacketTypes.DISCONNECT, reason)
    )
    exc = aiomqtt.MqttError("Disconnected during message iteration")
    exc.__cause__ = aiomqtt.MqttCodeError(code, "Unexpected disconnection")
    return exc


def test_the_brokers_session_taken_over_reason_is_a_takeover_at_once() -> None:
    why = takeover_reason(_lost(0x8E), short_lived=1)
    assert why is not None
    assert "0x8E" in why


def test_other_disconnects_are_a_takeover_only_as_a_streak() -> None:
    assert takeover_reason(_lost("Unspecified error"), 1) is None
    assert takeover_reason(_lost("Unspecified error"), SHORT_LIVED_STREAK - 1) is None
    why = takeover_reason(_lost("Unspecified error"), SHORT_LIVED_STREAK)
    assert why is not None
    assert "in a row" in why


def test_client_ids_are_per_log_origin_and_stable() -> None:
    a = client_id_for("hospital-a", "or-1", "iortd/hospital-a/or-1/5f0c2a9e41d7b3c8")
    b = client_id_for("hospital-a", "or-1", "iortd/hospital-a/or-1/0123456789abcdef")
    assert a != b
    assert a == client_id_for("hospital-a", "or-1", "iortd/hospital-a/or-1/5f0c2a9e41d7b3c8")
    assert a.startswith("iortd-hospital-a-or-1-")
    assert len(a) == len("iortd-hospital-a-or-1-") + 12
