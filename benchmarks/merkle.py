"""Benchmark of the Merkle tree over the audit log (auditlog/merkle.py, merkle_log.py)
against SHA-256 per line of the same bytes, measured in the same run.

1. frontier appends: ``Frontier.append`` of leaf hashes already in memory (the tree's own
   cost on top of hashing: amortised one node hash per leaf), then leaf hash + append per
   line in memory, beside baseline A: one ``hashlib.sha256`` per line of the same lines;
2. ``rebuild_frontier`` over a generated log directory (segments read in 4 MiB blocks, the
   seq of every line checked, leaf hash and append), beside baseline B: one SHA-256 per
   line of the same files read the same way;
3. ``rebuild_chained``, what the writer's open runs when the seal has no frontier (as (2),
   and every entry's hash recomputed and its ``prev`` checked).

The log is made of the daemon's sample entries (the shape benchmarks/audit_log.py uses),
chained and hashed in the log's canonical form, written straight to segments of
``--segment-mb``. The files are read once before timing, so both sides read from the page
cache; ``--repeat`` rounds, each running every case once in turn, the best of each kept.
A benchmark, not a test: it prints figures and exits 0.

    .venv/bin/python benchmarks/merkle.py [--entries N] [--repeat R] [--dir DIR]
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import orjson
from machine import filesystem, print_header, work_dir

from iortd.auditlog.canonical import ZERO_HASH, canonical, seal
from iortd.auditlog.logdir import segment_paths
from iortd.auditlog.merkle import Frontier
from iortd.auditlog.merkle_log import rebuild_chained, rebuild_frontier
from iortd.auditlog.segments import open_segment

DEFAULT_ENTRIES = 200_000
DEFAULT_REPEAT = 3
DEFAULT_SEGMENT_MB = 64
INTERLOCKS = ("door", "emergency_stop", "key", "water", "applicator")


def sample(i: int, start: datetime) -> dict[str, object]:
    t = i * 0.1
    delivered = round(min(t * 2.0 / 60.0, 20.0), 4)
    return {
        "device": "intrabeam-or3",
        "at": (start + timedelta(seconds=t)).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        "state": "IRRADIATING",
        "dose_rate_gy_min": round(2.0 + (i % 7) * 0.0013, 4),
        "dose_primary_gy": delivered,
        "dose_secondary_gy": round(delivered * 0.998, 4),
        "preset_gy": 20.0,
        "beam_on_s": round(t, 1),
        "kv": 50.0,
        "ua": round(40.0 - (i % 3) * 0.1, 1),
        "interlocks": dict.fromkeys(INTERLOCKS, "ok"),
        "all_clear": True,
        "simulated": False,
        "remaining_gy": round(20.0 - delivered, 4),
        "phase": "IRRADIATING",
    }


def write_log(directory: Path, entries: int, segment_bytes: int) -> tuple[int, int]:
    """Segments of chained entries; returns (entries, bytes)."""
    start = datetime(2026, 12, 6, 10, 0, tzinfo=UTC)
    prev, total, seg_size = ZERO_HASH, 0, segment_bytes
    out = None
    try:
        for seq in range(entries):
            if seg_size >= segment_bytes:
                if out is not None:
                    out.close()
                out = (directory / f"log-{seq:016d}-20261206.jsonl").open("wb")
                seg_size = 0
            body = canonical(
                {
                    "data": {"origin": "bench"} if seq == 0 else sample(seq, start),
                    "delivery_id": "or3-20261206T100000000000Z",
                    "mono_ns": 1_000_000 + seq,
                    "prev": prev,
                    "seq": seq,
                    "ts": "2026-12-06T10:00:00.000000Z",
                    "type": "log_created" if seq == 0 else "sample",
                }
            )
            line, prev = seal(body)
            out.write(line)  # type: ignore[union-attr]  # opened at seq 0
            seg_size += len(line)
            total += len(line)
    finally:
        if out is not None:
            out.close()
    return entries, total


def lines_of(files: list[Path]) -> list[bytes]:
    out: list[bytes] = []
    for p in files:
        with open_segment(p) as seg:
            for block in seg.blocks():
                out.extend(block)
    return out


def sha_per_line(lines: list[bytes]) -> None:
    sha256 = hashlib.sha256
    for line in lines:
        sha256(line).digest()


def leaf_and_append(lines: list[bytes]) -> Frontier:
    f = Frontier()
    append, sha256 = f.append, hashlib.sha256
    for line in lines:
        h = sha256(b"\x00")
        h.update(line)
        append(h.digest())
    return f


def appends_only(leaves: list[bytes]) -> Frontier:
    f = Frontier()
    append = f.append
    for h in leaves:
        append(h)
    return f


def sha_per_line_files(files: list[Path]) -> int:
    n, sha256 = 0, hashlib.sha256
    for p in files:
        with open_segment(p) as seg:
            for block in seg.blocks():
                for line in block:
                    sha256(line).digest()
                n += len(block)
    return n


def chained(files: list[Path], head: str) -> Frontier:
    return rebuild_chained(files, start=None, start_head=ZERO_HASH, head=head)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--entries", type=int, default=DEFAULT_ENTRIES)
    ap.add_argument("--repeat", type=int, default=DEFAULT_REPEAT)
    ap.add_argument("--segment-mb", type=int, default=DEFAULT_SEGMENT_MB)
    ap.add_argument("--dir", type=Path, help="an empty directory to write the log in")
    args = ap.parse_args()
    if args.entries < 1 or args.repeat < 1 or args.segment_mb < 1:
        sys.exit("--entries, --repeat and --segment-mb must be at least 1")
    base, cleanup = work_dir(args.dir, "iortd-merkle-bench-")
    try:
        print_header("iortd Merkle tree benchmark (benchmarks/merkle.py)")
        print(f"  disk       {filesystem(base)}")
        t0 = time.perf_counter()
        n, nbytes = write_log(base, args.entries, args.segment_mb * 1024 * 1024)
        files = segment_paths(base)
        gen_s = time.perf_counter() - t0
        print(
            f"  log        {n:,} entries, {nbytes / 1e6:,.1f} MB in {len(files)} segments, "
            f"{nbytes / n:.0f} B per line (written in {gen_s:.1f} s)"
        )
        print(f"  runs       best of {args.repeat}; files read once before timing (page cache)")
        lines = lines_of(files)  # also warms the page cache
        leaves = [hashlib.sha256(b"\x00" + x).digest() for x in lines]
        head = orjson.loads(lines[-1])["hash"]
        cases: list[tuple[str, Callable[[], object]]] = [
            ("(1) Frontier.append, leaf hashes in memory", lambda: appends_only(leaves)),
            ("(1) leaf hash + append per line, in memory", lambda: leaf_and_append(lines)),
            ("    baseline A: sha256 per line, in memory", lambda: sha_per_line(lines)),
            ("(2) rebuild_frontier over the log directory", lambda: rebuild_frontier(files)),
            ("(3) rebuild_chained (the writer's open)", lambda: chained(files, head)),
            ("    baseline B: sha256 per line, same files", lambda: sha_per_line_files(files)),
        ]
        # Rounds interleave the cases, so that a change of load on a shared machine falls
        # on all of them alike rather than on whichever ran last.
        runs: list[list[float]] = [[] for _ in cases]
        for _ in range(args.repeat):
            for i, (_label, fn) in enumerate(cases):
                t0 = time.perf_counter()
                fn()
                runs[i].append(n / (time.perf_counter() - t0))
        rows = [(label, max(r), r) for (label, _fn), r in zip(cases, runs, strict=True)]
        a, b, c, d, f, e = (row[1] for row in rows)
        check = rebuild_frontier(files)
        assert check.root() == leaf_and_append(lines).root()
        print()
        for label, best, rates in rows:
            spread = ", ".join(f"{r:,.0f}" for r in rates)
            print(f"{label:<48} {best:>12,.0f} leaves/s  [{spread}]")
        print(f"{'(1) leaf + append / baseline A':<48} {b / c:>12.2f}x")
        print(f"{'(2) rebuild / baseline B':<48} {d / e:>12.2f}x")
        per_leaf_us = 1e6 / a
        print(f"{'    tree cost per append (1, first row)':<48} {per_leaf_us:>12.2f} us")
        print(f"{'    rebuild of this log':<48} {n / d:>12.2f} s (root {check.root().hex()[:16]}…)")
        print(f"{'(3) chained rebuild / baseline B':<48} {f / e:>12.2f}x")
        print(f"{'    chained rebuild, per million entries':<48} {1e6 / f:>12.2f} s")
    finally:
        cleanup()


if __name__ == "__main__":
    main()
