"""Verification of an audit log, for auditors: the chain, the seqs, every signature, and
(given a checkpoint held somewhere else) that the log still contains what it covered.

Stops at the first problem and names it: file, line, seq and what is wrong.

Beyond the chain, when it reads a log directory: the ``seal`` and ``checkpoint`` files
there must verify and match the chain (a log shorter than them, or different at their
size, is not intact: a restored older copy, a truncation); entries no signature vouches
for are listed as *unvouched* — those a ``recovery`` entry recorded after a crash, and
those beyond the seal of a log whose writer is not running. The chain can be intact and
such entries still not be genuine: the command says so and exits 1. Timestamps that go
backwards are reported as warnings (a clock step), not as breaks.

The Merkle tree (issue 20) is recomputed in the same pass: one more SHA-256 per line (its
leaf) and the frontier (merkle.py's, its carries inlined in the loop). A checkpoint entry
whose data says ``tree: "rfc6962"`` must hold a tree checkpoint whose root is the tree's
over the entries before it; one without must hold a chain-head checkpoint (note.py): the
log says which, never the bytes. A tree seal, checkpoint file or ``--checkpoint`` copy
must have the tree's root at its size as well as the chain's head.

How a line is read: by the bytes of its envelope when it has the writer's exact form, with
no JSON parse; otherwise parsed whole, and then it must be its own canonical JSON
(lineform.py). Either way every check above is made on it.

The checks of the directory's own files, and of a writer that may be running, are in
dircheck.py; the report and its parts in findings.py.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import orjson

from iortd.auditlog.canonical import ZERO_HASH
from iortd.auditlog.dircheck import (
    check_anchors,
    commit_window,
    log_directory,
    read_anchors,
    unvouched_tail,
)
from iortd.auditlog.findings import Problem, Unvouched, VerifyReport, entry_data
from iortd.auditlog.lineform import (
    ALTERED,
    DATA_KEY,
    ENVELOPE,
    HASH_KEY,
    PARSED_KINDS,
    chain_problem,
    read_entry,
    tail_seq,
)
from iortd.auditlog.logdir import SEGMENT_RE, segment_paths
from iortd.auditlog.marker import read_marker
from iortd.auditlog.merkle import Frontier
from iortd.auditlog.note import Checkpoint, NoteError, Verifier
from iortd.auditlog.segments import SegmentError, open_segment
from iortd.auditlog.union import find_archive, merge, missing_segment

__all__ = [
    "Problem",
    "Unvouched",
    "VerifyReport",
    "collect_files",
    "iter_entries",
    "unvouched_deliveries",
    "verify_log",
]

CLOCK_STEPS_LISTED = 5  # backward steps named one by one; the rest are counted


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
    archive: Path | None = None,
) -> VerifyReport:
    """``external``: one or more signed notes held elsewhere (e.g. every checkpoint a
    subscriber saved); the log must contain, unchanged, what each of them covered.
    ``archive``: where retention archived the log's segments; the union of both places
    is verified as one log (union.py)."""
    rep = VerifyReport(files=collect_files(paths))
    if archive is not None:
        archive = find_archive(archive, log_directory(paths, rep.files))
        if not _merge_archive(rep, archive):
            return rep
    if not rep.files:
        rep.problem = Problem(Path(*paths[:1]) if paths else Path(), 0, None, "no log files found")
        return rep
    ext_cps: list[Checkpoint] = []
    ext_ignored: dict[str, None] = {}  # signatures by other keys (witnesses'), in order
    for note in [external] if isinstance(external, str) else external or ():
        try:
            got = Checkpoint.read(note, pubkey)
        except NoteError as exc:
            rep.problem = Problem(rep.files[0], 0, None, f"checkpoint held elsewhere: {exc}")
            return rep
        ext_cp, signed = got.checkpoint, got.signed
        if got.ignored:
            ext_ignored[got.ignored_summary()] = None
        if not signed:
            rep.problem = Problem(
                rep.files[0], 0, None, "checkpoint held elsewhere is not signed by --pubkey"
            )
            return rep
        ext_cps.append(ext_cp)
    ext_cps.sort(key=lambda c: c.count, reverse=True)  # the one covering most is checked first
    ext_hash_at: dict[int, str] = {}
    ext_seqs = {c.count - 1 for c in ext_cps}
    log_dir = log_directory(paths, rep.files)
    anchors = read_anchors(log_dir, rep) if log_dir is not None else []
    if anchors:
        # Listed again after the seal was read: a daemon writing the log seals entries
        # only once they are on disk, so every segment holding what the seal covers exists
        # now (it may have started one since the first listing: by size, or at midnight).
        rep.files = collect_files(paths)
        if archive is not None and not _merge_archive(rep, archive):
            return rep
    anchor_hashes: dict[int, str | None] = {cp.count - 1: None for _, _, cp in anchors}
    roots: dict[int, str] = {}  # count -> the tree's root (hex), at the anchors' sizes
    root_sizes = {c.count for c in ext_cps if c.root} | {c.count for *_, c in anchors if c.root}
    stack: list[bytes] = []  # the tree's frontier: merkle.Frontier's hashes, inlined
    last_ts = b""
    log_key: Verifier | None = None
    prev_b, expect_seq, seq_b = ZERO_HASH.encode(), 0, b"0"
    watch = ext_seqs | set(anchor_hashes) | {c - 1 for c in root_sizes}
    done_bytes = 0
    sha256 = hashlib.sha256
    # The hot loop: a block of a segment in memory (bounded: segments.py), lines split in
    # C, locals only. Per line of the writer's fast shape (lineform.py): the SHA-256 of
    # the line minus its hash field, the leaf's, the frontier's carries, and the envelope
    # compared in place with the prev and seq expected; no parse. Any other line is
    # parsed whole and must be its own canonical form.
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
            # From the data's end (the last "}" but the line's own) to the end of the line.
            m = ENVELOPE.fullmatch(line, line.rfind(b"}", 0, -1))
            if m is not None:
                claimed, prev_seen, seq_seen, ts, kind_b = m.groups()
            if (
                m is not None
                and prev_seen == prev_b
                and seq_seen == seq_b
                and expect_seq
                and kind_b not in PARSED_KINDS
                and line.startswith(DATA_KEY)
            ):
                # The fast shape: prev and seq are the ones expected, the rest as written.
                at = m.start(1) - 9
                h = sha256(line[:at])
                h.update(line[at + 74 :])
                seq = expect_seq
                if h.hexdigest().encode() != claimed:
                    rep.problem = Problem(path, n, seq, ALTERED)
                    break
                if ts < last_ts:
                    _clock_back(rep, path, n, seq, last_ts.decode(), ts.decode(), kind_b.decode())
                last_ts = ts
            else:
                at = line.rfind(HASH_KEY)
                end = at + 73
                if at < 0 or line[end : end + 2] != b'",':
                    rep.problem = Problem(path, n, None, "not a log entry (no hash field)")
                    break
                h = sha256(line[:at])
                h.update(line[end + 1 :])
                claimed = line[at + 9 : end]
                if h.hexdigest().encode() != claimed:
                    rep.problem = Problem(path, n, tail_seq(line, end), ALTERED)
                    break
                try:
                    entry, seq, _prev, ts_text, kind = read_entry(line)
                except ValueError as exc:
                    rep.problem = Problem(path, n, None, f"not a log entry ({exc})")
                    break
                ts = ts_text.encode()  # UTF-8 keeps the order of the text
                what = chain_problem(entry, line, expect_seq, prev_b)
                if what is None and seq != expect_seq:
                    what = _seq_problem(seq, expect_seq, n, archive, log_dir)
                if what is not None:
                    rep.problem = Problem(path, n, seq, what)
                    break
                if seq == 0:
                    rep.origin = entry_data(line).get("origin")
                elif kind == "daemon_start":
                    key_text = entry_data(line).get("verifier_key")
                    log_key = None
                    if isinstance(key_text, str):
                        rep.signing_key_recorded = True
                        try:
                            log_key = Verifier.parse(key_text)
                        except NoteError:
                            rep.warnings.append(
                                f"{path}:{n}: unreadable verifier_key in daemon_start"
                            )
                elif kind == "checkpoint":
                    frontier = Frontier.restore(seq, stack)
                    bad_cp = _check_checkpoint(
                        line, seq, prev_b.decode(), rep, pubkey, log_key, frontier
                    )
                    if bad_cp is not None:
                        rep.problem = Problem(path, n, seq, bad_cp)
                        break
                elif kind == "recovery":
                    _note_recovery(line, seq, rep)
                elif kind == "config_loaded":
                    rep.commit_window_s = commit_window(line)
                elif kind == "log_rollback_accepted":
                    rep.warnings.append(
                        f"{path}:{n} (seq {seq}): the daemon was started on a log behind its "
                        f"own seal or checkpoint (--accept-log-rollback): "
                        f"{entry_data(line).get('why')}"
                    )
                if ts < last_ts:
                    _clock_back(rep, path, n, seq, last_ts.decode(), ts.decode(), kind)
                last_ts = ts
            # The leaf (RFC 6962: SHA-256 of 0x00 || line) and the frontier's carries, as
            # Frontier.append does: leaf number seq merges one subtree per trailing 1 bit.
            leaf = sha256(b"\x00" + line).digest()
            k = seq
            while k & 1:
                leaf = sha256(b"\x01" + stack.pop() + leaf).digest()
                k >>= 1
            stack.append(leaf)
            if seq in watch:
                if seq + 1 in root_sizes:
                    roots[seq + 1] = Frontier.restore(seq + 1, stack).root().hex()
                if seq in ext_seqs:
                    ext_hash_at[seq] = claimed.decode()
                if seq in anchor_hashes:
                    anchor_hashes[seq] = claimed.decode()
            prev_b, expect_seq = claimed, seq + 1
            seq_b = b"%d" % expect_seq
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
    rep.head_seq, rep.head_hash = expect_seq - 1, prev_b.decode()
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
        elif ext_cp.root is not None and roots.get(ext_cp.count) != ext_cp.root:
            rep.problem = Problem(
                last,
                0,
                ext_cp.count - 1,
                f"the checkpoint held elsewhere has root {ext_cp.root[:16]}... at "
                f"{ext_cp.count} entries, the tree of the log's entries has "
                f"{roots.get(ext_cp.count, '?')[:16]}...: the log was rewritten",
            )
    if rep.problem is None and ext_cps:
        latest = ext_cps[0].count - 1
        rep.external_checkpoint = (
            f"covers entries 0..{latest}: consistent"
            if len(ext_cps) == 1
            else f"{len(ext_cps)} checkpoints, the latest covering entries 0..{latest}: "
            "all consistent"
        )
        if ext_ignored:
            # C2SP signed-note: signatures by keys the verifier was not given are ignored;
            # said, so that nobody takes a listed cosignature for a checked one.
            rep.external_checkpoint += (
                "; signatures by keys not given, ignored (not checked): " + "; ".join(ext_ignored)
            )
    if rep.problem is None and log_dir is not None:
        check_anchors(rep, anchors, anchor_hashes, pubkey or log_key, log_dir)
        _check_anchor_roots(rep, anchors, roots, pubkey or log_key, log_dir)
    if rep.problem is None and pubkey is not None and rep.checkpoints_by_pubkey == 0:
        rep.problem = Problem(
            rep.files[-1],
            0,
            None,
            f"no checkpoint in the log is signed by --pubkey ({pubkey.name}): nothing shows "
            "that these entries were written by that key's daemon",
        )
    if rep.problem is None and log_dir is not None:
        unvouched_tail(rep, log_dir, pubkey or log_key)
    if rep.clock_steps_back > CLOCK_STEPS_LISTED:
        rep.warnings.append(
            f"{rep.clock_steps_back - CLOCK_STEPS_LISTED} more backward steps of the entries' ts"
        )
    return rep


def _seq_problem(
    seq: int, expect_seq: int, n: int, archive: Path | None, log_dir: Path | None
) -> str:
    return (
        missing_segment(expect_seq, seq, archive)
        if archive is not None and n == 1 and seq > expect_seq
        else f"the log starts at seq {seq}, not 0: give the whole log (its directory),"
        f" or earlier segments are missing{_archived_hint(log_dir)}"
        if expect_seq == 0
        else f"seq {seq} where {expect_seq} was expected: an entry is missing, "
        "inserted or out of order"
    )


def _check_anchor_roots(
    rep: VerifyReport,
    anchors: Sequence[tuple[str, str, Checkpoint]],
    roots: dict[int, str],
    key: Verifier | None,
    log_dir: Path,
) -> None:
    """A tree seal or checkpoint file signed by ``key`` (check_anchors has matched its
    head) must also have the tree's root at its size."""
    if rep.problem is not None:
        return
    for name, note, cp in anchors:
        if cp.root is None or cp.count > rep.entries or cp.count not in roots:
            continue
        try:
            signed = Checkpoint.parse_verified(note, key)[1]
        except NoteError:
            continue
        if signed and roots[cp.count] != cp.root:
            rep.problem = Problem(
                log_dir / name,
                0,
                cp.count - 1,
                f"the {name} file has root {cp.root[:16]}... at {cp.count} entries, the tree "
                f"of the log's entries has {roots[cp.count][:16]}...: its entries were "
                "rewritten, or it was signed over other entries",
            )
            return


def _merge_archive(rep: VerifyReport, archive: Path) -> bool:
    """rep.files becomes the union with the archive; False (and rep.problem) when a
    segment in both places differs."""
    union = merge(rep.files, archive)
    rep.files, rep.archive = union.files, archive
    rep.archive_counts = (union.local, union.archived, union.both)
    rep.problem = union.problem
    return union.problem is None


def _archived_hint(log_dir: Path | None) -> str:
    marker = None if log_dir is None else read_marker(log_dir)
    where = None if marker is None else marker.get("archive")
    if not isinstance(where, str):
        return ""
    return (
        f" (this directory's retention marker says they were archived to {where}: "
        "verify with --archive)"
    )


# ---- recovery entries, clock steps, deliveries in unvouched ranges, checkpoint entries ----


def _note_recovery(line: bytes, seq: int, rep: VerifyReport) -> None:
    u = entry_data(line).get("unvouched")
    if not isinstance(u, dict):
        return
    first, last = u.get("first_seq"), u.get("last_seq")
    if isinstance(first, int) and isinstance(last, int) and 0 <= first <= last < seq:
        rep.unvouched.append(
            Unvouched(first, last, "written after the last seal before a crash", seq)
        )
    else:
        rep.warnings.append(f"seq {seq}: recovery entry with an unreadable unvouched range")


def _clock_back(
    rep: VerifyReport, path: Path, n: int, seq: int, before: str, ts: str, kind: str
) -> None:
    rep.clock_steps_back += 1
    if rep.clock_steps_back <= CLOCK_STEPS_LISTED:
        said = " (recorded by this clock_step entry)" if kind == "clock_step" else ""
        rep.warnings.append(
            f"{path}:{n} (seq {seq}): ts goes backwards, from {before} to {ts}{said}: the "
            "wall clock was stepped back; order is by seq, durations by mono_ns"
        )


def unvouched_deliveries(files: Sequence[Path], ranges: Sequence[Unvouched]) -> dict[str, str]:
    """Each delivery whose records span an unvouched range: delivery id -> the ranges, as
    text (a second pass over the log, made only when there are such ranges).

    A delivery's span runs from its first entry to its last, or to the end of the log when
    it has no ``delivery_terminated``: a delivery continued across a restart spans the
    crashed run's unvouched tail even when no entry there names it (a forger can strip or
    change the ids in that range, and what the delivery's record says about the time of
    that tail rests on it either way)."""
    if not ranges:
        return {}
    spans: dict[str, list[int]] = {}  # id -> [first seq, last seq, ended (0/1)]
    head = -1
    for _path, _n, raw in iter_entries(files):
        at = raw.rfind(b',"seq":')
        if at < 0:
            continue
        try:
            seq = int(raw[at + 7 : raw.find(b",", at + 7)])
        except ValueError:
            continue
        head = max(head, seq)
        did = _delivery_id(raw)
        if did is None:
            continue
        span = spans.get(did)
        if span is None:
            spans[did] = [seq, seq, 0]
        else:
            span[0], span[1] = min(span[0], seq), max(span[1], seq)
        if raw.endswith(b'"type":"delivery_terminated"}'):
            spans[did][2] = 1
    out: dict[str, str] = {}
    for did, (lo, last, ended) in spans.items():
        hi = last if ended else head
        hit = [
            f"seq {u.first_seq}..{u.last_seq}"
            for u in ranges
            if u.first_seq <= hi and lo <= u.last_seq
        ]
        if hit:
            out[did] = ", ".join(dict.fromkeys(hit))
    return out


def _delivery_id(raw: bytes) -> str | None:
    """The envelope's delivery_id (it sorts right before "hash"), read without parsing the
    data; a full parse when the line does not have the plain form."""
    if b'"delivery_id":' not in raw:
        return None
    h = raw.rfind(b',"hash":"')
    d = raw.rfind(b',"delivery_id":"', 0, h)
    if d >= 0 and h > 0 and raw[h - 1 : h] == b'"':
        value = raw[d + 16 : h - 1]
        if b'"' not in value and b"\\" not in value:
            return value.decode("utf-8", "replace")
    try:
        entry = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    did = entry.get("delivery_id") if isinstance(entry, dict) else None
    return did if isinstance(did, str) else None


def _check_checkpoint(
    line: bytes,
    seq: int,
    prev_hash: str,
    rep: VerifyReport,
    pubkey: Verifier | None,
    log_key: Verifier | None,
    frontier: Frontier,
) -> str | None:
    data = entry_data(line)
    note, tree = data.get("note"), data.get("tree")
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
    # Which kind it is, the entry says (data.tree); the note must be of that kind.
    if tree is not None and (tree != "rfc6962" or cp.root is None):
        return f"checkpoint entry says tree {tree!r}, its note is not an RFC 6962 tree checkpoint"
    if tree is None and cp.root is not None:
        return "checkpoint entry names no tree, its note is a tree checkpoint"
    if cp.root is not None and cp.root != (ours := frontier.root().hex()):
        return (
            f"checkpoint has root {cp.root[:16]}... at {seq} entries, the tree of the entries "
            f"before it has root {ours[:16]}...: the signed root is not this log's tree"
        )
    rep.checkpoints += 1
    rep.signed_through = seq  # the entries before it, and itself (it holds the signature)
    if pubkey is not None:
        rep.checkpoints_by_pubkey += 1
    return None
