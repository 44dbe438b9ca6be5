"""What verify checks in a log directory beyond the chain: its seal and checkpoint files,
and the entries past them.

The ``seal`` and ``checkpoint`` files must verify and match the chain: a log shorter than
them, or different at their size, is not intact (a restored older copy, a truncation, a
replaced log). Unreadable ones are warnings: a crash never leaves one half written (they
are replaced by rename), and deleting them gains a forger nothing.

Entries past the seal and every signature are *unvouched*, unless a daemon is writing the
log now and they are its current group commit. "The writer is running" is not taken on
trust from the directory's ``LOCK``: whoever can write the directory can hold a lock on a
file in it. A running daemon seals every group commit within its commit window (the last
``config_loaded`` records it), so when some process holds ``LOCK`` verify waits that window
and a margin for the seal to cover the head; if it does not, the entries past it are
unvouched like any others.
"""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Sequence
from pathlib import Path

from iortd.auditlog.findings import (
    DEFAULT_COMMIT_WINDOW_S,
    Problem,
    Unvouched,
    VerifyReport,
    entry_data,
)
from iortd.auditlog.logdir import CHECKPOINT_FILE, SEAL_FILE, SEGMENT_RE, read_anchor
from iortd.auditlog.note import Checkpoint, NoteError, Verifier

__all__ = [
    "check_anchors",
    "commit_window",
    "log_directory",
    "read_anchors",
    "unvouched_tail",
    "writer_running",
]

# How long a running daemon may take to seal its current group commit beyond its commit
# window (fsync and the signature in a worker thread, on a loaded machine).
SEAL_MARGIN_S = 2.0
MAX_COMMIT_WINDOW_S = 10.0  # config log.group_commit_ms's largest value
SEAL_POLL_S = 0.02


def log_directory(paths: Sequence[Path], files: Sequence[Path]) -> Path | None:
    """The log directory, when the user gave one (or segments all from one directory)."""
    dirs = [p for p in paths if p.is_dir()]
    if len(dirs) == 1 and len(paths) == 1:
        return dirs[0]
    parents = {p.parent for p in files}
    if not dirs and len(parents) == 1 and all(SEGMENT_RE.match(p.name) for p in files):
        return parents.pop()
    return None


def read_anchors(log_dir: Path, rep: VerifyReport) -> list[tuple[str, str, Checkpoint]]:
    """The seal and checkpoint files, parsed but not yet checked (the key is known only
    once the log is read). Unreadable ones are warnings: a crash never leaves one half
    written (they are replaced by rename), and deleting them gains a forger nothing."""
    out: list[tuple[str, str, Checkpoint]] = []
    for name, what in ((SEAL_FILE, "seal"), (CHECKPOINT_FILE, "checkpoint file")):
        path = log_dir / name
        try:
            note = read_anchor(path)
        except NoteError as exc:
            rep.warnings.append(f"{path}: the {what} cannot be used ({exc}): not used")
            continue
        if note is None:
            rep.anchors.append(f"{what}: none")
            continue
        try:
            cp, _ = Checkpoint.parse_verified(note, None)
        except NoteError as exc:
            rep.warnings.append(f"{path}: the {what} is not a signed note ({exc}): not used")
            continue
        out.append((what, note, cp))
    return out


def check_anchors(
    rep: VerifyReport,
    anchors: list[tuple[str, str, Checkpoint]],
    hashes: dict[int, str | None],
    key: Verifier | None,
    log_dir: Path,
) -> None:
    for what, note, cp in anchors:
        path = log_dir / (SEAL_FILE if what == "seal" else CHECKPOINT_FILE)
        try:
            _, signed = Checkpoint.parse_verified(note, key)
        except NoteError as exc:
            rep.warnings.append(f"{path}: the {what} does not verify ({exc}): not used")
            continue
        if not signed:
            who = key.name if key is not None else "no key (none given, none in the log)"
            rep.warnings.append(f"{path}: the {what} is not signed by {who}: not used")
            continue
        if rep.origin is not None and cp.origin != rep.origin:
            why = f"its {what} is for log {cp.origin!r}, this log is {rep.origin!r}: replaced"
            rep.problem = Problem(path, 0, None, why)
            return
        if cp.count > rep.entries:
            rep.problem = Problem(
                path,
                0,
                rep.head_seq + 1,
                f"the log has {rep.entries} entries but its {what} covers {cp.count}: "
                f"entries from seq {rep.head_seq + 1} on were removed, or the log was "
                "replaced by an older copy",
            )
            return
        if cp.count and hashes.get(cp.count - 1) != cp.head_hash:
            rep.problem = Problem(
                path,
                0,
                cp.count - 1,
                f"seq {cp.count - 1} differs from the log's {what}: the log was replaced "
                "or rewritten",
            )
            return
        rep.anchors.append(f"{what}: covers entries 0..{cp.count - 1}: consistent")
        rep.sealed_count = max(rep.sealed_count, cp.count)


def writer_running(log_dir: Path) -> bool:
    """Whether a daemon holds the directory's LOCK now (a shared lock is refused). Held
    for an instant only: a daemon starting in that instant is told the log is in use."""
    try:
        fd = os.open(log_dir / "LOCK", os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        os.close(fd)  # closing drops the lock, if it was taken
    return False


def commit_window(line: bytes) -> float:
    """The commit window a config_loaded entry records (its default if unreadable)."""
    config = entry_data(line).get("config")
    log = config.get("log") if isinstance(config, dict) else None
    ms = log.get("group_commit_ms") if isinstance(log, dict) else None
    if isinstance(ms, bool) or not isinstance(ms, int | float) or not ms > 0:
        return DEFAULT_COMMIT_WINDOW_S
    return min(float(ms) / 1000, MAX_COMMIT_WINDOW_S)


def _sealed_within_window(rep: VerifyReport, log_dir: Path, key: Verifier | None) -> bool:
    """Whether the seal comes to cover the head within the commit window and the margin,
    as it does behind a running daemon: signed by ``key``, for this log, and covering at
    least the head, with the head's hash if it ends there (if it covers more, the daemon
    has written on; the next verify checks those)."""
    deadline = time.monotonic() + rep.commit_window_s + SEAL_MARGIN_S
    while True:
        try:
            text = read_anchor(log_dir / SEAL_FILE)
            cp, signed = Checkpoint.parse_verified(text, key) if text else (None, False)
        except NoteError:
            cp, signed = None, False
        if (
            cp is not None
            and signed
            and cp.origin == rep.origin
            and (
                cp.count > rep.head_seq + 1
                or (cp.count == rep.head_seq + 1 and cp.head_hash == rep.head_hash)
            )
        ):
            return True
        if time.monotonic() >= deadline:
            return False
        # A bounded poll of a file another process replaces: there is nothing to wait on.
        time.sleep(SEAL_POLL_S)


def unvouched_tail(rep: VerifyReport, log_dir: Path, key: Verifier | None) -> None:
    """Entries past the seal and every signature: the running daemon's current commit
    (sealed within its window), or entries nobody vouches for."""
    if not (rep.signing_key_recorded or rep.checkpoints):
        rep.warnings.append(
            "the log was never signed (no key recorded): its chain proves nothing against "
            "anyone who can write the directory"
        )
        return
    vouched = max(rep.sealed_count - 1, rep.signed_through)
    if rep.head_seq <= vouched:
        return
    rep.writer_running = writer_running(log_dir)
    if rep.writer_running:
        if _sealed_within_window(rep, log_dir, key):
            return  # the current group commit: sealed within the window
        rep.writer_running = False
        rep.unvouched.append(
            Unvouched(
                vouched + 1,
                rep.head_seq,
                "after the last seal and signature: a process holds the log directory's "
                f"LOCK, but no seal covered them within {rep.commit_window_s + SEAL_MARGIN_S:g} "
                "s, as one would behind a running daemon (a lock held by someone else, or a "
                "daemon that cannot write)",
                None,
            )
        )
        return
    rep.unvouched.append(
        Unvouched(
            vouched + 1,
            rep.head_seq,
            "after the last seal and signature, and no daemon is writing the log (a crash "
            "not yet recovered, or entries added since)",
            None,
        )
    )
