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
from test_command_intake import PHYS, entries, start, stop

from iortd.auditlog.command import sign_command
from iortd.auditlog.writer import AuditLog
from iortd.daemon.commands import _prepare_inbox

T0 = datetime.now(UTC)


def fail_acceptance(audit: AuditLog, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every ``command_accepted`` appended from now on fails to commit (EIO)."""
    real = audit.append

    def failing(kind: str, data: dict[str, object], **kw: object) -> object:
        entry = real(kind, data, **kw)  # type: ignore[arg-type]
        if kind != "command_accepted":
            return entry
        failed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        failed.set_exception(OSError(5, "Input/output error"))
        return entry._replace(committed=failed)

    monkeypatch.setattr(audit, "append", failing)


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
    r = await start(log_dir, now=T0)
    await r.intake._read_inbox(inbox)
    assert (inbox / "accepted" / "a.json").exists()
    await stop(r)
    # The crash between the record and the move: the file is back in the inbox. The
    # next start is after the command's expiry (300 s) and the allowed skew (60 s).
    (inbox / "accepted" / "a.json").rename(inbox / "a.json")
    r = await start(log_dir, now=T0 + timedelta(seconds=400))
    await r.intake._read_inbox(inbox)
    await stop(r)
    assert (inbox / "accepted" / "a.json").read_bytes() == raw
    assert not list((inbox / "rejected").iterdir()), "an accepted command filed as rejected"
    kinds = [e["type"] for e in entries(log_dir)]
    assert kinds.count("command_accepted") == 1
    assert "command_rejected" not in kinds


@pytest.mark.parametrize("reads", [1, 2])
async def test_an_inbox_file_whose_record_failed_stays_in_the_inbox(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, reads: int
) -> None:
    """After the first read (d422d73), and after the next one, which finds the same bytes
    as a command accepted in this run: the same command (not acted on twice), filed as
    accepted only once that acceptance is on disk, which here it never is."""
    log_dir, inbox = tmp_path / "log", tmp_path / "inbox"
    inbox.mkdir()
    assert _prepare_inbox(inbox) is None
    (inbox / "a.json").write_bytes(signed_at(T0))
    r = await start(log_dir, now=T0)
    fail_acceptance(r.audit, monkeypatch)
    for _ in range(reads):
        await r.intake._read_inbox(inbox)
        assert (inbox / "a.json").exists(), "moved although its record is not on disk"
    assert not list((inbox / "accepted").iterdir())
    assert not list((inbox / "rejected").iterdir())
    await stop(r)
