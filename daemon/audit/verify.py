"""Verification of an audit log, for auditors: the chain, the seqs, every signature, and
(given a checkpoint held somewhere else) that the log still contains what it covered.

Stops at the first problem and names it: file, line, seq and what is wrong.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from daemon.audit.canonical import ZERO_HASH
from daemon.audit.note import Checkpoint, NoteError, Verifier
from daemon.audit.segments import SegmentError, open_segment
from daemon.audit.writer import SEGMENT_RE, segment_paths

_HASH_KEY = b',"hash":"'

__all__ = ["Problem", "VerifyReport", "collect_files", "iter_entries", "verify_log"]


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
    external_checkpoint: str | None = None  # what was established about it
    warnings: list[str] = field(default_factory=list)
    problem: Problem | None = None

    @property
    def intact(self) -> bool:
        return self.problem is None


def collect_files(paths: Sequence[Path]) -> list[Path]:
    """Segments named by the user: directories expand to their segments in chain order;
    files named one by one are put in chain order by name. A file the user names through a
    symbolic link is read where it points (segments inside a directory never are:
    segments.py)."""
    out: list[Path] = []
    for p in paths:
        if p.is_dir():
            out.extend(segment_paths(p))
        elif p.is_symlink():
            out.append(p.resolve())
        else:
            out.append(p)
    named = [p for p in out if SEGMENT_RE.match(p.name)]
    if named:
        # e.g. `verify LOGDIR/*`: LOCK, checkpoint and quarantine/ are not segments
        return sorted(named, key=lambda p: p.name)
    return out


def iter_entries(files: Sequence[Path]) -> Iterator[tuple[Path, int, bytes]]:
    """(file, line number, line with its newline); an incomplete last line is yielded as
    is, so that the caller sees it. Stops at a segment that cannot be read as lines (not a
    regular file, a line too long: segments.py); verify_log names the problem."""
    for path in files:
        try:
            with open_segment(path) as seg:
                for n, raw in seg.lines():
                    yield path, n, raw
        except SegmentError:
            return


def verify_log(
    paths: Sequence[Path],
    *,
    pubkey: Verifier | None = None,
    external: str | Sequence[str] | None = None,
    progress: Callable[[int], None] | None = None,
) -> VerifyReport:
    """``external``: one or more signed notes held elsewhere (e.g. every checkpoint a
    subscriber saved); the log must contain, unchanged, what each of them covered."""
    rep = VerifyReport(files=collect_files(paths))
    if not rep.files:
        rep.problem = Problem(Path(*paths[:1]) if paths else Path(), 0, None, "no log files found")
        return rep
    ext_cps: list[Checkpoint] = []
    for note in [external] if isinstance(external, str) else external or ():
        try:
            ext_cp, signed = Checkpoint.parse_verified(note, pubkey)
        except NoteError as exc:
            rep.problem = Problem(rep.files[0], 0, None, f"checkpoint held elsewhere: {exc}")
            return rep
        if not signed:
            rep.problem = Problem(
                rep.files[0], 0, None, "checkpoint held elsewhere is not signed by --pubkey"
            )
            return rep
        ext_cps.append(ext_cp)
    ext_cps.sort(key=lambda c: c.count, reverse=True)  # the one covering most is checked first
    ext_hash_at: dict[int, str] = {}
    ext_seqs = {c.count - 1 for c in ext_cps}
    log_key: Verifier | None = None
    prev_hash, expect_seq = ZERO_HASH, 0
    done_bytes = 0
    sha256, loads = hashlib.sha256, orjson.loads
    # The hot loop: a block of a segment in memory (bounded: segments.py), lines split in
    # C, locals only. Per line: one SHA-256 over the line minus its hash field, and a parse
    # of the short envelope tail (mono_ns, prev, seq, ts, type) - never of the data.
    for path in rep.files:
        try:
            seg = open_segment(path)
        except SegmentError as exc:
            rep.problem = Problem(path, exc.line, None, exc.what)
            break
        n = 0
        for n, line in enumerate(seg.flat(), start=1):
            if progress is not None and not n & 0x3FFF:  # every 16k lines, within a segment
                progress(done_bytes + seg.consumed)
            at = line.rfind(_HASH_KEY)
            end = at + 73
            if at < 0 or line[end : end + 2] != b'",':
                rep.problem = Problem(path, n, None, "not a log entry (no hash field)")
                break
            h = sha256(line[:at])
            h.update(line[end + 1 :])
            try:
                claimed = line[at + 9 : end].decode("ascii")
                tail = loads(b"{" + line[end + 2 :])
                seq, prev, kind = tail["seq"], tail["prev"], tail["type"]
            except (ValueError, KeyError, TypeError) as exc:
                rep.problem = Problem(path, n, None, f"not a log entry ({exc})")
                break
            if h.hexdigest() != claimed:
                rep.problem = Problem(
                    path, n, seq, "hash does not match the entry's content: the entry was altered"
                )
                break
            if seq != expect_seq:
                what = (
                    f"the log starts at seq {seq}, not 0: give the whole log (its directory),"
                    " or earlier segments are missing"
                    if expect_seq == 0
                    else f"seq {seq} where {expect_seq} was expected: an entry is missing, "
                    "inserted or out of order"
                )
                rep.problem = Problem(path, n, seq, what)
                break
            if prev != prev_hash:
                rep.problem = Problem(
                    path, n, seq, f"prev does not match the hash of seq {expect_seq - 1}"
                )
                break
            if seq == 0:
                if kind != "log_created":
                    rep.problem = Problem(path, n, 0, "the log does not start with log_created")
                    break
                rep.origin = _data(line).get("origin")
            elif kind == "daemon_start":
                key_text = _data(line).get("verifier_key")
                log_key = None
                if isinstance(key_text, str):
                    try:
                        log_key = Verifier.parse(key_text)
                    except NoteError:
                        rep.warnings.append(f"{path}:{n}: unreadable verifier_key in daemon_start")
            elif kind == "checkpoint":
                bad = _check_checkpoint(line, seq, prev_hash, rep, pubkey, log_key)
                if bad is not None:
                    rep.problem = Problem(path, n, seq, bad)
                    break
            if seq in ext_seqs:
                ext_hash_at[seq] = claimed
            prev_hash, expect_seq = claimed, seq + 1
        else:
            if seg.error is not None:
                rep.problem = Problem(path, seg.error.line, None, seg.error.what)
            elif seg.torn:
                rep.problem = Problem(
                    path, n + 1, None, "incomplete last line: the file was truncated"
                )
        seg.close()
        done_bytes += seg.consumed
        if progress is not None:
            progress(done_bytes)
        if rep.problem is not None:
            break
    rep.entries = expect_seq
    rep.head_seq, rep.head_hash = expect_seq - 1, prev_hash
    rep.bytes = done_bytes
    if rep.problem is None and rep.entries == 0:
        rep.problem = Problem(rep.files[0], 0, None, "no entries: a log starts with log_created")
    for ext_cp in ext_cps:
        if rep.problem is not None:
            break
        last = rep.files[-1]
        if rep.origin is not None and ext_cp.origin != rep.origin:
            rep.problem = Problem(
                last,
                0,
                None,
                f"checkpoint held elsewhere is for log {ext_cp.origin!r}, "
                f"this log is {rep.origin!r}: the log was replaced",
            )
        elif rep.entries < ext_cp.count:
            rep.problem = Problem(
                last,
                0,
                rep.head_seq + 1,
                f"the log has {rep.entries} entries but a checkpoint held elsewhere covers "
                f"{ext_cp.count}: entries from seq {rep.head_seq + 1} on were removed",
            )
        elif ext_hash_at.get(ext_cp.count - 1) != ext_cp.head_hash:
            rep.problem = Problem(
                last,
                0,
                ext_cp.count - 1,
                f"seq {ext_cp.count - 1} differs from the checkpoint held elsewhere: the log "
                "was replaced or rewritten",
            )
    if rep.problem is None and ext_cps:
        latest = ext_cps[0].count - 1
        rep.external_checkpoint = (
            f"covers entries 0..{latest}: consistent"
            if len(ext_cps) == 1
            else f"{len(ext_cps)} checkpoints, the latest covering entries 0..{latest}: "
            "all consistent"
        )
    if rep.problem is None and pubkey is not None and rep.checkpoints_by_pubkey == 0:
        rep.problem = Problem(
            rep.files[-1],
            0,
            None,
            f"no checkpoint in the log is signed by --pubkey ({pubkey.name}): nothing shows "
            "that these entries were written by that key's daemon",
        )
    return rep


def _data(line: bytes) -> dict[str, Any]:
    """The data of an entry whose hash already checked out; {} if it is not an object
    (a forger can make a well-chained entry of anything: the checks that use it fail)."""
    try:
        entry = orjson.loads(line)
    except orjson.JSONDecodeError:
        return {}
    data = entry.get("data") if isinstance(entry, dict) else None
    return data if isinstance(data, dict) else {}


def _check_checkpoint(
    line: bytes,
    seq: int,
    prev_hash: str,
    rep: VerifyReport,
    pubkey: Verifier | None,
    log_key: Verifier | None,
) -> str | None:
    note = _data(line).get("note")
    if not isinstance(note, str):
        return "checkpoint entry holds no note"
    key = pubkey or log_key
    try:
        cp, signed = Checkpoint.parse_verified(note, key)
    except NoteError as exc:
        return str(exc)
    if not signed:
        who = "--pubkey" if pubkey else "the key recorded in daemon_start"
        return f"checkpoint is not signed by {who}"
    if cp.count != seq or cp.head_hash != prev_hash:
        return (
            f"checkpoint covers {cp.count} entries with head {cp.head_hash[:16]}..., but the "
            f"chain has head {prev_hash[:16]}... at {seq} entries: entries before it were "
            "rewritten"
        )
    if rep.origin is not None and cp.origin != rep.origin:
        return f"checkpoint origin {cp.origin!r} is not this log's {rep.origin!r}"
    rep.checkpoints += 1
    rep.signed_through = seq  # the entries before it, and itself (it holds the signature)
    if pubkey is not None:
        rep.checkpoints_by_pubkey += 1
    return None
