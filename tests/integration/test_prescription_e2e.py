"""A prescription reaches the room: ``iort-plan send`` over a real Mosquitto into a real
``iortd run`` (sim driver), with test_commands_e2e.py's broker, site and keyring.

* sent: ``command_accepted`` then ``prescription_received`` in the log, with the SHA-256 of
  the prescription's canonical bytes (the sender's line names the same), and a notice on
  ``events``;
* the same file sent again is a new command (new nonce), recorded as the same prescription
  (``outcome`` ``same``), not as a replay;
* a prescription signed by a physicist who did not approve it is accepted as a command (the
  key is enrolled) and refused as a prescription (``signer_not_approver``).
"""

from __future__ import annotations

import asyncio
import hashlib
import subprocess
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiomqtt
import orjson
import pytest
from daemonproc import Daemon, Site
from mqttobs import Observer
from test_commands_e2e import (  # the commands' set-up, reused
    BIN,
    CMD,
    EVENTS,
    PHYS,
    broker,  # noqa: F401 - a fixture
    log_entries,
    site,  # noqa: F401 - a fixture
    subscribed,
)

from iortd.auditlog.command import sign_command
from iortd.auditlog.note import write_keypair
from iortd.daemon.mqtt.broker import Mosquitto
from iortd.plan.cli import main as iort_plan
from iortd.plan.model import parse_prescription, prescription_bytes

pytestmark = pytest.mark.integration


def new_rx(path: Path, approved_by: str) -> Path:
    at = (datetime.now(UTC) - timedelta(minutes=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
    argv = [
        *("new", "--treatment-id", "T-2026-0042", "--plan-id", "IORT-P1", "--dose-gy", "20"),
        *("--applicator", "SPH30", "--diameter-mm", "30", "--planned-time-min", "23"),
        *("--approved-by", approved_by, "--approved-at", at, "--out", str(path)),
    ]
    assert iort_plan(argv) == 0
    return path


def received_with(nonce: str) -> Callable[[dict[str, Any]], bool]:
    return lambda r: r.get("event") == "prescription_received" and r.get("nonce") == nonce


def send(rx: Path, key: Path, url: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            *(str(BIN / "iort-plan"), "send", str(rx), "--key", str(key)),
            *("--holder", "phys-anna", "--site", "test-site", "--room", "or-7"),
            *("--broker", url),
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


async def test_iort_plan_send_reaches_the_room_and_is_on_the_record(
    site: Site,  # noqa: F811 - the fixture
    broker: Mosquitto,  # noqa: F811 - the fixture
    tmp_path: Path,
) -> None:
    key, _ = write_keypair(PHYS, tmp_path / "keys")
    rx = new_rx(tmp_path / "rx.json", "phys-anna")
    sha = hashlib.sha256(prescription_bytes(parse_prescription(rx.read_bytes()))).hexdigest()
    obs = await Observer(broker.port, topic=EVENTS).start()
    daemon = await Daemon.follow(site)
    nonces = []
    try:
        await subscribed(daemon)
        for outcome in ("new", "same"):
            done = await asyncio.to_thread(send, rx, key, broker.url)
            assert done.returncode == 0, done.stderr
            assert f"sha256 {sha}" in done.stdout
            nonce = done.stdout.rsplit("nonce ", 1)[1].rstrip(")\n")
            nonces.append(nonce)
            got = await daemon.seen(
                received_with(nonce), f"prescription {outcome} ({nonce}) received"
            )
            assert (got["outcome"], got["sha256"]) == (outcome, sha)
        await obs.wait_for(
            lambda m: "prescription received treatment T-2026-0042" in m.payload.get("message", ""),
            "the prescription reported on events",
        )
        # Enrolled physicist, not the approver: a valid command, a refused prescription.
        other = orjson.loads(new_rx(tmp_path / "other.json", "phys.curie").read_bytes())
        env = sign_command(
            "prescription", other, signer=PHYS, holder="phys-anna", site="test-site",
            room="or-7", ttl_s=300,
        )  # fmt: skip
        async with aiomqtt.Client("127.0.0.1", broker.port, identifier="rx-test") as client:
            await client.publish(CMD + "prescription", orjson.dumps(env), qos=1)
        await daemon.seen(
            lambda r: r.get("event") == "prescription_refused", "the other approver's refused"
        )
        assert await daemon.stop() == 0
    finally:
        await daemon.ensure_dead()
        await obs.stop()

    entries = log_entries(site.log_dir)
    kinds = [(e["type"], e["data"].get("nonce")) for e in entries]
    for nonce in nonces:  # recorded as accepted before it was handled
        assert kinds.index(("command_accepted", nonce)) < kinds.index(
            ("prescription_received", nonce)
        )
    received = [e["data"] for e in entries if e["type"] == "prescription_received"]
    assert [(d["outcome"], d["sha256"], d["signer"]) for d in received] == [
        ("new", sha, "phys-anna"),
        ("same", sha, "phys-anna"),
    ]
    [refused] = [e["data"] for e in entries if e["type"] == "prescription_refused"]
    assert (refused["reason"], refused["nonce"]) == ("signer_not_approver", env["nonce"])
