"""What verify finds: the report of :func:`~iortd.auditlog.verify.verify_log` and its parts.

A :class:`Problem` is the first thing that makes the log not intact (file, line, seq and
what is wrong); an :class:`Unvouched` range is entries whose chain is intact but that no
signature vouches for as genuine; :class:`VerifyReport` holds both, the log's head, what
the seal and checkpoint files said, and the warnings (clock steps, unusable anchors). The
auditors' tools (audit/) read this report; the checks that fill it are in verify.py (the
chain, checkpoints, recovery entries) and dircheck.py (the log directory's own files).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from iortd.auditlog.canonical import ZERO_HASH

__all__ = ["DEFAULT_COMMIT_WINDOW_S", "Problem", "Unvouched", "VerifyReport", "entry_data"]

DEFAULT_COMMIT_WINDOW_S = 0.05  # config log.group_commit_ms's default


@dataclass(frozen=True, slots=True)
class Problem:
    file: Path
    line: int  # 1-based; 0 when the problem is the log as a whole
    seq: int | None
    what: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else str(self.file)
        seq = f" (seq {self.seq})" if self.seq is not None else ""
        return f"{where}{seq}: {self.what}"


@dataclass(frozen=True, slots=True)
class Unvouched:
    """Entries first_seq..last_seq that no signature vouches for as genuine."""

    first_seq: int
    last_seq: int
    why: str
    recorded_at: int | None  # seq of the recovery entry that recorded them; None: found now

    @property
    def count(self) -> int:
        return self.last_seq - self.first_seq + 1

    def __str__(self) -> str:
        n = self.count
        where = (
            f"recorded by the recovery entry at seq {self.recorded_at}"
            if self.recorded_at is not None
            else "found now"
        )
        return (
            f"seq {self.first_seq}..{self.last_seq} ({n} {'entry' if n == 1 else 'entries'}) "
            f"{self.why}; {where}; not covered by any signature as genuine"
        )


@dataclass(slots=True)
class VerifyReport:
    files: list[Path] = field(default_factory=list)
    entries: int = 0
    bytes: int = 0
    origin: str | None = None
    head_seq: int = -1
    head_hash: str = ZERO_HASH
    checkpoints: int = 0
    checkpoints_by_pubkey: int = 0
    signed_through: int = -1  # last seq covered by a verified checkpoint (its own seq)
    sealed_count: int = 0  # entries covered by the directory's valid seal/checkpoint file
    external_checkpoint: str | None = None  # what was established about it
    warnings: list[str] = field(default_factory=list)
    problem: Problem | None = None
    unvouched: list[Unvouched] = field(default_factory=list)
    anchors: list[str] = field(default_factory=list)  # seal/checkpoint file findings
    clock_steps_back: int = 0
    signing_key_recorded: bool = False  # some daemon_start names a verifier key
    writer_running: bool | None = None  # None: not a log directory
    commit_window_s: float = DEFAULT_COMMIT_WINDOW_S  # as the last config_loaded records it
    archive: Path | None = None  # the log's archive directory, when verified with it
    archive_counts: tuple[int, int, int] | None = None  # segments: local, archived, both

    @property
    def intact(self) -> bool:
        return self.problem is None

    @property
    def vouched(self) -> bool:
        """Intact, and every entry vouched for (or the writer is live)."""
        return self.intact and not self.unvouched


def entry_data(line: bytes) -> dict[str, Any]:
    """The data of an entry whose hash already checked out; {} if it is not an object
    (a forger can make a well-chained entry of anything: the checks that use it fail)."""
    try:
        entry = orjson.loads(line)
    except orjson.JSONDecodeError:
        return {}
    data = entry.get("data") if isinstance(entry, dict) else None
    return data if isinstance(data, dict) else {}
