"""Session takeover detection (daemon/mqtt/link.py), from the exceptions aiomqtt raises."""

from __future__ import annotations

from typing import Any

import aiomqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.reasoncodes import ReasonCode

from iortd.daemon.mqtt.link import (
    BACKOFF_INITIAL_S,
    BACKOFF_MAX_S,
    SHORT_LIVED_S,
    SHORT_LIVED_STREAK,
    STABLE_AFTER_S,
    TAKEOVER_BACKOFF_INITIAL_S,
    Takeovers,
    client_id_for,
    takeover_reason,
)
from iortd.kernel.backoff import Backoff
from iortd.kernel.broker import BrokerSettings


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


def _takeovers() -> tuple[Takeovers, list[dict[str, Any]]]:
    t = Takeovers(BrokerSettings("127.0.0.1", 1883, tls=False, client_id="iortd-s-r-0"))
    seen: list[dict[str, Any]] = []
    t.on_takeover = seen.append
    return t, seen


def test_a_streak_of_short_connections_is_reported_and_holds_the_next_attempt() -> None:
    t, seen = _takeovers()
    backoff = Backoff(BACKOFF_INITIAL_S, BACKOFF_MAX_S)
    for _ in range(SHORT_LIVED_STREAK - 1):
        t.lost(_lost("Unspecified error"), SHORT_LIVED_S / 2, backoff)
    assert seen == []
    assert backoff.step_s == BACKOFF_INITIAL_S
    t.lost(_lost("Unspecified error"), SHORT_LIVED_S / 2, backoff)
    assert t.count == 1
    assert backoff.step_s == TAKEOVER_BACKOFF_INITIAL_S
    [data] = seen
    assert data["client_id"] == "iortd-s-r-0"
    assert data["count"] == 1
    assert data["retry_in_s"] == TAKEOVER_BACKOFF_INITIAL_S
    # The broker's 0x8E: at once, and the takeover backoff doubles.
    t.lost(_lost(0x8E), SHORT_LIVED_S * 2, backoff)
    assert (t.count, seen[-1]["retry_in_s"]) == (2, 2 * TAKEOVER_BACKOFF_INITIAL_S)


def test_a_stable_connection_ends_the_streak_and_a_failing_report_is_contained() -> None:
    t, _ = _takeovers()

    def broken(data: dict[str, Any]) -> None:
        raise RuntimeError(data["reason"])

    t.on_takeover = broken
    backoff = Backoff(BACKOFF_INITIAL_S, BACKOFF_MAX_S)
    t.lost(_lost(0x8E), 1.0, backoff)  # the report fails: logged, not raised
    t.lost(_lost(0x8E), 1.0, backoff)
    assert t.count == 2
    t.lost(_lost("Unspecified error"), STABLE_AFTER_S, backoff)
    assert t.count == 0
    backoff.reset()  # as the connect loop does on every lost connection
    t.lost(_lost(0x8E), STABLE_AFTER_S, backoff)
    assert t.count == 1
    assert backoff.step_s == TAKEOVER_BACKOFF_INITIAL_S  # the takeover backoff restarted
