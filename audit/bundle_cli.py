"""``iort-audit prove`` and ``iort-audit verify-bundle`` (audit/bundle.py does the work).

    iort-audit prove LOGDIR --delivery ID --out FILE [--pubkey FILE] [--archive DIR]
                     [--checkpoint-size N] [--cosigned FILE] [--from-checkpoint FILE]
    iort-audit verify-bundle FILE --pubkey FILE [--witness-key VKEY ...] [--quorum N]

Exit status: 0 the bundle was written / verifies; 1 the log or the bundle is bad (the
first thing wrong is named: an entry's seq, a proof, the note, a signature), or the bundle
verifies but some of its entries were recorded as unvouched; 2 usage (a file that cannot be
read, a key that is not one, no tree checkpoint of the size asked for).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import orjson

from iortd.audit.bundle import BundleError, check_bundle, make_bundle
from iortd.audit.inputs import UsageError, checkpoint_notes, load_pubkey
from iortd.audit.witnessed import load_witness_keys
from iortd.auditlog.archive import ArchiveError
from iortd.auditlog.union import find_archive, merge
from iortd.auditlog.verify import collect_files
from iortd.kernel.durable import write_atomic
from iortd.kernel.files import FileReadError, read_small_file

__all__ = ["add_parsers", "run_prove", "run_verify_bundle"]

EXIT_OK, EXIT_BAD, EXIT_USAGE = 0, 1, 2
MAX_BUNDLE = 256 * 1024 * 1024  # a delivery of hours at 10 samples/s is tens of MB


def _err(msg: str) -> None:
    print(f"iort-audit: {msg}", file=sys.stderr)  # noqa: T201 - CLI output


def _out(msg: str) -> None:
    print(msg)  # noqa: T201 - CLI output


def add_parsers(sub: Any) -> None:
    p = sub.add_parser("prove", help="write a proof bundle of one delivery (verify-bundle)")
    p.add_argument("logdir", type=Path, metavar="LOGDIR", help="the log directory")
    p.add_argument("--delivery", required=True, metavar="ID", help="see: iort-audit deliveries")
    p.add_argument("--out", required=True, type=Path, metavar="FILE", help="the bundle to write")
    p.add_argument("--pubkey", type=Path, metavar="FILE", help="check the checkpoint's signature")
    p.add_argument("--archive", type=Path, metavar="DIR", help="where retention archived segments")
    p.add_argument(
        "--checkpoint-size",
        type=int,
        metavar="N",
        help="use the tree checkpoint of this size (default: the first covering the delivery)",
    )
    p.add_argument(
        "--cosigned",
        type=Path,
        metavar="FILE",
        help="that checkpoint with witnesses' cosignatures (note or audit/checkpoint payload)",
    )
    p.add_argument(
        "--from-checkpoint",
        type=Path,
        metavar="FILE",
        help="an older checkpoint you hold: add a consistency proof from it",
    )
    v = sub.add_parser("verify-bundle", help="check a proof bundle offline")
    v.add_argument("bundle", type=Path, metavar="FILE")
    v.add_argument("--pubkey", required=True, type=Path, metavar="FILE", help="the log's key")
    v.add_argument(
        "--witness-key",
        action="append",
        default=[],
        type=Path,
        metavar="VKEY",
        help="a witness's verifier key file; its cosignature is then required (see --quorum)",
    )
    v.add_argument("--quorum", type=int, metavar="N", help="cosignatures needed (default: all)")


def _note_file(path: Path | None, option: str) -> str | None:
    if path is None:
        return None
    try:
        text = read_small_file(path, expected="a saved checkpoint").decode("utf-8")
    except FileReadError as exc:
        raise UsageError(f"{option} {path}: {exc.reason}") from None
    except UnicodeDecodeError:
        raise UsageError(f"{option} {path}: not UTF-8 text") from None
    return checkpoint_notes(text, path)


def run_prove(args: argparse.Namespace) -> int:
    if not args.logdir.is_dir():
        _err(f"{args.logdir}: not a log directory")
        return EXIT_USAGE
    try:
        pubkey = load_pubkey(args.pubkey) if args.pubkey else None
        cosigned = _note_file(args.cosigned, "--cosigned")
        held = _note_file(args.from_checkpoint, "--from-checkpoint")
        files = collect_files([args.logdir])
        if args.archive is not None:
            u = merge(files, find_archive(args.archive, args.logdir))
            if u.problem is not None:
                _err(f"--archive: {u.problem}")
                return EXIT_BAD
            files = u.files
    except (UsageError, ArchiveError) as exc:
        _err(str(exc))
        return EXIT_USAGE
    try:
        bundle = make_bundle(
            files,
            args.delivery,
            pubkey=pubkey,
            checkpoint_size=args.checkpoint_size,
            cosigned=cosigned,
            held=held,
        )
        data = orjson.dumps(bundle, option=orjson.OPT_INDENT_2) + b"\n"
        if pubkey is not None:  # what was written must verify: else the log is not intact
            check_bundle(data, pubkey)
    except BundleError as exc:
        _err(f"{args.delivery}: {exc}")
        return EXIT_USAGE if exc.usage else EXIT_BAD
    try:
        write_atomic(args.out, data)
    except OSError as exc:
        _err(f"--out {args.out}: cannot write: {exc.strerror}")
        return EXIT_USAGE
    _out(
        f"wrote {args.out} ({len(data)} bytes): delivery {args.delivery}, entries seq "
        f"{bundle['first_seq']}..{bundle['last_seq']}, tree size {bundle['tree_size']}, "
        f"{len(bundle['range_proof'])} proof hashes"
    )
    return EXIT_OK


def run_verify_bundle(args: argparse.Namespace) -> int:
    try:
        pubkey = load_pubkey(args.pubkey)
        # The same keys and quorum rules as verify --witness-key (audit/witnessed.py):
        # a vkey line or its .pub file, none twice, a quorum of 1 .. the keys given.
        witnesses = load_witness_keys([str(w) for w in args.witness_key], args.quorum)
        raw = read_small_file(args.bundle, MAX_BUNDLE, expected="a proof bundle")
    except UsageError as exc:
        _err(str(exc))
        return EXIT_USAGE
    except FileReadError as exc:
        _err(f"{args.bundle}: {exc.reason}")
        return EXIT_USAGE
    try:
        c = check_bundle(raw, pubkey, witnesses, args.quorum)
    except BundleError as exc:
        if exc.usage:
            _err(str(exc))
            return EXIT_USAGE
        _out(f"NOT VERIFIED: {args.bundle}: {exc}")
        return EXIT_BAD
    _out(
        f"VERIFIED: delivery {c.delivery_id}, entries seq {c.first_seq}..{c.last_seq} are the "
        f"whole contiguous range in the tree of size {c.tree_size} of {c.origin}, signed by "
        f"{pubkey.name}"
    )
    if c.cosigned_by:
        _out(f"  cosigned by {', '.join(c.cosigned_by)}")
    if c.consistent_from is not None:
        _out(f"  extends the held checkpoint of size {c.consistent_from} (consistency proof)")
    for line in c.caveats:
        _out(f"  note: {line}")
    for line in c.unvouched:
        _out(f"  UNVOUCHED: {line}")
    return EXIT_BAD if c.unvouched else EXIT_OK
