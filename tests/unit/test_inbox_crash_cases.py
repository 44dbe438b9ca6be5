"""Two crash cases of the command inbox (daemon/commands.py), each a fix of the review on
main (8dc5c66, d422d73) that had no test:

* a file whose acceptance is on disk but which a crash left in the inbox (before the
  move) is filed under ``accepted/`` at the next start even when the command has expired
  since: it was accepted; judged afresh it would be refused as expired and filed under
  ``rejected/`` with a ``command_rejected`` entry that contradicts the record;
* a file whose ``command_accepted`` entry failed to commit stays in the inbox (it is
  judged again later): only a verdict on disk moves a file.

One inbox read at a time (``_read_inbox``), so that the test sees exactly one judgement.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from pathlib import Path

import orjson
import pytest
from test_command_intake import ORIGIN, PHYS, RING, entries

from iortd.auditlog.command import sign_command
from iortd.auditlog.writer import AuditLog
from iortd.daemon.commands import CommandIntake, _prepare_inbox

T0 = datetime.now(UTC)


async def intake_at(log_dir: Path, now: datetime) -> tuple[AuditLog, CommandIntake]:
    audit, _ = await AuditLog.open(log_dir, origin=ORIGIN)
    intake = CommandIntake(
        RING,
        audit,
        site="site-a",
        room="or-3",
        skew_s=60,
        max_per_minute=5,
        notice=lambda sev, msg: None,
        now=lambda: now,
    )
    intake.rebuild_nonces(log_dir)
    return audit, intake


async def closed(audit: AuditLog) -> None:
    task = asyncio.create_task(audit.run())
    await audit.close()
    await task


def signed_at(now: datetime) -> bytes:
    cmd = sign_command(
        "ping", {}, signer=PHYS, holder="phys-anna", site="site-a", room="or-3", ttl_s=300,
        now=now,
    )  # fmt: skip
    return orjson.dumps(cmd)


async def test_an_accepted_file_left_by_a_crash_is_filed_accepted_though_expired_since(
    tmp_path: Path,
) -> None:
    log_dir, inbox = tmp_path / "log", tmp_path / "inbox"
    inbox.mkdir()
    assert _prepare_inbox(inbox) is None
    raw = signed_at(T0)
    (inbox / "a.json").write_bytes(raw)
    audit, intake = await intake_at(log_dir, T0)
    writer = asyncio.create_task(audit.run())
    await intake._read_inbox(inbox)
    assert (inbox / "accepted" / "a.json").exists()
    await audit.close()
    await writer
    # The crash between the record and the move: the file is back in the inbox. The
    # next start is after the command's expiry (300 s) and the allowed skew (60 s).
    (inbox / "accepted" / "a.json").rename(inbox / "a.json")
    audit, intake = await intake_at(log_dir, T0 + timedelta(seconds=400))
    writer = asyncio.create_task(audit.run())
    await intake._read_inbox(inbox)
    await audit.close()
    await writer
    assert (inbox / "accepted" / "a.json").read_bytes() == raw
    assert not list((inbox / "rejected").iterdir()), "an accepted command filed as rejected"
    kinds = [e["type"] for e in entries(log_dir)]
    assert kinds.count("command_accepted") == 1
    assert "command_rejected" not in kinds


async def test_an_inbox_file_whose_record_failed_stays_in_the_inbox(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log_dir, inbox = tmp_path / "log", tmp_path / "inbox"
    inbox.mkdir()
    assert _prepare_inbox(inbox) is None
    (inbox / "a.json").write_bytes(signed_at(T0))
    audit, intake = await intake_at(log_dir, T0)
    real = audit.append

    def failing(kind: str, data: dict[str, object], **kw: object) -> object:
        entry = real(kind, data, **kw)  # type: ignore[arg-type]
        if kind != "command_accepted":
            return entry
        failed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        failed.set_exception(OSError(5, "Input/output error"))  # the commit failed
        return entry._replace(committed=failed)

    monkeypatch.setattr(audit, "append", failing)
    await intake._read_inbox(inbox)
    assert (inbox / "a.json").exists(), "moved although its record is not on disk"
    assert not list((inbox / "accepted").iterdir())
    assert not list((inbox / "rejected").iterdir())
    await closed(audit)


async def test_a_file_whose_record_failed_is_not_filed_accepted_at_the_next_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The next read finds the same bytes as a command accepted in this run: it is the
    same command (not acted on twice), but it is filed as accepted only once that
    acceptance is on disk; its record failed, so the file stays in the inbox."""
    log_dir, inbox = tmp_path / "log", tmp_path / "inbox"
    inbox.mkdir()
    assert _prepare_inbox(inbox) is None
    (inbox / "a.json").write_bytes(signed_at(T0))
    audit, intake = await intake_at(log_dir, T0)
    real = audit.append

    def failing(kind: str, data: dict[str, object], **kw: object) -> object:
        entry = real(kind, data, **kw)  # type: ignore[arg-type]
        if kind != "command_accepted":
            return entry
        failed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        failed.set_exception(OSError(5, "Input/output error"))
        return entry._replace(committed=failed)

    monkeypatch.setattr(audit, "append", failing)
    for _ in range(2):
        await intake._read_inbox(inbox)
        assert (inbox / "a.json").exists(), "filed as accepted, its acceptance not on disk"
    assert not list((inbox / "accepted").iterdir())
    assert not list((inbox / "rejected").iterdir())
    await closed(audit)
