"""The ``dicom`` sink: the delivery's record handed to the hospital by DICOM (issue 23).

A sink plug-in (entry point ``iort.sinks`` ``dicom``) shipped with the auditors' tools
because it needs their libraries (pydicom, pynetdicom, reportlab: the extra ``reports``);
the daemon never imports it, it loads it by entry point (tests/unit/test_layers.py,
``PLUGIN_API``: of the daemon it imports the plug-in API only).

When: ``when = "termination"`` (the default) queues a delivery at its
``delivery_terminated`` (and again at a ``delivery_amended``: the builder gives a new
instance then); ``when = "signoff"`` queues it only at a physicist's sign-off that
approves it (``approved``, ``approved_with_deviation``; ``reviewed`` does not), and again
at each later one (a new instance referencing the first). A queued delivery is built at
the next checkpoint (one is written at every delivery end; the builder reads the VERIFIED
log, audit/dicom_handoff.py), or at once after a sign-off (already covered).

What, how and the record: audit/dicom_sender.py (the worker: outbox, attempts, backoff,
commitment, the overdue alarm) and audit/dicom_outbox.py (the files). Every outcome goes
on the record through ``SinkContext.record`` as a ``dicom_handoff`` entry
(docs/audit-log.md) and from there on MQTT ``events``; a sink without ``record`` (an older
daemon) refuses to start rather than send what it cannot record.

The network (audit/dicom_net.py) and the builder (audit/dicom_handoff.py, with the PDF
report's reportlab and matplotlib) are imported at their first use, in the worker's
threads: neither ``iortd check-config`` nor the daemon's start waits for them (some 2 s on
a small machine); ``start`` only checks that the extra ``reports`` is installed.
"""

from __future__ import annotations

import asyncio
import importlib.util
import math
import threading
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Final

import orjson
import structlog

from iortd.audit.dicom_config import (
    Destination,
    DestinationError,
    parse_ae_title,
    parse_destinations,
    parse_listen,
)
from iortd.audit.dicom_outbox import Outbox, OutboxError, write_private
from iortd.audit.dicom_sender import Built, HandoffSettings, HandoffWorker
from iortd.auditlog.logdir import SEGMENT_RE, read_segment, segment_paths
from iortd.daemon.sinks import (
    DeliveryAmended,
    DeliverySnapshot,
    Sink,
    SinkConfigError,
    SinkContext,
    SinkOptionError,
    SinkSpec,
    Terminated,
    TrackerEvent,
)

__all__ = ["DicomSink", "DicomSinkFactory", "Settings", "missed_triggers", "settings_of"]

log = structlog.get_logger("iortd.dicom")

OPTIONS: Final = frozenset(
    {
        "calling_ae",
        "destinations",
        "send",
        "when",
        "protected_store",
        "keyring",
        "pubkey",
        "archive",
        "commitment_listen",
        "alarm_after_s",
        "retry_initial_s",
        "retry_max_s",
        "allow_simulated",
    }
)
WHAT: Final = ("record", "report")
WHEN: Final = ("termination", "signoff")
APPROVING: Final = frozenset({"approved", "approved_with_deviation"})
MAX_ALARM_S: Final = 7 * 24 * 3600.0
COMMIT_WAIT_S: Final = 30.0  # how long one commitment request waits for its report
CATCH_UP_DAYS: Final = 7  # how far back a start looks for a hand-off a crash lost
SINCE_FILE: Final = "since.json"


class Settings:
    """The validated options."""

    def __init__(self, options: Mapping[str, Any]) -> None:
        self.calling_ae = _ae(options.get("calling_ae"))
        self.destinations = _destinations(options)
        self.send = _send(options.get("send", list(WHAT)))
        self.when = options.get("when", "termination")
        if self.when not in WHEN:
            raise SinkOptionError("options.when", f"{self.when!r}: one of {', '.join(WHEN)}")
        self.protected_store = _path(options, "protected_store", folder=True)
        self.keyring = _path(options, "keyring", folder=False)
        self.pubkey = _path(options, "pubkey", folder=False)
        self.archive = _path(options, "archive", folder=True)
        self.listen = _listen(options, self.destinations)
        self.alarm_after_s = _seconds(options, "alarm_after_s", 3600.0, MAX_ALARM_S)
        initial = _seconds(options, "retry_initial_s", 5.0, 3600.0)
        most = _seconds(options, "retry_max_s", max(300.0, initial), 24 * 3600.0)
        if most < initial:
            raise SinkOptionError("options.retry_max_s", "must be at least retry_initial_s")
        self.handoff = HandoffSettings(initial, most, self.alarm_after_s)
        self.allow_simulated = options.get("allow_simulated", False)
        if not isinstance(self.allow_simulated, bool):
            raise SinkOptionError("options.allow_simulated", "must be true or false")


def settings_of(options: Mapping[str, Any]) -> Settings:
    unknown = sorted(set(options) - OPTIONS)
    if unknown:
        raise SinkOptionError(
            f"options.{unknown[0]}", f"unknown key (known: {', '.join(sorted(OPTIONS))})"
        )
    return Settings(options)


def _ae(value: Any) -> str:
    if value is None:
        raise SinkOptionError("options.calling_ae", 'missing: iortd\'s AE title ("IORTD_OR7")')
    try:
        return parse_ae_title(value, "options.calling_ae")
    except DestinationError as exc:
        raise _option_error(exc) from None


def _option_error(exc: DestinationError) -> SinkOptionError:
    key, _, message = str(exc).partition(": ")
    return SinkOptionError(key, message)


def _destinations(options: Mapping[str, Any]) -> tuple[Destination, ...]:
    # The config loader makes only top-level path options absolute (path_options): a
    # relative TLS file of a destination would be taken from the daemon's working
    # directory, so it is refused here, naming the key.
    raw = options.get("destinations")
    if isinstance(raw, list | tuple):
        for i, item in enumerate(raw):
            if not isinstance(item, Mapping):
                continue
            for key in ("tls_ca", "tls_cert", "tls_key"):
                v = item.get(key)
                if isinstance(v, str) and v and not Path(v).is_absolute():
                    raise SinkOptionError(
                        f"options.destinations[{i}].{key}",
                        f"{v!r}: give the file's absolute path (the daemon does not resolve "
                        "a destination's relative paths against the config file's folder)",
                    )
    try:
        return parse_destinations(options, "options")
    except DestinationError as exc:
        raise _option_error(exc) from None


def _send(value: Any) -> tuple[str, ...]:
    ok = (
        isinstance(value, list | tuple)
        and value
        and all(v in WHAT for v in value)
        and len(set(value)) == len(value)
    )
    if not ok:
        raise SinkOptionError(
            "options.send", f"{value!r}: a list of one or both of record, report (no repeats)"
        )
    return tuple(value)


def _path(options: Mapping[str, Any], key: str, *, folder: bool) -> Path | None:
    """A path option, checked to name an existing folder or file (read-only: a stat)."""
    v = options.get(key)
    if v is None:
        return None
    if not isinstance(v, str) or not v or "\0" in v:
        raise SinkOptionError(f"options.{key}", "must be a path (a non-empty string)")
    path = Path(v)
    if not (path.is_dir() if folder else path.is_file()):
        kind = "folder" if folder else "file"
        raise SinkOptionError(f"options.{key}", f"{path} is not a {kind} (give its path)")
    return path


def _listen(options: Mapping[str, Any], dests: Sequence[Destination]) -> tuple[str, int] | None:
    v = options.get("commitment_listen")
    if v is None:
        if any(d.commitment for d in dests):
            raise SinkOptionError(
                "options.commitment_listen",
                "missing: a destination has commitment = true, so iortd needs an address "
                'for the receiver\'s N-EVENT-REPORT (e.g. "0.0.0.0:11113")',
            )
        return None
    try:
        return parse_listen(v, "options.commitment_listen")
    except DestinationError as exc:
        raise _option_error(exc) from None


def _seconds(options: Mapping[str, Any], key: str, default: float, most: float) -> float:
    v = options.get(key, default)
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        v = -1.0
    if not 0 < v <= most:
        raise SinkOptionError(f"options.{key}", f"{v!r}: a number of seconds in (0, {most:g}]")
    return float(v)


def missed_triggers(log_dir: Path, since: str, when: str) -> list[tuple[str, str]]:
    """(delivery id, trigger) of what the log says was to be handed off since ``since``
    (UTC, the log's ``ts`` format) with no ``dicom_handoff`` entry of that delivery after
    it: a SIGKILL between the record and the sink's pending file (the sink hears of an
    entry only once it is on disk). Blocking; reads the segments of the last
    ``CATCH_UP_DAYS`` days at most, one at a time. An entry that does not parse is
    skipped (``iort-audit verify`` reports it)."""
    cutoff = max(since[:10].replace("-", ""), _days_ago(CATCH_UP_DAYS))
    paths = [p for p in segment_paths(log_dir) if _segment_date(p) >= cutoff[:8]]
    # A segment named for an earlier day may hold today's entries too: include the one
    # before the first taken.
    all_paths = segment_paths(log_dir)
    if paths and all_paths.index(paths[0]) > 0:
        paths.insert(0, all_paths[all_paths.index(paths[0]) - 1])
    elif not paths and all_paths:
        paths = all_paths[-1:]
    todo: dict[tuple[str, str], int] = {}
    for path in paths:
        for line in read_segment(path).splitlines():
            if not any(m in line for m in _CATCH_UP_MARKS):
                continue
            try:
                e = orjson.loads(line)
                kind, data, seq, ts = e["type"], e["data"], e["seq"], e["ts"]
            except (orjson.JSONDecodeError, KeyError, TypeError):
                continue
            if not isinstance(ts, str) or ts < since or not isinstance(data, dict):
                continue
            if kind == "dicom_handoff":
                # Only a build's outcome (its instances queued, or the build failed)
                # handles the triggers before it: an attempt's outcome (a retry of an
                # earlier instance, stored, unreachable...) says nothing of an amendment
                # recorded after that instance was built.
                if data.get("outcome") not in _HANDLED_BY:
                    continue
                did = data.get("delivery_id")
                for key in [k for k in todo if k[0] == did]:
                    del todo[key]
            elif when == "termination" and kind in _ENDS:
                did = e.get("delivery_id")
                if isinstance(did, str):
                    todo.setdefault((did, _ENDS[kind]), seq)
            elif when == "signoff" and kind == "delivery_signed":
                did, meaning = data.get("delivery_id"), data.get("meaning")
                if isinstance(did, str) and meaning in APPROVING:
                    todo.setdefault((did, f"signed:{meaning}"), seq)
    return sorted(todo, key=lambda k: todo[k])


_ENDS: Final = {"delivery_terminated": "termination", "delivery_amended": "amended"}
_HANDLED_BY: Final = frozenset({"queued", "build_failed"})
_CATCH_UP_MARKS: Final = (
    b'"type":"delivery_terminated"',
    b'"type":"delivery_amended"',
    b'"type":"delivery_signed"',
    b'"type":"dicom_handoff"',
)


def _since(path: Path) -> str:
    """When this sink first started (UTC, the log's ``ts`` format), kept in its state
    directory: a start catches up nothing older (a sink added to a site with years of
    deliveries does not send them all)."""
    try:
        value = orjson.loads(path.read_bytes())["since"]
        if isinstance(value, str) and len(value) == 27:
            return value
    except FileNotFoundError:
        pass
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("dicom_since_unreadable", error=str(exc))  # written again: from now
    now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    write_private(path, orjson.dumps({"since": now}))
    return now


def _segment_date(path: Path) -> str:
    m = SEGMENT_RE.match(path.name)
    return m.group(2) if m else ""


def _days_ago(days: int) -> str:
    return (datetime.now(UTC) - timedelta(days=days)).strftime("%Y%m%d")


class DicomSinkFactory:
    """The ``iort.sinks`` entry point ``dicom``."""

    name = "dicom"
    path_options = frozenset({"protected_store", "keyring", "pubkey", "archive"})

    def validate(self, options: Mapping[str, Any]) -> None:
        settings_of(options)

    def create(self, spec: SinkSpec, context: SinkContext) -> Sink:
        return DicomSink(settings_of(spec.options), context)


def _missing_extra() -> str | None:
    """The first library of the extra ``reports`` that is not installed (cheap: nothing
    is imported; the heavy imports happen in the worker's threads, at first use, so that
    they do not delay the daemon's start)."""
    for name in ("pydicom", "pynetdicom", "reportlab", "matplotlib"):
        if importlib.util.find_spec(name) is None:
            return name
    return None


class _Transfer:
    """The worker's network seam over audit/dicom_net.py (blocking; in worker threads)."""

    def __init__(self, settings: Settings) -> None:
        self._s = settings
        # One commitment listener at a time: they share commitment_listen's port.
        self._commit_lock = threading.Lock()

    @property
    def _net(self) -> Any:
        from iortd.audit import dicom_net  # noqa: PLC0415 - heavy: at first use, in a thread

        return dicom_net

    def store(self, dest: Any, instances: Sequence[tuple[str, bytes]]) -> Sequence[Any]:
        from iortd.audit.dicom_handoff import read_instance  # noqa: PLC0415 - ditto

        datasets = [read_instance(data) for _, data in instances]
        got: Sequence[Any] = self._net.store(self._s.calling_ae, dest, datasets)
        return got

    def commit(self, dest: Any, refs: Sequence[tuple[str, str]]) -> Any:
        if self._s.listen is None:
            raise RuntimeError("commitment_listen is not set")
        host, port = self._s.listen
        with self._commit_lock:
            return self._net.request_commitment(
                self._s.calling_ae,
                dest,
                refs,
                listen_host=host,
                listen_port=port,
                timeout_s=min(dest.timeout_s, COMMIT_WAIT_S),
            )


class _Builder:
    """The instances of a delivery from the verified log (audit/dicom_handoff.py)."""

    def __init__(self, settings: Settings, log_dir: Path) -> None:
        self._s = settings
        self._dir = log_dir

    def __call__(self, delivery_id: str) -> list[Built]:
        from iortd.audit import dicom_handoff  # noqa: PLC0415 - heavy: at first use, in a thread

        s = self._s
        datasets = dicom_handoff.handoff_instances(
            self._dir,
            delivery_id,
            what=s.send,
            store_dir=s.protected_store,
            keyring=s.keyring,
            pubkey=s.pubkey,
            # when = "signoff": the builder refuses a delivery the log holds no sign-off of
            require_signoff=s.when == "signoff",
            archive=s.archive,
        )
        return [
            Built(w, str(ds.SOPClassUID), str(ds.SOPInstanceUID), dicom_handoff.instance_bytes(ds))
            for w, ds in zip(s.send, datasets, strict=True)
        ]


class DicomSink(Sink):
    name = "dicom"

    def __init__(self, settings: Settings, context: SinkContext) -> None:
        self._s = settings
        self._ctx = context
        self.worker: HandoffWorker | None = None
        self._since = ""

    async def start(self) -> None:
        ctx = self._ctx
        if ctx.record is None or ctx.log_directory is None or ctx.notice is None:
            raise SinkConfigError(
                "the dicom sink needs a daemon that lets sinks record (SinkContext.record): "
                "every hand-off attempt goes on the record"
            )
        if ctx.simulated and not self._s.allow_simulated:
            # Nothing in the instances says "simulated": a simulator's delivery would be
            # filed as a patient's treatment record.
            raise SinkConfigError(
                "a device of this config is a simulator: its deliveries would reach the "
                "destinations as treatment records; set allow_simulated = true only where "
                "every destination is a test system"
            )
        if (missing := _missing_extra()) is not None:
            raise SinkConfigError(
                f"the dicom sink needs the extra 'reports' (pip install 'iortd[reports]'): "
                f"{missing} is not installed"
            )
        try:
            worker = HandoffWorker(
                Outbox(ctx.state_dir),
                self._s.destinations,
                _Transfer(self._s),
                _Builder(self._s, ctx.log_directory),
                ctx.record,
                ctx.notice,
                self._s.handoff,
            )
            await worker.open()
            since = await asyncio.to_thread(_since, ctx.state_dir / SINCE_FILE)
        except (OutboxError, OSError) as exc:
            raise SinkConfigError(f"outbox {ctx.state_dir}: {exc}") from None
        self.worker = worker
        self._since = since
        log.info(
            "dicom_sink_started",
            destinations=[d.name for d in self._s.destinations],
            when=self._s.when,
            send=list(self._s.send),
        )

    async def _catch_up(self, log_dir: Path, since: str) -> None:
        """Queue what a crash lost between the record and the pending file. Never raises
        (but cancellation): a log it cannot read is the daemon's start's to report."""
        if self.worker is None:
            return
        try:
            missed = await asyncio.to_thread(missed_triggers, log_dir, since, self._s.when)
        except Exception as exc:  # e.g. a damaged segment: the daemon's start says so
            log.warning("dicom_catch_up_failed", error=str(exc))
            return
        for did, trigger in missed:
            log.warning("dicom_handoff_caught_up", delivery=did, trigger=trigger)
            await self.worker.queue_delivery(did, trigger)

    async def run(self) -> None:
        if self.worker is None or self._ctx.log_directory is None:
            return
        # In the sink's own task, not in start: reading days of segments must not hold up
        # the daemon's start (start is bounded by timeout_s and refuses the run).
        # The catch-up first: the worker's attempts would otherwise record outcomes while
        # the scan reads the log (harmless now that only a build's outcome counts, but
        # the scan then sees the log as the crash left it).
        await self._catch_up(self._ctx.log_directory, self._since)
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self.worker.run(), name="dicom-worker")
            self.worker.wake()

    async def events(
        self, events: Sequence[TrackerEvent], delivery: DeliverySnapshot | None
    ) -> None:
        if self.worker is None or self._s.when != "termination":
            return
        for ev in events:
            if isinstance(ev, Terminated):
                await self.worker.queue_delivery(ev.delivery_id, "termination")
            elif isinstance(ev, DeliveryAmended):
                await self.worker.queue_delivery(ev.delivery_id, "amended")

    async def checkpoint(self, note: str) -> None:
        if self.worker is not None:
            self.worker.wake()  # what ended is covered now: build it

    async def signed(self, delivery_id: str, meaning: str) -> None:
        if self.worker is None or self._s.when != "signoff" or meaning not in APPROVING:
            return
        await self.worker.queue_delivery(delivery_id, f"signed:{meaning}")
        self.worker.wake()

    async def aclose(self) -> None:
        if self.worker is not None:
            await self.worker.aclose()
