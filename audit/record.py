"""One delivery as auditors' reports and exports see it: read from a verified log.

Everything here comes from the log's entries and from verify.py's findings; nothing from
outside the log (no clock, no host name, no file other than the log's segments). The
reports (report/) and exports (export.py, dicom.py) are pure functions of a
:class:`DeliveryRecord`, so the same log always gives the same record.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from iortd.audit.review import load_entries
from iortd.audit.rxcheck import PrescriptionCheck, is_rx_entry_of, prescription_check
from iortd.auditlog.note import Checkpoint, NoteError
from iortd.auditlog.verify import VerifyReport, collect_files

__all__ = [
    "EVENT_TYPES",
    "CheckpointInfo",
    "DeliveryRecord",
    "Interval",
    "NoSuchDelivery",
    "Verification",
    "delivery_ids",
    "read_delivery",
]

# The entries of a delivery that are events (everything but samples and the applicator
# reader's samples; the reader's events are in audit/applicator.py), in the order the
# report's table and the events CSV list them: the log's own order (seq).
EVENT_TYPES = (
    "delivery_started",
    "phase_changed",
    "interlock_changed",
    "alarm_raised",
    "alarm_cleared",
    "monitoring_gap_started",
    "monitoring_gap_ended",
    "monitoring_gap",
    "operator_action",
    "delivery_terminated",
    "delivery_amended",
    "verification",  # the checks against a prescription (rxcheck.py), issue 18
    "prescription_used",
)


class NoSuchDelivery(LookupError):
    """The log holds no entry with this delivery id."""


@dataclass(frozen=True, slots=True)
class Verification:
    """What verify.py established about the whole log, as the report states it."""

    intact: bool
    problem: str | None  # file:line (seq N): what is wrong
    problem_brief: str | None  # the same with the file's name only (for a page stamp)
    entries: int
    files: tuple[str, ...]  # segment file names, in chain order
    origin: str | None
    head_seq: int
    head_hash: str
    checkpoints: int
    signed_through: int
    key: str  # who the signatures were checked against
    # The unvouched ranges this delivery has entries in (text), if any: written after the
    # last seal before a crash, not covered by any signature as genuine.
    unvouched: str | None = None

    @classmethod
    def of(cls, rep: VerifyReport, key: str, unvouched: str | None = None) -> Verification:
        return cls(
            intact=rep.intact,
            problem=None if rep.problem is None else str(rep.problem),
            problem_brief=None
            if rep.problem is None
            else str(replace(rep.problem, file=Path(rep.problem.file.name))),
            entries=rep.entries,
            files=tuple(p.name for p in rep.files),
            origin=rep.origin,
            head_seq=rep.head_seq,
            head_hash=rep.head_hash,
            checkpoints=rep.checkpoints,
            signed_through=rep.signed_through,
            key=key,
            unvouched=unvouched,
        )


@dataclass(frozen=True, slots=True)
class CheckpointInfo:
    """The first signed checkpoint after the delivery's last entry: it covers the delivery."""

    seq: int
    ts: str
    count: int
    head_hash: str
    signers: tuple[str, ...]
    time: str | None  # the note's own "time" extension
    reason: str | None
    note: str


@dataclass(frozen=True, slots=True)
class Interval:
    """A stretch of the delivery's time line, in the device clock's UTC text."""

    kind: str  # "interruption" or "gap"
    start: str
    end: str | None
    cause: str


@dataclass
class DeliveryRecord:
    delivery_id: str
    verification: Verification
    # context in force when the delivery started (the latest entries before it)
    software_version: str | None = None
    clock_speed: float | None = None
    config_file: str | None = None
    config_sha256: str | None = None
    plan: dict[str, Any] = field(default_factory=dict)
    site: dict[str, Any] = field(default_factory=dict)
    tolerances: dict[str, Any] = field(default_factory=dict)
    device: dict[str, Any] = field(default_factory=dict)
    devices_seen: list[dict[str, Any]] = field(default_factory=list)  # (re)identified during
    # the delivery itself
    started: str | None = None
    preset_gy: float | None = None
    joined_in_progress: bool = False
    continues: str | None = None  # an earlier record of the same treatment (after a restart)
    continues_reason: str | None = None
    status: str | None = None
    reason: str | None = None
    summary: dict[str, Any] = field(default_factory=dict)
    amendments: list[dict[str, Any]] = field(default_factory=list)
    samples: list[dict[str, Any]] = field(default_factory=list)  # entries, whole
    # the applicator reader's readings (applicator_sample entries, whole; issue 16)
    applicator_samples: list[dict[str, Any]] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)  # entries, whole
    first_seq: int = -1
    first_ts: str | None = None
    last_seq: int = -1
    last_ts: str | None = None
    last_hash: str | None = None
    checkpoint: CheckpointInfo | None = None
    simulated: bool = False
    # Set when a restart took the delivery over after a crash whose tail was unvouched:
    # samples from this seq on, up to that start, are not what the daemon saw for certain,
    # and the dose shown while no later sample or end exists comes from before them.
    untrusted_from: int | None = None
    untrusted_to: int | None = None
    # its checks against a prescription and prescription_used entries (issue 18), whole:
    # also those naming the delivery only in their data (rxcheck.py)
    rx_entries: list[dict[str, Any]] = field(default_factory=list)
    # physicists' sign-offs naming the delivery (delivery_signed entries, whole; issue 19),
    # and, when checked against a keyring (audit/signoffs.py), each one's finding by seq
    # (None: valid); None: not checked
    signoffs: list[dict[str, Any]] = field(default_factory=list)
    signoff_verdicts: dict[int, str | None] | None = None

    @property
    def prescription_check(self) -> PrescriptionCheck:
        """The governing check, every check, and whether the prescription was used."""
        lo, hi = self.untrusted_from, self.untrusted_to
        untrusted = (lo, hi) if lo is not None and hi is not None else None
        return prescription_check(self.rx_entries, self.samples + self.events, untrusted)

    @property
    def entries(self) -> list[dict[str, Any]]:
        """Every entry of the delivery, in seq order."""
        return sorted(
            self.samples + self.applicator_samples + self.events, key=lambda e: int(e["seq"])
        )

    @property
    def delivered_primary_gy(self) -> Any:
        return self.summary.get("delivered_primary_gy", self._last("dose_primary_gy"))

    @property
    def delivered_secondary_gy(self) -> Any:
        return self.summary.get("delivered_secondary_gy", self._last("dose_secondary_gy"))

    def _last(self, key: str) -> Any:
        lo, hi = self.untrusted_from, self.untrusted_to
        for e in reversed(self.samples):
            if lo is None or hi is None or not lo <= int(e["seq"]) <= hi:
                return e["data"].get(key)
        return None

    def intervals(self) -> list[Interval]:
        """Interruptions (from the phase changes) and monitoring gaps, in time order."""
        out: list[Interval] = []
        open_intr: dict[str, Any] | None = None
        for e in self.events:
            d = e["data"]
            if e["type"] == "phase_changed":
                if d.get("to") == "INTERRUPTED" and open_intr is None:
                    open_intr = d
                elif d.get("from") == "INTERRUPTED" and open_intr is not None:
                    out.append(
                        Interval(
                            "interruption",
                            str(open_intr.get("at")),
                            d.get("at"),
                            _cause(open_intr.get("cause")),
                        )
                    )
                    open_intr = None
        if open_intr is not None:
            out.append(
                Interval("interruption", str(open_intr.get("at")), None, _cause(open_intr["cause"]))
            )
        seen: set[str] = set()
        gaps = list(self.summary.get("gaps") or [])
        gaps += [e["data"] for e in self.events if e["type"] == "monitoring_gap_ended"]
        gaps += [e["data"] for e in self.events if e["type"] == "monitoring_gap"]
        term = [e["data"] for e in self.events if e["type"] == "delivery_terminated"]
        gaps += [t["gap"] for t in term if isinstance(t.get("gap"), dict)]
        gaps += [e["data"] for e in self.events if e["type"] == "monitoring_gap_started"]
        for g in gaps:
            start = g.get("start")
            if not isinstance(start, str) or start in seen:
                continue
            seen.add(start)
            end = g.get("end")
            out.append(
                Interval("gap", start, end if isinstance(end, str) else None, str(g.get("cause")))
            )
        return sorted(out, key=lambda i: (i.start, i.kind))


def _cause(text: Any) -> str:
    """A phase change's cause without the tracker's "interrupted: " prefix."""
    return str(text).removeprefix("interrupted: ")


def delivery_ids(paths: Sequence[Path]) -> list[str]:
    """Every delivery id in the log, in order of first appearance."""
    seen: dict[str, None] = {}
    for e in load_entries(collect_files(paths)):
        did = e.get("delivery_id")
        if isinstance(did, str):
            seen.setdefault(did, None)
    return list(seen)


def _checkpoint(e: dict[str, Any]) -> CheckpointInfo | None:
    note = e.get("data", {}).get("note")
    if not isinstance(note, str):
        return None
    try:
        cp, _ = Checkpoint.parse_verified(note, None)
    except NoteError:
        return None
    ext = dict(x.split(" ", 1) for x in cp.extensions if " " in x)
    sigs = note.partition("\n\n")[2]
    signers = tuple(line.split(" ")[1] for line in sigs.split("\n") if line.count(" ") >= 2)
    return CheckpointInfo(
        seq=int(e["seq"]),
        ts=str(e.get("ts")),
        count=cp.count,
        head_hash=cp.head_hash,
        signers=signers,
        time=ext.get("time"),
        reason=ext.get("reason"),
        note=note,
    )


def read_delivery(
    paths: Sequence[Path], delivery_id: str, verification: Verification
) -> DeliveryRecord:
    """The delivery's entries and the context the log gives them. Raises NoSuchDelivery.

    Reads the log's whole entries in order (for a log that is not intact, up to the first
    line that is not a whole entry: what --allow-unverified reports on)."""
    return _collect(load_entries(collect_files(paths)), delivery_id, verification)


def _collect(
    entries: Iterable[dict[str, Any]], delivery_id: str, verification: Verification
) -> DeliveryRecord:
    rec = DeliveryRecord(delivery_id, verification)
    ctx: dict[str, dict[str, Any]] = {}
    checkpoints: list[dict[str, Any]] = []
    inside = ended = False
    unvouched_from: Any = None
    for e in entries:
        kind = e.get("type")
        raw = e.get("data")
        d: dict[str, Any] = raw if isinstance(raw, dict) else {}
        mine = e.get("delivery_id") == delivery_id
        if is_rx_entry_of(e, delivery_id):
            rec.rx_entries.append(e)
        if kind == "delivery_signed" and d.get("delivery_id") == delivery_id:
            rec.signoffs.append(e)  # never the top-level delivery_id (auditlog/signoff.py)
        if kind == "recovery":
            u = d.get("unvouched")
            unvouched_from = u.get("first_seq") if isinstance(u, dict) else None
        if inside and kind == "daemon_start" and d.get("open_delivery") == delivery_id:
            # Taken over by this start: an end recorded before it (in a crash's unvouched
            # tail, possibly forged) was not believed; the outcome is what comes after,
            # and nor is a sample in that tail the dose so far.
            rec.status, rec.reason, rec.summary = None, None, {}
            if isinstance(unvouched_from, int):
                rec.untrusted_from, rec.untrusted_to = unvouched_from, int(e["seq"])
        if not inside and not mine:
            if kind in ("daemon_start", "config_loaded", "device_identified"):
                ctx[str(kind)] = d
            continue
        if mine and not inside:
            inside = True
            rec.first_seq, rec.first_ts = int(e["seq"]), str(e.get("ts"))
            _take_context(rec, ctx)
        if kind == "checkpoint":
            checkpoints.append(e)
        if not mine:
            if kind == "device_identified" and not ended:
                rec.devices_seen.append({**d, "seq": e.get("seq")})
            continue
        rec.last_seq, rec.last_ts, rec.last_hash = int(e["seq"]), str(e.get("ts")), e.get("hash")
        ended = True if kind in ("delivery_terminated", "delivery_amended") else ended
        if kind == "sample":
            rec.samples.append(e)
            rec.simulated = rec.simulated or bool(d.get("simulated"))
            continue
        if kind == "applicator_sample":
            rec.applicator_samples.append(e)
            # a simulated reader beside a real console: the record is still simulated
            rec.simulated = rec.simulated or bool(d.get("simulated"))
            continue
        rec.events.append(e)
        if kind == "delivery_started":
            rec.started = d.get("at") or e.get("ts")
            rec.preset_gy = d.get("preset_gy")
            rec.joined_in_progress = bool(d.get("joined_in_progress"))
            rec.continues = d.get("continues")
            rec.continues_reason = d.get("continues_reason")
        elif kind == "delivery_terminated":
            rec.status, rec.reason = d.get("status"), d.get("reason")
            rec.summary = d.get("summary") or {}
            rec.simulated = rec.simulated or bool(rec.summary.get("simulated"))
        elif kind == "delivery_amended":
            rec.amendments.append(d)
            rec.summary = d.get("summary") or rec.summary
    if not inside:
        raise NoSuchDelivery(delivery_id)
    # The first signed checkpoint after the delivery's last entry covers all of it (a later
    # amendment moves the last entry, and so the covering checkpoint, on).
    covering = (_checkpoint(e) for e in checkpoints if int(e["seq"]) > rec.last_seq)
    rec.checkpoint = next((cp for cp in covering if cp is not None), None)
    if rec.preset_gy is None:
        rec.preset_gy = rec.summary.get("preset_gy", rec.plan.get("prescribed_dose_gy"))
    return rec


def _take_context(rec: DeliveryRecord, ctx: dict[str, dict[str, Any]]) -> None:
    start = ctx.get("daemon_start", {})
    rec.software_version = start.get("software_version")
    speed = start.get("clock_speed")
    rec.clock_speed = float(speed) if isinstance(speed, int | float) else None
    cfg = ctx.get("config_loaded", {})
    rec.config_file = cfg.get("file")
    rec.config_sha256 = cfg.get("sha256")
    raw = cfg.get("config")
    config: dict[str, Any] = raw if isinstance(raw, dict) else {}
    for name in ("plan", "site", "tolerances"):
        value = config.get(name)
        if isinstance(value, dict):
            setattr(rec, name, value)
    rec.device = ctx.get("device_identified", {})
