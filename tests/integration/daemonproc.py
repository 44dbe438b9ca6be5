"""The real daemon as a process whose operational log (JSON lines on stderr) is read as
it runs; tests wait on what it logs, never on the clock."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

BIN = Path(sys.executable).parent


@dataclass
class Site:
    config: Path
    log_dir: Path
    pubkey: Path


class Proc(Protocol):
    """What :class:`Daemon` uses of its process: an asyncio.subprocess.Process, or a forked
    one (forkdaemon.ForkedProc)."""

    @property
    def pid(self) -> int: ...
    @property
    def returncode(self) -> int | None: ...

    stderr: asyncio.StreamReader | None

    def send_signal(self, sig: int) -> None: ...
    def kill(self) -> None: ...
    async def wait(self) -> int: ...


@dataclass
class Daemon:
    """`iortd run` as a process; ``lines`` are its operational-log records so far."""

    proc: Proc
    lines: list[dict[str, Any]] = field(default_factory=list)
    _pump: asyncio.Task[None] | None = None
    _changed: asyncio.Event = field(default_factory=asyncio.Event)

    @classmethod
    async def start(
        cls, site: Site, *, env: dict[str, str] | None = None, args: tuple[str, ...] = ()
    ) -> Daemon:
        proc = await asyncio.create_subprocess_exec(
            str(BIN / "iortd"),
            "run",
            "--config",
            str(site.config),
            *args,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            env=env,
        )
        return cls(proc)

    @classmethod
    async def follow(
        cls, site: Site, *, env: dict[str, str] | None = None, args: tuple[str, ...] = ()
    ) -> Daemon:
        """Start and read the log continuously in the background: a long wait without
        reading would fill the pipe and stall the daemon. Wait with :meth:`seen`."""
        self = await cls.start(site, env=env, args=args)
        self._pump = asyncio.create_task(self._read_all())
        return self

    async def _read_all(self) -> None:
        assert self.proc.stderr is not None
        while raw := await self.proc.stderr.readline():
            self.lines.append(json.loads(raw))
            self._changed.set()
        self._changed.set()

    async def seen(
        self, pred: Callable[[dict[str, Any]], bool], what: str, within_s: float = 20
    ) -> dict[str, Any]:
        """With :meth:`follow`: the first log record (so far or to come) matching ``pred``."""
        assert self._pump is not None, "start with Daemon.follow()"
        checked = 0
        try:
            async with asyncio.timeout(within_s):
                while True:
                    for rec in self.lines[checked:]:
                        if pred(rec):
                            return rec
                    checked = len(self.lines)
                    if self._pump.done():
                        raise AssertionError(f"iortd exited while waiting for {what}")
                    self._changed.clear()
                    await self._changed.wait()
        except TimeoutError:
            tail = [(r.get("event"), r.get("reason")) for r in self.lines[-8:]]
            raise AssertionError(f"no {what} within {within_s} s; log ends {tail}") from None

    def events(self, name: str) -> list[dict[str, Any]]:
        return [r for r in self.lines if r.get("event") == name]

    async def wait_for(
        self, pred: Callable[[dict[str, Any]], bool], what: str, within_s: float = 20
    ) -> dict[str, Any]:
        """Read log lines until one satisfies ``pred``; fail clearly after ``within_s``."""
        assert self.proc.stderr is not None
        for line in self.lines:
            if pred(line):
                return line
        try:
            async with asyncio.timeout(within_s):
                while True:
                    raw = await self.proc.stderr.readline()
                    if not raw:
                        raise AssertionError(
                            f"iortd exited while waiting for {what}: {self.lines[-5:]}"
                        )
                    rec: dict[str, Any] = json.loads(raw)
                    self.lines.append(rec)
                    if pred(rec):
                        return rec
        except TimeoutError:
            raise AssertionError(f"timed out after {within_s} s waiting for {what}") from None

    async def drain(self) -> None:
        if self._pump is not None:
            await self._pump
            return
        assert self.proc.stderr is not None
        rest = await self.proc.stderr.read()
        self.lines += [json.loads(x) for x in rest.decode().splitlines() if x.strip()]

    async def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        async with asyncio.timeout(10):
            await self.drain()
            await self.proc.wait()

    async def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(15):
            await self.drain()
            return await self.proc.wait()

    async def ensure_dead(self) -> None:
        if self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()
