"""Crashes on the retention path: a process running a retention round is SIGKILLed at each
step (the crash point named in IORTD_RETENTION_CRASH_AT: auditlog/archive.py), then the
log is opened again (recovery, as at a real restart) and a round runs to its end.

At every point: nothing unarchived is gone from the log directory, a half copy is never
taken for a segment, the next round completes or redoes the step, and the log and its
archive verify as one.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import pytest

from iortd.auditlog.archive import CRASH_ENV, CRASH_POINTS, archive_dir_for
from iortd.auditlog.note import Signer, generate_keypair, write_keypair
from iortd.auditlog.retention import RetentionManager, RetentionSettings
from iortd.auditlog.verify import verify_log
from iortd.auditlog.writer import AuditLog, segment_paths

ORIGIN = "iortd/test-site/or-9/00112233aabbccdd"
SEG = 4096

# One round of the retention manager over LOGDIR with the key KEY, archive SHARE, budget.
ROUND = """
import asyncio, sys
from pathlib import Path
from iortd.auditlog.note import load_signer
from iortd.auditlog.retention import RetentionManager, RetentionSettings
from iortd.auditlog.writer import AuditLog

async def main(logdir, key, share, budget):
    log, _ = await AuditLog.open(Path(logdir), origin="x/y", signer=load_signer(Path(key)))
    task = asyncio.create_task(log.run())
    s = RetentionSettings(int(budget), archive_dir=Path(share), archive_mount_required=False)
    await RetentionManager(log, s).run_once()
    await log.close()
    await task

asyncio.run(main(*sys.argv[1:]))
"""


async def build(logdir: Path, signer: Signer) -> int:
    """A signed log of many small segments and a checkpoint; returns its size."""
    log, _ = await AuditLog.open(logdir, origin=ORIGIN, signer=signer, rotate_max_bytes=SEG)
    task = asyncio.create_task(log.run())
    log.append("daemon_start", {"verifier_key": signer.verifier.text}, durable=True)
    for i in range(150):
        e = log.append("sample", {"i": i, "pad": "x" * 240})
    await e.committed
    await log.checkpoint("test")
    await log.close()
    await task
    return sum(p.stat().st_size for p in segment_paths(logdir))


async def one_round(logdir: Path, signer: Signer, share: Path, budget: int) -> None:
    log, _ = await AuditLog.open(logdir, origin="x/y", signer=signer, rotate_max_bytes=SEG)
    task = asyncio.create_task(log.run())
    s = RetentionSettings(budget, archive_dir=share, archive_mount_required=False)
    res = await RetentionManager(log, s).run_once()
    assert res is not None
    assert res.problem is None
    await log.close()
    await task


def union_ok(logdir: Path, dest: Path, signer: Signer, before: list[str]) -> None:
    """Every segment gone from the directory is in the archive, and both verify as one."""
    local = {p.name for p in segment_paths(logdir)}
    archived = {p.name for p in segment_paths(dest)} if dest.is_dir() else set()
    assert set(before) - local <= archived, "a segment left the directory unarchived"
    rep = verify_log([logdir], pubkey=signer.verifier, archive=dest)
    assert rep.problem is None, rep.problem


@pytest.mark.parametrize("point", CRASH_POINTS)
def test_killed_at_each_step_then_restarted(tmp_path: Path, point: str) -> None:
    signer = generate_keypair("or-9")
    key, _ = write_keypair(signer, tmp_path / "keys")
    logdir, share = tmp_path / "log", tmp_path / "share"
    share.mkdir()
    total = asyncio.run(build(logdir, signer))
    budget = int(total / 0.9)  # over warn_fraction: some segments are due to go
    before = [p.name for p in segment_paths(logdir)]
    dest = archive_dir_for(share, ORIGIN)

    proc = subprocess.run(
        [sys.executable, "-c", ROUND, str(logdir), str(key), str(share), str(budget)],
        env={**os.environ, CRASH_ENV: point},
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    parts = [p for p in dest.iterdir() if p.name.endswith(".part")]
    local = [p.name for p in segment_paths(logdir)]
    if point in ("copy-mid", "copy-before-rename"):
        assert len(parts) == 1, "the copy was cut short in its temporary file"
        assert local == before, "nothing deleted before every step is done"
    elif point == "renamed-before-delete":
        assert local == before
        assert {p.name for p in segment_paths(dest)} == set(before[:-1])
    else:
        assert local == before[1:], "killed right after the first unlink"
    union_ok(logdir, dest, signer, before)

    # The restart: recovery, then a round that completes what was cut short.
    asyncio.run(one_round(logdir, signer, share, budget))
    assert not [p for p in dest.iterdir() if p.name.endswith(".part")]
    assert {p.name for p in segment_paths(dest)} >= set(before[:-1])
    assert len(segment_paths(logdir)) < len(before), "the deletion was done after all"
    union_ok(logdir, dest, signer, before)
