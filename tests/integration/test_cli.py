"""The console scripts as a user runs them: real processes, real signals."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

BIN = Path(sys.executable).parent
IORTD = str(BIN / "iortd")
IORT_SIM = str(BIN / "iort-sim")
IORT_AUDIT = str(BIN / "iort-audit")


def run(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), capture_output=True, text=True, timeout=timeout, check=False)


def test_demo_runs_one_simulated_delivery_to_normal_termination(tmp_path: Path) -> None:
    p = run(IORTD, "demo", "--speed", "1200", "--duration", "60", "--log-dir", str(tmp_path))
    assert p.returncode == 0, p.stderr
    out = p.stdout
    assert str(tmp_path) in out, "the demo says where the log goes"
    assert "[SIMULATED]" in out
    assert "terminated NORMAL (preset_reached)" in out
    assert "primary 20.000 Gy" in out
    # The progress lines count upward (printed at each tenth when not on a terminal).
    fractions = [
        float(line.split("/")[0].split()[-1]) for line in out.splitlines() if " Gy (2nd " in line
    ]
    assert len(fractions) >= 5
    assert fractions == sorted(fractions)


def test_demo_log_dir_is_relative_to_the_working_directory(tmp_path: Path) -> None:
    p = subprocess.run(
        [IORTD, "demo", "--speed", "1", "--duration", "0.2", "--log-dir", "mylogs"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        cwd=tmp_path,
    )
    assert p.returncode == 0, p.stderr
    assert f"audit log directory: {tmp_path / 'mylogs'}" in p.stdout


def test_demo_duration_bounds_the_run(tmp_path: Path) -> None:
    p = run(IORTD, "demo", "--speed", "1", "--duration", "1.0", "--log-dir", str(tmp_path))
    assert p.returncode == 0, p.stderr
    assert "demo stopped before the delivery ended" in p.stdout


def test_demo_rejects_a_bad_speed_naming_the_key() -> None:
    p = run(IORTD, "demo", "--speed", "0")
    assert p.returncode == 2
    (line,) = p.stderr.strip().splitlines()
    assert "simulation.speed" in line
    assert "greater than or equal to 0.01" in line


def test_run_stops_cleanly_on_sigterm(tmp_path: Path) -> None:
    cfg = tmp_path / "site.toml"
    cfg.write_text(
        """
[site]
id = "sig-test"
room = "or-2"
[log]
directory = "log"
[[devices]]
name = "source-1"
driver = "sim"
poll_interval_s = 0.05
[devices.options]
applicator = "SPH30"
"""
    )

    async def scenario() -> tuple[int, list[dict[str, object]]]:
        proc = await asyncio.create_subprocess_exec(
            IORTD,
            "run",
            "--config",
            str(cfg),
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        assert proc.stderr is not None
        lines: list[dict[str, object]] = []
        try:
            async with asyncio.timeout(20):
                while not any(e.get("event") == "device_connected" for e in lines):
                    raw = await proc.stderr.readline()
                    assert raw, f"iortd exited before connecting: {lines}"
                    lines.append(json.loads(raw))  # JSON lines when stderr is not a TTY
            proc.send_signal(signal.SIGTERM)
            async with asyncio.timeout(10):
                rest = await proc.stderr.read()
                rc = await proc.wait()
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        lines += [json.loads(x) for x in rest.decode().splitlines() if x.strip()]
        return rc, lines

    rc, lines = asyncio.run(scenario())
    assert rc == 0
    events = [e["event"] for e in lines]
    assert events[0] == "daemon_starting"
    assert events[-1] == "daemon_stopped"
    start = lines[0]
    assert start["config_sha256"]
    assert start["site"] == "sig-test"
    assert all("timestamp" in e and "level" in e for e in lines)


def test_iort_sim_run_is_reproducible_from_its_seed() -> None:
    args = [IORT_SIM, "run", "--applicator", "SPH40", "--step", "30"]
    a = run(*args, "--seed", "3")
    b = run(*args, "--seed", "3")
    c = run(*args, "--seed", "4")
    assert a.returncode == 0, a.stderr
    assert a.stdout == b.stdout
    assert a.stdout != c.stdout
    rows = [json.loads(x) for x in a.stdout.splitlines()]
    assert rows[-1]["termination"] == "NORMAL"
    assert all(r["simulated"] for r in rows)


def test_iort_sim_unknown_applicator_lists_the_known_ones() -> None:
    p = run(IORT_SIM, "run", "--applicator", "SPH99")
    assert p.returncode == 2
    assert "SPH30" in p.stderr


def test_iort_audit_says_it_is_not_built_yet() -> None:
    p = run(IORT_AUDIT, "verify", "somewhere")
    assert p.returncode == 2
    assert "not built yet" in p.stderr
