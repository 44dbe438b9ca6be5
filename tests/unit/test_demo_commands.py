"""The demo's signed commands (daemon/demo_commands.py): what ``iortd demo`` drops into its
inbox is what a site's daemon accepts, matches the simulated console, and identifies no one;
and the demo's console view shows the check before beam-on."""

from __future__ import annotations

import asyncio
import io
from datetime import UTC, datetime
from pathlib import Path

import pytest

from iortd.auditlog.canonical import canonical
from iortd.auditlog.command import NonceBook, check_command
from iortd.auditlog.keyring import parse_keyring
from iortd.auditlog.note import generate_keypair
from iortd.daemon.config import Config, load_config
from iortd.daemon.console import ConsoleView
from iortd.daemon.demo import EXAMPLE_TABLE, default_demo_config
from iortd.daemon.demo_commands import (
    DEMO_PHYSICIST,
    DEMO_PHYSICIST_NAME,
    DemoCommandsError,
    keyring_text,
    prepare,
)
from iortd.daemon.tracker import VerificationChecked
from iortd.drivers.registry import DriverRegistry
from iortd.plan.doserate import (
    expected_time_s,
    load_doserate_table,
    parse_output_factor,
    time_agrees,
)
from iortd.plan.model import parse_prescription

NOW = datetime(2026, 12, 6, 9, 30, tzinfo=UTC)
PHYS = generate_keypair(DEMO_PHYSICIST)


def demo_config(tmp_path: Path) -> Config:
    o = {"log": {"directory": str(tmp_path / "log")}}
    return load_config(default_demo_config(), DriverRegistry.from_entry_points(), o).config


def test_the_demo_commands_are_accepted_and_match_the_simulated_console(tmp_path: Path) -> None:
    c = demo_config(tmp_path)
    ring_path = tmp_path / "demo-keyring.toml"
    ring_path.write_text(keyring_text(PHYS, NOW))
    ring = parse_keyring(ring_path.read_bytes(), ring_path)
    (entry,) = ring.entries
    assert (entry.holder, entry.name, entry.roles) == (
        DEMO_PHYSICIST,
        DEMO_PHYSICIST_NAME,
        frozenset({"physicist"}),
    )
    sent = prepare(c, ring_path, tmp_path / "inbox", PHYS, NOW)
    files = sorted((tmp_path / "inbox").iterdir())
    assert [f.name for f in files] == ["1-output_factor.json", "2-prescription.json"]
    seen = NonceBook(60)
    cmds = [
        check_command(
            f.read_bytes(), ring, site="demo-site", room="or-1", now=NOW, skew_s=60, seen=seen
        )
        for f in files
    ]
    assert [(x.kind, x.signer) for x in cmds] == [
        ("output_factor", DEMO_PHYSICIST),
        ("prescription", DEMO_PHYSICIST),
    ]
    factor = parse_output_factor(canonical(dict(cmds[0].body)))
    assert factor.value == 1.0
    assert "simulated" in factor.machine
    p = parse_prescription(canonical(dict(cmds[1].body)))
    assert (p.treatment_id, p.plan_id) == ("T-DEMO-0001", "P-DEMO-0001")
    assert (p.prescribed_dose_gy, p.applicator_code, p.applicator_diameter_mm) == (
        20.0,
        "SPH30",
        30.0,
    )
    assert p.approved_at < NOW < p.not_after
    # The console's planned time agrees with the independent time of the EXAMPLE table.
    table = load_doserate_table(EXAMPLE_TABLE)
    ok, line = time_agrees(p.planned_time_s or 0, expected_time_s(p, table, factor), 0.05)
    assert ok, line
    assert sent.prescription_sha256 is not None
    assert sent.applicator_types == {"SPH30": "spherical"}


def test_no_prescription_or_a_console_that_is_not_the_simulator(tmp_path: Path) -> None:
    c = demo_config(tmp_path)
    ring = tmp_path / "ring.toml"
    sent = prepare(c, ring, tmp_path / "a", PHYS, NOW, prescription=False)
    assert sent.prescription_sha256 is None
    assert list((tmp_path / "a").iterdir()) == []
    other = c.model_copy(update={"devices": [d for d in c.devices if d.role != "source"]})
    with pytest.raises(DemoCommandsError, match="not the simulator"):
        prepare(other, ring, tmp_path / "b", PHYS, NOW)
    assert not (tmp_path / "b").exists(), "nothing written before the error"


def test_the_console_view_shows_the_check_before_beam_on() -> None:
    out = io.StringIO()
    view = ConsoleView(out, live=False)
    public = {
        "outcome": "NOT_VERIFIED",
        "trigger": "ready",
        "reasons": ["time"],
        "treatment_id": "T-DEMO-0001",
        "plan_id": "P-DEMO-0001",
        "planned_time_s": 1380.0,
        "expected_time_s": 1100.0,
    }
    ev = VerificationChecked("or-1-x", {}, public, 0, NOW)
    asyncio.run(view.events([ev], None))
    assert out.getvalue() == (
        "  check before beam-on (ready): NOT_VERIFIED [time]: T-DEMO-0001/P-DEMO-0001, "
        "planned 1380 s, expected 1100 s\n"
    )
