"""Birth and death with the session (the practice of Sparkplug B's NBIRTH/NDEATH, issue 22).

The retained ``status`` a daemon publishes when it connects is its *birth*: ``online:
true``, its ``session`` (one run of the daemon, daemon/mqtt/outbox.py), the ``config_hash``
(sha256 of the site config's bytes), ``software_version`` and ``origin`` (the audit log's).
The Last Will registered with that connection is its *death*: the same payload with
``online: false``, the same ``session`` and the next ``seq``. So every status says which
run it belongs to, and ``(session, seq)`` orders them: a birth comes after every will of an
earlier connection, of this run or an earlier one.

A will can still reach the broker after the next birth: a connection held half-open (a
dead host, a cut link, a NAT that forgot it) is dropped by the broker only when its
keepalive runs out, and the broker then publishes that connection's will, retained, over
the newer birth. Consumers keep the status with the highest ``(session, seq)`` and ignore
such a will (the dashboard does; docs/mqtt-topics.md, rules for consumers). The retained
message is still the will, though, and a consumer that connects later sees only that; so
the daemon reads its own status topic and, when it is overwritten by an older
``(session, seq)`` than its current birth, publishes that same birth again (the same
``seq``: its own will, registered with this connection, must still come after it).

`BirthGuard` is that decision, pure apart from its log line, its clock injected. It
answers at most once per ``min_interval_s`` (anyone with publish rights on the topic could
otherwise make the daemon publish in a loop). A status of a newer session than ours is
left alone: it is not ours to correct (a second daemon writing as this room is the
session-takeover case, docs/mqtt-topics.md, and recorded there).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import aiomqtt
import structlog

__all__ = ["BirthGuard", "subscribe_own_status"]

log = structlog.get_logger("iortd.mqtt")

MIN_INTERVAL_S = 1.0


class BirthGuard:
    def __init__(
        self, *, min_interval_s: float = MIN_INTERVAL_S, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._birth: tuple[int, int] | None = None
        self._min_interval_s = min_interval_s
        self._clock = clock
        self._last: float | None = None
        self.republished = 0

    def born(self, *, session: int, seq: int) -> None:
        """Our birth of this connection is out, with this ``(session, seq)``."""
        self._birth = (session, seq)

    def dead(self) -> None:
        """The connection is gone: nothing to defend until the next birth."""
        self._birth = None

    def stale(self, payload: object) -> bool:
        """Whether ``payload`` (a parsed status) is older than our current birth."""
        if self._birth is None or not isinstance(payload, dict):
            return False
        session, seq = _order(payload)
        if session is None or seq is None:
            return False
        return (session, seq) < self._birth

    def due(self, payload: object) -> bool:
        """Whether to publish the birth again now for ``payload`` (stale, and not within
        ``min_interval_s`` of the last time)."""
        if not self.stale(payload):
            return False
        now = self._clock()
        if self._last is not None and now - self._last < self._min_interval_s:
            return False
        self._last = now
        self.republished += 1
        return True

    def answer(self, raw: object, session: int, seq: int) -> bool:
        """For a message on our status topic: whether to publish our birth ``(session,
        seq)`` again now (logged when so). Anything that is not a JSON status is left
        alone."""
        if not isinstance(raw, bytes | bytearray):
            return False
        try:
            payload = json.loads(raw)
        except ValueError:
            return False
        if not self.due(payload):
            return False
        log.warning(
            "mqtt_birth_republished",
            stale_session=payload.get("session"),
            stale_seq=payload.get("seq"),
            stale_online=payload.get("online"),
            session=session,
            seq=seq,
        )
        return True


async def subscribe_own_status(client: aiomqtt.Client, topic: str, timeout_s: float) -> None:
    """Subscribe to our own ``status`` (QoS 1). A refusal or a timeout is logged and the
    link goes on: a late will then stays the retained status until the next reconnect, and
    consumers still ignore it. (Mosquitto 2.0 grants a subscription its ACL does not allow
    and delivers nothing on it: that case cannot be seen from here.)"""
    try:
        granted = await client.subscribe(topic, qos=1, timeout=timeout_s)
    except aiomqtt.MqttError as exc:
        log.error("mqtt_status_subscribe_failed", reason=str(exc))  # noqa: TRY400
        return
    codes = [g if isinstance(g, int) else int(g.value) for g in granted]
    if any(c >= 0x80 for c in codes):
        log.warning(
            "mqtt_status_subscribe_refused",
            codes=codes,
            topic=topic,
            hint="give the room's account read access to its own status topic",
        )


def _order(payload: dict[str, Any]) -> tuple[int | None, int | None]:
    session, seq = payload.get("session"), payload.get("seq")
    ok = all(isinstance(v, int) and not isinstance(v, bool) for v in (session, seq))
    return (session, seq) if ok else (None, None)
