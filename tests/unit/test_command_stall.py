"""A stalled disk must not switch the command intake off (daemon/commands.py): entries of
one group commit share one future, so a wait for it that times out must never cancel it
(another command's record is in the same commit), and a CancelledError that reaches the
intake while nobody is stopping it is one command's failure, not the end of the intake."""

from __future__ import annotations

import ast
import asyncio
import threading
from pathlib import Path

import pytest
from test_command_intake import entries, ping, start, stop, until

from iortd.auditlog.command import Command
from iortd.daemon import commands

DAEMON = Path(commands.__file__).parent


async def test_a_timed_out_wait_for_a_shared_commit_stops_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A's and B's records share one commit behind a stalled fsync; A times out waiting
    for it. B is still handled once the disk answers, and so is C, sent afterwards."""
    monkeypatch.setattr(commands, "HANDLER_TIMEOUT_S", 0.3)
    r = await start(tmp_path)
    notice = r.intake._notice

    def said(severity: str, text: str) -> None:
        if "command ack failed" in text:  # A timed out: B and C get the usual time
            monkeypatch.setattr(commands, "HANDLER_TIMEOUT_S", 10.0)
        notice(severity, text)

    r.intake._notice = said
    stall, stalled, release = threading.Event(), threading.Event(), threading.Event()
    write = r.audit._write_batch

    def slow_write(batch: list[object]) -> None:
        if stall.is_set():
            stalled.set()
            assert release.wait(10), "the test never released the disk"
        write(batch)  # type: ignore[arg-type]

    monkeypatch.setattr(r.audit, "_write_batch", slow_write)
    handled: list[str] = []

    async def handler(cmd: Command) -> None:
        handled.append(cmd.body["n"])

    r.intake.register("ack", handler)
    stop_ev = asyncio.Event()
    task = asyncio.create_task(r.intake.run(stop_ev))
    try:
        stall.set()
        r.audit.append("filler", {}, durable=True)  # the writer blocks in its fsync
        await until(stalled.is_set, "the writer stalled")
        a = r.intake.submit(ping("ack", n="A"), source="mqtt")
        b = r.intake.submit(ping("ack", n="B"), source="mqtt")
        assert a.recorded is b.recorded, "the test needs A and B in one group commit"
        await until(lambda: any("command ack failed" in n for n in r.notices), "A timed out")
        stall.clear()
        release.set()
        await until(lambda: handled == ["B"], f"B handled (handled: {handled})")
        r.intake.from_mqtt("ack", ping("ack", n="C"), retained=False)
        await until(lambda: handled == ["B", "C"], f"C handled (handled: {handled})")
        assert not task.done(), "the intake ended"
    finally:
        release.set()
        stop_ev.set()
        await task
    await stop(r)
    [failed] = [e for e in entries(tmp_path) if e["type"] == "command_failed"]
    assert failed["data"]["error"] == "TimeoutError"


async def test_a_cancelled_error_from_a_handler_is_that_command_failing(tmp_path: Path) -> None:
    """A handler that meets a future someone else cancelled: recorded as command_failed,
    answered with its nonce, and the next command is handled."""
    r = await start(tmp_path)
    handled: list[str] = []

    async def handler(cmd: Command) -> None:
        if cmd.body["n"] == "A":
            gone: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            gone.cancel()
            await gone
        handled.append(cmd.body["n"])

    r.intake.register("ack", handler)
    stop_ev = asyncio.Event()
    task = asyncio.create_task(r.intake.run(stop_ev))
    a = r.intake.submit(ping("ack", n="A"), source="mqtt")
    assert a.command is not None
    await until(lambda: any("command ack failed" in n for n in r.notices), "A's failure said")
    r.intake.from_mqtt("ack", ping("ack", n="B"), retained=False)
    await until(lambda: handled == ["B"], f"B handled (handled: {handled})")
    stop_ev.set()
    await task
    await stop(r)
    [said] = [n for n in r.notices if "command ack failed" in n]
    assert said.endswith(f"[nonce {a.command.nonce}]")
    [failed] = [e for e in entries(tmp_path) if e["type"] == "command_failed"]
    assert failed["data"]["error"] == "CancelledError"


async def test_stopping_the_intake_still_stops_it(tmp_path: Path) -> None:
    """Cancelling the intake's task (the daemon's shutdown deadline) is not a handler's
    failure: the task ends cancelled, nothing is recorded as command_failed."""
    r = await start(tmp_path)
    started = asyncio.Event()

    async def handler(cmd: Command) -> None:
        started.set()
        await asyncio.Event().wait()

    r.intake.register("ack", handler)
    task = asyncio.create_task(r.intake.run(asyncio.Event()))
    r.intake.submit(ping("ack", n="A"), source="mqtt")
    async with asyncio.timeout(5):
        await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await stop(r)
    assert not [e for e in entries(tmp_path) if e["type"] == "command_failed"]


def test_no_commit_future_is_awaited_unshielded_in_the_daemon() -> None:
    """``await x.committed`` under a timeout cancels the future of the whole group commit
    when it fires; every wait for a commit in the daemon goes through asyncio.shield."""
    found = []
    for path in sorted(DAEMON.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if (
                isinstance(node, ast.Await)
                and isinstance(node.value, ast.Attribute)
                and node.value.attr == "committed"
            ):
                found.append(f"{path.relative_to(DAEMON.parent)}:{node.lineno}")
    assert not found, f"await asyncio.shield(...committed) instead, at {found}"
