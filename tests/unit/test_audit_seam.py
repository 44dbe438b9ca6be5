"""Where record trust (issue 12: seal, unvouched entries) meets the delivery continued
across a restart (issue 14): what the auditors' tools say about a delivery whose records
span an unvouched range, whatever the forger made the entries in that range say.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import shutil
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest
from test_audit_seal import (
    DID,
    ORIGIN,
    crash,
    crashed_mid_delivery,
    entries,
    fake_end,
    forge,
    running,
    wait_sealed,
)
from test_config import ROOT

from iortd.audit.cli import main
from iortd.auditlog import dircheck, verify, writer
from iortd.auditlog.note import Signer, generate_keypair
from iortd.auditlog.verify import collect_files, unvouched_deliveries, verify_log
from iortd.auditlog.writer import AuditLog, segment_paths
from iortd.daemon import recovery, service
from iortd.daemon.config import load_config
from iortd.daemon.tracker import DeliveryStarted
from iortd.drivers.registry import DriverRegistry
from iortd.kernel.clock import SystemClock
from iortd.kernel.timefmt import utc_ts
from iortd.kernel.types import DeviceState, Interlock, InterlockState, SourceReading


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
        recovery.record_recovery(log, report, utc_ts(datetime.now(UTC)))
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


def at(dt: datetime) -> str:
    return utc_ts(dt)


async def a_run(directory: Path, wall: datetime, build: Any, **kw: Any) -> writer.RecoveryReport:
    log, report = await AuditLog.open(directory, origin=ORIGIN, wall=lambda: wall, **kw)
    task = asyncio.create_task(log.run())
    build(log, report)
    await log.close()
    await task
    return report


async def test_a_second_restart_with_the_console_gone_keeps_the_gap_from_the_last_reading(
    tmp_path: Path,
) -> None:
    """Run 1 watches a delivery, run 2 takes it over but never hears the console, run 3
    takes it over again: nobody has watched it since run 1's last reading, so run 3's gap
    (and the elapsed time counted from it) starts there, not at run 2's last entry."""
    t1 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
    t2 = t1 + timedelta(hours=1)  # run 2, console gone for its whole length
    t3 = t2 + timedelta(hours=1)
    sample = {
        "at": at(t1),
        "phase": "IRRADIATING",
        "state": "IRRADIATING",
        "preset_gy": 20.0,
        "delivered_primary_gy": 5.0,
        "delivered_secondary_gy": 5.0,
        "beam_on_s": 60.0,
        "elapsed_s": 61.0,
    }

    def run1(log: AuditLog, _: writer.RecoveryReport) -> None:
        log.append("daemon_start", {"open_delivery": None}, durable=True)
        log.append("delivery_started", {"at": at(t1)}, delivery_id=DID, durable=True)
        log.append("sample", sample, delivery_id=DID)
        log.append("daemon_stop", {"clean": True, "open_delivery": DID}, durable=True)

    def run2(log: AuditLog, rec: writer.RecoveryReport) -> None:
        assert rec.open_delivery_id == DID
        log.append("daemon_start", {"open_delivery": DID}, durable=True)
        gap = {"cause": "daemon not running (clean stop)", "start": rec.last_ts}
        log.append("monitoring_gap_started", gap, delivery_id=DID, durable=True)
        log.append("daemon_stop", {"clean": True, "open_delivery": DID}, durable=True)

    await a_run(tmp_path, t1, run1)
    await a_run(tmp_path, t2, run2)
    rec = await a_run(tmp_path, t3, lambda log, rec: None)
    assert rec.open_delivery_id == DID
    resumed = recovery.resumable(rec)
    assert resumed is not None
    assert resumed.unwatched_since_utc == t1, (
        f"the gap starts at run 2's last entry ({resumed.unwatched_since_utc}), not at the "
        f"last reading ({t1}): elapsed would lose run 2's hour"
    )


async def crashed_before_the_delivery_was_sealed(directory: Path, did: str = DID) -> Signer:
    """The crash came after the commit that started a delivery (a delivery joined in
    progress writes its start and first sample in one commit) but before its seal: the
    delivery's whole record is unvouched (its one sample says 9 Gy)."""
    signer = generate_keypair("or-9")
    log, _ = await AuditLog.open(directory, origin=ORIGIN, signer=signer)
    task = asyncio.create_task(log.run())
    await log.append("daemon_start", {"verifier_key": signer.verifier.text}, durable=True).committed
    await wait_sealed(directory, log.head[0] + 1)
    log._seal_due = False  # the crash comes after the next commit, before its seal
    log.signer = None
    log.append("delivery_started", {"preset_gy": 20.0}, delivery_id=did, durable=True)
    e = log.append("sample", {"delivered_primary_gy": 9.0, "phase": "IRRADIATING"}, delivery_id=did)
    await e.committed
    await crash(log, task)
    return signer


async def test_a_delivery_whose_whole_record_is_unvouched_is_closed_at_start_not_left_open(
    tmp_path: Path,
) -> None:
    """Nothing vouched names the delivery, so it cannot be taken over; it must not stay IN
    PROGRESS for ever. The start closes it UNKNOWN and says why; no dose is taken from its
    unvouched samples."""
    signer = await crashed_before_the_delivery_was_sealed(tmp_path)

    async with running(tmp_path, signer=signer) as (log, report):
        assert report.open_delivery_id is None  # nothing vouched names it
        assert report.unvouched is not None
        recovery.record_recovery(log, report, utc_ts(datetime.now(UTC)))
    ends = [
        x
        for x in entries(tmp_path)
        if x["type"] == "delivery_terminated" and x.get("delivery_id") == DID
    ]
    assert len(ends) == 1, "the delivery is left open for ever"
    [end] = ends
    assert end["data"]["status"] == "UNKNOWN"
    assert "unvouched" in end["data"]["reason"]
    assert end["data"]["last_sample"] == {}, "no dose from unvouched samples"
    assert end["data"]["gap"]["start"] == report.last_vouched_ts


# A delivery id as this daemon makes them for the demo's room ("or-1").
OURS = "or-1-20260301T120000000000Z"


def a_daemon(log: AuditLog, report: writer.RecoveryReport) -> service.Service:
    """The composition root over a real log, with no device and no sink: what a start
    records, and the tracker it hands the first reading to."""
    registry = DriverRegistry.from_entry_points()
    loaded = load_config(ROOT / "config" / "demo.toml", registry)
    return service.Service(loaded, SystemClock(), [], log, report)


def in_progress(clock_ns: int, dose: float, state: DeviceState) -> SourceReading:
    return SourceReading(
        mono_ns=clock_ns,
        utc=datetime.now(UTC),
        state=state,
        dose_rate_gy_min=2.0 if state is DeviceState.IRRADIATING else 0.0,
        dose_primary_gy=dose,
        dose_secondary_gy=dose,
        preset_gy=20.0,
        beam_on_s=dose * 30,
        kv=50.0,
        ua=40.0,
        interlocks=dict.fromkeys(Interlock, InterlockState.OK),
        simulated=True,
    )


async def test_the_record_after_a_wholly_unvouched_delivery_says_it_may_continue_it(
    tmp_path: Path,
) -> None:
    """Issue 14 item 2 where it meets issue 12: the delivery closed UNKNOWN at start because
    its whole record is unvouched, and the console still in a delivery at the first
    reading. The next record names the closed one in ``continues`` and says why; none of
    the unvouched entries' dose (9 Gy) is taken: the dose the console shows at joining
    is the earlier record's (``in_previous_record``), never observed beam."""
    signer = await crashed_before_the_delivery_was_sealed(tmp_path, OURS)
    async with running(tmp_path, signer=signer) as (log, report):
        assert report.unvouched_open_deliveries == (OURS,)
        daemon = a_daemon(log, report)
        daemon.record_start()
        events = daemon.tracker.on_reading(
            in_progress(time.monotonic_ns(), 12.0, DeviceState.IRRADIATING)
        )
    starts = [ev for ev in events if isinstance(ev, DeliveryStarted)]
    assert len(starts) == 1, events
    [start] = starts
    assert start.delivery_id != OURS
    assert start.joined_in_progress
    assert start.continues == OURS, "one treatment shown as two unlinked records"
    assert start.continues_reason is not None
    assert "unvouched" in start.continues_reason, start.continues_reason
    snap = daemon.tracker.snapshot()
    assert snap is not None
    seg, *after = snap.segments
    assert (seg.kind, seg.start_gy, seg.end_gy) == ("in_previous_record", 0.0, 12.0), seg
    assert [s.kind for s in after] == ["beam"], after  # followed on from here
    assert snap.delivered_primary_gy == 12.0
    assert not any(s.end_gy == 9.0 for s in snap.segments), "dose from unvouched entries"
    # The earlier record stays closed UNKNOWN, as before.
    [written] = [
        x
        for x in entries(tmp_path)
        if x["type"] == "delivery_terminated" and x.get("delivery_id") == OURS
    ]
    assert written["data"]["status"] == "UNKNOWN"


@pytest.mark.parametrize("state", [DeviceState.STANDBY, DeviceState.TERMINATED])
async def test_no_link_when_the_console_is_not_in_a_delivery_at_the_first_reading(
    tmp_path: Path, state: DeviceState
) -> None:
    """A console found idle, or at an end, after the restart: the next delivery is a new
    selection, not the unvouched one, and is not linked to it."""
    signer = await crashed_before_the_delivery_was_sealed(tmp_path)
    async with running(tmp_path, signer=signer) as (log, report):
        daemon = a_daemon(log, report)
        daemon.record_start()
        t = time.monotonic_ns()
        events = daemon.tracker.on_reading(in_progress(t, 12.0 if state else 0.0, state))
        events += daemon.tracker.on_reading(in_progress(t + 10**9, 0.0, DeviceState.STANDBY))
        events += daemon.tracker.on_reading(
            in_progress(t + 2 * 10**9, 0.0, DeviceState.PREPARATORY)
        )
    [start] = [ev for ev in events if isinstance(ev, DeliveryStarted)]
    assert start.continues is None, start


@pytest.mark.parametrize(
    "forged",
    [
        "Doe, Jane 1961-04-02",  # a name where a pseudonymous code belongs
        "or-1-20260301T120000000000Z" + "x" * 200,  # beyond what a payload may carry
        "other-room-20260301T120000000000Z",  # not this room's
    ],
)
async def test_an_unvouched_id_not_in_this_daemons_form_is_never_linked_to(
    tmp_path: Path, forged: str
) -> None:
    """The id comes from unvouched entries, which anyone who can write the directory may
    have written: it is named in ``continues`` (the events topic, reports, DICOM) only if
    it has the form of this daemon's own delivery ids, for this room."""
    signer = await crashed_before_the_delivery_was_sealed(tmp_path, forged)
    async with running(tmp_path, signer=signer) as (log, report):
        assert report.unvouched_open_deliveries == (forged,)
        daemon = a_daemon(log, report)
        daemon.record_start()
        events = daemon.tracker.on_reading(
            in_progress(time.monotonic_ns(), 12.0, DeviceState.IRRADIATING)
        )
    [start] = [ev for ev in events if isinstance(ev, DeliveryStarted)]
    assert start.continues is None, start.continues_reason
    snap = daemon.tracker.snapshot()
    assert snap is not None
    assert [s.kind for s in snap.segments] == ["unmonitored", "beam"], snap.segments


class Crash(BaseException):
    """The process dies here (a BaseException: nothing on the way catches it)."""


async def spilled_log(tmp_path: Path) -> tuple[Path, Path, list[str]]:
    """A cleanly closed log and, in its spill directory, three entries that continue its
    chain (what a stop on a full disk leaves). Returns (log dir, spill dir, their hashes)."""
    directory, spill, other = tmp_path / "log", tmp_path / "spill", tmp_path / "other"
    log, _ = await AuditLog.open(directory, origin=ORIGIN)
    task = asyncio.create_task(log.run())
    await log.append("daemon_start", {}, durable=True).committed
    await log.close()
    await task
    shutil.copytree(directory, other)
    (other / "LOCK").unlink()
    [seg] = segment_paths(directory)
    size = seg.stat().st_size
    log, _ = await AuditLog.open(other, origin=ORIGIN)
    task = asyncio.create_task(log.run())
    hashes = [log.append("sample", {"n": i}).hash for i in range(3)]
    await log.append("daemon_stop", {"clean": True}, durable=True).committed
    await log.close()
    await task
    spill.mkdir(mode=0o700)
    writer.spill_path(spill, ORIGIN).write_bytes((other / seg.name).read_bytes()[size:])
    return directory, spill, hashes


async def test_a_crash_during_spill_restore_loses_no_spilled_entry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The spill file is removed once it is dealt with; a crash right after that removal
    must find the entries in the log, not only in quarantine (nothing would say so)."""
    directory, spill, hashes = await spilled_log(tmp_path)
    real_unlink = Path.unlink

    def unlink_then_die(self: Path, missing_ok: bool = False) -> None:
        real_unlink(self, missing_ok)
        if self == writer.spill_path(spill, ORIGIN):
            raise Crash

    monkeypatch.setattr(Path, "unlink", unlink_then_die)
    with pytest.raises(Crash):
        await AuditLog.open(directory, origin=ORIGIN, spill_dir=spill)
    monkeypatch.undo()
    async with running(directory, spill_dir=spill):
        pass
    logged = [e["hash"] for e in entries(directory)]
    assert set(hashes) <= set(logged), "spilled entries lost by a crash during the restore"


async def test_a_crash_before_the_spill_file_is_removed_restores_nothing_twice(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    directory, spill, hashes = await spilled_log(tmp_path)

    def die(self: Path, missing_ok: bool = False) -> None:
        if self == writer.spill_path(spill, ORIGIN):
            raise Crash

    monkeypatch.setattr(Path, "unlink", die)
    with pytest.raises(Crash):
        await AuditLog.open(directory, origin=ORIGIN, spill_dir=spill)
    monkeypatch.undo()
    async with running(directory, spill_dir=spill) as (_, report):
        assert report.spilled is not None
        assert report.spilled["count"] == 4
        assert report.spilled["restored"] == 4, report.spilled
    logged = [e["hash"] for e in entries(directory)]
    assert len(logged) == len(set(logged))
    assert set(hashes) <= set(logged)
    assert not writer.spill_path(spill, ORIGIN).exists()


async def test_a_crash_during_recovery_before_its_seal_leaves_both_ranges_unvouched(
    tmp_path: Path,
) -> None:
    """Run 2 records the recovery (and takes the delivery over) but dies before its first
    seal; a forger then rewrites run 2's entries too. Run 3 still takes the delivery from
    vouched entries only, and everything after run 1's seal stays unvouched."""
    signer = generate_keypair("or-9")
    head, last = await crashed_mid_delivery(tmp_path, signer)
    forged = await forge(tmp_path, fake_end)
    log, report = await AuditLog.open(tmp_path, origin=ORIGIN, signer=signer)
    task = asyncio.create_task(log.run())
    log.signer = None  # dies before its first seal
    recovery.record_recovery(log, report, utc_ts(datetime.now(UTC)))
    e = log.append("daemon_start", {"open_delivery": DID}, durable=True)
    await e.committed
    await crash(log, task)
    more = await forge(tmp_path, fake_end)

    async with running(tmp_path, signer=signer) as (log, report):
        assert report.unvouched == (forged[0], more[-1])
        assert report.open_delivery_id == DID
        assert report.open_delivery_last_sample == last
        assert report.unvouched_open_deliveries == ()
        recovery.record_recovery(log, report, utc_ts(datetime.now(UTC)))
        await log.checkpoint("start")
    rep = verify_log([tmp_path], pubkey=signer.verifier)
    assert rep.intact, rep.problem
    assert {(u.first_seq, u.last_seq) for u in rep.unvouched} >= {(forged[0], more[-1])}
    assert DID in unvouched_deliveries(collect_files([tmp_path]), rep.unvouched)
    assert head < forged[0]


async def test_verify_is_not_fooled_by_a_rotation_between_its_listing_and_the_seal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a live log the daemon may start a new segment (by size, or at midnight) and seal
    its first entries after verify listed the segments but before it read the seal: that
    is the daemon writing, not entries removed."""
    signer = generate_keypair("or-9")
    async with running(tmp_path, signer=signer, rotate_max_bytes=64 * 1024) as (log, _):
        await log.append(
            "daemon_start", {"verifier_key": signer.verifier.text}, durable=True
        ).committed
        await log.checkpoint("start")
        for i in range(80):
            e = log.append("sample", {"n": i, "pad": "x" * 1000})
        await e.committed
    segs = segment_paths(tmp_path)
    assert len(segs) > 1

    real = verify.collect_files
    calls: list[int] = []

    def listed_before_the_rotation(paths: Any) -> list[Path]:
        calls.append(1)
        files = real(paths)
        return files[:-1] if len(calls) == 1 else files

    monkeypatch.setattr(verify, "collect_files", listed_before_the_rotation)
    rep = verify_log([tmp_path], pubkey=signer.verifier)
    assert rep.intact, rep.problem


async def test_verify_is_not_fooled_by_a_clean_stop_while_it_reads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """verify reads the seal, then the log (seconds, for a large one), then asks whether a
    daemon is writing. One that wrote on and stopped cleanly meanwhile left entries past
    the seal verify read, all sealed by now: not unvouched."""
    signer = generate_keypair("or-9")
    early = tmp_path / "early"
    directory = tmp_path / "log"
    async with running(directory, signer=signer) as (log, _):
        await log.append(
            "daemon_start", {"verifier_key": signer.verifier.text}, durable=True
        ).committed
        await log.checkpoint("start")
        early.mkdir()
        for name in ("seal", "checkpoint"):
            shutil.copy(directory / name, early / name)  # what verify read first
        for i in range(5):
            e = log.append("sample", {"n": i})
        await e.committed
        log.append("daemon_stop", {"clean": True}, durable=True)
        await log.checkpoint("shutdown")
    real = dircheck.read_anchors
    calls: list[Path] = []

    def first_read_before_the_stop(log_dir: Path, rep: Any) -> Any:
        calls.append(log_dir)
        return real(early if len(calls) == 1 else log_dir, rep)

    monkeypatch.setattr(verify, "read_anchors", first_read_before_the_stop)
    monkeypatch.setattr(dircheck, "writer_running", lambda _: False)
    rep = verify_log([directory], pubkey=signer.verifier)
    assert rep.intact, rep.problem
    assert rep.unvouched == [], rep.unvouched


async def test_a_forged_end_the_restart_did_not_believe_is_not_shown_as_the_outcome(
    tmp_path: Path,
) -> None:
    """A chained NORMAL end forged into the crashed run's tail; the restart takes the
    delivery over (daemon_start.open_delivery names it) and the console is gone. Every
    command must show it open (IN PROGRESS), not the forged NORMAL, and mark it unvouched."""
    signer = generate_keypair("or-9")
    await crashed_mid_delivery(tmp_path, signer)
    forged = await forge(tmp_path, fake_end)
    async with running(tmp_path, signer=signer) as (log, report):
        assert report.open_delivery_id == DID
        recovery.record_recovery(log, report, utc_ts(datetime.now(UTC)))
        log.append(
            "daemon_start",
            {"verifier_key": signer.verifier.text, "open_delivery": DID},
            durable=True,
        )
        log.append("daemon_stop", {"clean": True, "open_delivery": DID}, durable=True)
        await log.checkpoint("shutdown")
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        code = await asyncio.to_thread(main, ["deliveries", str(tmp_path)])
    assert code == 1
    [line] = [x for x in out.getvalue().splitlines() if DID in x]
    assert "IN PROGRESS" in line, line
    assert "NORMAL" not in line, line
    assert "20.000/" not in line, f"the forged sample's dose shown: {line}"
    assert f"UNVOUCHED entries seq {forged[0]}..{forged[-1]}" in line, line
    export = tmp_path.parent / f"{tmp_path.name}-export.json"
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        code = await asyncio.to_thread(
            main,
            [
                *("export", str(tmp_path), "--delivery", DID, "--format", "json"),
                *("--out", str(export), "--allow-unverified"),
            ],
        )
    assert code == 1
    doc = orjson.loads(export.read_bytes())
    assert "NORMAL" not in orjson.dumps(doc["delivery"]).decode(), doc["delivery"]
    assert doc["delivery"]["delivered_primary_gy"] == 5.0, "the last vouched sample's dose"
