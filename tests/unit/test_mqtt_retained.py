"""The MQTT sink's retained state topics (daemon/mqtt/retained.py), without a broker: what
goes out on a connection, and the guard that keeps a forked log's checkpoint off the
broker. The real path (a broker's retained checkpoint from another log) is in
tests/integration/test_audit_forger.py."""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import AsyncIterator
from pathlib import Path

import orjson
import pytest

from iortd.auditlog.note import Checkpoint, Signer, generate_keypair
from iortd.daemon.mqtt.outbox import Outbox, Record
from iortd.daemon.mqtt.retained import RETAINED_WAIT_S, RetainedState
from iortd.kernel.types import Interlock, InterlockState

ORIGIN = "iortd/site/room/0123456789abcdef"
TIMEOUT_S = 10.0
TS = "2026-11-26T10:00:00.123456Z"


def note(signer: Signer, count: int) -> str:
    return Checkpoint(ORIGIN, count, "ab" * 32, ("time t",)).signed(signer)


def wire(text: str) -> bytes:
    return orjson.dumps({"note": text})


@pytest.fixture
async def outbox(tmp_path: Path) -> AsyncIterator[Outbox]:
    ob = await Outbox.open(tmp_path, 1024 * 1024)
    task = asyncio.create_task(ob.run(), name="outbox-run")
    yield ob
    async with asyncio.timeout(TIMEOUT_S):
        await ob.close()
        await task


class Broker:
    """What the state sends, by topic."""

    def __init__(self) -> None:
        self.sent: list[Record] = []

    async def send(self, rec: Record) -> None:
        self.sent.append(rec)

    def topics(self) -> list[str]:
        return [r.topic for r in self.sent]


async def test_the_checkpoint_waits_for_the_brokers_and_goes_once_ours_is_seen(
    outbox: Outbox,
) -> None:
    signer = generate_keypair("iortd-test")
    state = RetainedState(now=lambda: TS, simulated=True, verifier=signer.verifier)
    state.checkpoint(note(signer, 5))
    broker = Broker()
    await state.reconnected(broker.send)
    await state.publish(outbox, broker.send, closing=lambda: False)
    assert broker.topics() == [], "published before the broker's retained one was seen"
    due = state.next_due(time.monotonic())
    assert due is not None
    assert 0 < due <= RETAINED_WAIT_S
    # One not signed by our key says nothing about our log: ours still waits.
    assert not await state.retained_checkpoint(wire(note(generate_keypair("other"), 99)))
    assert not await state.retained_checkpoint(b"not json")
    await state.publish(outbox, broker.send, closing=lambda: False)
    assert broker.topics() == []
    # Ours, which the log contains: ours may go now.
    assert await state.retained_checkpoint(wire(note(signer, 4)))
    await state.publish(outbox, broker.send, closing=lambda: False)
    assert broker.topics() == ["audit/checkpoint"]


# A witness's cosignature (C2SP tlog-cosignature: 76 bytes, a name with '/') beside our
# signature leaves the checkpoint ours (C2SP signed-note ignores unknown keys), so the guard
# checks it too: read as unreadable, a fork's cosigned checkpoint would pass unnoticed.
COSIGNATURE = (
    f"\u2014 witness.example/w1 {base64.b64encode(bytes(range(1, 5)) + bytes(72)).decode()}\n"
)


@pytest.mark.parametrize("cosigned", ["", COSIGNATURE], ids=["ours", "ours-cosigned"])
async def test_a_signed_checkpoint_the_log_does_not_contain_stops_ours_for_good(
    outbox: Outbox, cosigned: str
) -> None:
    signer = generate_keypair("iortd-test")
    state = RetainedState(now=lambda: TS, simulated=True, verifier=signer.verifier)
    asked: list[int] = []

    async def guard(cp: Checkpoint) -> str | None:
        asked.append(cp.count)
        return "the log has fewer entries"

    state.checkpoint_guard = guard
    state.checkpoint(note(signer, 5))
    broker = Broker()
    await state.reconnected(broker.send)
    assert not await state.retained_checkpoint(wire(note(signer, 50) + cosigned))
    assert asked == [50]
    # Not at the wait's end, not on closing, not after a newer checkpoint.
    state.checkpoint(note(signer, 6))
    await state.publish(outbox, broker.send, closing=lambda: True)
    assert "audit/checkpoint" not in broker.topics()


async def test_a_reconnect_sends_the_state_the_broker_had_again(outbox: Outbox) -> None:
    state = RetainedState(now=lambda: TS, simulated=True, verifier=None)
    state.reading({Interlock.DOOR: InterlockState.OK}, all_clear=False, delivery=None)
    broker = Broker()
    await state.publish(outbox, broker.send, closing=lambda: False)
    assert broker.topics() == ["interlocks"]
    # Unchanged: nothing more; on a new connection, the same message again.
    await state.publish(outbox, broker.send, closing=lambda: False)
    await state.reconnected(broker.send)
    assert broker.topics() == ["interlocks", "interlocks"]
    assert broker.sent[0] is broker.sent[1]
    # A change is a new message.
    state.reading({Interlock.DOOR: InterlockState.TRIPPED}, all_clear=False, delivery=None)
    await state.publish(outbox, broker.send, closing=lambda: False)
    assert broker.topics() == ["interlocks"] * 3
    assert broker.sent[2].body != broker.sent[1].body


async def test_a_cosignature_republishes_the_latest_checkpoint_only(outbox: Outbox) -> None:
    """Issue 20: the witness submitter's recorded cosignature goes out appended to the
    retained checkpoint; one of an older checkpoint changes nothing."""
    from iortd.auditlog.cosignature import CosignerKey  # noqa: PLC0415

    signer = generate_keypair("iortd-test")
    state = RetainedState(now=lambda: TS, simulated=True, verifier=signer.verifier)
    broker = Broker()
    await state.reconnected(broker.send)
    old, new = note(signer, 4), note(signer, 5)
    state.checkpoint(old)
    state.checkpoint(new)
    assert await state.retained_checkpoint(wire(old))  # the broker's: ours may go
    w = CosignerKey.generate("w.test/1")
    state.cosigned(old, w.cosign(old.split("\n\n")[0] + "\n", 1))  # superseded: ignored
    line = w.cosign(new.split("\n\n")[0] + "\n", 2)
    state.cosigned(new, line)
    state.cosigned(new, line)  # told twice: once in the payload
    await state.publish(outbox, broker.send, closing=lambda: False)
    sent = [r.payload for r in broker.sent if r.topic == "audit/checkpoint"]
    assert sent[-1]["note"] == new + line
    assert sent[-1]["cosignatures"] == [line.rstrip("\n")]
    # Its echo is recognised as our own (not parsed, not held against the log).
    assert not await state.retained_checkpoint(wire(sent[-1]["note"]))
    assert not state._cp_blocked
