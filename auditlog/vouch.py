"""How far this daemon's own signatures vouch for the log it finds at start-up.

After every group commit the writer signs (size, head hash) as the seal (writer.py); a
checkpoint is signed into the log and into the ``checkpoint`` file. After a crash, entries
beyond the last seal (or, if the seal is missing or does not verify with this daemon's
key, beyond the last valid checkpoint file or checkpoint entry) were not vouched for by any
signature: anyone with write access could have written them. :func:`vouch` says how many
entries are vouched for and by what; recovery reports the rest as *unvouched*.

It also refuses to start on a log that is behind its own seal or checkpoint file (a
restored backup, a truncation, a replaced log): signing on would make a fork.
:class:`LogRolledBack` names what was found and how to continue deliberately
(``--accept-log-rollback``, which is recorded in the log).

A seal or checkpoint file that is missing, unreadable or signed by another key vouches for
nothing and is listed in the report's ``anchor_problems``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from iortd.auditlog.canonical import open_line
from iortd.auditlog.logdir import (
    CHECKPOINT_FILE,
    SEAL_FILE,
    entry_seq,
    hash_at,
    read_anchor,
    read_segment,
)
from iortd.auditlog.note import Checkpoint, NoteError, Verifier

__all__ = ["LogRolledBack", "Vouch", "check_anchors_without_log", "vouch"]


class LogRolledBack(RuntimeError):
    """The log is behind this daemon's own seal or checkpoint file: a restored backup, a
    truncation, or a replaced log. Starting on it would sign a fork."""


@dataclass(slots=True)
class Vouch:
    count: int | None  # entries vouched for (0 .. count-1); None without a key
    by: str = "none"
    problems: list[str] = field(default_factory=list)
    rollback: dict[str, Any] | None = None


def anchors(
    directory: Path, verifier: Verifier, origin: str | None, problems: list[str]
) -> list[tuple[str, Checkpoint]]:
    """The seal and the checkpoint file, when present and signed by ``verifier`` for this
    log; anything else there is listed in ``problems`` (and vouches for nothing)."""
    out: list[tuple[str, Checkpoint]] = []
    for name, what in ((SEAL_FILE, "seal"), (CHECKPOINT_FILE, "checkpoint file")):
        try:
            text = read_anchor(directory / name)
            if text is None:
                problems.append(f"{what}: missing")
                continue
            cp, signed = Checkpoint.parse_verified(text, verifier)
        except NoteError as exc:
            problems.append(f"{what}: {exc}")
            continue
        if not signed:
            problems.append(f"{what}: not signed by this daemon's key ({verifier.name})")
            continue
        out.append((what, cp))  # another origin, signed by our key: the log was replaced
    return out


def check_anchors_without_log(
    directory: Path, verifier: Verifier | None, accept_rollback: bool
) -> None:
    """No log at all, but a seal or checkpoint file of ours: the log was deleted."""
    if verifier is None:
        return
    found = anchors(directory, verifier, None, [])
    if found and not accept_rollback:
        what, cp = found[0]
        raise rolled_back(
            directory, f"the directory has no log, but its {what} covers {cp.count} entries"
        )


def rolled_back(directory: Path, why: str) -> LogRolledBack:
    return LogRolledBack(
        f"{directory}: {why}: the log is behind what this daemon signed (a restored "
        "backup, a truncation, or a replaced log). Not starting: signing it would make a "
        "fork. Keep the directory as evidence and check it with `iort-audit verify`; to "
        "continue on this log deliberately, start once with --accept-log-rollback (it is "
        "recorded in the log)."
    )


def vouch(
    directory: Path,
    segments: list[Path],
    origin: str,
    head: tuple[int, str],
    verifier: Verifier | None,
    accept_rollback: bool,
) -> Vouch:
    """How far this daemon's signatures vouch for the log, and whether the log is behind
    them; ``head`` is the (seq, hash) of the log's last whole entry. Raises LogRolledBack
    (unless ``accept_rollback``)."""
    if verifier is None:
        return Vouch(None)
    out = Vouch(0)
    entries = head[0] + 1
    for what, cp in anchors(directory, verifier, origin, out.problems):
        why = None
        if cp.origin != origin:
            why = f"its {what} is for log {cp.origin!r}, this log is {origin!r}"
        elif cp.count > entries:
            why = f"the log has {entries} entries, its {what} covers {cp.count}"
        elif cp.count > 0 and hash_at(segments, cp.count - 1) != cp.head_hash:
            why = f"seq {cp.count - 1} differs from its {what}"
        if why is None:
            if cp.count > (out.count or 0):
                out.count, out.by = cp.count, what
            continue
        if not accept_rollback:
            raise rolled_back(directory, why)
        out.problems.append(f"{what}: {why} (rollback accepted)")
        if out.rollback is None:
            out.rollback = {
                "why": why,
                f"{what.replace(' ', '_')}_count": cp.count,
                f"{what.replace(' ', '_')}_head": cp.head_hash,
                "log_count": entries,
                "log_head": head[1],
            }
    if (out.count or 0) < entries:
        found = last_checkpoint_entry(segments, verifier, out.count or 0)
        if found is not None:
            out.count, out.by = found, "checkpoint entry"
    return out


def last_checkpoint_entry(segments: list[Path], verifier: Verifier, floor: int) -> int | None:
    """The count vouched for by the newest checkpoint entry signed by ``verifier`` that
    covers exactly the chain before it (its own seq + 1), if above ``floor``."""
    for path in reversed(segments):
        lines = read_segment(path).splitlines()
        for raw in reversed(lines):
            seq = entry_seq(raw)
            if seq is None or seq < floor:
                return None
            if not raw.endswith(b'"type":"checkpoint"}'):
                continue
            try:
                env = open_line(raw)
                note = orjson.loads(raw).get("data", {}).get("note")
                cp, signed = Checkpoint.parse_verified(str(note), verifier)
            except (ValueError, AttributeError):
                continue
            if signed and env.hash == env.computed and cp.count == seq and cp.head_hash == env.prev:
                return seq + 1
        if int(path.name[4:20]) <= floor:
            return None
    return None
