"""Where record trust (issue 12: seal, unvouched entries) meets the delivery continued
across a restart (issue 14): what the auditors' tools say about a delivery whose records
span an unvouched range, whatever the forger made the entries in that range say.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
from datetime import UTC, datetime
from pathlib import Path

from test_audit_seal import DID, crashed_mid_delivery, forge, running

from daemon import service
from daemon.audit import writer
from daemon.audit.note import generate_keypair
from daemon.audit.verify import collect_files, unvouched_deliveries, verify_log
from daemon.audit.writer import AuditLog
from daemon.audit_cli import main


def room_level_alarm(log: AuditLog) -> list[writer.Entry]:
    # The crashed run's samples of the delivery rewritten without its id (or entries of the
    # room put in their place): nothing in the range names the delivery any more.
    return [
        log.append("alarm", {"code": "door_open", "severity": "warning"}, durable=True),
        log.append("sample", {"dose_primary_gy": 9.0, "state": "IRRADIATING"}),
    ]


async def continued_across_the_restart(directory: Path) -> tuple[int, int]:
    """Crash mid-delivery, a forged tail with no delivery id, a restart that takes the
    delivery over and ends it NORMAL. Returns the unvouched range."""
    signer = generate_keypair("or-9")
    await crashed_mid_delivery(directory, signer)
    forged = await forge(directory, room_level_alarm)
    async with running(directory, signer=signer) as (log, report):
        assert report.unvouched == (forged[0], forged[-1])
        assert report.open_delivery_id == DID
        service._record_recovery(log, report, service.utc_ts(datetime.now(UTC)))
        log.append(
            "daemon_start",
            {"verifier_key": signer.verifier.text, "open_delivery": DID},
            durable=True,
        )
        log.append("sample", {"dose_primary_gy": 20.0, "state": "READY"}, delivery_id=DID)
        await log.append(
            "delivery_terminated",
            {"status": "NORMAL", "reason": "preset reached", "summary": {"preset_gy": 20.0}},
            delivery_id=DID,
            durable=True,
        ).committed
        await log.checkpoint("delivery_end")
    return forged[0], forged[-1]


async def test_a_delivery_continued_across_unvouched_entries_is_named_even_if_none_are_its(
    tmp_path: Path,
) -> None:
    first, last = await continued_across_the_restart(tmp_path)
    rep = verify_log([tmp_path], pubkey=None)
    assert rep.intact, rep.problem
    assert [(u.first_seq, u.last_seq) for u in rep.unvouched] == [(first, last)]
    touched = unvouched_deliveries(collect_files([tmp_path]), rep.unvouched)
    assert touched.get(DID) == f"seq {first}..{last}", touched

    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        code = await asyncio.to_thread(main, ["deliveries", str(tmp_path)])
    assert code == 1
    [line] = [x for x in out.getvalue().splitlines() if DID in x]
    assert f"UNVOUCHED entries seq {first}..{last}" in line, line
