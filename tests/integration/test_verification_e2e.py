"""Verification before beam-on over a wire simulator (issue 18's first "Done when"): a real
``iortd run`` reading ``iort-sim serve`` over a pty (serial-xrs), signed prescriptions over
a real Mosquitto, one site and log across four runs of the daemon (one delivery each):

1. no prescription: the READY check is NOT_VERIFIED (``no_prescription``), and the beam
   coming on raises ``no_prescription``; both alarms clear at the delivery's end;
2. (restart) prescriptions sent while the console is READY, each checked at once
   (trigger ``prescription``): a dose mismatch, an applicator mismatch, a planned time
   beyond the tolerance, each NOT_VERIFIED with that reason and the alarm; then the
   matching one: VERIFIED, the alarm cleared, on ``events`` and ``delivery``; beam-on
   writes ``prescription_used``;
3. (restart) the same prescription for the next delivery: ``already_delivered`` (rebuilt
   from the log); a newer one from another physicist replaces it while READY: VERIFIED; the
   daemon stops before beam-on and starts again: the delivery is taken over with that
   check (published again, not made again);
4. (restart, that physicist's key removed from the keyring) the pending prescription's
   check fails ``signature``.

Expiry, the reader's applicator and every other mismatch are unit-tested on the pure check
(tests/unit/test_verification.py).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiomqtt
import orjson
import pytest
from daemonproc import Daemon, Site
from mqttobs import Observer
from simproc import SERIAL_XRS_DEVICE, Simulator, fast_console
from test_commands_e2e import (  # the commands' broker, reused
    CMD,
    EVENTS,
    PHYS,
    broker,  # noqa: F401 - a fixture
    log_entries,
    subscribed,
)

from iortd.audit import cli as audit_cli
from iortd.auditlog.command import sign_command
from iortd.auditlog.note import Signer, generate_keypair, write_keypair
from iortd.daemon.mqtt.broker import Mosquitto
from iortd.plan.doserate import output_factor_bytes
from iortd.plan.model import Tolerances, make_prescription, prescription_dict

pytestmark = pytest.mark.integration

CURIE = generate_keypair("phys.curie")
DELIVERY = "iort/v1/test-site/or-7/delivery"
PRESET_GY = 0.3  # BAL34 at 2.5 Gy/min: 7.2 s of beam, 0.9 s at the speed below
# Run 2 sends four prescriptions while READY: 32 simulated s, 4 s real, leave room on a
# loaded machine (each is a publish and a durable append, well under 0.5 s).
SPEED = 8
# A site table: the example's BAL34 rate, and BAL34X (the same applicator) at a rate that
# makes the console's planned time 20 % short of the independent time.
TABLE = """format = 1
example = true
machine = "iortd simulator (test)"
source = "EXAMPLE: test table"
date = 2026-11-26
[applicators.BAL34]
surface_gy_min = 2.5
[applicators.BAL34X]
surface_gy_min = 2.0
"""
SITE = """
[site]
id = "test-site"
room = "or-7"
[log]
directory = "log"
signing_key_file = "keys/or-7.key"
group_commit_ms = 20
[health]
listen = ""
[mqtt]
url = "{url}"
keepalive_s = 2
[commands]
keyring = "{keyring}"
[verification]
doserate_table = "table.toml"
require_output_factor = false
applicator_types = {{ BAL34 = "balloon" }}
[tolerances]
stale_after_polls = 5
""" + SERIAL_XRS_DEVICE.replace("applicator_every = 5", "applicator_every = 1")


def keyring(path: Path, holders: list[tuple[str, Signer]]) -> Path:
    path.write_text(
        "".join(
            f'[[key]]\nholder = "{h}"\nname = "Staff {h}"\nroles = ["physicist"]\n'
            f'public_key = "{k.verifier.text}"\nvalid_from = "2026-01-01T00:00:00Z"\n'
            'valid_until = "2099-01-01T00:00:00Z"\n\n'
            for h, k in holders
        )
    )
    return path


def write_site(base: Path, url: str, port: str, holders: list[tuple[str, Signer]]) -> Site:
    ring = keyring(base / "keyring.toml", holders)
    (base / "table.toml").write_text(TABLE)
    cfg = base / "site.toml"
    cfg.write_text(SITE.format(url=url, keyring=ring, port=port))
    pub = base / "keys" / "or-7.pub"
    if not pub.exists():
        _, pub = write_keypair(generate_keypair("or-7"), base / "keys")
    return Site(cfg, base / "log", pub)


def rx(
    *, by: str = "phys-anna", dose: float = PRESET_GY, code: str = "BAL34",
    diameter: float = 35.0, minutes_ago: float = 30, valid: timedelta = timedelta(hours=12),
) -> dict[str, Any]:  # fmt: skip
    at = datetime.now(UTC) - timedelta(minutes=minutes_ago)
    p = make_prescription(
        treatment_id="T-2026-0042", plan_id="IORT-P1", fraction=1, fractions=1,
        prescribed_dose_gy=dose, dose_reference="surface", depth_mm=None,
        applicator_code=code, applicator_diameter_mm=diameter, planned_time_s=7.2,
        approved_by=by, approved_at=at, not_after=at + valid,
        tolerances=Tolerances(),
    )  # fmt: skip
    return prescription_dict(p)


async def send(
    port: int, body: dict[str, Any], signer: Signer, holder: str, kind: str = "prescription"
) -> None:
    env = sign_command(
        kind, body, signer=signer, holder=holder, site="test-site", room="or-7", ttl_s=300
    )
    async with aiomqtt.Client("127.0.0.1", port, identifier="verify-test") as client:
        await client.publish(CMD + kind, orjson.dumps(env), qos=1)


def checked(trigger: str, outcome: str, n: int = 1) -> Callable[[dict[str, Any]], bool]:
    """The n-th ``verification_checked`` line with that trigger and outcome."""
    seen = [0]

    def pred(r: dict[str, Any]) -> bool:
        if r.get("event") == "verification_checked" and (r["trigger"], r["outcome"]) == (
            trigger,
            outcome,
        ):
            seen[0] += 1
            return seen[0] == n
        return False

    return pred


async def console(base: Path, start_delay_s: float) -> Simulator:
    """The Axxent-like console over a pty: READY for ``start_delay_s`` simulated seconds."""
    return await Simulator.start(
        *fast_console(base / f"sim-{start_delay_s:g}"),
        *("--applicator", "BAL34", "--preset", str(PRESET_GY)),
        *("--start-delay", str(start_delay_s), "--seed", "5", "--speed", str(SPEED)),
        transport="serial",
    )


async def one_run(
    base: Path,
    broker: Mosquitto,  # noqa: F811 - the fixture
    holders: list[tuple[str, Signer]],
    start_delay_s: float,
    during: Callable[[Daemon], Any],
    after: Callable[[Site], Any] | None = None,
) -> None:
    """One console (one delivery) and a daemon; ``after`` runs once that daemon has
    stopped, with the console still going (a restart in the middle of the delivery)."""
    sim = await console(base, start_delay_s)
    site = write_site(base, broker.url, sim.device, holders)
    daemon = await Daemon.follow(site)
    try:
        await subscribed(daemon)
        await during(daemon)
        assert await daemon.stop() == 0
        if after is not None:
            await after(site)
    finally:
        await daemon.ensure_dead()
        await sim.stop()


def ended(r: dict[str, Any]) -> bool:
    return r.get("event") == "delivery_terminated"


async def test_verification_over_a_wire_simulator(
    broker: Mosquitto,  # noqa: F811 - the fixture
    tmp_path: Path,
) -> None:
    both = [("phys-anna", PHYS), ("phys.curie", CURIE)]
    port = broker.port
    obs = await Observer(port, topic=EVENTS).start()
    deliveries = await Observer(port, topic=DELIVERY).start()

    async def no_prescription(d: Daemon) -> None:
        await d.seen(checked("ready", "NOT_VERIFIED"), "the READY check")
        await d.seen(ended, "the delivery's end")

    good = rx()

    async def mismatches(d: Daemon) -> None:
        await d.seen(checked("ready", "NOT_VERIFIED"), "the READY check (none pending)")
        cases = [
            (rx(dose=0.31, minutes_ago=29), "dose"),
            (rx(diameter=30.0, minutes_ago=28), "applicator"),
            (rx(code="BAL34X", minutes_ago=27), "time"),
        ]
        for n, (body, _reason) in enumerate(cases, 1):
            await send(port, body, PHYS, "phys-anna")
            await d.seen(checked("prescription", "NOT_VERIFIED", n), f"check {n}")
        # The day's output factor arriving while READY makes a new check, which uses it.
        factor = output_factor_bytes(1.0, datetime.now(UTC).date(), "phys-anna", "sim")
        await send(port, orjson.loads(factor), PHYS, "phys-anna", kind="output_factor")
        await d.seen(checked("prescription", "NOT_VERIFIED", 4), "the check on the factor")
        await send(port, {**good, "approved_at": rx(minutes_ago=26)["approved_at"]}, PHYS,
                   "phys-anna")  # fmt: skip
        await d.seen(checked("prescription", "VERIFIED"), "the matching prescription")
        await d.seen(ended, "the delivery's end")

    async def reused(d: Daemon) -> None:
        await d.seen(checked("ready", "NOT_VERIFIED"), "already delivered")
        await send(port, rx(by="phys.curie", minutes_ago=1), CURIE, "phys.curie")
        await d.seen(checked("prescription", "VERIFIED"), "the newer prescription")

    async def restarted(site: Site) -> None:
        # Stopped and started again at READY (an upgrade): the delivery is taken over with
        # its latest check, published again, and not checked again.
        again = await Daemon.follow(site)
        try:
            rebuilt = await again.seen(
                lambda r: r.get("event") == "verification_rebuilt", "the verifier rebuilt"
            )
            assert rebuilt["used_prescriptions"] == 1
            await deliveries.wait_for(
                lambda m: (
                    m.topic == DELIVERY
                    and m.payload["session"] == sessions[-1] + 2
                    and (m.payload["delivery"] or {}).get("verification") is not None
                ),
                "the delivery with its check, after the restart",
            )
            assert await again.stop() == 0
        finally:
            await again.ensure_dead()
        assert again.events("verification_checked") == []

    short: dict[str, Any] = {}

    async def removed(d: Daemon) -> None:
        await d.seen(checked("ready", "NOT_VERIFIED"), "the signer's key removed")
        # Valid for a few seconds more: verified when it comes, expired at the next READY.
        short.update(rx(minutes_ago=0.5, valid=timedelta(seconds=34)))
        await send(port, short, PHYS, "phys-anna")
        await d.seen(checked("prescription", "VERIFIED"), "the short-lived prescription")

    async def expired(d: Daemon) -> None:
        await d.seen(checked("ready", "NOT_VERIFIED"), "the expired prescription")

    await one_run(tmp_path, broker, both, 2, no_prescription)
    await one_run(tmp_path, broker, both, 40, mismatches)
    # Each start is a new session: run 3's first daemon is the next one, its restart the
    # one after.
    sessions = [max(m.payload["session"] for m in deliveries.messages if m.topic == DELIVERY)]
    await one_run(tmp_path, broker, both, 80, reused, restarted)
    await one_run(tmp_path, broker, [("phys-anna", PHYS)], 80, removed)
    # The next console's READY comes after the prescription's not_after (a known time).
    not_after = datetime.fromisoformat(short["not_after"])
    await asyncio.sleep(max(0.0, (not_after - datetime.now(UTC)).total_seconds()) + 0.1)
    await one_run(tmp_path, broker, [("phys-anna", PHYS)], 80, expired)
    await obs.stop()
    await deliveries.stop()

    entries = log_entries(tmp_path / "log")
    checks = [e["data"] for e in entries if e["type"] == "verification"]
    assert [(c["trigger"], c["outcome"], c["reasons"]) for c in checks] == [
        ("ready", "NOT_VERIFIED", ["no_prescription"]),
        ("ready", "NOT_VERIFIED", ["no_prescription"]),
        ("prescription", "NOT_VERIFIED", ["dose"]),
        ("prescription", "NOT_VERIFIED", ["applicator"]),
        ("prescription", "NOT_VERIFIED", ["time"]),
        ("prescription", "NOT_VERIFIED", ["time"]),  # the output factor arrived
        ("prescription", "VERIFIED", []),
        ("ready", "NOT_VERIFIED", ["already_delivered"]),
        ("prescription", "VERIFIED", []),
        ("ready", "NOT_VERIFIED", ["signature"]),
        ("prescription", "VERIFIED", []),
        ("ready", "NOT_VERIFIED", ["expired"]),
    ]
    # Every item checked, with what was expected and what the console said.
    assert {c["item"] for c in checks[6]["checks"]} == {
        "no_prescription", "signature", "expired", "already_delivered", "applicator", "dose",
        "time", "time_unchecked",
    }  # fmt: skip
    assert checks[4]["time_basis"]["factor_assumed"] is True  # before the factor came
    for c in checks[5:7]:  # the day's factor, from the output_factor command
        assert c["time_basis"]["factor_assumed"] is False, c["time_basis"]
        assert c["time_basis"]["output_factor"] == 1.0
        assert c["time_basis"]["factor_measured_on"] == datetime.now(UTC).date().isoformat()
    alarms = [
        (e["type"], e["data"]["code"])
        for e in entries
        if e["type"].startswith("alarm_") and e["data"]["code"] in ("no_prescription",
                                                                     "prescription_not_verified")
    ]  # fmt: skip
    # Run 1: raised at READY and at beam-on, both cleared at the end; run 2: raised by the
    # first mismatch, cleared by the matching prescription; runs 3, 4 and 5: raised at READY
    # (cleared in 3 and 4 by a matching prescription).
    assert alarms == [
        ("alarm_raised", "prescription_not_verified"),
        ("alarm_raised", "no_prescription"),
        ("alarm_cleared", "prescription_not_verified"),
        ("alarm_cleared", "no_prescription"),
        ("alarm_raised", "prescription_not_verified"),
        ("alarm_cleared", "prescription_not_verified"),
        ("alarm_raised", "prescription_not_verified"),
        ("alarm_cleared", "prescription_not_verified"),
        ("alarm_raised", "prescription_not_verified"),
        ("alarm_cleared", "prescription_not_verified"),
        ("alarm_raised", "prescription_not_verified"),
    ]
    [used] = [e for e in entries if e["type"] == "prescription_used"]
    assert used["data"]["prescription_sha256"] == checks[6]["prescription_sha256"]
    kinds = [e["type"] for e in entries]
    assert kinds.index("prescription_used") > kinds.index("verification")
    # Published after the record: the checks on events, the last one on the delivery topic.
    published = [m.payload for m in obs.messages if m.payload.get("kind") == "verification"]
    assert [p["verification"]["outcome"] for p in published] == [c["outcome"] for c in checks]
    verified = [
        m.payload["delivery"]["verification"]
        for m in deliveries.messages
        if m.topic == DELIVERY
        and m.payload.get("delivery")
        and m.payload["delivery"].get("verification")
    ]
    after_restart = [
        m.payload["delivery"]["verification"]
        for m in deliveries.messages
        if m.topic == DELIVERY
        and m.payload["session"] == sessions[-1] + 2
        and m.payload["delivery"]
    ]
    assert after_restart[0]["outcome"] == "VERIFIED"
    assert after_restart[0]["trigger"] == "prescription"
    assert verified[-1]["outcome"] == "NOT_VERIFIED"
    assert verified[-1]["reasons"] == ["expired"]
    assert any(v["outcome"] == "VERIFIED" for v in verified)

    # The auditors' side reads what the daemon wrote: the log verifies, and the governing
    # check of the delivery that was given is the VERIFIED one, its prescription used.
    pub = tmp_path / "keys" / "or-7.pub"
    assert audit_cli.main(["verify", str(tmp_path / "log"), "--pubkey", str(pub)]) == 0
    given = checks[6]["delivery_id"]
    out = tmp_path / "given.json"
    argv = ["export", str(tmp_path / "log"), "--delivery", given, "--pubkey", str(pub)]
    assert audit_cli.main([*argv, "--format", "json", "--out", str(out)]) == 0
    pv = orjson.loads(out.read_bytes())["prescription_verification"]
    assert pv["outcome"] == "VERIFIED"
    assert pv["prescription_used_seq"] == used["seq"]
    assert not pv["checked_only_at_or_after_beam_on"]
