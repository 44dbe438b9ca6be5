"""The console scripts as a user runs them: real processes, real signals."""

from __future__ import annotations

import asyncio
import json
import os
import re
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


@pytest.fixture(autouse=True)
def private_data_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The demo keeps its signing key in the per-user data directory: never the real one."""
    home = tmp_path / "data-home"
    monkeypatch.setenv("XDG_DATA_HOME", str(home))
    return home


def run(
    *args: str, timeout: float = 60, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        list(args), capture_output=True, text=True, timeout=timeout, check=False, cwd=cwd
    )


def test_demo_runs_one_simulated_delivery_to_normal_termination(
    tmp_path: Path, private_data_home: Path
) -> None:
    logdir = tmp_path / "log"
    # x300: the console is READY for 0.6 s (180 simulated s), six polls, so the check before
    # beam-on is made at READY even on a loaded machine; 4.6 s of beam.
    p = run(IORTD, "demo", "--speed", "300", "--duration", "60", "--log-dir", str(logdir))
    assert p.returncode == 0, p.stderr
    out = p.stdout
    assert f"audit log: {logdir}" in out, "the demo says where the log goes"
    pub = private_data_home / "iortd" / "demo-key" / "iortd-demo.pub"
    assert f"iort-audit verify {logdir} --pubkey {pub}" in out
    key = private_data_home / "iortd" / "demo-key" / "iortd-demo.key"
    assert key.stat().st_mode & 0o777 == 0o600
    assert "[SIMULATED]" in out
    assert "terminated NORMAL (preset_reached)" in out
    assert "primary 20.000 Gy" in out
    # The progress lines count upward (printed at each tenth when not on a terminal).
    fractions = [
        float(line.split("/")[0].split()[-1]) for line in out.splitlines() if " Gy (2nd " in line
    ]
    assert len(fractions) >= 5
    assert fractions == sorted(fractions)
    # One time base on the console (issue 14): elapsed is never shorter than beam-on, on
    # any progress line or the end line.
    shown = re.findall(r"beam-on ([\d:]+),? +elapsed ([\d:]+)", out)
    assert len(shown) >= 5
    secs = [
        tuple(sum(int(x) * 60**i for i, x in enumerate(reversed(t.split(":")))) for t in p)
        for p in shown
    ]
    assert all(e >= b for b, e in secs), [p for p, (b, e) in zip(shown, secs, strict=True) if e < b]
    # What the demo showed is what the log holds, and the log verifies against the key.
    v = run(IORT_AUDIT, "verify", str(logdir), "--pubkey", str(pub))
    assert v.returncode == 0, v.stdout + v.stderr
    assert v.stdout.startswith("INTACT: ")
    listing = run(IORT_AUDIT, "deliveries", str(logdir))
    assert listing.returncode == 0, listing.stderr
    (line,) = listing.stdout.splitlines()
    assert " NORMAL " in line
    assert "20.000/20.000 Gy" in line
    # The demo's applicator reader (issue 16) is polled, recorded and cross-checked beside
    # the source: it agrees with the console (no applicator alarm), and the monitor's own
    # applicator interlock is recorded as the monitor's.
    entries = [
        json.loads(text)
        for seg in sorted(logdir.glob("log-*.jsonl"))
        for text in seg.read_text("utf-8").splitlines()
    ]
    readings = [e for e in entries if e["type"] == "applicator_sample"]
    assert readings
    assert {e["data"]["device"] for e in readings} == {"stand-1"}
    codes = {e["data"]["code"] for e in entries if e["type"] == "alarm_raised"}
    assert not codes & {"applicator_mismatch", "applicator_displaced", "applicator_tilted"}
    assert any(
        e["type"] == "monitor_interlock_changed" and e["data"]["to"] == "ok" for e in entries
    )
    # Verification before beam-on (issue 18): the demo sends a signed demo prescription and
    # the day's output factor before the console is READY, so the first check is VERIFIED,
    # with no NOT_VERIFIED flash before it and no alarm; beam-on uses that prescription.
    assert "demo prescription: sent by the demo physicist" in out
    assert "iort-audit report" in out
    types = [e["type"] for e in entries]
    checks = [e["data"] for e in entries if e["type"] == "verification"]
    assert checks, "the console's READY was checked"
    assert [c["outcome"] for c in checks] == ["VERIFIED"] * len(checks), checks
    assert checks[0]["trigger"] == "ready"
    first_check = types.index("verification")
    assert types.index("prescription_received") < first_check
    assert types.index("output_factor_received") < first_check
    beam_on = next(
        i
        for i, e in enumerate(entries)
        if e["type"] == "phase_changed" and e["data"]["to"] == "IRRADIATING"
    )
    assert first_check < beam_on
    assert types.index("prescription_used") > first_check
    assert not codes & {"prescription_not_verified", "no_prescription"}
    received = next(e["data"] for e in entries if e["type"] == "prescription_received")
    assert received["prescription"]["treatment_id"] == "T-DEMO-0001"
    assert received["prescription"]["approved_by"] == "demo-physicist"


def test_demo_log_dir_is_relative_to_the_working_directory(tmp_path: Path) -> None:
    p = run(IORTD, "demo", "--speed", "1", "--duration", "0.2", "--log-dir", "mylogs", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert f"audit log: {tmp_path / 'mylogs'}\n" in p.stdout
    assert (tmp_path / "mylogs" / "checkpoint").is_file()


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


def test_run_refuses_to_start_without_a_signing_key(tmp_path: Path) -> None:
    cfg = tmp_path / "site.toml"
    cfg.write_text(SITE.format(key=""))
    p = run(IORTD, "run", "--config", str(cfg))
    assert p.returncode == 2
    assert "log.signing_key_file: required" in p.stderr
    assert not (tmp_path / "log").exists(), "nothing is written before the config is usable"


SITE = """
[site]
id = "sig-test"
room = "or-2"
[log]
directory = "log"
{key}
[health]
listen = ""
[mqtt]
enabled = false
[[devices]]
name = "source-1"
driver = "sim"
poll_interval_s = 0.05
[devices.options]
applicator = "SPH30"
"""


def test_run_stops_cleanly_on_sigterm(tmp_path: Path) -> None:
    keygen = run(IORT_AUDIT, "keygen", "--name", "or-2", "--out", str(tmp_path / "keys"))
    assert keygen.returncode == 0, keygen.stderr
    cfg = tmp_path / "site.toml"
    cfg.write_text(SITE.format(key='signing_key_file = "keys/or-2.key"'))

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
    # The audit log says it was a clean stop, and verifies against the key.
    v = run(
        IORT_AUDIT, "verify", str(tmp_path / "log"), "--pubkey", str(tmp_path / "keys/or-2.pub")
    )
    assert v.returncode == 0, v.stdout
    shown = run(IORT_AUDIT, "show", str(tmp_path / "log"), "--type", "daemon_stop")
    assert "clean=True" in shown.stdout


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


def test_iort_audit_usage_errors_exit_2(tmp_path: Path) -> None:
    p = run(IORT_AUDIT, "verify", str(tmp_path / "nowhere"))
    assert p.returncode == 2
    assert "no such file or directory" in p.stderr
    assert run(IORT_AUDIT).returncode == 2


async def _line_matching(
    stream: asyncio.StreamReader, pattern: str, within_s: float
) -> re.Match[str]:
    seen = []
    async with asyncio.timeout(within_s):
        while raw := await stream.readline():
            line = raw.decode()
            seen.append(line)
            if m := re.search(pattern, line):
                return m
    raise AssertionError(f"no line matching {pattern!r} in {seen}")


async def test_demo_streams_to_its_own_broker_and_stops_it(tmp_path: Path) -> None:
    """`iortd demo` with no broker configured starts a private Mosquitto, says where to
    subscribe, streams the delivery there (mosquitto_sub sees it) and stops the broker
    by PID at the end. With ``--no-prescription`` (a run of its own would cost another
    delivery): the check before beam-on says ``no_prescription``, loudly."""
    demo = await asyncio.create_subprocess_exec(
        IORTD,
        *("demo", "--speed", "300", "--log-dir", str(tmp_path / "log"), "--no-prescription"),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    sub: asyncio.subprocess.Process | None = None
    try:
        assert demo.stdout is not None
        pid = int((await _line_matching(demo.stdout, r"Mosquitto \(pid (\d+)\)", 10))[1])
        cmd = await _line_matching(demo.stdout, r"mosquitto_sub -h (\S+) -p (\d+) -t '(\S+)'", 10)
        sub = await asyncio.create_subprocess_exec(
            "mosquitto_sub",
            *("-h", cmd[1], "-p", cmd[2], "-t", cmd[3], "-v"),
            stdout=asyncio.subprocess.PIPE,
        )
        rest, err = await asyncio.wait_for(demo.communicate(), 60)
        assert demo.returncode == 0, err.decode()
        assert "TERMINATED" in rest.decode()
        assert "ALARM HIGH" in rest.decode()
    finally:
        if demo.returncode is None:
            demo.kill()
            await demo.wait()
        if sub is not None and sub.returncode is None:
            sub.terminate()  # it would wait for its broker to come back
    out, _ = await sub.communicate()
    lines = out.decode().splitlines()
    topics = {line.split(" ", 1)[0].removeprefix(cmd[3].rstrip("#")) for line in lines}
    assert {"telemetry", "events", "status", "delivery"} <= topics, topics
    last = json.loads([x for x in lines if " " in x][-1].split(" ", 1)[1])
    status = [
        json.loads(x.split(" ", 1)[1]) for x in lines if x.split(" ", 1)[0].endswith("/status")
    ]
    assert status[-1]["online"] is False, "a clean end publishes offline"
    assert last["sim"] is True
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # the private broker is gone
    # No prescription: every check NOT_VERIFIED [no_prescription], both HIGH alarms raised;
    # the delivery topic carried the outcome too.
    entries = [
        json.loads(text)
        for seg in sorted((tmp_path / "log").glob("log-*.jsonl"))
        for text in seg.read_text("utf-8").splitlines()
    ]
    checks = [e["data"] for e in entries if e["type"] == "verification"]
    assert checks
    assert {(c["outcome"], tuple(c["reasons"])) for c in checks} == {
        ("NOT_VERIFIED", ("no_prescription",))
    }
    raised = {e["data"]["code"] for e in entries if e["type"] == "alarm_raised"}
    assert {"prescription_not_verified", "no_prescription"} <= raised
    assert not any(e["type"] == "prescription_received" for e in entries)
    deliveries = [
        json.loads(x.split(" ", 1)[1]) for x in lines if x.split(" ", 1)[0].endswith("/delivery")
    ]
    assert any(
        ((d.get("delivery") or {}).get("verification") or {}).get("outcome") == "NOT_VERIFIED"
        for d in deliveries
    ), deliveries[-1:]
