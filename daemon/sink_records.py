"""What a sink may put on the record: ``SinkContext.record``, the narrow door into the log.

Why: a sink that acts in the world (the DICOM sender hands the delivery's record to the
hospital) must leave each action's outcome in the audit log, the place an auditor reads;
until now only the daemon itself appended. The door is as narrow as it can be:

* one entry at a time, of a type listed in :data:`iortd.daemon.sinks.SINK_ENTRY_TYPES`
  for the calling sink's type (the project names its record's vocabulary; a plug-in cannot
  invent types, write ``delivery_terminated`` or ``checkpoint``, nor another plug-in's
  entries: each sink gets :meth:`SinkRecorder.for_sink` of its own type);
* the data is a JSON object of at most :data:`MAX_DATA_BYTES` (canonical JSON), appended
  without a top-level ``delivery_id`` (a sink's entry never extends a delivery's range:
  the delivery it concerns is a field of its data, as for ``delivery_signed``);
* log first: the entry is written and fsync'd (bounded by :data:`COMMIT_WAIT_S`; a
  failing disk's entries are kept by the writer's spill, as every entry is), and only then
  is it shown, through every sink's :meth:`~iortd.daemon.sinks.Sink.report` (each behind
  its own queue: a slow one delays nobody, the caller included);
* never after ``daemon_stop``: :meth:`SinkRecorder.close` is called before it is written,
  and ``record`` then returns False (the caller keeps its own state so that the action is
  done, and recorded, again at the next start).
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from typing import Any, Final

import structlog

from iortd.auditlog.canonical import CanonicalError, canonical
from iortd.auditlog.writer import AuditLog, AuditLogClosed
from iortd.daemon.sink_queue import QueuedSink
from iortd.daemon.sinks import SINK_ENTRY_TYPES, Recorder

__all__ = ["COMMIT_WAIT_S", "MAX_DATA_BYTES", "SinkRecorder"]

log = structlog.get_logger("iortd.sinks")

MAX_DATA_BYTES: Final = 4096
COMMIT_WAIT_S: Final = 10.0


class SinkRecorder:
    """The daemon's side of ``SinkContext.record``: built before the sinks (their context
    holds :meth:`record`), told of them once they are open (:meth:`connect`)."""

    def __init__(self, audit: AuditLog) -> None:
        self._audit = audit
        self._sinks: list[QueuedSink] = []
        self._closed = False

    def connect(self, sinks: Sequence[QueuedSink]) -> None:
        """The sinks that are shown what is recorded (their ``report``)."""
        self._sinks = list(sinks)

    def close(self) -> None:
        """Nothing more is recorded (called before ``daemon_stop`` is written)."""
        self._closed = True

    def for_sink(self, sink_type: str) -> Recorder:
        """``SinkContext.record`` for a sink of type ``sink_type``: only the entry types
        :data:`SINK_ENTRY_TYPES` gives to that type."""

        async def record(kind: str, data: Mapping[str, Any]) -> bool:
            if SINK_ENTRY_TYPES.get(kind) != sink_type:
                log.error(
                    "sink_entry_refused",
                    type=kind,
                    sink_type=sink_type,
                    reason="not an entry type of this sink type",
                )
                return False
            return await self.record(kind, data)

        return record

    async def record(self, kind: str, data: Mapping[str, Any]) -> bool:
        """Append ``kind`` with ``data``, wait (bounded) until it is on disk, then show it
        to every sink. False, with a log line, when it was not recorded."""
        if self._closed:
            log.warning("sink_entry_not_recorded", type=kind, reason="daemon stopping")
            return False
        if kind not in SINK_ENTRY_TYPES:
            log.error("sink_entry_refused", type=kind, reason="not a sink entry type")
            return False
        try:
            size = len(canonical(dict(data)))
        except (CanonicalError, TypeError, ValueError) as exc:
            log.error(  # noqa: TRY400 - a refusal, not a crash: no traceback
                "sink_entry_refused", type=kind, reason=f"not canonical JSON: {exc}"
            )
            return False
        if size > MAX_DATA_BYTES:
            log.error("sink_entry_refused", type=kind, reason=f"{size} bytes > {MAX_DATA_BYTES}")
            return False
        try:
            entry = self._audit.append(kind, dict(data), durable=True)
        except AuditLogClosed:
            log.warning("sink_entry_not_recorded", type=kind, reason="audit log closed")
            return False
        except CanonicalError as exc:  # e.g. a NaN: the writer checks every value
            log.error("sink_entry_refused", type=kind, reason=str(exc))  # noqa: TRY400 - a refusal
            return False
        try:
            async with asyncio.timeout(COMMIT_WAIT_S):
                await asyncio.shield(entry.committed)
        except TimeoutError:
            # The disk is failing: the writer keeps the entry (spill) and says so on every
            # channel; showing it now is what the dispatcher does for the tracker's events.
            log.warning("sink_entry_commit_slow", type=kind, waited_s=COMMIT_WAIT_S)
        except Exception as exc:  # the write failed: the writer's spill keeps the entry
            log.warning("sink_entry_commit_failed", type=kind, error=str(exc))
        for sink in self._sinks:
            try:
                await sink.report(kind, data)
            except Exception:
                log.exception("sink_failed", sink=sink.name, callback="report")
        return True
