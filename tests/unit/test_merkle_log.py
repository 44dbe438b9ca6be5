"""Rebuilding the frontier from a log directory (auditlog/merkle_log.py).

Against the committed real log (tests/fixtures/golden-log) and against small logs written
here with the log's own canonical form (several segments), the frontier read from the
segments must equal one built from each line with hashlib alone; partial rebuilds (the
frontier after N entries), resuming from a saved frontier, and every refusal (a torn
tail, a gap, a log that does not start at seq 0, a line that is not an entry, a link in
place of a segment) are checked, each refusal naming the file and line.
"""

from __future__ import annotations

import hashlib
import itertools
import os
from pathlib import Path

import pytest

from iortd.auditlog.canonical import ZERO_HASH, canonical, seal
from iortd.auditlog.merkle import Frontier, root_of
from iortd.auditlog.merkle_log import RebuildError, rebuild_frontier
from iortd.auditlog.segments import BLOCK_BYTES

GOLDEN = Path(__file__).resolve().parents[1] / "fixtures" / "golden-log" / "log"


def independent_root(lines: list[bytes]) -> bytes:
    """MTH with hashlib only, RFC 6962 §2.1, over the lines without their newline."""

    def mth(d: list[bytes]) -> bytes:
        if not d:
            return hashlib.sha256(b"").digest()
        if len(d) == 1:
            return hashlib.sha256(b"\x00" + d[0]).digest()
        k = 1 << ((len(d) - 1).bit_length() - 1)
        return hashlib.sha256(b"\x01" + mth(d[:k]) + mth(d[k:])).digest()

    return mth(lines)


def entry_lines(n: int, pad: int = 0) -> list[bytes]:
    """n chained entries in the log's canonical form, each line with its newline."""
    out, prev = [], ZERO_HASH
    for seq in range(n):
        body = canonical(
            {
                "data": {"i": seq, "pad": "x" * pad},
                "mono_ns": seq,
                "prev": prev,
                "seq": seq,
                "ts": "2026-12-06T10:00:00.000000Z",
                "type": "log_created" if seq == 0 else "sample",
            }
        )
        line, prev = seal(body)
        out.append(line)
    return out


def write_log(directory: Path, lines: list[bytes], cuts: list[int]) -> list[Path]:
    """Segments starting at seq 0 and at each cut."""
    directory.mkdir(exist_ok=True)
    paths = []
    starts = [0, *cuts, len(lines)]
    for a, b in itertools.pairwise(starts):
        p = directory / f"log-{a:016d}-20261206.jsonl"
        p.write_bytes(b"".join(lines[a:b]))
        paths.append(p)
    return paths


def test_the_golden_log_rebuilds_to_the_independent_root() -> None:
    lines = [
        line
        for p in sorted(GOLDEN.glob("log-*.jsonl"))
        for line in p.read_bytes().split(b"\n")[:-1]
    ]
    assert len(lines) > 50
    f = rebuild_frontier(sorted(GOLDEN.glob("log-*.jsonl")))
    assert f.size == len(lines)
    assert f.root() == independent_root(lines)


def test_across_segments_and_the_frontier_after_n_entries(tmp_path: Path) -> None:
    lines = entry_lines(23)
    files = write_log(tmp_path, lines, [7, 16])
    bare = [x[:-1] for x in lines]
    assert rebuild_frontier(files).root() == independent_root(bare)
    for n in (0, 1, 7, 8, 16, 22, 23):
        f = rebuild_frontier(files, upto=n)
        assert (f.size, f.root()) == (n, independent_root(bare[:n]))
    with pytest.raises(RebuildError, match="holds 23 entries, not 24"):
        rebuild_frontier(files, upto=24)


def test_resuming_from_a_saved_frontier_reads_only_what_follows(tmp_path: Path) -> None:
    lines = entry_lines(30)
    files = write_log(tmp_path, lines, [10, 20])
    saved = rebuild_frontier(files, upto=12)
    # The first segment is not read at all: make it unreadable to prove it.
    files[0].write_bytes(b"garbage\n")
    f = rebuild_frontier(files, start=saved)
    assert f.root() == independent_root([x[:-1] for x in lines])
    assert saved.size == 12  # the saved frontier is not changed
    with pytest.raises(RebuildError, match="already covers 12"):
        rebuild_frontier(files, start=saved, upto=5)


def test_memory_stays_bounded_over_many_blocks(tmp_path: Path) -> None:
    # A segment over two read blocks: lines split across a block boundary must be whole.
    pad = 3000
    n = (BLOCK_BYTES // (pad + 200)) * 2 + 5
    lines = entry_lines(n, pad=pad)
    files = write_log(tmp_path, lines, [])
    assert files[0].stat().st_size > BLOCK_BYTES
    assert rebuild_frontier(files).root() == root_of(
        hashlib.sha256(b"\x00" + x[:-1]).digest() for x in lines
    )


def test_refusals_name_the_file_and_line(tmp_path: Path) -> None:
    lines = entry_lines(10)
    files = write_log(tmp_path / "torn", lines, [5])
    with files[1].open("ab") as fh:
        fh.write(b'{"data":')
    with pytest.raises(RebuildError, match=r"log-0000000000000005-20261206\.jsonl line 6: an "):
        rebuild_frontier(files)

    files = write_log(tmp_path / "gap", lines[:4] + lines[5:], [])
    with pytest.raises(RebuildError, match=r"line 5: seq 5 where 4 was expected"):
        rebuild_frontier(files)

    files = write_log(tmp_path / "late", lines, [5])
    with pytest.raises(RebuildError, match="starts at seq 5, not 0"):
        rebuild_frontier(files[1:])

    files = write_log(tmp_path / "junk", [*lines[:3], b"not an entry\n", *lines[4:]], [])
    with pytest.raises(RebuildError, match="line 4: not a log entry"):
        rebuild_frontier(files)

    files = write_log(tmp_path / "link", lines, [5])
    target = tmp_path / "elsewhere.jsonl"
    files[1].rename(target)
    os.symlink(target, files[1])
    with pytest.raises(RebuildError, match="symbolic link"):
        rebuild_frontier(files)

    assert rebuild_frontier([]) == Frontier()
