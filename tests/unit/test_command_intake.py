"""The daemon's command intake (daemon/commands.py) over a real audit log: recorded before
handled, refusals counted and rate-limited, nonces rebuilt across a restart, the inbox."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson
import pytest
from structlog.testing import capture_logs

from iortd.auditlog.command import Command, RejectReason, sign_command
from iortd.auditlog.keyring import parse_keyring
from iortd.auditlog.note import generate_keypair
from iortd.auditlog.writer import AuditLog, segment_paths
from iortd.daemon.commands import CommandIntake

ORIGIN = "iortd/site-a/or-3/00112233aabbccdd"
PHYS = generate_keypair("phys-anna")
RING = parse_keyring(
    (
        '[[key]]\nholder = "phys-anna"\nname = "A. Example"\nroles = ["physicist"]\n'
        f'public_key = "{PHYS.verifier.text}"\nvalid_from = "2026-01-01T00:00:00Z"\n'
        'valid_until = "2099-01-01T00:00:00Z"\n'
    ).encode(),
    Path("keyring.toml"),
)


def entries(directory: Path) -> list[dict[str, Any]]:
    return [
        orjson.loads(line)
        for path in segment_paths(directory)
        for line in path.read_bytes().splitlines()
    ]


def ping(kind: str = "ping", **body: Any) -> bytes:
    cmd = sign_command(
        kind, body, signer=PHYS, holder="phys-anna", site="site-a", room="or-3", ttl_s=300
    )
    return orjson.dumps(cmd)


async def until(cond: Callable[[], bool], what: str, timeout_s: float = 5.0) -> None:
    """A bounded poll (the inbox is polled by design: a file has no event to wait on)."""
    for _ in range(int(timeout_s / 0.02)):
        if cond():
            return
        await asyncio.sleep(0.02)
    pytest.fail(f"not within {timeout_s} s: {what}")


class Run:
    def __init__(self, audit: AuditLog, intake: CommandIntake, notices: list[str]) -> None:
        self.audit, self.intake, self.notices = audit, intake, notices


@pytest.fixture
async def run(tmp_path: Path) -> AsyncIterator[Run]:
    r = await start(tmp_path)
    yield r
    await stop(r)


async def start(directory: Path, max_per_minute: int = 5, now: datetime | None = None) -> Run:
    """The intake over a running writer; ``now``: the intake's clock stands there."""
    audit, _ = await AuditLog.open(directory, origin=ORIGIN)
    notices: list[str] = []
    intake = CommandIntake(
        RING,
        audit,
        site="site-a",
        room="or-3",
        skew_s=60,
        max_per_minute=max_per_minute,
        notice=lambda sev, msg: notices.append(f"{sev}: {msg}"),
        now=None if now is None else lambda: now,
    )
    intake.rebuild_nonces(directory)
    r = Run(audit, intake, notices)
    r.task = asyncio.create_task(audit.run())  # type: ignore[attr-defined]
    return r


async def stop(r: Run) -> None:
    r.intake.flush_summary()
    await r.audit.close()
    await r.task  # type: ignore[attr-defined]


async def test_accepted_is_recorded_before_the_handler_runs(run: Run, tmp_path: Path) -> None:
    seen: list[tuple[str, bool]] = []

    async def handler(cmd: Command) -> None:
        on_disk = any(e["type"] == "command_accepted" for e in entries(tmp_path))
        seen.append((cmd.kind, on_disk))

    run.intake.register("ack", handler)
    verdict = run.intake.submit(ping("ack", alarm="A1"), source="mqtt")
    assert verdict.command is not None
    stop_ev = asyncio.Event()
    task = asyncio.create_task(run.intake.run(stop_ev))
    await until(lambda: bool(seen), "the handler ran")
    stop_ev.set()
    await task
    assert seen == [("ack", True)]
    [acc] = [e for e in entries(tmp_path) if e["type"] == "command_accepted"]
    assert acc["data"]["body"]["body_keys"] == ["alarm"]
    assert "A1" not in orjson.dumps(acc).decode()  # the body's values are not recorded


async def test_unknown_handler_retained_and_wrong_topic(run: Run) -> None:
    assert run.intake.submit(ping("prescription"), source="mqtt").reason == RejectReason.no_handler
    assert run.intake.submit(ping(), source="mqtt", retained=True).reason == RejectReason.retained
    wrong = run.intake.submit(ping(), source="mqtt", topic_kind="prescription")
    assert wrong.reason == RejectReason.wrong_topic
    # None of them booked a nonce or changed anything: the same ping is still accepted.
    raw = ping()
    assert run.intake.submit(raw, source="mqtt", retained=True).reason == RejectReason.retained
    assert run.intake.submit(raw, source="mqtt").command is not None
    assert run.intake.submit(raw, source="mqtt").reason == RejectReason.replayed


async def test_a_flood_is_recorded_one_by_one_up_to_the_limit_then_summarised(
    run: Run, tmp_path: Path
) -> None:
    for i in range(50):
        run.intake.submit(b"junk" if i % 2 else b"{}", source="mqtt")
    run.intake.flush_summary()
    await run.audit.append("mark", {}, durable=True).committed
    found = entries(tmp_path)
    one_by_one = [e for e in found if e["type"] == "command_rejected"]
    [summary] = [e for e in found if e["type"] == "command_rejected_summary"]
    assert len(one_by_one) == 5
    assert summary["data"]["total"] == 45
    assert run.intake.counts == {"malformed": 50}
    assert "junk" not in orjson.dumps(found).decode()  # never the payload
    assert len(run.notices) == 6  # five refusals and one summary on events


async def test_a_replay_across_a_restart_is_refused(tmp_path: Path) -> None:
    raw = ping()
    r = await start(tmp_path)
    assert r.intake.submit(raw, source="mqtt").command is not None
    await stop(r)
    r = await start(tmp_path)
    assert len(r.intake.seen) == 1
    assert r.intake.submit(raw, source="mqtt").reason == RejectReason.replayed
    await stop(r)


async def test_the_inbox_moves_each_file_once_judged(tmp_path: Path) -> None:
    log_dir, inbox = tmp_path / "log", tmp_path / "inbox"
    inbox.mkdir()
    r = await start(log_dir)
    good = ping()
    (inbox / "a.json").write_bytes(good)
    (inbox / "b.json").write_bytes(b"{" * 20000)
    (inbox / ".partial").write_bytes(b"being written")
    os.symlink("/etc/passwd", inbox / "link.json")
    stop_ev = asyncio.Event()
    task = asyncio.create_task(r.intake.run(stop_ev, inbox, poll_s=0.05))
    await until((inbox / "rejected" / "b.json").exists, "b.json moved to rejected/")
    stop_ev.set()
    await task
    assert (inbox / "accepted" / "a.json").read_bytes() == good
    assert sorted(p.name for p in inbox.iterdir()) == [
        ".partial",
        "accepted",
        "link.json",
        "rejected",
    ]
    await stop(r)
    # A crash between the record and the move: the file is judged again at the next start,
    # moved to accepted/ (it was), and not acted on twice.
    (inbox / "accepted" / "a.json").rename(inbox / "a.json")
    r = await start(log_dir)
    stop_ev = asyncio.Event()
    task = asyncio.create_task(r.intake.run(stop_ev, inbox, poll_s=0.05))
    await until(lambda: not (inbox / "a.json").exists(), "a.json moved again")
    stop_ev.set()
    await task
    await stop(r)
    assert (inbox / "accepted" / "a.json").exists()
    kinds = [e["type"] for e in entries(log_dir)]
    assert kinds.count("command_accepted") == 1
    assert r.intake.accepted == 0


async def test_keyring_loaded_records_the_hash_and_no_keys(run: Run, tmp_path: Path) -> None:
    run.intake.record_loaded()
    await run.audit.append("mark", {}, durable=True).committed
    [e] = [e for e in entries(tmp_path) if e["type"] == "keyring_loaded"]
    assert e["data"]["keyring_sha256"] == RING.sha256
    assert e["data"]["keys"][0]["holder"] == "phys-anna"
    assert PHYS.verifier.text.split("+", 2)[2] not in orjson.dumps(e).decode()


async def test_an_inbox_that_goes_away_or_is_a_trap_never_stops_the_intake(
    tmp_path: Path,
) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    r = await start(tmp_path / "log")
    stop_ev = asyncio.Event()
    task = asyncio.create_task(r.intake.run(stop_ev, inbox, poll_s=0.05))
    await until((inbox / "accepted").is_dir, "accepted/ made")
    for sub in ("accepted", "rejected"):
        (inbox / sub).rmdir()
    inbox.rmdir()  # the directory gone while running: logged, retried, nothing stops
    with capture_logs() as logs:
        await until(lambda: any(e["event"] == "inbox_unreadable" for e in logs), "the warning")
    assert not task.done()
    stop_ev.set()
    await task
    # accepted/ planted as a link (files would be moved where it points): the inbox is off.
    inbox.mkdir()
    (inbox / "accepted").symlink_to(tmp_path)
    (inbox / "a.json").write_bytes(ping())
    stop_ev = asyncio.Event()
    with capture_logs() as logs:
        task = asyncio.create_task(r.intake.run(stop_ev, inbox, poll_s=0.05))
        await until(lambda: any(e["event"] == "inbox_unusable" for e in logs), "refused")
    stop_ev.set()
    await task
    assert (inbox / "a.json").exists()
    assert any("command inbox not read" in n for n in r.notices)
    await stop(r)


async def test_commands_waiting_in_the_inbox_are_handled_before_first_read_is_set(
    tmp_path: Path,
) -> None:
    """What waits in the inbox at start is judged, recorded and handled before
    ``first_read`` is set (the daemon starts its devices after it: a prescription put in
    the inbox before the start governs the first check at READY, with no flash of
    NOT_VERIFIED), even with a long poll interval; an empty inbox sets it at once."""
    log_dir, inbox = tmp_path / "log", tmp_path / "inbox"
    inbox.mkdir()
    r = await start(log_dir)
    handled: list[str] = []

    async def handler(cmd: Command) -> None:
        await asyncio.sleep(0)  # a real handler awaits its own durable entry
        handled.append(cmd.body["n"])

    r.intake.register("prescription", handler)
    for n in ("1", "2"):
        (inbox / f"prescription-{n}.json").write_bytes(ping("prescription", n=n))
    stop_ev = asyncio.Event()
    task = asyncio.create_task(r.intake.run(stop_ev, inbox, poll_s=60.0))
    async with asyncio.timeout(5):
        await r.intake.first_read.wait()
    assert sorted(handled) == ["1", "2"], "handled before first_read is set"
    assert sorted(p.name for p in (inbox / "accepted").iterdir()) == [
        "prescription-1.json",
        "prescription-2.json",
    ]
    stop_ev.set()
    await task
    await stop(r)
    # No inbox at all (commands over MQTT only): set at once.
    r = await start(tmp_path / "log2")
    stop_ev = asyncio.Event()
    task = asyncio.create_task(r.intake.run(stop_ev, None, poll_s=60.0))
    async with asyncio.timeout(5):
        await r.intake.first_read.wait()
    stop_ev.set()
    await task
    await stop(r)


async def test_a_failed_handler_is_answered_naming_the_nonce(run: Run, tmp_path: Path) -> None:
    """A sender waiting for its command's answer (the dashboard) knows it by ``[nonce N]``:
    a handler that fails is answered that way too, at once, not by silence."""

    async def handler(cmd: Command) -> None:
        raise RuntimeError("broken")

    run.intake.register("ack", handler)
    verdict = run.intake.submit(ping("ack", alarm="A1"), source="mqtt")
    assert verdict.command is not None
    stop_ev = asyncio.Event()
    task = asyncio.create_task(run.intake.run(stop_ev))
    await until(lambda: any("failed" in n for n in run.notices), "the failure's notice")
    stop_ev.set()
    await task
    [said] = [n for n in run.notices if "failed" in n]
    assert said.startswith("critical: command ack failed: RuntimeError")
    assert said.endswith(f"[nonce {verdict.command.nonce}]")
    assert [e["type"] for e in entries(tmp_path)].count("command_failed") == 1
