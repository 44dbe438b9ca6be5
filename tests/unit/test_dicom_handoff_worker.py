"""The DICOM sink's durable hand-off (audit/dicom_outbox.py, audit/dicom_sender.py) with a
scripted peer in place of the network (the real peers are in
tests/integration/test_dicom_sink_e2e.py): the outbox is on disk (0700/0600) before any
attempt; every attempt's outcome is recorded with its attempt number; a peer that is down
is retried with capped backoff and the entry leaves only once stored (and committed where
asked); Storage Commitment failures resend the same instance; entries survive a restart;
an outcome the daemon could not record keeps its entry; a hung peer does not hold up the
other destinations, nor get a second association beside the hung one; the overdue alarm
fires once."""

from __future__ import annotations

import asyncio
import contextlib
import os
import stat
import threading
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from iortd.audit.dicom_outbox import Outbox, OutboxError
from iortd.audit.dicom_sender import Built, HandoffSettings, HandoffWorker

RECORD_CLASS = "1.2.840.10008.5.1.4.1.1.481.4"
PDF_CLASS = "1.2.840.10008.5.1.4.1.1.104.1"
UID_R = "1.2.826.0.1.3680043.8.498.1001"
UID_P = "1.2.826.0.1.3680043.8.498.1002"
DID = "or-3-20261126T095900Z"


@dataclass(frozen=True)
class Dest:
    name: str
    commitment: bool = False
    timeout_s: float = 2.0


@dataclass(frozen=True)
class Stored:
    sop_instance_uid: str
    outcome: str
    status: int | None
    detail: str


@dataclass(frozen=True)
class Commit:
    transaction_uid: str
    committed: tuple[str, ...]
    failed: tuple[tuple[str, int], ...]
    detail: str


def instances(delivery_id: str) -> list[Built]:
    return [
        Built("record", RECORD_CLASS, UID_R, b"DICM-record-" + delivery_id.encode()),
        Built("report", PDF_CLASS, UID_P, b"DICM-report-" + delivery_id.encode()),
    ]


@dataclass
class Peer:
    """Scripted outcomes per destination: each store call takes the next script item
    (``"up"``: every instance stored; another outcome word: every instance gets it)."""

    outbox_root: Path
    script: dict[str, list[str]] = field(default_factory=dict)
    commits: dict[str, list[Callable[[Sequence[str]], Commit]]] = field(default_factory=dict)
    received: dict[str, list[str]] = field(default_factory=dict)  # what the receiver holds
    hang: dict[str, threading.Event] = field(default_factory=dict)
    calls: dict[str, int] = field(default_factory=dict)
    concurrent: dict[str, int] = field(default_factory=dict)  # per destination
    max_concurrent: dict[str, int] = field(default_factory=dict)
    on_disk_at_store: list[bool] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def store(self, dest: Any, datas: Sequence[tuple[str, bytes]]) -> list[Stored]:
        with self.lock:
            self.calls[dest.name] = self.calls.get(dest.name, 0) + 1
            now = self.concurrent[dest.name] = self.concurrent.get(dest.name, 0) + 1
            self.max_concurrent[dest.name] = max(self.max_concurrent.get(dest.name, 0), now)
        try:
            for uid, _ in datas:
                self.on_disk_at_store.append(
                    (self.outbox_root / dest.name / f"{uid}.json").is_file()
                )
            if (ev := self.hang.get(dest.name)) is not None:
                ev.wait(30)
            todo = self.script.get(dest.name) or ["up"]
            what = todo.pop(0) if len(todo) > 1 else todo[0]
            if what == "up":
                got = self.received.setdefault(dest.name, [])
                got += [uid for uid, _ in datas if uid not in got]
                return [Stored(uid, "stored", 0, "") for uid, _ in datas]
            status = 0xA700 if what == "failed" else None
            return [Stored(uid, what, status, f"scripted {what}") for uid, _ in datas]
        finally:
            with self.lock:
                self.concurrent[dest.name] -= 1

    def commit(self, dest: Any, refs: Sequence[tuple[str, str]]) -> Commit:
        todo = self.commits.get(dest.name) or []
        uids = [uid for _, uid in refs]
        if todo:
            return todo.pop(0)(uids)
        return Commit("2.25.1", tuple(uids), (), "")


@dataclass
class Rig:
    root: Path
    peer: Peer
    records: list[dict[str, Any]] = field(default_factory=list)
    notices: list[tuple[str, str]] = field(default_factory=list)
    recording: bool = True
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    build_failures: int = 0

    async def record(self, kind: str, data: Mapping[str, Any]) -> bool:
        assert kind == "dicom_handoff"
        if not self.recording:
            return False
        self.records.append(dict(data))
        self.changed.set()
        return True

    def notice(self, severity: str, message: str) -> None:
        self.notices.append((severity, message))
        self.changed.set()

    def build(self, delivery_id: str) -> list[Built]:
        if self.build_failures:
            self.build_failures -= 1
            raise RuntimeError("no signed checkpoint covers the delivery yet")
        return instances(delivery_id)

    def worker(
        self, dests: Sequence[Dest], mono: Callable[[], float] | None = None, **kw: Any
    ) -> HandoffWorker:
        settings = HandoffSettings(
            **{"retry_initial_s": 0.02, "retry_max_s": 0.1, "alarm_after_s": 3600.0, **kw}
        )
        clock = {} if mono is None else {"mono": mono}
        return HandoffWorker(
            Outbox(self.root),
            dests,
            self.peer,
            self.build,
            self.record,
            self.notice,
            settings,
            **clock,
        )

    def outcomes(self, dest: str | None = None, uid: str | None = None) -> list[str]:
        return [
            r["outcome"]
            for r in self.records
            if (dest is None or r["destination"] == dest)
            and (uid is None or r["sop_instance_uid"] == uid)
        ]

    async def until(self, cond: Callable[[], bool], what: str, bound_s: float = 15.0) -> None:
        """Until ``cond``: woken by each record, and every 50 ms for what is not recorded
        (a file removed); a clear failure after ``bound_s``."""
        try:
            async with asyncio.timeout(bound_s):
                while not cond():
                    self.changed.clear()
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(0.05):
                            await self.changed.wait()
        except TimeoutError:
            last = [(r["outcome"], r["attempt"]) for r in self.records[-8:]]
            raise AssertionError(f"not within {bound_s} s: {what}; last records {last}") from None


@pytest.fixture
def rig(tmp_path: Path) -> Rig:
    root = tmp_path / "sinks" / "dicom"
    return Rig(root, Peer(root / "outbox"))


@pytest.fixture
async def running() -> AsyncIterator[Callable[[HandoffWorker], None]]:
    tasks: list[tuple[HandoffWorker, asyncio.Task[None]]] = []

    def start(w: HandoffWorker) -> None:
        tasks.append((w, asyncio.create_task(w.run())))

    yield start
    for w, t in tasks:
        await w.aclose()
        async with asyncio.timeout(10):
            await t


def mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


async def test_queued_on_disk_closed_to_others_before_any_attempt_then_removed(
    rig: Rig, running: Callable[[HandoffWorker], None]
) -> None:
    w = rig.worker([Dest("ois")])
    await w.open()
    running(w)
    await w.queue_delivery(DID, "termination")
    w.wake()  # a checkpoint: the delivery's instances can be built
    await rig.until(lambda: rig.outcomes().count("stored") == 2, "both stored")
    assert rig.outcomes() == ["queued", "queued", "stored", "stored"]
    assert rig.peer.on_disk_at_store == [True, True]
    first = rig.records[0]
    assert first == {
        "delivery_id": DID,
        "destination": "ois",
        "what": "record",
        "sop_instance_uid": UID_R,
        "outcome": "queued",
        "status": None,
        "detail": "",
        "attempt": 0,
    }
    assert [r["attempt"] for r in rig.records[2:]] == [1, 1]
    assert mode(rig.root) == 0o700
    assert mode(rig.root / "outbox") == 0o700
    assert mode(rig.root / "outbox" / "ois") == 0o700
    await rig.until(lambda: not list((rig.root / "outbox" / "ois").iterdir()), "emptied")
    assert rig.peer.received["ois"] == [UID_R, UID_P]


async def test_files_are_0600_while_queued(rig: Rig) -> None:
    w = rig.worker([Dest("ois")])
    await w.open()
    await w.queue_delivery(DID, "termination")
    await w.build_pending()  # without running the sender
    files = sorted((rig.root / "outbox" / "ois").iterdir())
    assert [f.name for f in files] == [
        f"{UID_R}.dcm",
        f"{UID_R}.json",
        f"{UID_P}.dcm",
        f"{UID_P}.json",
    ] or sorted(f.name for f in files) == sorted(
        [f"{UID_R}.dcm", f"{UID_R}.json", f"{UID_P}.dcm", f"{UID_P}.json"]
    )
    assert all(mode(f) == 0o600 for f in files)
    assert all(b"DICM" not in f.read_bytes() for f in files if f.suffix == ".json")


async def test_a_peer_down_for_a_while_is_retried_until_it_takes_each_instance_once(
    rig: Rig, running: Callable[[HandoffWorker], None]
) -> None:
    rig.peer.script["ois"] = ["unreachable", "refused", "unreachable", "up"]
    w = rig.worker([Dest("ois")])
    await w.open()
    running(w)
    await w.queue_delivery(DID, "termination")
    w.wake()
    await rig.until(lambda: rig.outcomes(uid=UID_R)[-1:] == ["stored"], "stored at last")
    assert rig.outcomes(uid=UID_R) == ["queued", "unreachable", "refused", "unreachable", "stored"]
    attempts = [r["attempt"] for r in rig.records if r["sop_instance_uid"] == UID_R]
    assert attempts == [0, 1, 2, 3, 4]
    assert rig.peer.received["ois"] == [UID_R, UID_P]


async def test_entries_survive_a_restart_and_are_sent_as_the_same_instances(
    rig: Rig, running: Callable[[HandoffWorker], None]
) -> None:
    first = rig.worker([Dest("ois")])
    await first.open()
    await first.queue_delivery(DID, "termination")
    await first.build_pending()
    # (a SIGKILL here: the next start finds the outbox as it was)
    second = rig.worker([Dest("ois")])
    await second.open()
    running(second)
    await rig.until(lambda: rig.outcomes().count("stored") == 2, "sent after the restart")
    assert rig.peer.received["ois"] == [UID_R, UID_P]


async def test_a_pending_delivery_survives_a_restart_before_its_instances_are_built(
    rig: Rig, running: Callable[[HandoffWorker], None]
) -> None:
    first = rig.worker([Dest("ois")])
    await first.open()
    await first.queue_delivery(DID, "termination")  # on disk, not yet built
    second = rig.worker([Dest("ois")])
    await second.open()
    running(second)
    await rig.until(lambda: rig.outcomes().count("stored") == 2, "built and sent at start")


async def test_an_outcome_not_recorded_keeps_its_entry(rig: Rig) -> None:
    w = rig.worker([Dest("ois")])
    await w.open()
    await w.queue_delivery(DID, "termination")
    await w.build_pending()
    rig.recording = False  # the daemon is stopping: nothing more goes on the record
    await w.attempt_due()
    assert rig.peer.received["ois"] == [UID_R, UID_P]
    names = {f.name for f in (rig.root / "outbox" / "ois").iterdir()}
    assert f"{UID_R}.json" in names  # resent (same UID) and recorded at the next start


async def test_storage_commitment_failure_resends_until_committed(
    rig: Rig, running: Callable[[HandoffWorker], None]
) -> None:
    def unknown(uids: Sequence[str]) -> Commit:
        return Commit("2.25.2", (), tuple((u, 0x0112) for u in uids), "no such object")

    rig.peer.commits["ois"] = [unknown]
    w = rig.worker([Dest("ois", commitment=True)])
    await w.open()
    running(w)
    await w.queue_delivery(DID, "termination")
    w.wake()
    await rig.until(lambda: rig.outcomes(uid=UID_R)[-1:] == ["committed"], "committed at last")
    assert rig.outcomes(uid=UID_R) == ["queued", "stored", "commit_failed", "stored", "committed"]
    failed = next(r for r in rig.records if r["outcome"] == "commit_failed")
    assert failed["status"] == 0x0112
    await rig.until(lambda: not list((rig.root / "outbox" / "ois").iterdir()), "emptied")


async def test_a_stored_instance_waits_in_the_outbox_for_its_commitment(rig: Rig) -> None:
    def silent(uids: Sequence[str]) -> Commit:
        return Commit("2.25.3", (), (), "no N-EVENT-REPORT within 2 s")

    rig.peer.commits["ois"] = [silent]
    w = rig.worker([Dest("ois", commitment=True)])
    await w.open()
    await w.queue_delivery(DID, "termination")
    await w.build_pending()
    await w.attempt_due()
    assert rig.outcomes(uid=UID_R) == ["queued", "stored", "commit_failed"]
    assert (rig.root / "outbox" / "ois" / f"{UID_R}.json").is_file()  # not handed off yet


async def test_a_hung_peer_holds_up_neither_the_others_nor_gets_a_second_association(
    rig: Rig, running: Callable[[HandoffWorker], None]
) -> None:
    rig.peer.hang["slow"] = hung = threading.Event()
    w = rig.worker([Dest("slow", timeout_s=0.2), Dest("ois")])
    await w.open()
    running(w)
    await w.queue_delivery(DID, "termination")
    w.wake()
    await rig.until(lambda: rig.outcomes("ois").count("stored") == 2, "the other destination")
    await rig.until(
        lambda: "unreachable" in rig.outcomes("slow"), "the hung attempt cut and recorded"
    )
    hung_detail = next(r for r in rig.records if r["outcome"] == "unreachable")["detail"]
    assert "no answer within" in hung_detail
    calls_while_hung = rig.peer.calls["slow"]
    # no second association while the first thread hangs
    assert calls_while_hung == 1, rig.outcomes("slow")
    hung.set()
    await rig.until(lambda: rig.outcomes("slow").count("stored") == 2, "stored once it answers")
    assert rig.peer.max_concurrent["slow"] == 1


async def test_the_overdue_alarm_fires_once_and_the_retries_go_on(
    rig: Rig, running: Callable[[HandoffWorker], None]
) -> None:
    rig.peer.script["ois"] = ["refused"]  # for good
    w = rig.worker([Dest("ois")], alarm_after_s=0.3)
    await w.open()
    running(w)
    await w.queue_delivery(DID, "termination")
    w.wake()
    await rig.until(lambda: rig.outcomes(uid=UID_R).count("overdue") == 1, "overdue")
    n = len(rig.outcomes(uid=UID_R))
    await rig.until(lambda: len(rig.outcomes(uid=UID_R)) > n + 2, "retries go on")
    assert rig.outcomes(uid=UID_R).count("overdue") == 1
    crit = [m for s, m in rig.notices if s == "critical"]
    assert any("not handed off" in m and "ois" in m for m in crit), rig.notices
    assert all("DICM" not in m for _, m in rig.notices)


async def test_a_delivery_whose_instances_cannot_be_built_yet_is_tried_again(
    rig: Rig, running: Callable[[HandoffWorker], None]
) -> None:
    rig.build_failures = 2
    w = rig.worker([Dest("ois")])
    await w.open()
    running(w)
    await w.queue_delivery(DID, "termination")
    w.wake()
    await rig.until(lambda: rig.outcomes().count("stored") == 2, "built at last and stored")
    built = [r for r in rig.records if r["outcome"] == "build_failed"]
    assert len(built) == 1  # recorded once, not at every try
    assert built[0]["sop_instance_uid"] is None
    assert "checkpoint" in built[0]["detail"]


async def test_a_link_in_place_of_the_outbox_is_refused(rig: Rig, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    rig.root.mkdir(parents=True, mode=0o700)
    (rig.root / "outbox").symlink_to(elsewhere)
    with pytest.raises(OutboxError, match="not a directory"):
        await rig.worker([Dest("ois")]).open()
    assert not list(elsewhere.iterdir())


async def test_a_link_in_place_of_the_sinks_folder_is_refused(rig: Rig, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / "sinks").symlink_to(elsewhere)
    with pytest.raises(OutboxError, match="not a directory"):
        await rig.worker([Dest("ois")]).open()
    assert not list(elsewhere.iterdir())


async def test_what_a_crash_or_a_hand_left_is_tidied_at_open(rig: Rig) -> None:
    w = rig.worker([Dest("ois")])
    await w.open()
    await w.queue_delivery(DID, "termination")
    await w.build_pending()
    box = rig.root / "outbox" / "ois"
    os.chmod(box, 0o755)  # noqa: S103 - opened by hand: what open() must close again
    (box / f"{UID_P}.json").unlink()  # a crash between the instance and its entry
    (box / f"{UID_R}.json").write_bytes(b"[1, 2]")  # not an entry
    again = rig.worker([Dest("ois")])
    await again.open()
    assert mode(box) == 0o700
    names = sorted(f.name for f in box.iterdir())
    assert names == [f"{UID_R}.bad", f"{UID_R}.dcm"]  # set aside, never sent


async def test_the_build_backoff_grows_while_builds_fail(rig: Rig) -> None:
    now = [100.0]
    settings = HandoffSettings(retry_initial_s=0.02, retry_max_s=10.0, alarm_after_s=3600.0)
    w = HandoffWorker(
        Outbox(rig.root),
        [Dest("ois")],
        rig.peer,
        rig.build,
        rig.record,
        rig.notice,
        settings,
        mono=lambda: now[0],
    )
    await w.open()
    await w.queue_delivery(DID, "termination")
    rig.build_failures = 3
    delays = []
    for _ in range(3):
        await w.build_pending()
        due = w._build_due  # when the next build is due, by the fake clock
        delays.append(due - now[0])
        now[0] = due
    assert delays[2] >= 0.04, delays  # steps 0.02, 0.04, 0.08 (each drawn in [step/2, step])
    await w.build_pending()
    assert rig.outcomes().count("queued") == 2  # built at the fourth try


async def test_a_checkpoint_builds_a_new_delivery_but_not_one_that_failed_before_its_time(
    rig: Rig,
) -> None:
    now = [100.0]
    tried: list[str] = []

    def build(delivery_id: str) -> list[Built]:
        tried.append(delivery_id)
        if delivery_id == "bad":
            raise RuntimeError("the log is not intact")
        return instances(delivery_id)

    settings = HandoffSettings(retry_initial_s=30.0, retry_max_s=300.0, alarm_after_s=3600.0)
    w = HandoffWorker(
        Outbox(rig.root),
        [Dest("ois")],
        rig.peer,
        build,
        rig.record,
        rig.notice,
        settings,
        mono=lambda: now[0],
    )
    await w.open()
    await w.queue_delivery("bad", "termination")
    await w.build_pending()
    assert tried == ["bad"]
    now[0] += 1.0  # a checkpoint a second later, with a new delivery ended
    await w.queue_delivery("good", "termination")
    w.wake()
    await w.build_pending()
    assert tried == ["bad", "good"]  # the failed one waits for its backoff (>= 15 s)
    now[0] += 300.0
    await w.build_pending()
    assert tried == ["bad", "good", "bad"]


async def test_a_delivery_never_built_raises_the_overdue_alarm_once(rig: Rig) -> None:
    wall, mono = [1_000_000.0], [100.0]
    settings = HandoffSettings(retry_initial_s=1.0, retry_max_s=60.0, alarm_after_s=3600.0)
    w = HandoffWorker(
        Outbox(rig.root),
        [Dest("ois")],
        rig.peer,
        rig.build,
        rig.record,
        rig.notice,
        settings,
        wall=lambda: wall[0],
        mono=lambda: mono[0],
    )
    await w.open()
    await w.queue_delivery(DID, "termination")
    rig.build_failures = 100  # the log does not verify, for good
    for _ in range(4):
        await w.build_pending()
        wall[0] += 1800.0  # half an hour between tries
        mono[0] += 1800.0
    outcomes = rig.outcomes()
    assert outcomes.count("build_failed") == 1
    assert outcomes.count("overdue") == 1
    [alarm] = [m for s, m in rig.notices if s == "critical"]
    assert DID in alarm
    assert "could not be built" in alarm


async def test_an_abandoned_build_is_never_joined_by_a_second(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A build that outlives its bound is abandoned, not stopped (it verifies the whole
    log in a thread): the next try waits for it to end rather than start another beside
    it, and builds once it has."""
    monkeypatch.setattr("iortd.audit.dicom_sender.BUILD_TIMEOUT_S", 0.05)
    release, started = threading.Event(), []

    def slow(delivery_id: str) -> list[Built]:
        started.append(delivery_id)
        release.wait(30)
        return instances(delivery_id)

    rig.build = slow  # type: ignore[method-assign]
    now = [100.0]
    w = rig.worker([Dest("ois")], mono=lambda: now[0])
    await w.open()
    await w.queue_delivery(DID, "termination")
    await w.build_pending()  # times out: the thread goes on
    assert rig.outcomes() == ["build_failed"]
    for _ in range(3):
        now[0] += 60.0
        await w.build_pending()
    assert started == [DID], "a second build beside the abandoned one"
    release.set()
    for _ in range(200):  # the abandoned thread ends (bounded: 2 s)
        if not w._building.is_set():
            break
        await asyncio.sleep(0.01)
    now[0] += 60.0
    await w.build_pending()
    assert started == [DID, DID]
    assert rig.outcomes().count("queued") == 2


async def test_entries_of_a_destination_no_longer_configured_are_reported_not_dropped(
    rig: Rig,
) -> None:
    """They hold the real Patient ID and may be the only copy of a hand-off: a critical
    notice names the destination and the count; the files stay."""
    old = rig.worker([Dest("ois"), Dest("old-pacs")])
    await old.open()
    await old.queue_delivery(DID, "termination")
    await old.build_pending()
    assert rig.outcomes().count("queued") == 4
    await old.aclose()
    new = rig.worker([Dest("ois")])
    await new.open()
    [(severity, message)] = rig.notices
    assert severity == "critical"
    assert "2 instance(s) queued for destination 'old-pacs'" in message
    assert len(list((rig.root / "outbox" / "old-pacs").glob("*.json"))) == 2
