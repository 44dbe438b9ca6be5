"""The daemon's command intake: signed commands in, judged, recorded first, then handled.

Commands reach the daemon two ways, judged alike by :meth:`CommandIntake.submit`:

* MQTT: the MQTT sink subscribes (QoS 1) to ``{prefix}/v1/{site}/{room}/cmd/#`` and hands
  every message to the intake (daemon/mqtt/sink.py). A retained message is refused
  (``retained``) without being read: a retained command would be delivered again at every
  reconnect of every subscriber, for as long as the broker keeps it.
* The inbox (``[commands] inbox``): a directory polled every ``inbox_poll_s``; each regular
  file is read (at most ``MAX_COMMAND_BYTES`` + 1 bytes, never through a link), judged,
  and moved to ``accepted/`` or ``rejected/`` beside it once the verdict is on disk
  (nothing is deleted). A SIGKILL between the read and the move leaves the file in the
  inbox: the next start judges it again; if it had been accepted, its nonce was rebuilt
  from the log and the same bytes are moved to ``accepted/`` without being acted on twice.
  What waits in the inbox at start is read, judged and handled in one pass before
  :attr:`CommandIntake.first_read` is set; the daemon polls its devices only after that
  (bounded, daemon/app.py), so a prescription and the day's output factor dropped there
  before the start (``iortd demo`` does) govern the console's first check at READY.

Judging (:func:`iortd.auditlog.command.check_command`, then here: a known kind this daemon
has no handler for is ``no_handler``; a full queue of accepted commands is ``busy``):

* accepted: a ``command_accepted`` entry (kind, signer, nonce, issued/expires, the raw
  bytes' SHA-256, the body's top-level keys and SHA-256 or the handler's own summary; never
  the raw payload) is appended (durable) and the nonce booked *before* anything else; the
  handler runs once the entry is on disk (bounded by ``HANDLER_TIMEOUT_S``); a handler
  that fails is recorded (``command_failed``), never retried.
* refused: nothing changes; the reason is counted (:attr:`CommandIntake.counts`), and,
  up to ``max_per_minute`` a minute, recorded as ``command_rejected`` (reason, detail,
  SHA-256, size, source) and reported on ``events`` (a ``daemon_notice`` whose answer
  fields, daemon/answers.py, name the bytes' SHA-256; its detail never names a refused
  envelope's unknown fields, auditlog/command.py). Beyond that,
  one ``command_rejected_summary`` a minute (and at the stop) carries the counts by
  reason: a flood costs a counter increment each, not a log entry each.

The nonces of every command accepted within the last ``MAX_TTL_S`` + skew are rebuilt from
the log at start (:meth:`CommandIntake.rebuild_nonces`), so a replay across a restart is
refused like any other; if the log cannot be read back, there are no commands this run
(said loudly) rather than a chance of a replay. The keyring is loaded once at start and
recorded (``keyring_loaded``: its SHA-256, holders, roles and windows; no keys).

A crash between the record and the handler leaves an accepted command whose handler did
not run (and whose nonce is booked): a handler (item 3's prescription verification, later
acknowledgements) must rebuild what it needs from the ``command_accepted`` entries at start
rather than rely on having run once.

``ping`` is built in: a documented no-op a sender uses to check its set-up end to end
(key enrolled, role, clocks, broker ACL): accepted, recorded, answered on ``events``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import stat
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import structlog

from iortd.auditlog.canonical import canonical
from iortd.auditlog.command import (
    MAX_COMMAND_BYTES,
    MAX_TTL_S,
    ROLES_FOR_KIND,
    Command,
    CommandRejected,
    NonceBook,
    RejectReason,
    check_command,
)
from iortd.auditlog.keyring import Keyring, load_keyring, parse_utc
from iortd.auditlog.logdir import SEGMENT_RE, LogDamaged, read_segment, segment_paths
from iortd.auditlog.writer import AuditLog, AuditLogClosed
from iortd.daemon.answers import answered
from iortd.daemon.config import Config
from iortd.kernel.durable import fsync_dir
from iortd.kernel.timefmt import utc_ts

__all__ = [
    "HANDLER_TIMEOUT_S",
    "CommandIntake",
    "Handler",
    "Verdict",
    "open_intake",
    "rebuild_or_off",
    "resume_commands",
]

log = structlog.get_logger("iortd.commands")

HANDLER_TIMEOUT_S = 10.0
DISPATCH_QUEUE = 64
SUMMARY_WINDOW_S = 60.0
ACCEPTED_DIR, REJECTED_DIR = "accepted", "rejected"

# A handler gets the accepted command once its entry is on disk.
Handler = Callable[[Command], Awaitable[None]]
Summary = Callable[[Mapping[str, Any]], Mapping[str, Any]]


def _default_summary(body: Mapping[str, Any]) -> dict[str, Any]:
    """What is recorded of a body by default: its shape and hash, never its values."""
    return {
        "body_keys": sorted(body)[:32],
        "body_sha256": hashlib.sha256(canonical(dict(body))).hexdigest(),
    }


@dataclass(frozen=True, slots=True)
class Verdict:
    """What :meth:`CommandIntake.submit` decided; ``recorded`` resolves once the verdict's
    entry is on disk (None: nothing was recorded one by one, e.g. a summarised refusal)."""

    command: Command | None
    reason: RejectReason | None
    recorded: asyncio.Future[None] | None = None
    redelivered: bool = False  # the same bytes as an accepted command (a crashed inbox)


class CommandIntake:
    def __init__(
        self,
        keyring: Keyring,
        audit: AuditLog,
        *,
        site: str,
        room: str,
        skew_s: float,
        max_per_minute: int,
        notice: Callable[[str, str], None],
        now: Callable[[], datetime] | None = None,
        monotonic: Callable[[], float] | None = None,
    ) -> None:
        self.keyring = keyring
        self._audit = audit
        self.site, self.room = site, room
        self.skew_s = skew_s
        self.max_per_minute = max_per_minute
        self._notice = notice
        self._now = now or (lambda: datetime.now(UTC))
        loop_time = asyncio.get_running_loop().time
        self._mono = monotonic or loop_time
        self.seen = NonceBook(skew_s)
        self._accepted_sha: dict[str, str] = {}  # nonce -> raw sha256 (inbox redelivery)
        self._accepted_rec: dict[str, asyncio.Future[None]] = {}  # nonce -> its record (this run)
        self._handlers: dict[str, tuple[Handler, Summary]] = {}
        self._queue: asyncio.Queue[tuple[Command, asyncio.Future[None], Handler]] = asyncio.Queue(
            DISPATCH_QUEUE
        )
        self.counts: Counter[str] = Counter()  # refusals by reason, since start
        self.accepted = 0
        self._window_start = self._mono()
        self._reported = 0
        self._suppressed: Counter[str] = Counter()
        self._closed = False  # the run ended: nothing more is recorded (daemon_stop follows)
        # Set once what waited in the inbox at start is judged and handled (or there is
        # no inbox): the daemon starts its devices after it (daemon/app.py).
        self.first_read = asyncio.Event()
        self.command_sinks: list[Any] = []  # the sinks commands come through (MQTT's)
        self.register("ping", self._ping)

    # ---- set-up ------------------------------------------------------------------------

    def register(self, kind: str, handler: Handler, summary: Summary | None = None) -> None:
        """Handle ``kind`` (a kind of auditlog/command.py's role table); ``summary`` says
        what of a body is recorded (default: its keys and hash). One handler per kind."""
        if kind not in ROLES_FOR_KIND:
            raise ValueError(f"{kind!r} is not a command kind (auditlog/command.py)")
        if kind in self._handlers and kind != "ping":
            raise ValueError(f"a handler for {kind!r} is registered already")
        self._handlers[kind] = (handler, summary or _default_summary)

    def record_loaded(self) -> None:
        """``keyring_loaded``: the keyring's hash, holders and roles (no keys)."""
        data = {**self.keyring.summary(), "path_name": self.keyring.path.name}
        self._audit.append("keyring_loaded", data, durable=True)
        log.info("keyring_loaded", sha256=self.keyring.sha256, keys=len(self.keyring.entries))

    def rebuild_nonces(self, directory: Path) -> int:
        """Book the nonces of the commands the log accepted that could still be replayed
        (blocking: run it in a thread at start). Returns how many were booked."""
        now = self._now()
        cutoff = now - timedelta(seconds=MAX_TTL_S + self.skew_s)
        booked = 0
        for path in reversed(segment_paths(directory)):
            for line in read_segment(path).splitlines():
                if b'"type":"command_accepted"' not in line:
                    continue
                booked += self._book_line(line, now)
            m = SEGMENT_RE.match(path.name)
            if m and m.group(2) < cutoff.strftime("%Y%m%d"):
                break  # this segment began before the window: older ones are older still
        self.seen.prune(now)
        return booked

    def _book_line(self, line: bytes, now: datetime) -> int:
        try:
            data = orjson.loads(line)["data"]
            nonce, expires = str(data["nonce"]), parse_utc(data["expires_at"])
        except (ValueError, KeyError, TypeError):
            return 0  # not ours to judge here: iort-audit verify reports a bad entry
        self.seen.add(nonce, expires)
        self._accepted_sha[nonce] = str(data.get("sha256", ""))
        return 1

    # ---- judging -------------------------------------------------------------------------

    def submit(
        self, raw: bytes, *, source: str, retained: bool = False, topic_kind: str | None = None
    ) -> Verdict:
        """Judge one command now (never waits); records and queues an accepted one.
        ``topic_kind``: the last level of its MQTT topic, which must be its kind (so that a
        broker ACL per command topic means what it says)."""
        if source == "inbox":
            sha = hashlib.sha256(raw).hexdigest()
            nonce = next((n for n, h in self._accepted_sha.items() if h == sha), None)
            if nonce is not None:
                # Accepted before (a crash left it in the inbox, or its record was not on
                # disk in time): filed as accepted once that acceptance is on disk, whatever
                # it would be judged now (expired since, its key's window closed).
                recorded = self._accepted_rec.get(nonce)  # None: from the log, on disk
                return Verdict(None, RejectReason.replayed, recorded, redelivered=True)
        try:
            cmd, handled = self._judge(raw, retained, topic_kind)
        except CommandRejected as exc:
            return Verdict(None, exc.reason, self._refused(exc, raw, source))
        return Verdict(cmd, None, self._accept(cmd, handled, source))

    def _judge(
        self, raw: bytes, retained: bool, topic_kind: str | None
    ) -> tuple[Command, tuple[Handler, Summary]]:
        if retained:
            raise CommandRejected(
                RejectReason.retained,
                "a retained message on a command topic (it would replay at every "
                "reconnect); clear it and send commands without the retain flag",
            )
        cmd = check_command(
            raw,
            self.keyring,
            site=self.site,
            room=self.room,
            now=self._now(),
            skew_s=self.skew_s,
            seen=self.seen,
        )
        if topic_kind is not None and topic_kind != cmd.kind:
            raise CommandRejected(
                RejectReason.wrong_topic, f"a {cmd.kind!r} command on cmd/{topic_kind[:40]!r}"
            )
        handled = self._handlers.get(cmd.kind)
        if handled is None:
            raise CommandRejected(
                RejectReason.no_handler, f"this daemon does not handle {cmd.kind!r} yet"
            )
        if self._queue.full():
            raise CommandRejected(RejectReason.busy, "too many commands in progress")
        return cmd, handled

    def from_mqtt(self, topic_kind: str, raw: bytes, retained: bool) -> None:
        """The MQTT sink's ``on_command``; after the intake's run ended, dropped (the
        sender's command expires; nothing may follow ``daemon_stop`` in the log)."""
        if self._closed:
            log.warning("command_after_stop_ignored", source="mqtt")
            return
        self.submit(raw, source="mqtt", retained=retained, topic_kind=topic_kind)

    def _accept(
        self, cmd: Command, handled: tuple[Handler, Summary], source: str
    ) -> asyncio.Future[None]:
        handler, summary = handled
        try:
            shown = dict(summary(cmd.body))
        except Exception:  # a summary must not turn an accepted command into a crash
            log.exception("command_summary_failed", kind=cmd.kind)
            shown = _default_summary(cmd.body)
        data = {
            "kind": cmd.kind,
            "signer": cmd.signer,
            "nonce": cmd.nonce,
            "issued_at": utc_ts(cmd.issued_at),
            "expires_at": utc_ts(cmd.expires_at),
            "sha256": cmd.sha256,
            "source": source,
            "body": shown,
        }
        entry = self._audit.append("command_accepted", data, durable=True)
        self.seen.prune(self._now())  # memory bounded by the commands still valid
        self.seen.add(cmd.nonce, cmd.expires_at)
        self._accepted_sha = {n: h for n, h in self._accepted_sha.items() if n in self.seen}
        self._accepted_rec = {n: f for n, f in self._accepted_rec.items() if n in self.seen}
        self._accepted_sha[cmd.nonce] = cmd.sha256
        self._accepted_rec[cmd.nonce] = entry.committed
        self.accepted += 1
        self._queue.put_nowait((cmd, entry.committed, handler))
        log.info("command_accepted", kind=cmd.kind, signer=cmd.signer, nonce=cmd.nonce)
        return entry.committed

    def _refused(
        self, exc: CommandRejected, raw: bytes, source: str
    ) -> asyncio.Future[None] | None:
        reason = exc.reason
        self.counts[reason] += 1
        self._roll_window()
        if self._reported >= self.max_per_minute:
            self._suppressed[reason] += 1
            return None
        self._reported += 1
        sha = hashlib.sha256(raw).hexdigest()
        data = {
            "reason": str(reason),
            "detail": exc.detail[:300],
            "sha256": sha,
            "size": len(raw),
            "source": source,
        }
        log.warning("command_rejected", reason=str(reason), sha256=sha, source=source)
        said = f"command refused ({reason}): {exc.detail[:200]} [sha256 {sha[:16]}]"
        self._notice("info", answered(said, "refused", sha256=sha, reason=str(reason)))
        try:
            return self._audit.append("command_rejected", data, durable=True).committed
        except AuditLogClosed:
            return None

    def _roll_window(self) -> None:
        if self._mono() - self._window_start >= SUMMARY_WINDOW_S:
            self.flush_summary()
            self._window_start = self._mono()
            self._reported = 0

    def flush_summary(self) -> None:
        """One ``command_rejected_summary`` for the refusals not recorded one by one."""
        if not self._suppressed:
            return
        counts = dict(sorted((str(k), v) for k, v in self._suppressed.items()))
        total = sum(counts.values())
        self._suppressed.clear()
        data = {"counts": counts, "total": total, "window_s": SUMMARY_WINDOW_S}
        with contextlib.suppress(AuditLogClosed):
            self._audit.append("command_rejected_summary", data, durable=True)
        log.warning("command_rejected_summary", **data)
        self._notice(
            "critical",
            f"{total} more commands refused in the last minute, by reason: {counts} "
            "(a flood on the command topic or a misconfigured sender)",
        )

    # ---- the task --------------------------------------------------------------------------

    async def run(
        self, stop: asyncio.Event, inbox: Path | None = None, poll_s: float = 1.0
    ) -> None:
        """Handle accepted commands, close each minute's summary, read the inbox; until
        ``stop`` (then the pending summary is recorded)."""
        if inbox is not None:
            problem = await asyncio.to_thread(_prepare_inbox, inbox)
            if problem is not None:
                # Not a reason to stop the record: the inbox is off, said loudly.
                log.error("inbox_unusable", problem=problem)
                self._notice("critical", f"command inbox not read: {problem}")
                inbox = None
        try:
            try:
                await self._first_read(inbox)
            except Exception:
                log.exception("commands_error")  # as below: the record goes on regardless
            finally:
                self.first_read.set()
            while not stop.is_set():
                try:
                    await self._step(stop, inbox, poll_s)
                except Exception:
                    # A bug here must not take the daemon (and its record) down with it.
                    log.exception("commands_error")
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(max(poll_s, 1.0)):
                            await stop.wait()
        finally:
            self._closed = True
            self.flush_summary()

    async def _first_read(self, inbox: Path | None) -> None:
        """What waits in the inbox at start, judged, recorded and handled now rather than
        one command per poll: a prescription and the day's output factor put there before
        the start are in force before the first check at READY."""
        if inbox is not None:
            await self._read_inbox(inbox)
        while not self._queue.empty():
            await self._handle(*self._queue.get_nowait())

    async def _step(self, stop: asyncio.Event, inbox: Path | None, poll_s: float) -> None:
        window_left = SUMMARY_WINDOW_S - (self._mono() - self._window_start)
        timeout = max(0.01, min(poll_s if inbox is not None else window_left, window_left))
        getter = asyncio.ensure_future(self._queue.get())
        stopper = asyncio.ensure_future(stop.wait())
        try:
            await asyncio.wait(
                {getter, stopper}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            stopper.cancel()
            if not getter.done():
                getter.cancel()
        if getter.done() and not getter.cancelled():
            await self._handle(*getter.result())
        self._roll_window()
        if inbox is not None and not stop.is_set():
            await self._read_inbox(inbox)

    async def _handle(self, cmd: Command, recorded: asyncio.Future[None], handler: Handler) -> None:
        try:
            async with asyncio.timeout(HANDLER_TIMEOUT_S):
                # The record first; shielded: its future is the whole group commit's, and
                # a timeout here must not cancel it under the commands sharing it.
                await asyncio.shield(recorded)
                await handler(cmd)
        except (Exception, asyncio.CancelledError) as exc:
            task = asyncio.current_task()
            if isinstance(exc, asyncio.CancelledError) and task and task.cancelling():
                raise  # the intake is being stopped
            # Otherwise a future cancelled under this command (not the intake): this
            # command failed, and the intake goes on taking the others.
            log.exception("command_failed", kind=cmd.kind, nonce=cmd.nonce)
            data = {"kind": cmd.kind, "nonce": cmd.nonce, "error": type(exc).__name__}
            with contextlib.suppress(AuditLogClosed):
                self._audit.append("command_failed", data, durable=True)
            # Ends with the nonce as every handler's answer does, so that a sender waiting
            # for its answer (the dashboard) hears this one at once.
            said = (
                f"command {cmd.kind} failed: {type(exc).__name__}; accepted but not carried "
                f"out [nonce {cmd.nonce}]"
            )
            failed = answered(
                said, "failed", kind=cmd.kind, nonce=cmd.nonce, reason=type(exc).__name__
            )
            self._notice("critical", failed)

    async def _ping(self, cmd: Command) -> None:
        issued = utc_ts(cmd.issued_at)
        said = f"ping from {cmd.signer} accepted (nonce {cmd.nonce}, issued {issued})"
        self._notice("info", answered(said, "done", kind="ping", nonce=cmd.nonce))

    # ---- the inbox -------------------------------------------------------------------------

    async def _read_inbox(self, inbox: Path) -> None:
        try:
            await self._read_inbox_files(inbox)
        except OSError as exc:
            # The directory gone, unreadable, on a failing disk: retried at the next poll;
            # the daemon's record goes on whatever the inbox does.
            log.warning("inbox_unreadable", error=exc.strerror)

    async def _read_inbox_files(self, inbox: Path) -> None:
        for path in await asyncio.to_thread(_inbox_files, inbox):
            raw = await asyncio.to_thread(_read_bounded, path)
            if raw is None:
                continue  # gone, or not a regular file: left where it is, logged
            verdict = self.submit(raw, source="inbox")
            if verdict.recorded is not None:
                with contextlib.suppress(Exception):
                    async with asyncio.timeout(HANDLER_TIMEOUT_S):
                        await asyncio.shield(verdict.recorded)  # on disk before the move
                r = verdict.recorded
                if not r.done() or r.cancelled() or r.exception() is not None:
                    continue  # not on disk (yet): left in the inbox, judged again later
            ok = verdict.command is not None or verdict.redelivered
            await asyncio.to_thread(_move, path, inbox / (ACCEPTED_DIR if ok else REJECTED_DIR))


async def open_intake(
    config: Config, audit: AuditLog, notice: Callable[[str, str], None], sinks: Sequence[Any]
) -> CommandIntake | None:
    """The intake ``[commands]`` asks for (None without a keyring): the keyring loaded, the
    nonces rebuilt from the log (before any sink runs, so no command can overtake them) and
    the MQTT sink's ``on_command`` set. Raises KeyringError."""
    c = config.commands
    if c.keyring is None:
        return None
    keyring = await asyncio.to_thread(load_keyring, c.keyring)
    intake = CommandIntake(
        keyring,
        audit,
        site=config.site.id,
        room=config.site.room,
        skew_s=c.clock_skew_s,
        max_per_minute=c.max_per_minute,
        notice=notice,
    )
    try:
        booked = await asyncio.to_thread(intake.rebuild_nonces, config.log.directory)
    except (OSError, LogDamaged) as exc:
        # Without the nonces a replay could pass: no commands this run, said loudly; the
        # monitoring and its record go on.
        log.error("commands_off", reason=f"nonces not rebuilt from the log: {exc}")  # noqa: TRY400
        notice("critical", "signed commands are OFF this run: the log could not be read back")
        return None
    log.info("command_nonces_rebuilt", booked=booked)
    for sink in sinks:
        inner = getattr(sink, "inner", sink)
        if hasattr(inner, "on_command"):
            inner.on_command = intake.from_mqtt
            intake.command_sinks.append(inner)
    return intake


def _prepare_inbox(inbox: Path) -> str | None:
    """``accepted/`` and ``rejected/`` made; why the inbox cannot be used, or None. A
    link in their place is refused: files would be moved to wherever it points."""
    try:
        for sub in (ACCEPTED_DIR, REJECTED_DIR):
            d = inbox / sub
            if d.is_symlink():
                return f"{d} is a symbolic link; make it a directory"
            d.mkdir(mode=0o750, parents=True, exist_ok=True)
    except OSError as exc:
        return f"{exc.filename}: {exc.strerror}"
    return None


def _inbox_files(inbox: Path) -> list[Path]:
    """Regular files (not hidden: a sender writes ``.name`` then renames it), oldest first."""
    found = []
    with os.scandir(inbox) as it:
        for e in it:
            if e.name.startswith(".") or not e.is_file(follow_symlinks=False):
                continue
            found.append((e.stat(follow_symlinks=False).st_mtime_ns, e.name))
    return [inbox / name for _, name in sorted(found)[:100]]


def _read_bounded(path: Path) -> bytes | None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as exc:
        log.warning("inbox_unreadable", error=exc.strerror)
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        with os.fdopen(fd, "rb", closefd=False) as f:
            return f.read(MAX_COMMAND_BYTES + 1)
    finally:
        os.close(fd)


def _move(path: Path, into: Path) -> None:
    """Into ``into`` under a free name (never over another file), then the rename made
    durable: a crash after this leaves the file judged and moved, or still in the inbox."""
    if into.is_symlink():
        log.error("inbox_move_refused", reason=f"{into.name}/ became a symbolic link")
        return
    target = into / path.name
    n = 0
    while target.exists():
        n += 1
        target = into / f"{path.name}.{n}"
    try:
        os.rename(path, target)
        fsync_dir(into)
    except OSError as exc:
        log.error("inbox_move_failed", error=exc.strerror)  # noqa: TRY400 - the reason is enough


async def resume_commands(what: str, orphans: Sequence[Command], handle: Handler) -> None:
    """Judge now, one by one, the commands of one kind that a crash left accepted but
    unhandled (each handler's ``resume``): each bounded like the intake bounds a handler;
    one that fails is logged (``{what}_resume_failed``) and the others go on: the record
    goes on, and the sender, who saw no answer, sends again."""
    for cmd in orphans:
        log.warning(f"{what}_resumed", nonce=cmd.nonce)
        try:
            async with asyncio.timeout(HANDLER_TIMEOUT_S):
                await handle(cmd)
        except Exception:
            log.exception(f"{what}_resume_failed", nonce=cmd.nonce)


async def rebuild_or_off(
    event: str, what: str, rebuild: Callable[[], int], notice: Callable[[str, str], None]
) -> int | None:
    """A handler's state rebuilt from the log (``rebuild``, blocking: in a thread); what
    it returns, or None when the log cannot be read back: then ``{event}_off`` is logged
    and a critical notice says that ``what`` is OFF this run (the handler is not installed:
    one judged without its state could accept what it must not)."""
    try:
        return await asyncio.to_thread(rebuild)
    except (OSError, LogDamaged) as exc:
        log.error(f"{event}_off", reason=f"not rebuilt from the log: {exc}")  # noqa: TRY400
        notice("critical", f"{what} OFF this run: the log could not be read")
        return None
