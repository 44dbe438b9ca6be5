"""A retention round hung on its share (a stalled NFS mount) cannot hold up the daemon's
exit (auditlog/retention.py): the round runs in a thread that the process does not wait
for; a stop abandons it after STOP_WAIT_S, says so in the log, and the process exits.

asyncio's default executor (``asyncio.to_thread``) would not do: ``asyncio.run`` joins it
at its end and the interpreter joins its threads at exit, so one copy that never returns
would keep the process alive for good. The share is made to hang in a separate Python
process (its copy blocks on an Event nobody sets), which must exit within its bound.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

SCRIPT = r"""
import asyncio, sys, threading, time
from pathlib import Path

from iortd.auditlog import retention, retention_round
from iortd.auditlog.retention import RetentionManager, RetentionSettings
from iortd.auditlog.writer import AuditLog

never = threading.Event()


async def main(tmp: Path) -> None:
    loop = asyncio.get_running_loop()
    entered = asyncio.Event()

    def hung_copy(*args: object) -> bool:
        loop.call_soon_threadsafe(entered.set)
        never.wait()  # the share never answers
        return True

    retention_round.archive_segment = hung_copy
    retention.STOP_WAIT_S = 0.2  # the test's time: the bound is what is tested
    share = tmp / "share"
    share.mkdir()
    log, _ = await AuditLog.open(
        tmp / "log", origin="iortd/s/r/00112233aabbccdd", signer=None, rotate_max_bytes=4096
    )
    writer = asyncio.create_task(log.run())
    for i in range(60):
        e = log.append("sample", {"i": i, "pad": "x" * 240})
    await e.committed
    mgr = RetentionManager(
        log,
        RetentionSettings(
            budget_bytes=1 << 30, archive_dir=share, archive_mount_required=False
        ),
    )
    stop = asyncio.Event()
    rounds = asyncio.create_task(mgr.run(stop))
    await asyncio.wait_for(entered.wait(), 10)
    t0 = time.monotonic()
    stop.set()
    await asyncio.wait_for(rounds, 10)
    await asyncio.wait_for(log.close(), 10)
    await asyncio.wait_for(writer, 10)
    print(f"stopped in {time.monotonic() - t0:.3f} s", flush=True)


asyncio.run(main(Path(sys.argv[1])))
print("asyncio.run returned", flush=True)
"""


def test_a_round_hung_on_the_share_does_not_hold_up_the_exit(tmp_path: Path) -> None:
    bound = 10.0  # the stop's wait (0.2 s here), start-up and teardown on a busy host
    t0 = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-c", SCRIPT, str(tmp_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        out, _ = proc.communicate(timeout=bound)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        raise AssertionError(
            f"the process did not exit within {bound:g} s of its start; output:\n{out}"
        ) from None
    elapsed = time.monotonic() - t0
    assert proc.returncode == 0, out
    assert "asyncio.run returned" in out
    assert "retention_round_abandoned" in out, out
    assert elapsed < bound
