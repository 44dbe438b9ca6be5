"""Benchmark of the audit-log writer and verifier against disk and CPU baselines.

Measured in one run, on one disk, with entries of one size (the daemon's sample entry):

1. the iortd writer (auditlog/writer.py): samples appended as fast as one producer
   can, group commit with the default 50 ms window, entries/s and commit latency; then
   durable=True entries appended one at a time, each awaited (one fsync each); both again
   with a signing key, so that every group commit is followed by its seal (a signed note
   replaced atomically: temp file, fsync, rename, fsync of the directory): the difference
   per durable entry is the seal's cost per group commit; and the sealed samples once more
   without the Merkle tree (the writer's frontier switched off after open, as a version
   before issue 20 wrote: chain-head checkpoints), so that the tree's cost per append
   (one leaf hash and on average one node hash, on the event loop) is the difference;
2. baseline A: os.write + os.fsync per entry, the same bytes;
3. baseline B: SQLite (stdlib sqlite3), WAL, synchronous=FULL, one transaction per entry
   inserting the same JSON text;
4. verify_log (auditlog/verify.py) over the log written in (1), entries/s and MB/s,
   against baseline D: the hashing verification must do, per line of the same files read
   in the same 4 MiB blocks: the entry hash (SHA-256 of the line without its hash field,
   cut where the writer spliced it in), the RFC 6962 leaf (SHA-256 of 0x00 || line) and
   the tree's node hashes (one per entry on average); baseline C, one hashlib.sha256 per
   line, and bulk SHA-256 as references.

Goals (the issue): writer >= 10x SQLite's per-entry-transaction rate for samples;
verification >= half the speed of the hashing it must do (D: since the Merkle tree,
every line is hashed twice, so one SHA-256 per line, C, is no longer its floor; C's
ratio is printed beside it). A benchmark, not a test: it exits 0 whatever the figures and
prints PASS/MISS per goal. ``--verify-only`` writes one log and measures only (4).

    .venv/bin/python benchmarks/audit_log.py [--entries N] [--sync-entries M] [--dir DIR]
        [--repeat R] [--verify-only]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import shutil
import sqlite3
import statistics
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from machine import filesystem, print_header, work_dir

from iortd.auditlog.note import Signer, generate_keypair
from iortd.auditlog.segments import open_segment
from iortd.auditlog.verify import verify_log
from iortd.auditlog.writer import AuditLog, Entry, segment_paths
from iortd.kernel.types import Interlock

REPO = Path(__file__).resolve().parent.parent
DEFAULT_ENTRIES = 100_000  # samples for (1) and the log that (4) verifies
DEFAULT_SYNC_ENTRIES = 4_000  # entries for each one-fsync-per-entry measurement
YIELD_EVERY = 500  # the producer lets the writer task run every this many appends
LATENCY_EVERY = 50  # commit latency is sampled on every this-many-th append
PACED_RATE = 1_000  # entries/s for the paced commit-latency measurement
PACED_SECONDS = 0.5
GOAL_WRITER_VS_SQLITE = 10.0
GOAL_VERIFY_VS_SHA = 0.5
INTERLOCKS = tuple(str(il) for il in Interlock)


# ---- the entries ------------------------------------------------------------------------


def utc_ts(dt: datetime) -> str:
    return dt.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def sample_data(i: int, start: datetime) -> dict[str, Any]:
    """The shape daemon/entries.py:sample_entry writes during an irradiation: a
    reading every 100 ms, values with the precision a device reports."""
    t = i * 0.1
    delivered = round(min(t * 2.0 / 60.0, 20.0), 4)
    return {
        "device": "intrabeam-or3",
        "at": utc_ts(start + timedelta(seconds=t)),
        "device_mono_ns": 1_234_567_890_123 + i * 100_000_000,
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
        "delivered_primary_gy": delivered,
        "delivered_secondary_gy": round(delivered * 0.998, 4),
        "remaining_gy": round(20.0 - delivered, 4),
        "elapsed_s": round(t + 3.2, 1),
        "estimated_remaining_s": round((20.0 - delivered) * 30.0, 1),
        "phase": "IRRADIATING",
    }


DELIVERY_ID = "or3-20261126T101500123456Z"


# ---- small helpers ----------------------------------------------------------------------


@dataclass(slots=True)
class Rate:
    count: int
    seconds: float
    nbytes: int = 0

    @property
    def per_s(self) -> float:
        return self.count / self.seconds

    @property
    def mb_s(self) -> float:
        return self.nbytes / self.seconds / 1e6


def best(rates: list[Rate]) -> Rate:
    return min(rates, key=lambda r: r.seconds / r.count)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def fresh(base: Path, name: str) -> Path:
    d = base / name
    if d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True)
    return d


def log_lines(directory: Path) -> Iterator[bytes]:
    for path in segment_paths(directory):
        with open(path, "rb") as f:
            yield from f


# ---- (1) the iortd writer -----------------------------------------------------------------


@dataclass(slots=True)
class WriterRun:
    rate: Rate
    append_s: float  # time spent appending, without waiting for the commit
    latencies_ms: list[float]
    directory: Path


async def _open(
    directory: Path, signer: Signer | None = None, tree: bool = True
) -> tuple[AuditLog, asyncio.Task[None]]:
    log, _ = await AuditLog.open(directory, origin="bench", signer=signer)
    if not tree:
        log.frontier = log._committed_frontier = None  # chain-head only, as before issue 20
    task = asyncio.create_task(log.run())
    await log.append("bench_start", {}, durable=True).committed  # after log_created
    return log, task


async def _close(log: AuditLog, task: asyncio.Task[None]) -> None:
    await log.close()
    await task


def _track(entry: Entry, out: list[float]) -> None:
    t = time.perf_counter()
    entry.committed.add_done_callback(lambda _f: out.append((time.perf_counter() - t) * 1e3))


async def writer_samples(
    directory: Path, data: list[dict[str, Any]], signer: Signer | None = None, tree: bool = True
) -> WriterRun:
    log, task = await _open(directory, signer, tree)
    latencies: list[float] = []
    last: Entry | None = None
    t0 = time.perf_counter()
    for i, d in enumerate(data):
        last = log.append("sample", d, delivery_id=DELIVERY_ID)
        if i % LATENCY_EVERY == 0:
            _track(last, latencies)
        if i % YIELD_EVERY == YIELD_EVERY - 1:
            await asyncio.sleep(0)
    t_appended = time.perf_counter()
    assert last is not None
    await last.committed
    t1 = time.perf_counter()
    await asyncio.sleep(0)  # let the done callbacks of the last batch run
    await _close(log, task)
    return WriterRun(Rate(len(data), t1 - t0), t_appended - t0, latencies, directory)


async def writer_paced(directory: Path, data: list[dict[str, Any]]) -> list[float]:
    """Commit latency at a steady PACED_RATE: what a sample waits at realistic load."""
    log, task = await _open(directory)
    latencies: list[float] = []
    n = round(PACED_RATE * PACED_SECONDS)
    t0 = time.perf_counter()
    last: Entry | None = None
    for i in range(n):
        delay = t0 + i / PACED_RATE - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        last = log.append("sample", data[i % len(data)], delivery_id=DELIVERY_ID)
        _track(last, latencies)
    assert last is not None
    await last.committed
    await asyncio.sleep(0)
    await _close(log, task)
    return latencies


async def writer_durable(
    directory: Path, data: list[dict[str, Any]], signer: Signer | None = None
) -> Rate:
    log, task = await _open(directory, signer)
    t0 = time.perf_counter()
    for d in data:
        await log.append("sample", d, delivery_id=DELIVERY_ID, durable=True).committed
    t1 = time.perf_counter()
    await _close(log, task)
    return Rate(len(data), t1 - t0)


# ---- (2), (3) one fsync per entry -------------------------------------------------------


def raw_fsync(path: Path, lines: list[bytes]) -> Rate:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_TRUNC, 0o640)
    try:
        t0 = time.perf_counter()
        for line in lines:
            os.write(fd, line)
            os.fsync(fd)
        t1 = time.perf_counter()
    finally:
        os.close(fd)
    return Rate(len(lines), t1 - t0)


def sqlite_wal(path: Path, texts: list[str]) -> Rate:
    con = sqlite3.connect(path, isolation_level=None)
    try:
        (mode,) = con.execute("PRAGMA journal_mode=WAL").fetchone()
        if mode != "wal":
            raise RuntimeError(f"SQLite refused WAL mode (got {mode!r})")
        con.execute("PRAGMA synchronous=FULL")
        con.execute("CREATE TABLE log (seq INTEGER PRIMARY KEY, entry TEXT NOT NULL)")
        t0 = time.perf_counter()
        for seq, text in enumerate(texts):
            con.execute("BEGIN")
            con.execute("INSERT INTO log (seq, entry) VALUES (?, ?)", (seq, text))
            con.execute("COMMIT")
        t1 = time.perf_counter()
    finally:
        con.close()
    return Rate(len(texts), t1 - t0)


# ---- (4) verification -------------------------------------------------------------------


def verify(directory: Path, expect_entries: int) -> Rate:
    t0 = time.perf_counter()
    rep = verify_log([directory])
    t1 = time.perf_counter()
    if not rep.intact or rep.entries != expect_entries:
        raise RuntimeError(f"verify_log: {rep.problem}, {rep.entries} entries")
    return Rate(rep.entries, t1 - t0, rep.bytes)


def sha_per_line(directory: Path) -> Rate:
    sha256 = hashlib.sha256
    n = nbytes = 0
    t0 = time.perf_counter()
    for path in segment_paths(directory):
        with open(path, "rb") as f:
            for line in f:
                sha256(line).digest()
                n += 1
                nbytes += len(line)
    t1 = time.perf_counter()
    return Rate(n, t1 - t0, nbytes)


def hashing_floor(directory: Path) -> Rate:
    """Baseline D: only the hashing verify_log cannot avoid, over the same files read the
    same way (open_segment's blocks): per line the entry hash, the leaf and the frontier's
    node hashes (merkle.py's carry, inlined). Finding where the hash field is cut out
    (one rfind from the end) is counted in it: without it the entry hash has no bytes."""
    sha256 = hashlib.sha256
    n = nbytes = 0
    stack: list[bytes] = []
    t0 = time.perf_counter()
    for path in segment_paths(directory):
        with open_segment(path) as seg:
            for block in seg.blocks():
                for line in block:
                    at = line.rfind(b',"hash":"')
                    h = sha256(line[:at])
                    h.update(line[at + 74 :])
                    h.hexdigest()
                    leaf = sha256(b"\x00" + line).digest()
                    k = n
                    while k & 1:
                        leaf = sha256(b"\x01" + stack.pop() + leaf).digest()
                        k >>= 1
                    stack.append(leaf)
                    n += 1
                    nbytes += len(line) + 1
    t1 = time.perf_counter()
    return Rate(n, t1 - t0, nbytes)


def sha_bulk(directory: Path) -> Rate:
    nbytes = 0
    t0 = time.perf_counter()
    for path in segment_paths(directory):
        with open(path, "rb") as f:
            hashlib.file_digest(f, "sha256")
        nbytes += path.stat().st_size
    t1 = time.perf_counter()
    return Rate(1, t1 - t0, nbytes)


# ---- the machine ------------------------------------------------------------------------


# ---- the run ----------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--entries", type=int, default=DEFAULT_ENTRIES, help="samples (1, 4)")
    ap.add_argument(
        "--sync-entries",
        type=int,
        default=DEFAULT_SYNC_ENTRIES,
        help="entries per one-fsync-per-entry measurement (durable writer, A, B)",
    )
    ap.add_argument("--dir", type=Path, help="work here and keep the files (empty or new)")
    ap.add_argument("--repeat", type=int, default=2, help="runs per measurement; best kept")
    ap.add_argument(
        "--verify-only",
        action="store_true",
        help="write one log of --entries samples and measure only verification (4)",
    )
    args = ap.parse_args(argv)
    if args.entries < 1 or args.sync_entries < 1 or args.repeat < 1:
        ap.error("--entries, --sync-entries and --repeat must be at least 1")
    n, repeat = args.entries, args.repeat
    m = min(args.sync_entries, n)  # the baselines write lines taken from the samples' log

    work, cleanup = work_dir(args.dir, "iortd-audit-bench-")
    try:
        if args.verify_only:
            return run_verify(work, n, repeat)
        return run(work, n, m, repeat)
    finally:
        cleanup()


def run(work: Path, n: int, m: int, repeat: int) -> int:
    started = time.perf_counter()
    print_header("iortd audit-log benchmark")
    print(f"  dir        {work}")
    print(f"  disk       {filesystem(work, free=True)}")
    sys.stdout.flush()

    start = datetime(2026, 11, 26, 10, 15, 0, 123456, tzinfo=UTC)
    data = [sample_data(i, start) for i in range(n)]

    # (1) the writer. Each run in a fresh log directory.
    runs: list[WriterRun] = []
    durable: list[Rate] = []
    paced: list[list[float]] = []
    signer = generate_keypair("bench")
    sealed: list[WriterRun] = []
    chain_only: list[WriterRun] = []
    sealed_durable: list[Rate] = []
    for k in range(repeat):
        runs.append(asyncio.run(writer_samples(fresh(work, f"samples-{k}"), data)))
        paced.append(asyncio.run(writer_paced(fresh(work, f"paced-{k}"), data)))
        durable.append(asyncio.run(writer_durable(fresh(work, f"durable-{k}"), data[:m])))
        sealed.append(asyncio.run(writer_samples(fresh(work, f"sealed-{k}"), data, signer)))
        shutil.rmtree(sealed[-1].directory)
        chain_only.append(
            asyncio.run(writer_samples(fresh(work, f"chain-{k}"), data, signer, tree=False))
        )
        shutil.rmtree(chain_only[-1].directory)
        sealed_durable.append(
            asyncio.run(writer_durable(fresh(work, f"sealed-durable-{k}"), data[:m], signer))
        )
    w = min(runs, key=lambda r: r.rate.seconds)
    lat_paced = min(paced, key=statistics.median)
    for r in runs:  # keep only the best run's log for verification
        if r is not w:
            shutil.rmtree(r.directory)

    # The same bytes for the baselines: the sample lines the writer wrote.
    lines = [ln for ln in log_lines(w.directory) if b'"type":"sample"' in ln][:m]
    line_len = statistics.mean(len(ln) for ln in lines)
    data_len = statistics.mean(
        len(ln[ln.index(b'"data":') + 7 : ln.index(b',"delivery_id":')]) for ln in lines
    )
    texts = [ln[:-1].decode() for ln in lines]

    # (2), (3) one fsync per entry.
    raw = [raw_fsync(fresh(work, f"raw-{k}") / "raw.jsonl", lines) for k in range(repeat)]
    sql = [sqlite_wal(fresh(work, f"sqlite-{k}") / "log.db", texts) for k in range(repeat)]

    # (4) verification of the log from (1); the files are in the page cache for all three.
    expect = n + 2  # log_created, bench_start, the samples
    ver, floor, sha, bulk = verify_rounds(w.directory, expect, repeat)

    # ---- report
    print(f"  entries    {n} samples; {m} per one-fsync-per-entry run")
    print(f"  entry size {line_len:.0f} B per line ({data_len:.0f} B of it the sample data)")
    print()
    print(f"  best of {repeat} runs each (every run in brackets)")
    print(f"  {'measurement':<52} {'best':>17}  runs")
    print(f"  {'-' * 52} {'-' * 17}  {'-' * 16}")

    def row(what: str, figure: str, every: str = "") -> None:
        print(f"  {what:<52} {figure:>17}  {every}".rstrip())

    def per_s(rates: list[Rate]) -> str:
        return "[" + ", ".join(f"{r.per_s:,.0f}" for r in rates) + "]"

    def mb_s(rates: list[Rate]) -> str:
        return "[" + ", ".join(f"{r.mb_s:,.0f}" for r in rates) + "]"

    lat = w.latencies_ms
    row(
        "(1) writer, samples, group commit 50 ms",
        f"{w.rate.per_s:,.0f} entries/s",
        per_s([r.rate for r in runs]),
    )
    row(
        "    producer loop until the last append, per entry", f"{w.append_s / n * 1e6:.1f} us/entry"
    )
    row(
        f"    commit latency p50 / p99 (1 in {LATENCY_EVERY}, saturated)",
        f"{pct(lat, 0.5):.0f} / {pct(lat, 0.99):.0f} ms",
    )
    row(
        f"    commit latency p50 / p99 (every one, {PACED_RATE}/s)",
        f"{pct(lat_paced, 0.5):.1f} / {pct(lat_paced, 0.99):.1f} ms",
    )
    d, a, b, v, c = best(durable), best(raw), best(sql), best(ver), best(sha)
    row(
        "(1) writer, durable=True, one at a time, awaited",
        f"{d.per_s:,.0f} entries/s",
        per_s(durable),
    )
    sd = best(sealed_durable)
    sw = min(sealed, key=lambda r: r.rate.seconds)
    row(
        "(1) writer, samples, sealed (a seal per group commit)",
        f"{sw.rate.per_s:,.0f} entries/s",
        per_s([r.rate for r in sealed]),
    )
    row("    producer loop, per entry (with the tree)", f"{sw.append_s / n * 1e6:.1f} us/entry")
    cw = min(chain_only, key=lambda r: r.rate.seconds)
    row(
        "(1) writer, samples, sealed, no Merkle tree (before #20)",
        f"{cw.rate.per_s:,.0f} entries/s",
        per_s([r.rate for r in chain_only]),
    )
    row("    producer loop, per entry (chain only)", f"{cw.append_s / n * 1e6:.1f} us/entry")
    row(
        "(1) writer, durable=True, sealed, one at a time",
        f"{sd.per_s:,.0f} entries/s",
        per_s(sealed_durable),
    )
    row(
        "    the seal's cost per group commit (sealed - unsealed)",
        f"{(1 / sd.per_s - 1 / d.per_s) * 1e3:.2f} ms",
    )
    row("(2) baseline A: os.write + os.fsync per entry", f"{a.per_s:,.0f} entries/s", per_s(raw))
    row(
        "(3) baseline B: SQLite WAL FULL, 1 transaction/entry",
        f"{b.per_s:,.0f} entries/s",
        per_s(sql),
    )
    verify_rows(row, ver, floor, sha, bulk)
    print()
    r_sql = w.rate.per_s / b.per_s
    print("  ratios (best against best)")
    row("writer samples / SQLite", f"{r_sql:.1f}x")
    row("writer durable / raw write+fsync", f"{d.per_s / a.per_s:.2f}x")
    r_ver = verify_ratios(row, v, best(floor), c)
    print()
    print("  goals (issue)")
    ok1 = r_sql >= GOAL_WRITER_VS_SQLITE
    print(
        f"  {'PASS' if ok1 else 'MISS'}  writer samples >= {GOAL_WRITER_VS_SQLITE:.0f}x SQLite "
        f"per-entry transactions: {r_sql:.1f}x"
    )
    verify_goal(r_ver)
    print()
    print(f"  total time {time.perf_counter() - started:.1f} s")
    return 0


def verify_rounds(
    directory: Path, expect: int, repeat: int
) -> tuple[list[Rate], list[Rate], list[Rate], list[Rate]]:
    """verify_log, baseline D, baseline C and bulk SHA-256, interleaved round by round so
    that a change of the machine's load falls on all of them; the files are read once
    first, so that every measurement reads from the page cache."""
    sha_bulk(directory)
    ver: list[Rate] = []
    floor: list[Rate] = []
    sha: list[Rate] = []
    bulk: list[Rate] = []
    for _ in range(repeat):
        ver.append(verify(directory, expect))
        floor.append(hashing_floor(directory))
        sha.append(sha_per_line(directory))
        bulk.append(sha_bulk(directory))
    return ver, floor, sha, bulk


def _rates(rates: list[Rate], unit: str) -> str:
    if unit == "MB/s":
        return "[" + ", ".join(f"{r.mb_s:,.0f}" for r in rates) + "]"
    return "[" + ", ".join(f"{r.per_s:,.0f}" for r in rates) + "]"


def verify_rows(
    row: Any, ver: list[Rate], floor: list[Rate], sha: list[Rate], bulk: list[Rate]
) -> None:
    v, f, c = best(ver), best(floor), best(sha)
    row("(4) verify_log", f"{v.mb_s:,.1f} MB/s", _rates(ver, "MB/s"))
    row("    verify_log, entries", f"{v.per_s:,.0f} entries/s", _rates(ver, "e"))
    row("    baseline D: the hashing verify must do", f"{f.mb_s:,.1f} MB/s", _rates(floor, "MB/s"))
    row("    baseline D, entries", f"{f.per_s:,.0f} entries/s", _rates(floor, "e"))
    row("    baseline C: sha256 per line, same file", f"{c.mb_s:,.1f} MB/s", _rates(sha, "MB/s"))
    row(
        "    bulk sha256 of the file (reference)",
        f"{best(bulk).mb_s:,.1f} MB/s",
        _rates(bulk, "MB/s"),
    )


def verify_ratios(row: Any, v: Rate, f: Rate, c: Rate) -> float:
    row("verify_log / hashing it must do (D)", f"{v.mb_s / f.mb_s:.2f}x")
    row("verify_log / sha256 per line (C)", f"{v.mb_s / c.mb_s:.2f}x")
    return v.mb_s / f.mb_s


def verify_goal(r_ver: float) -> None:
    ok = r_ver >= GOAL_VERIFY_VS_SHA
    print(
        f"  {'PASS' if ok else 'MISS'}  verify_log >= {GOAL_VERIFY_VS_SHA:.1f}x the hashing it "
        f"must do (D: entry hash, leaf, nodes): {r_ver:.2f}x"
    )


def run_verify(work: Path, n: int, repeat: int) -> int:
    """(4) alone: one log of n samples written by the writer (unsealed, as in (1))."""
    started = time.perf_counter()
    print_header("iortd audit-log benchmark: verification only")
    print(f"  dir        {work}")
    print(f"  load avg   {' '.join(f'{x:.2f}' for x in os.getloadavg())} (1, 5, 15 min)")
    start = datetime(2026, 11, 26, 10, 15, 0, 123456, tzinfo=UTC)
    data = [sample_data(i, start) for i in range(n)]
    w = asyncio.run(writer_samples(fresh(work, "samples"), data))
    size = sum(p.stat().st_size for p in segment_paths(w.directory))
    print(f"  log        {n + 2:,} entries, {size / 1e6:.1f} MB, {size / (n + 2):.0f} B per line")
    ver, floor, sha, bulk = verify_rounds(w.directory, n + 2, repeat)
    print()
    print(f"  best of {repeat} rounds each (every round in brackets)")

    def row(what: str, figure: str, every: str = "") -> None:
        print(f"  {what:<52} {figure:>17}  {every}".rstrip())

    verify_rows(row, ver, floor, sha, bulk)
    print()
    print("  ratios (best against best)")
    r_ver = verify_ratios(row, best(ver), best(floor), best(sha))
    print()
    verify_goal(r_ver)
    print(f"  load avg   {' '.join(f'{x:.2f}' for x in os.getloadavg())} (1, 5, 15 min)")
    print(f"  total time {time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
