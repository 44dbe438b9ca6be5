"""What a start records about the log it found (daemon/recovery.py ``record_recovery``) and
what verify makes of it (auditlog/verify.py): the unvouched range, an accepted
rollback, a wall clock behind the log's last entry; backward timestamps as warnings.
"""

from __future__ import annotations

import asyncio
import dataclasses
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson

from iortd.auditlog.note import generate_keypair
from iortd.auditlog.verify import verify_log
from iortd.auditlog.writer import AuditLog, segment_paths
from iortd.daemon import recovery
from iortd.kernel.timefmt import utc_ts

ORIGIN = "iortd/test-site/or-9/00112233aabbccdd"


def entries(directory: Path) -> list[dict[str, Any]]:
    return [
        orjson.loads(line)
        for path in segment_paths(directory)
        for line in path.read_bytes().splitlines()
    ]


async def test_a_wall_clock_behind_the_log_at_start_is_a_clock_step_and_a_verify_warning(
    tmp_path: Path,
) -> None:
    signer = generate_keypair("or-9")
    ahead = datetime.now(UTC) + timedelta(hours=2)  # the previous run's clock was ahead
    log, _ = await AuditLog.open(tmp_path, origin=ORIGIN, signer=signer, wall=lambda: ahead)
    task = asyncio.create_task(log.run())
    await log.append("daemon_stop", {"clean": True}, durable=True).committed
    await log.close()
    await task

    log, report = await AuditLog.open(tmp_path, origin=ORIGIN, signer=signer)
    task = asyncio.create_task(log.run())
    now = utc_ts(datetime.now(UTC))
    recovery.record_recovery(log, report, now)
    await log.append("daemon_start", {"verifier_key": signer.verifier.text}, durable=True).committed
    await log.checkpoint("start")
    await log.close()
    await task

    [step] = [e for e in entries(tmp_path) if e["type"] == "clock_step"]
    assert step["data"]["across_restart"] is True
    assert step["data"]["expected_wall"] == report.last_ts
    assert step["data"]["step_s"] < -7000
    rep = verify_log([tmp_path], pubkey=signer.verifier)
    assert rep.intact, rep.problem
    assert rep.clock_steps_back == 1
    assert any("ts goes backwards" in w and "clock_step" in w for w in rep.warnings), rep.warnings


async def test_the_recovery_entry_records_the_unvouched_range_and_verify_lists_it(
    tmp_path: Path,
) -> None:
    signer = generate_keypair("or-9")
    log, report = await AuditLog.open(tmp_path, origin=ORIGIN, signer=signer)
    task = asyncio.create_task(log.run())
    await log.append("daemon_start", {"verifier_key": signer.verifier.text}, durable=True).committed
    await log.close()
    await task
    # Pretend recovery found seq 1 unvouched (what a forged tail looks like to it).
    log, report = await AuditLog.open(tmp_path, origin=ORIGIN, signer=signer)
    report = dataclasses.replace(report, previous_stop="crash", vouched_count=1)
    task = asyncio.create_task(log.run())
    recovery.record_recovery(log, report, utc_ts(datetime.now(UTC)))
    await log.checkpoint("start")
    await log.close()
    await task
    [rec] = [e for e in entries(tmp_path) if e["type"] == "recovery"]
    assert rec["data"]["unvouched"]["first_seq"] == 1
    assert rec["data"]["unvouched"]["last_seq"] == 1
    assert rec["data"]["unvouched"]["count"] == 1
    rep = verify_log([tmp_path], pubkey=signer.verifier)
    assert rep.intact
    assert not rep.vouched
    [u] = rep.unvouched
    assert (u.first_seq, u.last_seq, u.recorded_at) == (1, 1, rec["seq"])
