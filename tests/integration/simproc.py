"""`iort-sim serve` as a process, for the integration tests: started on its own pty or
port, read as JSON lines (tests wait on what it prints, never on the clock), stopped by
PID. One place for the serial, Modbus, dashboard and report tests."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BIN = Path(sys.executable).parent

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
