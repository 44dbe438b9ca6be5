"""`iort-sim serve` as a process, for the integration tests: started on its own pty or
port, read as JSON lines (tests wait on what it prints, never on the clock), stopped by
PID. One place for the serial, Modbus, dashboard and report tests."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from iortd.simulators.durations import parse_duration

BIN = Path(sys.executable).parent
CONFIG = Path(__file__).resolve().parents[2] / "config"

# The built-in profiles self-test for 10 simulated seconds before the automatic operator
# starts; at speed 1 that is 10 s of every real-time test spent waiting. A test that is
# not about the self-test runs a copy of the profile with a shorter one, and the bundled
# scenario it plays moved earlier by the difference, so that every step still falls at
# the same moment of the delivery.
SELF_TEST_S = 10.0
FAST_SELF_TEST_S = 2.0

# The [[devices]] table of a daemon reading the serial simulator with serial-xrs.
SERIAL_XRS_DEVICE = """
[[devices]]
name = "console-1"
driver = "serial-xrs"
poll_interval_s = 0.1
timeout_s = 0.5
[devices.transport]
type = "serial"
port = "{port}"
baudrate = 19200
[devices.options]
applicator_every = 5
"""

# A room with a console and an applicator reader and stand over Modbus TCP (issue 16):
# the simulator's --devices file ({speed}, {seed}) and the daemon's [[devices]] tables
# reading it with the production drivers ({console_port}, {stand_port}).
APPLICATOR_ROOM_SIM = """
speed = {speed}

[[device]]
name = "console"
transport = "modbus-tcp"
profile = "axxent"
applicator = "BAL34"
preset = 1.5
start_delay = 1
seed = {seed}

[[device]]
name = "stand"
kind = "applicator"
transport = "modbus-tcp"
profile = "axxent"
applicator = "BAL34"
"""
APPLICATOR_ROOM_DEVICES = """
[[devices]]
name = "console-1"
driver = "modbus-xrs"
poll_interval_s = 0.1
timeout_s = 0.5
[devices.options]
map = "xrs-mb1"
unit_id = 1
[devices.transport]
type = "tcp"
host = "127.0.0.1"
port = {console_port}
[[devices]]
name = "stand-1"
role = "applicator"
driver = "modbus-apl"
poll_interval_s = 0.1
timeout_s = 0.3
[devices.options]
unit_id = 2
[devices.transport]
type = "tcp"
host = "127.0.0.1"
port = {stand_port}
"""


def fast_profile_text(text: str) -> str:
    """A built-in profile's text with a :data:`FAST_SELF_TEST_S` self-test."""
    old = f"self_test_s = {SELF_TEST_S}"
    assert text.count(old) == 1, "the bundled profile's self-test line"
    return text.replace(old, f"self_test_s = {FAST_SELF_TEST_S}", 1)


def fast_console(
    directory: Path, scenario: str | None = None, profile: str = "axxent"
) -> tuple[str, ...]:
    """``iort-sim serve`` arguments for the built-in ``profile`` with a short self-test and,
    if named, the bundled ``scenario`` with every step moved earlier by the self-test
    saved (same name, actions and durations; written to ``directory``). With
    ``--hold-until-polled``: the console's clock starts at the daemon's first request, so
    that a daemon slow to start on a loaded machine misses nothing the scenario does."""
    directory.mkdir(parents=True, exist_ok=True)
    prof = directory / f"{profile}.toml"
    prof.write_text(fast_profile_text((CONFIG / "profiles" / f"{profile}.toml").read_text()))
    args: tuple[str, ...] = ("--profile", str(prof), "--hold-until-polled")
    if scenario is None:
        return args
    shift = SELF_TEST_S - FAST_SELF_TEST_S
    lines = []
    for line in (CONFIG / "scenarios" / f"{scenario}.toml").read_text().splitlines():
        if m := re.fullmatch(r'at = "(.+)"', line):
            at = parse_duration(m.group(1)) - shift
            assert at >= 0, f"{scenario}: a step before the self-test's end"
            lines.append(f'at = "{at:g}s"')
        else:
            lines.append(line)
    moved = directory / f"{scenario}.toml"
    moved.write_text("\n".join(lines) + "\n")
    return (*args, "--scenario", str(moved))


@dataclass
class Simulator:
    """One ``iort-sim serve`` process. ``device`` is where it serves: the pty path
    (serial, modbus-rtu) or "host:port" (modbus-tcp); ``serving`` its serving line."""

    proc: asyncio.subprocess.Process
    device: str = ""
    lines: list[dict[str, Any]] = field(default_factory=list)
    serving: dict[str, Any] = field(default_factory=dict)

    @classmethod
    async def start(cls, *args: str, transport: str | None = "serial") -> Simulator:
        """Start it and wait until every endpoint is open (``ready``); ``transport=None``
        when ``args`` name a devices file (``--devices``)."""
        chosen = ("--transport", transport) if transport is not None else ()
        proc = await asyncio.create_subprocess_exec(
            str(BIN / "iort-sim"),
            *("serve", *chosen, *args),
            stdout=asyncio.subprocess.PIPE,
        )
        sim = cls(proc)
        try:
            await sim.until("ready", within_s=10)
        except BaseException:
            await sim.stop()
            raise
        s = sim.serving = next(r for r in sim.lines if r["event"] == "serving")
        sim.device = s["device"] if "device" in s else f"{s['host']}:{s['port']}"
        return sim

    async def until(self, event: str, within_s: float) -> dict[str, Any]:
        """The first line of this event, read so far or within ``within_s``."""
        assert self.proc.stdout is not None
        rec: dict[str, Any]
        for rec in self.lines:
            if rec["event"] == event:
                return rec
        async with asyncio.timeout(within_s):
            while raw := await self.proc.stdout.readline():
                rec = json.loads(raw)
                self.lines.append(rec)
                if rec["event"] == event:
                    return rec
        raise AssertionError(f"iort-sim exited before {event}: {self.lines[-3:]}")

    async def ctl(self, device: str, *args: str) -> dict[str, Any]:
        """``iort-sim ctl`` on one device of this simulator; its JSON reply ({} if none)."""
        control = next(r for r in self.lines if r["event"] == "ready")["control"]
        proc = await asyncio.create_subprocess_exec(
            str(BIN / "iort-sim"), "ctl", "--control", control, "--device", device, *args,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        async with asyncio.timeout(15):
            out, err = await proc.communicate()
        assert proc.returncode == 0, f"iort-sim ctl {' '.join(args)}: {err.decode()}"
        reply: dict[str, Any] = json.loads(out) if out.strip() else {}
        return reply

    async def stop(self) -> None:
        """SIGTERM, then SIGKILL if it has not exited within 10 s."""
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                async with asyncio.timeout(10):
                    await self.proc.wait()
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
