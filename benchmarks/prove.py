"""Benchmark of proof bundles (audit/bundle.py): ``iort-audit prove`` and ``verify-bundle``
for one delivery in a large log, beside the baseline of hashing the whole log once.

The log (``--entries``, default 10^6) is made of the daemon's sample entries
(benchmarks/merkle.py's shape), chained and hashed in the log's canonical form; one
delivery of ``--delivery-entries`` entries (default 1,500: a 25-minute delivery at one
sample a second) sits in the middle, and a signed tree checkpoint entry follows it (its
root folded while the log is written). Timed, best of ``--repeat``, files in the page cache:

- ``prove``: make_bundle (two streaming passes: find the range, then the leaf hashes and
  the subtree roots of the proof) and the JSON written to memory;
- ``verify-bundle``: check_bundle on those bytes (parse, every entry's hash, the chain
  inside the range, the range proof to the signed root, the signature);
- baseline: one SHA-256 per line of the same files read the same way (what checking the
  delivery costs without a tree: hashing the whole log once).

A benchmark, not a test: it prints figures and exits 0.

    .venv/bin/python benchmarks/prove.py [--entries N] [--delivery-entries M] [--repeat R]
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import orjson
from machine import filesystem, print_header, work_dir
from merkle import sample, sha_per_line_files

from iortd.audit.bundle import check_bundle, make_bundle
from iortd.auditlog.canonical import ZERO_HASH, canonical, seal
from iortd.auditlog.logdir import segment_paths
from iortd.auditlog.merkle import Frontier
from iortd.auditlog.note import Checkpoint, Signer, generate_keypair

ORIGIN = "iortd/bench/or-3/0011223344556677"
DID = "or3-20261206T100000000000Z"
SEGMENT_BYTES = 64 * 1024 * 1024


def write_log(directory: Path, entries: int, delivery: int, signer: Signer) -> tuple[int, int]:
    """The log; returns (entries, bytes). The delivery starts at entries // 2."""
    start = datetime(2026, 12, 6, 10, 0, tzinfo=UTC)
    first = entries // 2
    last = first + delivery - 1
    prev, total, seg_size, out = ZERO_HASH, 0, SEGMENT_BYTES, None
    tree = Frontier()
    sha256 = hashlib.sha256
    try:
        for seq in range(entries):
            if seg_size >= SEGMENT_BYTES:
                if out is not None:
                    out.close()
                out = (directory / f"log-{seq:016d}-20261206.jsonl").open("wb")
                seg_size = 0
            kind, data, did = "sample", sample(seq, start), None
            if seq == 0:
                kind, data = "log_created", {"origin": ORIGIN}
            elif seq == first:
                kind, data, did = "delivery_started", {"preset_gy": 20.0}, DID
            elif seq == last:
                kind, data, did = "delivery_terminated", {"status": "NORMAL"}, DID
            elif first < seq < last:
                did = DID
            elif seq == last + 2:  # the delivery-end checkpoint, after one more entry
                cp = Checkpoint(ORIGIN, seq, prev, ("reason delivery_end",), tree.root().hex())
                kind = "checkpoint"
                data = {"note": cp.signed(signer), "count": seq, "head": prev}
                data |= {"root": tree.root().hex(), "tree": "rfc6962"}
            entry: dict[str, object] = {"data": data}
            if did is not None:
                entry["delivery_id"] = did
            entry |= {"mono_ns": 1_000_000 + seq, "prev": prev, "seq": seq}
            entry |= {"ts": "2026-12-06T10:00:00.000000Z", "type": kind}
            line, prev = seal(canonical(entry))
            h = sha256(b"\x00")
            h.update(line[:-1])
            tree.append(h.digest())
            out.write(line)  # type: ignore[union-attr]  # opened at seq 0
            seg_size += len(line)
            total += len(line)
    finally:
        if out is not None:
            out.close()
    return entries, total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--entries", type=int, default=1_000_000)
    ap.add_argument("--delivery-entries", type=int, default=1_500)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--dir", type=Path, help="an empty directory to write the log in")
    args = ap.parse_args()
    if args.repeat < 1 or args.delivery_entries < 2 or args.entries < 2 * args.delivery_entries:
        sys.exit("--repeat >= 1, --delivery-entries >= 2, --entries >= 2 * --delivery-entries")
    base, cleanup = work_dir(args.dir, "iortd-prove-bench-")
    try:
        print_header("iortd proof bundle benchmark (benchmarks/prove.py)")
        print(f"  disk       {filesystem(base)}")
        signer = generate_keypair("bench")
        t0 = time.perf_counter()
        n, nbytes = write_log(base, args.entries, args.delivery_entries, signer)
        files = segment_paths(base)
        print(
            f"  log        {n:,} entries, {nbytes / 1e6:,.1f} MB in {len(files)} segments "
            f"(written in {time.perf_counter() - t0:.1f} s); one delivery of "
            f"{args.delivery_entries:,} entries in the middle"
        )
        print(f"  runs       best of {args.repeat}; files read once before timing (page cache)")
        sha_per_line_files(files)  # warm the page cache
        bundle: list[bytes] = []

        def prove() -> None:
            b = make_bundle(files, DID, pubkey=signer.verifier)
            bundle[:] = [orjson.dumps(b, option=orjson.OPT_INDENT_2)]

        def verify() -> None:
            check_bundle(bundle[0], signer.verifier)

        cases: list[tuple[str, Callable[[], object]]] = [
            ("prove (iort-audit prove, no file write)", prove),
            ("verify-bundle (check_bundle)", verify),
            ("baseline: sha256 per line of the whole log", lambda: sha_per_line_files(files)),
        ]
        runs: list[list[float]] = [[] for _ in cases]
        for _ in range(args.repeat):
            for i, (_label, fn) in enumerate(cases):
                t0 = time.perf_counter()
                fn()
                runs[i].append(time.perf_counter() - t0)
        print()
        for (label, _fn), r in zip(cases, runs, strict=True):
            spread = ", ".join(f"{x:.3f}" for x in r)
            print(f"{label:<48} {min(r):>10.3f} s  [{spread}]")
        b = orjson.loads(bundle[0])
        print(
            f"{'    bundle':<48} {len(bundle[0]) / 1e3:>10.1f} kB: {len(b['entries']):,} "
            f"entries, {len(b['range_proof'])} proof hashes, tree size {b['tree_size']:,}"
        )
        print(f"{'    verify-bundle / baseline':<48} {min(runs[1]) / min(runs[2]):>10.4f}x")
        print(f"{'    prove / baseline':<48} {min(runs[0]) / min(runs[2]):>10.2f}x")
    finally:
        cleanup()


if __name__ == "__main__":
    main()
