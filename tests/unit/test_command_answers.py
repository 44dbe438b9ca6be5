"""A command's answer is matched on its structured fields, never on its words (review
finding 4): the daemon's real intake and MQTT sink make the ``daemon_notice``, the
dashboard's real validation and :class:`Commander` hear it.

The attack: anyone who may publish on a command topic (no key needed) waits for a
physicist's sign-off envelope on ``cmd/signoff`` and publishes junk whose extra field is
named ``sign-off recorded [nonce N]``. The intake refuses it; its refusal's words used to
quote the field's name, and the dashboard, which matched words, said "recorded" while the
daemon's own verdict was a refusal."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest
import signofflog
import test_dashboard_signoff
from test_dashboard_login import PW_ANNA
from test_dashboard_signoff import Rig, physicist, sign

from iortd.auditlog.command import CommandRejected, NonceBook, check_command
from iortd.auditlog.keyring import Keyring
from iortd.auditlog.note import generate_keypair
from iortd.auditlog.writer import AuditLog
from iortd.daemon.answers import answered
from iortd.daemon.commands import CommandIntake
from iortd.daemon.mqtt.outbox import Outbox
from iortd.daemon.mqtt.sink import MqttSink
from iortd.daemon.signoff import install
from iortd.kernel.broker import BrokerSettings
from iortd.users.keyring import keyring_bytes
from iortd.users.store import load_store

rig = test_dashboard_signoff.rig  # the fixture: the dashboard's app, hub and store
TIMEOUT_S = 5.0
NOW = datetime.now(UTC)


def junk(marker: str) -> bytes:
    """The attacker's command: unsigned, with an extra field named ``marker``."""
    env = {
        "v": 1, "kind": "signoff", "nonce": "cd" * 16, "signer": "phys-anna",
        "site": "site-a", "room": "or-3", "issued_at": NOW.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "expires_at": (NOW + timedelta(seconds=60)).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "body": {}, "sig": "", marker: 1,
    }  # fmt: skip
    return orjson.dumps(env)


def test_the_intake_counts_unknown_fields_and_never_names_them() -> None:
    marker = f"sign-off recorded [nonce {'ab' * 16}]"
    with pytest.raises(CommandRejected) as got:
        check_command(
            junk(marker), Keyring(Path("k"), "", ()), site="site-a", room="or-3", now=NOW,
            skew_s=5, seen=NonceBook(5),
        )  # fmt: skip
    assert got.value.detail == "1 unknown field(s)"
    # nor the version's value, whatever it is
    raw = orjson.loads(junk("x"))
    del raw["x"]
    raw["v"] = marker
    with pytest.raises(CommandRejected) as got:
        check_command(
            orjson.dumps(raw), Keyring(Path("k"), "", ()), site="site-a", room="or-3", now=NOW,
            skew_s=5, seen=NonceBook(5),
        )  # fmt: skip
    assert marker not in got.value.detail


class Daemon:
    """A room's daemon as far as answers go: the real intake (a keyring, an audit log) and
    the real MQTT sink's outbox, whose wire bytes the dashboard receives."""

    def __init__(self, intake: CommandIntake, sink: MqttSink, outbox: Outbox) -> None:
        self.intake, self.sink, self.outbox = intake, sink, outbox
        self.said: list[tuple[str, str]] = []
        self._told: set[int] = set()  # the outbox records already received

    def notice(self, severity: str, message: str) -> None:
        self.said.append((severity, message))

    async def tell(self, rig: Rig) -> None:
        """Every notice so far, through the MQTT sink, to the dashboard (validated)."""
        for severity, message in self.said:
            await self.sink.notice(severity, message)
        self.said.clear()
        for rec in [r for r in self.outbox.pending if r.topic == "events"]:
            if rec.n in self._told:
                continue
            self._told.add(rec.n)
            acc = rig.hub.rooms.receive(
                "iort/v1/site-a/or-3/events", rec.wire(historical=False), 0.0
            )
            assert acc is not None
            rig.hub.message(acc)


@pytest.fixture
async def daemon(tmp_path: Path, rig: Rig) -> AsyncIterator[Daemon]:
    audit, _ = await AuditLog.open(
        tmp_path / "log", origin="iortd/site-a/or-3/0011", signer=generate_keypair("or-3")
    )
    log_task = asyncio.create_task(audit.run())
    outbox = await Outbox.open(tmp_path / "outbox", 1024 * 1024)
    box_task = asyncio.create_task(outbox.run())
    sink = MqttSink(
        BrokerSettings("127.0.0.1", 1883, tls=False, client_id="iortd-site-a-or-3-0"),
        outbox,
        site="site-a",
        room="or-3",
        simulated=False,
    )
    _, ring = keyring_bytes(load_store(rig.users))
    d = Daemon(None, sink, outbox)  # type: ignore[arg-type]  # the intake needs its notice
    d.intake = CommandIntake(
        ring, audit, site="site-a", room="or-3", skew_s=60, max_per_minute=60, notice=d.notice
    )
    try:
        yield d
    finally:
        async with asyncio.timeout(TIMEOUT_S):
            await outbox.close()
            await box_task
            await audit.close()
            await log_task


def attacked(
    rig: Rig, daemon: Daemon, verdict: Callable[[bytes], None]
) -> Callable[[str, bytes], Any]:
    """The dashboard's publish: the attacker's junk reaches the daemon first, then the
    physicist's command (``verdict`` has the daemon judge it); every notice goes out."""

    async def publish(topic: str, raw: bytes) -> None:
        rig.sent.append((topic, raw))
        nonce = orjson.loads(raw)["nonce"]
        daemon.intake.submit(
            junk(f"sign-off recorded [nonce {nonce}]"), source="mqtt", topic_kind="signoff"
        )
        verdict(raw)
        await daemon.tell(rig)

    return publish


async def test_a_refused_junk_command_naming_the_marker_does_not_make_it_recorded(
    rig: Rig, daemon: Daemon
) -> None:
    def refused(raw: bytes) -> None:  # the real verdict: refused (no sign-off handler here)
        daemon.intake.submit(raw, source="mqtt", topic_kind="signoff")

    rig.hub.publish = attacked(rig, daemon, refused)
    b = await physicist(rig)
    status, body = await sign(b, holder="phys-anna", password=PW_ANNA)
    assert (status, body["recorded"]) == (422, False), body
    sha = hashlib.sha256(rig.sent[-1][1]).hexdigest()
    assert body["message"].startswith("command refused (no_handler)")
    assert f"[sha256 {sha[:16]}]" in body["message"]


async def test_the_daemons_real_answer_still_says_recorded(rig: Rig, daemon: Daemon) -> None:
    stop = asyncio.Event()
    handled = asyncio.Event()

    async def signoff(cmd: Any) -> None:  # answers as daemon/signoff.py does once recorded
        said = f"sign-off recorded: delivery x approved by A (phys-anna) [nonce {cmd.nonce}]"
        daemon.notice("info", answered(said, "done", kind="signoff", nonce=cmd.nonce))
        handled.set()

    daemon.intake.register("signoff", signoff)
    run = asyncio.create_task(daemon.intake.run(stop))

    def accepted(raw: bytes) -> None:
        daemon.intake.submit(raw, source="mqtt", topic_kind="signoff")

    async def publish(topic: str, raw: bytes) -> None:
        await attacked(rig, daemon, accepted)(topic, raw)
        async with asyncio.timeout(TIMEOUT_S):
            await handled.wait()
        await daemon.tell(rig)

    rig.hub.publish = publish
    try:
        b = await physicist(rig)
        status, body = await sign(b, holder="phys-anna", password=PW_ANNA)
        assert (status, body["recorded"]) == (200, True), body
        assert body["message"].startswith("sign-off recorded")
    finally:
        stop.set()
        async with asyncio.timeout(TIMEOUT_S):
            await run


async def test_a_copy_of_the_bytes_refused_as_a_replay_is_not_the_answer(
    rig: Rig, daemon: Daemon
) -> None:
    """Someone republishes the physicist's very bytes (retained, or again): the intake
    refuses the copy naming the same SHA-256; the verdict is still the handler's."""
    stop = asyncio.Event()
    handled = asyncio.Event()

    async def signoff(cmd: Any) -> None:
        said = f"sign-off recorded: delivery x [nonce {cmd.nonce}]"
        daemon.notice("info", answered(said, "done", kind="signoff", nonce=cmd.nonce))
        handled.set()

    daemon.intake.register("signoff", signoff)
    run = asyncio.create_task(daemon.intake.run(stop))

    async def publish(topic: str, raw: bytes) -> None:
        rig.sent.append((topic, raw))
        daemon.intake.submit(raw, source="mqtt", topic_kind="signoff")
        daemon.intake.submit(raw, source="mqtt", topic_kind="signoff", retained=True)
        daemon.intake.submit(raw, source="mqtt", topic_kind="signoff")  # replayed
        await daemon.tell(rig)  # the copies' refusals come first
        async with asyncio.timeout(TIMEOUT_S):
            await handled.wait()
        await daemon.tell(rig)

    rig.hub.publish = publish
    try:
        b = await physicist(rig)
        status, body = await sign(b, holder="phys-anna", password=PW_ANNA)
        assert (status, body["recorded"]) == (200, True), body
    finally:
        stop.set()
        async with asyncio.timeout(TIMEOUT_S):
            await run


# ---- each answer's fields, as the daemon's real handlers make them --------------------------


async def test_the_sign_off_handler_and_the_intake_answer_with_their_fields(
    tmp_path: Path,
) -> None:
    said: list[tuple[str, str]] = []

    def notice(severity: str, message: str) -> None:
        said.append((severity, message))

    audit, _ = await AuditLog.open(tmp_path, origin=signofflog.ORIGIN, signer=signofflog.LOGKEY)
    task = asyncio.create_task(audit.run())
    try:
        intake = CommandIntake(
            signofflog.RING, audit, site="site-a", room="or-3", skew_s=60, max_per_minute=60,
            notice=notice,
        )  # fmt: skip
        signoffs = await install(intake, audit, tmp_path, notice)
        assert signoffs is not None
        await signofflog.deliveries(audit)
        room = signofflog.Room(tmp_path, audit, intake, signoffs, task)
        done = await room.send(signofflog.body(room))
        refused = await room.send(signofflog.body(room, name="Someone Else"))
        fields = [getattr(m, "command", None) for _, m in said]
        assert fields == [
            {"kind": "signoff", "nonce": done["data"]["nonce"], "sha256": None,
             "outcome": "done", "reason": None},
            {"kind": "signoff", "nonce": refused["data"]["nonce"], "sha256": None,
             "outcome": "refused", "reason": refused["data"]["reason"]},
        ]  # fmt: skip
        said.clear()
        raw = junk("sign-off recorded")
        intake.submit(raw, source="mqtt", topic_kind="signoff")
        [(_, message)] = said
        assert getattr(message, "command", None) == {
            "kind": None, "nonce": None, "sha256": hashlib.sha256(raw).hexdigest(),
            "outcome": "refused", "reason": "malformed",
        }  # fmt: skip
        assert "sign-off recorded" not in message
    finally:
        await audit.close()
        await task
