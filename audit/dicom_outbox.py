"""The DICOM sink's outbox: what is still to be handed to each destination, on disk.

Layout, under the sink's ``state_dir`` (``LOG_DIR/sinks/NAME``; the log's lock makes the
daemon its only writer)::

    outbox/DEST/UID.dcm     the instance (DICOM file bytes; holds the real Patient ID)
    outbox/DEST/UID.json    its state: delivery, what, SOP class, stage, attempts, ...
    pending/KEY.json        a delivery to hand off whose instances are not built yet

Every directory is 0700 and every file 0600 (the instances hold the real Patient ID and
the plan's UID: the only place besides the protected store and the wire where they are).
A directory found open to others is closed at :meth:`Outbox.open`; a link or anything but
a directory where one is expected is refused (nothing is written through it).

Crash safety (each write is a temporary file, fsync'd, renamed, the directory fsync'd):

* an entry exists once its ``.json`` exists; the ``.dcm`` is written first, so an entry
  always has its instance. A ``.dcm`` without a ``.json`` (a crash between the two) is
  removed at open: the pending delivery it came from is still there and builds it again;
* removal goes the other way (``.json`` first);
* a pending file is removed only after every entry it produced is on disk.

Names: a destination name is a slug (``[a-z0-9][a-z0-9_-]{0,31}``) and a SOP Instance UID
is digits and dots: neither is patient data, and neither can climb out of the directory.
Blocking: call from a worker thread.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import stat
import threading
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Final

import orjson
import structlog

from iortd.kernel.durable import fsync_dir, write_all

__all__ = ["DEST_RE", "UID_RE", "Entry", "Outbox", "OutboxError", "Pending", "write_private"]

log = structlog.get_logger("iortd.dicom")

DEST_RE: Final = re.compile(r"[a-z0-9][a-z0-9_-]{0,31}")
UID_RE: Final = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))+")
MAX_STATE_BYTES: Final = 64 * 1024
MAX_INSTANCE_BYTES: Final = 256 * 1024 * 1024


class OutboxError(Exception):
    """The outbox cannot be used (a link, a file where a directory goes, no permission)."""


@dataclass(frozen=True, slots=True)
class Entry:
    """One instance for one destination."""

    destination: str
    sop_instance_uid: str
    sop_class_uid: str
    what: str  # record | report
    delivery_id: str
    queued_at: float  # POSIX seconds (wall clock: it must mean something after a restart)
    stage: str = "store"  # store | commit (stored; waiting for the commitment)
    attempts: int = 0
    alarmed: bool = False  # the overdue alarm was raised (once per entry)


@dataclass(frozen=True, slots=True)
class Pending:
    """A delivery to hand off whose instances are not built yet."""

    delivery_id: str
    trigger: str  # termination | amended | signed:MEANING
    since: float  # POSIX seconds
    failures: int = 0
    alarmed: bool = False  # the overdue alarm was raised

    @property
    def key(self) -> str:
        return hashlib.sha256(f"{self.delivery_id}\n{self.trigger}".encode()).hexdigest()[:32]


def write_private(path: Path, data: bytes) -> None:
    """``path`` replaced by ``data``, 0600, durable (temporary file, fsync, rename, fsync
    of the directory); a link planted under the temporary name is never followed."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        os.fchmod(fd, 0o600)  # whatever the umask
        write_all(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    tmp.replace(path)
    fsync_dir(path.parent)


def _read_regular(path: Path, limit: int) -> bytes:
    """A regular file's bytes, not following a link; OutboxError if it is not one."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise OutboxError(f"{path}: cannot be read: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size > limit:
            raise OutboxError(f"{path}: not a regular file of at most {limit} bytes")
        with os.fdopen(os.dup(fd), "rb") as f:
            return f.read(limit + 1)
    finally:
        os.close(fd)


def _private_dir(path: Path) -> None:
    """``path`` exists as a directory of ours, 0700 (created, or closed if it was open)."""
    try:
        os.mkdir(path, 0o700)
        fsync_dir(path.parent)
    except FileExistsError:
        pass
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise OutboxError(f"{path}: not a directory (a link or a file is in its place)")
    if st.st_uid != os.geteuid():
        raise OutboxError(f"{path}: owned by another user (uid {st.st_uid})")
    if stat.S_IMODE(st.st_mode) != 0o700:
        os.chmod(path, 0o700)
        log.warning("dicom_outbox_dir_closed", path=str(path), was=oct(stat.S_IMODE(st.st_mode)))


class Outbox:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.entries_dir = root / "outbox"
        self.pending_dir = root / "pending"

    def open(self, destinations: list[str]) -> None:
        """Create (or close) the directories; remove what a crash left half-written."""
        self.root.parent.mkdir(parents=True, exist_ok=True)
        st = os.lstat(self.root.parent)  # LOG_DIR/sinks: a link would take the files elsewhere
        if not stat.S_ISDIR(st.st_mode):
            raise OutboxError(
                f"{self.root.parent}: not a directory (a link or a file is in its place)"
            )
        for d in (self.root, self.entries_dir, self.pending_dir):
            _private_dir(d)
        for name in destinations:
            if not DEST_RE.fullmatch(name):
                raise OutboxError(f"destination name {name!r} is not a slug")
            _private_dir(self.entries_dir / name)
        for d in [self.pending_dir, *self.entries_dir.iterdir()]:
            for f in d.iterdir() if d.is_dir() and not d.is_symlink() else ():
                if f.name.startswith(".") and f.name.endswith(".tmp"):
                    f.unlink()  # a write a crash cut short
                elif f.suffix == ".dcm" and not f.with_suffix(".json").exists():
                    f.unlink()  # an instance whose entry was never written
                    log.info("dicom_outbox_orphan_removed", file=f.name)

    # ---- entries ---------------------------------------------------------------------

    def _paths(self, destination: str, uid: str) -> tuple[Path, Path]:
        if not DEST_RE.fullmatch(destination) or not UID_RE.fullmatch(uid) or len(uid) > 64:
            raise OutboxError(f"not an outbox name: {destination!r}/{uid!r}")
        d = self.entries_dir / destination
        return d / f"{uid}.dcm", d / f"{uid}.json"

    def add(self, entry: Entry, instance: bytes) -> bool:
        """Put ``entry`` and its instance on disk; False (nothing changed) when that
        instance is queued for that destination already."""
        dcm, js = self._paths(entry.destination, entry.sop_instance_uid)
        if js.exists():
            return False
        write_private(dcm, instance)
        write_private(js, orjson.dumps(asdict(entry)))
        return True

    def update(self, entry: Entry) -> None:
        _, js = self._paths(entry.destination, entry.sop_instance_uid)
        write_private(js, orjson.dumps(asdict(entry)))

    def remove(self, entry: Entry) -> None:
        dcm, js = self._paths(entry.destination, entry.sop_instance_uid)
        with contextlib.suppress(FileNotFoundError):
            js.unlink()
        fsync_dir(js.parent)
        with contextlib.suppress(FileNotFoundError):
            dcm.unlink()

    def instance(self, entry: Entry) -> bytes:
        dcm, _ = self._paths(entry.destination, entry.sop_instance_uid)
        return _read_regular(dcm, MAX_INSTANCE_BYTES)

    def orphans(self, destinations: list[str]) -> dict[str, int]:
        """Entry counts of destination directories the config no longer names."""
        if not self.entries_dir.is_dir():
            return {}
        return {
            d.name: n
            for d in sorted(self.entries_dir.iterdir())
            if d.is_dir() and d.name not in destinations and (n := len(list(d.glob("*.json"))))
        }

    def load(self, destinations: list[str]) -> list[Entry]:
        """Every entry of the configured destinations, oldest first. An entry that does not
        parse is set aside (renamed ``.bad``), logged, never sent."""
        out: list[Entry] = []
        for name in destinations:
            for js in sorted((self.entries_dir / name).glob("*.json")):
                try:
                    e = Entry(**_object(_read_regular(js, MAX_STATE_BYTES)))
                    if (e.destination, f"{e.sop_instance_uid}.json") != (name, js.name):
                        raise OutboxError("entry names another file")  # noqa: TRY301
                    out.append(e)
                except (OutboxError, TypeError, ValueError) as exc:
                    log.error("dicom_outbox_entry_bad", file=f"{name}/{js.name}", error=str(exc))  # noqa: TRY400
                    js.rename(js.with_suffix(".bad"))
        return sorted(out, key=lambda e: (e.queued_at, e.destination, e.sop_instance_uid))

    # ---- pending deliveries ------------------------------------------------------------

    def add_pending(self, p: Pending) -> None:
        path = self.pending_dir / f"{p.key}.json"
        if not path.exists():
            write_private(path, orjson.dumps(asdict(p)))

    def update_pending(self, p: Pending) -> None:
        write_private(self.pending_dir / f"{p.key}.json", orjson.dumps(asdict(p)))

    def remove_pending(self, p: Pending) -> None:
        with contextlib.suppress(FileNotFoundError):
            (self.pending_dir / f"{p.key}.json").unlink()
        fsync_dir(self.pending_dir)

    def pending(self) -> list[Pending]:
        out = []
        for path in sorted(self.pending_dir.glob("*.json")):
            try:
                p = Pending(**_object(_read_regular(path, MAX_STATE_BYTES)))
                if f"{p.key}.json" != path.name:
                    raise OutboxError("pending entry names another file")  # noqa: TRY301
                out.append(p)
            except (OutboxError, TypeError, ValueError) as exc:
                log.error("dicom_pending_bad", file=path.name, error=str(exc))  # noqa: TRY400
                path.rename(path.with_suffix(".bad"))
        return sorted(out, key=lambda p: p.since)


def _object(raw: bytes) -> dict[str, Any]:
    obj = orjson.loads(raw)
    if not isinstance(obj, dict):
        raise TypeError("not a JSON object")
    return obj


def bumped(entry: Entry, **changes: Any) -> Entry:
    return replace(entry, **changes)
