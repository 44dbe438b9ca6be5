"""The day's output factor and a physicist's override reach the room: ``iort-plan send --kind
output_factor`` and ``iort-plan override`` over a real Mosquitto into a real ``iortd run``
(sim driver), with test_commands_e2e.py's broker, site and keyring.

* the factor file ``iort-plan factor`` wrote, sent: ``command_accepted`` then
  ``output_factor_received`` in the log, with the SHA-256 the sender printed, and a notice
  on ``events``;
* a factor measured three days ago, signed by an enrolled physicist: a valid command,
  refused as a factor (``output_factor_refused``, ``too_old``);
* an override from ``iort-plan override``: its envelope passes every check of the intake
  (key, role, room, time, nonce, topic). Its handler is built beside this one, so the
  outcome is either ``command_accepted`` (handler present) or ``command_rejected`` with
  ``no_handler`` (not yet): both say the envelope was good; any other reason would not.
"""

from __future__ import annotations

import subprocess
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

pytestmark = pytest.mark.integration

ROOM = ("--holder", "phys-anna", "--site", "test-site", "--room", "or-7")


def iort_plan_run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "iort-plan"), *argv],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def override_seen(r: dict[str, Any]) -> bool:
    if r.get("event") == "command_accepted":
        return r.get("kind") == "override"
    return r.get("event") == "command_rejected"


async def test_the_days_factor_and_an_override_reach_the_room(
    site: Site,  # noqa: F811 - the fixture
    broker: Mosquitto,  # noqa: F811 - the fixture
    tmp_path: Path,
) -> None:
    key, _ = write_keypair(PHYS, tmp_path / "keys")
    factor = tmp_path / "factor.json"
    made = ["factor", "--value", "1.012", "--measured-by", "phys-anna", "--machine", "XRS-1"]
    assert iort_plan([*made, "--out", str(factor)]) == 0
    obs = await Observer(broker.port, topic=EVENTS).start()
    daemon = await Daemon.follow(site)
    try:
        await subscribed(daemon)
        sent = iort_plan_run(
            *("send", "--kind", "output_factor", str(factor), "--key", str(key), *ROOM),
            *("--broker", broker.url),
        )
        assert sent.returncode == 0, sent.stderr
        sha = sent.stdout.split("sha256 ", 1)[1].split(" ", 1)[0]
        nonce = sent.stdout.rsplit("nonce ", 1)[1].rstrip(")\n")
        got = await daemon.seen(
            lambda r: r.get("event") == "output_factor_received" and r.get("nonce") == nonce,
            "the output factor received",
        )
        assert got["sha256"] == sha
        await obs.wait_for(
            lambda m: "output factor 1.0120" in m.payload.get("message", ""),
            "the factor reported on events",
        )
        # Three days old, signed by an enrolled physicist: a valid command, a refused factor.
        day = (datetime.now(UTC) - timedelta(days=3)).date().isoformat()
        stale = {**orjson.loads(factor.read_bytes()), "measured_on": day}
        env = sign_command(
            "output_factor", stale, signer=PHYS, holder="phys-anna", site="test-site",
            room="or-7", ttl_s=300,
        )  # fmt: skip
        async with aiomqtt.Client("127.0.0.1", broker.port, identifier="of-test") as client:
            await client.publish(CMD + "output_factor", orjson.dumps(env), qos=1)
        await daemon.seen(
            lambda r: r.get("event") == "output_factor_refused", "the stale factor refused"
        )
        over = iort_plan_run(
            *("override", "--delivery", "or-7-20261206T081500000000Z"),
            *("--prescription", "ab" * 32, "--item", "dose", "--reason", "checked"),
            *("--key", str(key), *ROOM, "--broker", broker.url),
        )
        assert over.returncode == 0, over.stderr
        await daemon.seen(override_seen, "the override judged by the intake")
        assert await daemon.stop() == 0
    finally:
        await daemon.ensure_dead()
        await obs.stop()

    entries = log_entries(site.log_dir)
    kinds = [(e["type"], e["data"].get("nonce")) for e in entries]
    assert kinds.index(("command_accepted", nonce)) < kinds.index(("output_factor_received", nonce))
    [received] = [e["data"] for e in entries if e["type"] == "output_factor_received"]
    assert (received["sha256"], received["signer"], received["output_factor"]) == (
        sha,
        "phys-anna",
        1.012,
    )
    [refused] = [e["data"] for e in entries if e["type"] == "output_factor_refused"]
    assert (refused["reason"], refused["nonce"]) == ("too_old", env["nonce"])
    # The override's envelope passed every check: accepted, or wanting only its handler.
    over_nonce = over.stdout.rsplit("nonce ", 1)[1].rstrip(")\n")
    accepted = [
        e for e in entries if e["type"] == "command_accepted" and e["data"]["kind"] == "override"
    ]
    rejected = [e["data"] for e in entries if e["type"] == "command_rejected"]
    if accepted:
        assert [e["data"]["nonce"] for e in accepted] == [over_nonce]
    else:
        assert [(d["reason"], d["detail"]) for d in rejected] == [
            ("no_handler", "this daemon does not handle 'override' yet")
        ]
