"""Submitting the log's tree checkpoints to witnesses, and recording their cosignatures
(issue 20; the witness's side is witness/, the protocol docs/witness.md).

A :class:`WitnessSubmitter` is one of the daemon's sinks (daemon/sinks.py): the service
tells it each checkpoint once it is committed to the log, behind its own queue, so a slow
or absent witness never delays the delivery loop nor the audit log. Chain-head checkpoints
(no Merkle root: a log without a tree, note.py) are never submitted: a witness could not
check them.

Per configured ``[[witness]]`` it keeps one state (:class:`WitnessState`): the size the
witness last cosigned (rebuilt at start from the log's last ``witness_cosigned`` entry for
that witness; 0 when there is none) and the newest checkpoint not yet cosigned. Only the
newest matters: a witness that cosigns size 900 has vouched for every prefix, so an older
pending one is replaced, never queued. Each witness has its own task; an attempt
(:meth:`WitnessSubmitter.attempt`) is the whole state machine:

- the consistency proof from the witness's size to the checkpoint's is computed in a
  worker thread from the log's leaf hashes (auditlog/merkle_log.leaf_hashes; with
  retention, the archived segments too: union.merge), once per checkpoint (retries reuse
  it), then sent with auditlog/witness_client.submit (one bound, ``timeout_s``, for the
  exchange); a log that cannot be read back is handled like an outage (kept, retried);
- 200: the lines are checked against the configured verifier key
  (cosignature.verified_cosignatures); the one that verifies is recorded as
  ``witness_cosigned`` {witness, size, root, cosignature, time} (durable), becomes the
  state, and is handed to ``on_cosigned`` (the MQTT sink appends it to the retained
  checkpoint); a 200 without a valid line by that key is a refusal;
- 409 with a size: the witness holds another size (ours was lost, or another daemon with
  this log's key submitted): one retry with a proof from that size; a size larger than the
  checkpoint's means the witness has cosigned more of this log than the log now holds (a
  rollback, e.g. after ``--accept-log-rollback``): refused, recorded, alarmed — the
  witness is right to refuse, and only an operator can settle it;
- 429 and 5xx, and an unreachable or silent witness (WitnessUnavailable): kept pending and
  tried again with capped jittered backoff (kernel/backoff.py);
- every other refusal (403 key, 404 origin, 422 fork or bad proof, 400): recorded as
  ``witness_refused`` {witness, status, detail (at most 200 printable characters)} and
  dropped; the next checkpoint is tried afresh.

**The alarm.** When a checkpoint has waited longer than ``alarm_after_s`` without being
cosigned (outage or refusals), a ``critical`` notice goes to every sink (MQTT ``events``,
the dashboard), as for a failing log disk, once per outage; an ``info`` notice says when
the witness cosigns again. Both also go to the operational log.

**Stop.** The composition root closes the submitter before it records the stop, so
nothing follows ``daemon_stop`` from here; a cosignature in flight is dropped, and the
stop's own checkpoint is submitted (extended) by the next start's.

An unforeseen exception in one attempt is logged (``witness_attempt_failed``) and retried
with backoff: it ends neither this witness's loop nor another's.

**Crash.** Nothing here is the record until ``witness_cosigned`` is committed: a SIGKILL
before that loses only the cosignature, and the next start submits its own ``start``
checkpoint with a proof from the last recorded size. If the witness had cosigned in the
meantime, its 409 says so and the retry catches up. A cosignature is recorded only after
it verifies against the configured key, so a broker, proxy or impostor cannot make the
log say that a witness cosigned.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import orjson
import structlog

from iortd.auditlog.archive import ArchiveError, archive_dir_for
from iortd.auditlog.cosignature import (
    CosignerVerifier,
    verified_cosignatures,
    verify_cosignature,
)
from iortd.auditlog.logdir import recent_lines, segment_paths
from iortd.auditlog.merkle import consistency_proof
from iortd.auditlog.merkle_log import RebuildError, leaf_hashes
from iortd.auditlog.note import Checkpoint, NoteError
from iortd.auditlog.signed_note import split_note
from iortd.auditlog.union import merge
from iortd.auditlog.witness_client import (
    Conflict,
    Cosigned,
    Outcome,
    WitnessUnavailable,
    submit,
)
from iortd.auditlog.writer import AuditLog, AuditLogClosed
from iortd.daemon.sinks import Sink
from iortd.kernel.backoff import Backoff
from iortd.kernel.threads import in_daemon_thread

__all__ = ["COSIGNED", "REFUSED", "WitnessState", "WitnessSubmitter", "WitnessTarget"]

COSIGNED: Final = "witness_cosigned"
REFUSED: Final = "witness_refused"
BACKOFF_INITIAL_S: Final = 1.0
BACKOFF_MAX_S: Final = 300.0

log = structlog.get_logger("iortd.witness")

Submit = Callable[[str, int, Sequence[bytes], str, float], Awaitable[Outcome]]
Leaves = Callable[[int], Sequence[bytes]]


@dataclass(frozen=True, slots=True)
class WitnessTarget:
    """One ``[[witness]]`` table, its vkey parsed."""

    name: str
    url: str
    verifier: CosignerVerifier
    timeout_s: float
    alarm_after_s: float


@dataclass(frozen=True, slots=True)
class _Pending:
    note: str
    text: str  # the note's text (what a cosignature signs)
    size: int
    root: str  # hex


@dataclass
class WitnessState:
    size: int = 0  # the size this witness last cosigned (0: none recorded)
    root: str | None = None
    pending: _Pending | None = None
    waiting_since: float | None = None  # monotonic: the oldest uncosigned checkpoint
    alarmed: bool = False
    wake: asyncio.Event = field(default_factory=asyncio.Event)


def _tree_checkpoint(note: str) -> _Pending | None:
    """The checkpoint's size and root, or None for a chain-head (or unreadable) note."""
    try:
        text, _ = split_note(note, "checkpoint")
        cp, _ = Checkpoint.parse_verified(note, None)
    except NoteError:
        return None
    if cp.root is None:
        return None
    return _Pending(note, text, cp.count, cp.root)


def last_cosigned(directory: Path) -> dict[str, tuple[int, str]]:
    """Per witness name, (size, root) of its last ``witness_cosigned`` entry in the log.
    Blocking (reads every segment holding one): run it in a thread."""
    found: dict[str, tuple[int, str]] = {}
    for line in recent_lines(directory, "", COSIGNED.encode()):
        try:
            entry = orjson.loads(line)
            if entry.get("type") != COSIGNED:
                continue
            data = entry["data"]
            found[str(data["witness"])] = (int(data["size"]), str(data["root"]))
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError):
            continue  # a damaged line: iort-audit verify reports it
    return found


class WitnessSubmitter(Sink):
    """The daemon's witness client: one state and one task per witness (module doc)."""

    name = "witness"

    def __init__(
        self,
        targets: Sequence[WitnessTarget],
        audit: AuditLog,
        notice: Callable[[str, str], None],
        *,
        submit_fn: Submit | None = None,
        leaves: Leaves | None = None,
        mono: Callable[[], float] = time.monotonic,
        backoff_initial_s: float = BACKOFF_INITIAL_S,
    ) -> None:
        self.targets = {t.name: t for t in targets}
        self._audit = audit
        self._notice = notice
        self._submit: Submit = submit_fn or submit
        self._leaves: Leaves = leaves or self._log_leaves
        self._mono = mono
        self.states = {t.name: WitnessState() for t in targets}
        self._closing = asyncio.Event()
        self._backoff_initial_s = backoff_initial_s
        # Told (note, cosignature line) once one is recorded: the MQTT sink's retained
        # checkpoint carries it (daemon/mqtt/sink.py checkpoint_cosigned).
        self.on_cosigned: list[Callable[[str, str], None]] = []
        self._proof: tuple[tuple[int, int, str] | None, Sequence[bytes]] = (None, ())

    def _log_leaves(self, size: int) -> Sequence[bytes]:
        """Every leaf hash up to ``size``; with retention, the archived segments too (the
        archive's copies of what is also local are taken from the log directory)."""
        files = segment_paths(self._audit.directory)
        root = self._audit.archive_root
        if root is not None:
            files = merge(files, archive_dir_for(root, self._audit.origin)).files
        return list(leaf_hashes(files, 0, size))

    async def start(self) -> None:
        """The state of each witness from the log (its last ``witness_cosigned``)."""
        found = await asyncio.to_thread(last_cosigned, self._audit.directory)
        for name, state in self.states.items():
            if name in found:
                state.size, state.root = found[name]
            log.info("witness_state", witness=name, size=state.size)

    async def checkpoint(self, note: str) -> None:
        if self._closing.is_set():
            return  # the shutdown's checkpoint: submitted at the next start (module doc)
        pending = _tree_checkpoint(note)
        if pending is None:
            return  # a chain-head checkpoint: nothing a witness can check
        now = self._mono()
        for state in self.states.values():
            if state.pending is None and state.waiting_since is None:
                state.waiting_since = now
            state.pending = pending
            state.wake.set()

    # ---- one attempt: the state machine -------------------------------------------------

    async def attempt(self, name: str) -> bool:
        """Try the witness's pending checkpoint once (module doc). True when it is settled
        (cosigned, refused or nothing pending); False: keep it and try again later."""
        target, state = self.targets[name], self.states[name]
        pending = state.pending
        if pending is None:
            return True
        try:
            outcome = await self._send(target, state.size, pending)
            if isinstance(outcome, Conflict):
                if outcome.size > pending.size:
                    self._refused(
                        name,
                        409,
                        f"the witness has cosigned {outcome.size} entries of this log, more "
                        f"than the {pending.size} it now holds (a rollback)",
                        pending,
                    )
                    return True
                log.info("witness_conflict", witness=name, ours=state.size, theirs=outcome.size)
                state.size, state.root = outcome.size, None
                outcome = await self._send(target, outcome.size, pending)
        except WitnessUnavailable as exc:
            log.warning("witness_unavailable", witness=name, error=str(exc))
            return False
        if isinstance(outcome, Cosigned):
            return await self._cosigned(target, state, pending, outcome.lines)
        if isinstance(outcome, Conflict):
            self._refused(name, 409, f"a second 409 (size {outcome.size})", pending)
            return True
        if outcome.status == 429 or outcome.status >= 500:
            log.warning("witness_busy", witness=name, status=outcome.status, detail=outcome.text)
            return False
        self._refused(name, outcome.status, outcome.text, pending)
        return True

    async def _send(self, target: WitnessTarget, old: int, pending: _Pending) -> Outcome:
        if old > pending.size:
            # Our own record says the witness holds more than the log: only the witness
            # can say so (an entry appended to the log directory must not stop witnessing):
            # ask from 0, and its 409 gives the size it really holds.
            old = 0
        proof: Sequence[bytes] = []
        if 0 < old < pending.size:
            key = (old, pending.size, pending.root)
            if self._proof[0] != key:  # retries during an outage reuse it
                leaves, size = self._leaves, pending.size
                try:
                    # Its own daemon thread: the leaves may come from the archive share,
                    # which can hang (kernel/threads.py); a hung read must not hold the
                    # default executor that shutdown waits for.
                    got = await in_daemon_thread(
                        lambda: consistency_proof(leaves(size), old, size),
                        name="iortd-witness-proof",
                    )
                except (RebuildError, ArchiveError, OSError, ValueError) as exc:
                    # The log cannot be read back (an archive unmounted, a damaged
                    # segment): not the witness's fault; kept and retried, and alarmed
                    # after the bound like an outage.
                    raise WitnessUnavailable(f"cannot build the proof from the log: {exc}") from exc
                self._proof = (key, got)
            proof = self._proof[1]
        return await self._submit(target.url, old, proof, pending.note, target.timeout_s)

    async def _cosigned(
        self, target: WitnessTarget, state: WitnessState, pending: _Pending, lines: Sequence[str]
    ) -> bool:
        name = target.name
        try:
            kept = verified_cosignatures(pending.text, lines, [target.verifier])
        except NoteError as exc:
            self._refused(name, 200, f"a cosignature that does not verify: {exc}", pending)
            return True
        if not kept:
            self._refused(name, 200, "no cosignature by the configured key", pending)
            return True
        data = {
            "witness": name,
            "size": pending.size,
            "root": pending.root,
            "cosignature": kept[0].rstrip("\n"),
            "time": verify_cosignature(target.verifier, pending.text, kept[0]),
        }
        if not self._record(COSIGNED, data):
            return True
        for tell in self.on_cosigned:
            tell(pending.note, kept[0])
        if state.pending is pending:
            state.pending = None
        state.size, state.root = pending.size, pending.root
        # A newer checkpoint came during the attempt: it waits from now, not from before.
        state.waiting_since = None if state.pending is None else self._mono()
        if state.alarmed:
            state.alarmed = False
            self._notice("info", f"witness {name} cosigns again (size {pending.size})")
        log.info("witness_cosigned", witness=name, size=pending.size)
        return True

    def _refused(self, name: str, status: int, detail: str, pending: _Pending) -> None:
        # What the witness said, for people: printable ASCII only, bounded (it is text
        # from the network going into the record).
        detail = "".join(c if c.isascii() and c.isprintable() else " " for c in detail)[:200]
        log.warning("witness_refused", witness=name, status=status, size=pending.size)
        self._record(
            REFUSED, {"witness": name, "status": status, "size": pending.size, "detail": detail}
        )
        state = self.states[name]
        if state.pending is pending:
            state.pending = None

    def _record(self, kind: str, data: dict[str, Any]) -> bool:
        if self._closing.is_set():  # the stop is being recorded: nothing after it
            log.warning("witness_not_recorded", kind=kind, reason="stopping")
            return False
        try:
            self._audit.append(kind, data, durable=True)
        except AuditLogClosed:
            log.warning("witness_not_recorded", kind=kind, reason="audit log closed")
            return False
        return True

    def check_alarm(self, name: str) -> None:
        """Raise the alarm once when a checkpoint has waited longer than the bound."""
        target, state = self.targets[name], self.states[name]
        since = state.waiting_since
        if since is None or state.alarmed:
            return
        waited = self._mono() - since
        if waited > target.alarm_after_s:
            state.alarmed = True
            log.error("witness_overdue", witness=name, waited_s=round(waited))
            self._notice(
                "critical",
                f"witness {name} has not cosigned this room's log for {waited / 60:.0f} min "
                f"(bound {target.alarm_after_s / 60:g} min): check the witness and the "
                "network; the log itself is being recorded",
            )

    # ---- the tasks ----------------------------------------------------------------------

    async def run(self) -> None:
        """One loop per witness until :meth:`aclose`, which cancels a submission in flight
        (its cosignature, if any, is not recorded: the next start submits again)."""
        async with asyncio.TaskGroup() as tg:
            loops = [tg.create_task(self._loop(n), name=f"witness:{n}") for n in self.targets]
            await self._closing.wait()
            for task in loops:
                task.cancel(msg="witness submitter closed")

    async def _loop(self, name: str) -> None:
        target, state = self.targets[name], self.states[name]
        backoff = Backoff(self._backoff_initial_s, BACKOFF_MAX_S)
        delay: float | None = None
        while not self._closing.is_set():
            # Wake for a new checkpoint, a retry, or to look at the alarm's bound.
            bound = target.alarm_after_s
            if state.waiting_since is not None and not state.alarmed:
                due = state.waiting_since + target.alarm_after_s - self._mono()
                bound = max(min(bound, due + 0.01), 0.01)
            if delay is not None:
                bound = min(bound, delay)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(bound):
                    await state.wake.wait()
            state.wake.clear()
            if self._closing.is_set():
                return
            if state.pending is not None:
                try:
                    settled = await self.attempt(name)
                except Exception:
                    # A bug or an answer nobody foresaw must not end witnessing for good
                    # (nor another witness's loop): logged, kept, retried with backoff.
                    log.exception("witness_attempt_failed", witness=name)
                    settled = False
                if settled:
                    backoff.reset()
                    delay = None
                else:
                    delay = backoff.next_delay()
            self.check_alarm(name)

    async def aclose(self) -> None:
        """Stop submitting and recording; the composition root calls it before the stop
        is recorded (nothing may follow ``daemon_stop``), the sink queue again at close."""
        self._closing.set()
        for state in self.states.values():
            state.wake.set()


async def open_submitter(
    witnesses: Sequence[Any], audit: AuditLog, notice: Callable[[str, str], None]
) -> WitnessSubmitter | None:
    """The submitter for the config's ``[[witness]]`` tables (None without any, or
    without a signing key: then no checkpoint has a root to submit), its state rebuilt."""
    if not witnesses or audit.signer is None:
        return None
    targets = [
        WitnessTarget(w.name, w.url, CosignerVerifier.parse(w.vkey), w.timeout_s, w.alarm_after_s)
        for w in witnesses
    ]
    submitter = WitnessSubmitter(targets, audit, notice)
    await submitter.start()
    return submitter
