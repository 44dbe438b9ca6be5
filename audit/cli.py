"""``iort-audit``: the auditors' tool for iortd delivery logs.

    iort-audit keygen --name NAME [--out DIR]
    iort-audit keyring check|list FILE; keyring add FILE --holder ... (audit/keyring_cli.py)
    iort-audit verify PATH... [--pubkey FILE] [--checkpoint FILE|DIR] [--archive DIR]
    iort-audit show PATH... [--delivery ID [--entries]] [--type T] [--since TS] [--until TS]
    iort-audit deliveries PATH...
    iort-audit report PATH... --delivery ID --out FILE.pdf|FILE.html [--pubkey FILE]
                              [--keyring FILE] [--allow-unverified]
    iort-audit export PATH... --delivery ID --format csv|json|dicom --out FILE
                              [--table samples|events|applicator] [--pubkey FILE]
                              [--store DIR] [--allow-unverified]
    iort-audit prove ...; verify-bundle ... (audit/bundle_cli.py); send (audit/send_cli.py)

Exit status: 0 intact / done; 1 the log is not intact (the first bad entry is named:
file, line, seq, what is wrong; a segment that is not a regular file, e.g. a FIFO or a
link, is a bad log too); 2 usage error (including a PATH, --pubkey or --checkpoint that is
not a readable regular file or directory). ``show`` and ``deliveries`` verify the
chain too and exit 1, after printing, when it is broken. ``report`` and ``export`` verify
first and write nothing when it is broken, unless --allow-unverified (then the output says
so, on every page of a report, and the exit status is still 1).

``report``, ``export --format dicom`` and ``send`` need the extra ``reports`` (reportlab,
matplotlib, pydicom, pynetdicom), imported only when run; without it they exit 2 naming
the package and ``pip install 'iortd[reports]'``. Every other command works without it.
"""

from __future__ import annotations

import argparse
import os
import stat
import sys
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from iortd.audit import bundle_cli, keyring_cli, send_cli, witnessed
from iortd.audit.export import applicator_csv, events_csv, json_export, samples_csv
from iortd.audit.extra import dicom_exporter, report_renderer, with_extra
from iortd.audit.handoff import load_report_keyring, read_hand_off
from iortd.audit.inputs import UsageError, held_checkpoints, load_pubkey
from iortd.audit.record import DeliveryRecord, NoSuchDelivery, Verification, read_delivery
from iortd.audit.review import (
    collect_deliveries,
    format_entry,
    format_summary,
    load_entries,
    one_line,
)
from iortd.audit.sampling import policy_findings
from iortd.audit.signoffs import attach_verdicts, verify_signoffs
from iortd.auditlog.note import (
    NoteError,
    Verifier,
    generate_keypair,
    write_keypair,
)
from iortd.auditlog.verify import VerifyReport, collect_files, unvouched_deliveries, verify_log
from iortd.kernel.durable import write_atomic
from iortd.kernel.version import __version__

__all__ = ["main"]

EXIT_OK, EXIT_BAD, EXIT_USAGE = 0, 1, 2


def _err(msg: str) -> None:
    print(f"iort-audit: {msg}", file=sys.stderr)  # noqa: T201 - CLI output


def _out(msg: str) -> None:
    print(msg)  # noqa: T201 - CLI output


def _progress(total: int) -> Callable[[int], None] | None:
    """A progress bar on stderr, only when it is a terminal and the log is large."""
    if not sys.stderr.isatty() or total < 16 * 1024 * 1024:
        return None

    def show(done: int) -> None:
        frac = min(done / total, 1.0)
        bar = "#" * int(frac * 40)
        sys.stderr.write(f"\rverifying [{bar:<40}] {frac:6.1%} of {total / 1e6:.0f} MB")
        if done >= total:
            sys.stderr.write("\n")
        sys.stderr.flush()

    return show


def _verify(
    paths: Sequence[Path],
    pubkey: Verifier | None,
    external: Sequence[str] | None,
    archive: Path | None = None,
) -> VerifyReport:
    files = collect_files(paths) + (collect_files([archive]) if archive else [])
    total = sum(f.stat().st_size for f in files if f.is_file())
    return verify_log(
        paths, pubkey=pubkey, external=external, progress=_progress(total), archive=archive
    )


def _cmd_keygen(args: argparse.Namespace) -> int:
    out: Path = args.out
    if out.exists() and not out.is_dir():
        # write_keypair's mkdir would raise FileExistsError for --out itself, which is not
        # the key already existing.
        _err(f"--out {out}: not a directory; give the directory for NAME.key and NAME.pub")
        return EXIT_USAGE
    key_path = out / f"{args.name}.key"
    try:
        signer = generate_keypair(args.name)
        key, pub = write_keypair(signer, out)
    except NoteError as exc:
        _err(str(exc))
        return EXIT_USAGE
    except FileExistsError as exc:
        if exc.filename is not None and Path(exc.filename) == key_path:
            _err(f"{key_path} exists; not overwriting a signing key")
        else:
            _err(f"--out {out}: {exc.filename} is in the way: {exc.strerror}")
        return EXIT_USAGE
    except OSError as exc:
        _err(f"--out {args.out}: {exc.strerror or exc}")
        return EXIT_USAGE
    _out(f"private key: {key} (mode 0600; point log.signing_key_file at it)")
    _out(f"public key:  {pub} (give it to auditors: iort-audit verify --pubkey {pub})")
    _out(f"verifier key: {signer.verifier.text}")
    return EXIT_OK


def _check_paths(paths: Sequence[Path]) -> bool:
    """A usage error (False) for a PATH that is neither a directory nor a regular file. The
    segments *inside* a directory are checked as they are read (segments.py): a bad one
    there makes the log not intact, exit 1."""
    ok = True
    for p in paths:
        try:
            mode = p.stat().st_mode
        except FileNotFoundError:
            _err(f"{p}: no such file or directory")
            ok = False
            continue
        except OSError as exc:
            _err(f"{p}: cannot be read: {exc.strerror}")
            ok = False
            continue
        if not (stat.S_ISDIR(mode) or stat.S_ISREG(mode)):
            _err(f"{p}: not a log directory or segment file (not a regular file)")
            ok = False
    return ok


def _cmd_verify(args: argparse.Namespace) -> int:
    if not _check_paths(args.paths):
        return EXIT_USAGE
    if args.checkpoint and not args.pubkey:
        _err(
            "--checkpoint needs --pubkey: a checkpoint is only evidence if its signature is checked"
        )
        return EXIT_USAGE
    if args.archive is not None and not args.archive.is_dir():
        _err(f"--archive {args.archive}: not a directory (mount the archive share?)")
        return EXIT_USAGE
    pubkey = None
    external: list[str] | None = None
    try:
        ring = load_report_keyring(args.keyring) if args.keyring else None
        if args.pubkey:
            pubkey = load_pubkey(args.pubkey)
        if args.checkpoint and pubkey is not None:
            external = held_checkpoints(args.checkpoint, pubkey)
        witnesses = witnessed.load_witness_keys(args.witness_key, args.quorum)
    except UsageError as exc:
        _err(str(exc))
        return EXIT_USAGE
    rep = _verify(args.paths, pubkey, external, args.archive)
    for w in rep.warnings:
        _err(f"warning: {w}")
    if not rep.intact:
        _out(f"NOT INTACT: {rep.problem}")
        _out(f"  {rep.entries} entries before it verified")
        verify_signoffs(rep.files, ring, _out, _err)  # an edited sign-off is named too
        return EXIT_BAD
    for w in policy_findings(load_entries(rep.files)):  # audit/sampling.py
        _err(f"warning: samples: {w}")
    who = (
        f"signed by {pubkey.name}"
        if pubkey
        else "checked against the key recorded in the log only (pass --pubkey for assurance)"
    )
    _out(
        f"INTACT: {rep.entries} entries in {len(rep.files)} file(s), {rep.bytes} bytes; "
        f"origin {rep.origin}"
    )
    _out(f"  head: seq {rep.head_seq}, hash {rep.head_hash}")
    if rep.archive_counts is not None:
        local, archived, both = rep.archive_counts
        _out(
            f"  archive {rep.archive}: {archived} segment(s) read from it, {local} from the "
            f"log directory, {both} in both places (compared equal)"
        )
    _out(f"  checkpoints: {rep.checkpoints} verified, {who}")
    unsigned = rep.head_seq - rep.signed_through
    _out(
        f"  signed through seq {rep.signed_through}"
        + (
            f"; {unsigned} later {'entry is' if unsigned == 1 else 'entries are'} not covered "
            "by a signature yet"
            if unsigned
            else ""
        )
    )
    if rep.external_checkpoint:
        _out(f"  checkpoint held elsewhere: {rep.external_checkpoint}")
    else:
        _out(
            "  note: without --checkpoint, removal of the entries after the last seal or "
            "checkpoint cannot be detected if the seal and checkpoint files were deleted too: "
            "keep a checkpoint off this host"
        )
    signed_ok = verify_signoffs(rep.files, ring, _out, _err)  # audit/signoffs.py
    if witnesses:  # audit/witnessed.py
        q = args.quorum or 1
        signed_ok &= witnessed.check_witnessed(load_entries(rep.files), witnesses, q, _out, _err)
    return max(_report_unvouched(rep), EXIT_OK if signed_ok else EXIT_BAD)


def _report_unvouched(rep: VerifyReport) -> int:
    """The seal/checkpoint-file findings, and entries no signature vouches for: each
    range, the deliveries it touches, and exit 1 (the chain is intact, but the log does
    not show those entries to be genuine)."""
    for a in rep.anchors:
        _out(f"  {a}")
    if rep.writer_running:
        _out(
            "  the daemon is writing this log: the entries after the seal are its current "
            "group commit, sealed within the commit window"
        )
    if not rep.unvouched:
        return EXIT_OK
    for u in rep.unvouched:
        _out(f"UNVOUCHED: {u}")
    for did, ranges in unvouched_deliveries(rep.files, rep.unvouched).items():
        _out(f"UNVOUCHED: delivery {did} has entries in {ranges}")
    n = sum(u.count for u in rep.unvouched)
    _out(
        f"RESULT: the chain is intact, but {n} {'entry is' if n == 1 else 'entries are'} "
        "not vouched for by any signature: they may have been written by anyone with write "
        "access to the log directory (exit status 1)"
    )
    return EXIT_BAD


def _parse_ts(text: str | None) -> str | None:
    if text is None:
        return None
    try:
        dt = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO 8601 time: {text!r}") from None
    if dt.tzinfo is None:
        raise argparse.ArgumentTypeError(f"give a time zone (e.g. Z): {text!r}")
    # Compared as text with the log's ts: the same instant, in UTC, in the same format.
    try:
        utc = dt.astimezone(UTC)
    except OverflowError:
        raise argparse.ArgumentTypeError(f"out of range: {text!r}") from None
    return utc.replace(tzinfo=None).isoformat(timespec="microseconds") + "Z"


def _chain_warning(paths: Sequence[Path]) -> VerifyReport:
    rep = verify_log(paths)
    if not rep.intact:
        _err(f"warning: the log is NOT INTACT: {rep.problem}; run iort-audit verify")
    for u in rep.unvouched:
        _err(f"warning: UNVOUCHED: {u}")
    return rep


def _unvouched_of(rep: VerifyReport) -> dict[str, str]:
    return unvouched_deliveries(rep.files, rep.unvouched) if rep.intact else {}


def _cmd_show(args: argparse.Namespace) -> int:
    if not _check_paths(args.paths):
        return EXIT_USAGE
    try:
        since, until = _parse_ts(args.since), _parse_ts(args.until)
    except argparse.ArgumentTypeError as exc:
        _err(str(exc))
        return EXIT_USAGE
    rep = _chain_warning(args.paths)
    files = collect_files(args.paths)
    entries: Iterable[dict[str, Any]] = load_entries(files)
    if args.delivery:
        records = [r for r in collect_deliveries(entries) if r.delivery_id == args.delivery]
        if not records:
            _err(
                f"no delivery {args.delivery!r} in the log (list them with: iort-audit deliveries)"
            )
            return EXIT_USAGE
        _out(format_summary(records[0]))
        touched = _unvouched_of(rep).get(args.delivery)
        if touched:
            _out(f"  UNVOUCHED       entries {touched}: not covered by any signature as genuine")
        if not args.entries:
            return EXIT_OK if rep.vouched else EXIT_BAD
        # A second streaming pass: the log is never held in memory whole.
        entries = (e for e in load_entries(files) if e.get("delivery_id") == args.delivery)
    for e in entries:
        ts = str(e.get("ts", ""))
        if args.type and e.get("type") not in args.type:
            continue
        if since and ts < since:
            continue
        if until and ts > until:
            continue
        mark = ""
        seq = e.get("seq")
        if isinstance(seq, int) and any(u.first_seq <= seq <= u.last_seq for u in rep.unvouched):
            mark = "  [UNVOUCHED]"
        _out(format_entry(e) + mark)
    return EXIT_OK if rep.vouched else EXIT_BAD


def _cmd_deliveries(args: argparse.Namespace) -> int:
    if not _check_paths(args.paths):
        return EXIT_USAGE
    rep = _chain_warning(args.paths)
    touched = _unvouched_of(rep)
    for rec in collect_deliveries(load_entries(collect_files(args.paths))):
        ranges = touched.get(rec.delivery_id)
        _out(one_line(rec) + (f"  UNVOUCHED entries {ranges}" if ranges else ""))
    return EXIT_OK if rep.vouched else EXIT_BAD


REPORT_SUFFIXES = {".pdf": "pdf", ".html": "html", ".htm": "html"}
EXPORT_SUFFIXES = {"csv": (".csv",), "json": (".json",), "dicom": (".dcm",)}


def _check_out(out: Path, suffixes: Sequence[str], what: str) -> bool:
    """A usage error (False) for an --out that cannot be what was asked or written."""
    if out.suffix.lower() not in suffixes:
        _err(f"--out {out}: {what} needs a file name ending in {' or '.join(suffixes)}")
        return False
    parent = out.parent if str(out.parent) else Path()
    if not parent.is_dir():
        _err(f"--out {out}: directory {parent} does not exist")
        return False
    if out.is_dir():
        _err(f"--out {out}: is a directory")
        return False
    if not os.access(parent, os.W_OK | os.X_OK):
        _err(f"--out {out}: directory {parent} is not writable")
        return False
    return True


def _write_out(out: Path, data: bytes) -> bool:
    """All or nothing: a temporary file beside ``out``, fsync'd, renamed over it."""
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        write_atomic(out, data, tmp=tmp)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        _err(f"--out {out}: cannot write: {exc.strerror or exc}")
        return False
    return True


def _verified_delivery(args: argparse.Namespace) -> tuple[int, DeliveryRecord | None, str | None]:
    """Verify the log, then read the delivery: (exit status so far, record, key name)."""
    if not _check_paths(args.paths):
        return EXIT_USAGE, None, None
    pubkey = None
    if args.pubkey:
        try:
            pubkey = load_pubkey(args.pubkey)
        except UsageError as exc:
            _err(str(exc))
            return EXIT_USAGE, None, None
    rep = _verify(args.paths, pubkey, None)
    key = f"--pubkey {pubkey.name}" if pubkey else "the key recorded in the log"
    status = EXIT_OK
    touched = _unvouched_of(rep).get(args.delivery)
    if touched:
        why = (
            f"entries {touched} of delivery {args.delivery} are UNVOUCHED (written after "
            "the last seal before a crash; not covered by any signature as genuine)"
        )
        _out(f"UNVOUCHED: {why}")
        if not args.allow_unverified:
            _err(f"{why}; nothing written. --allow-unverified writes an output marked NOT VERIFIED")
            return EXIT_BAD, None, None
        _err(f"warning: {why}; the output is marked NOT VERIFIED")
        status = EXIT_BAD
    if not rep.intact:
        _out(f"NOT INTACT: {rep.problem}")
        if not args.allow_unverified:
            _err(
                f"the log is not intact ({rep.problem}); nothing written. Check it with "
                "iort-audit verify; --allow-unverified writes an output marked NOT VERIFIED"
            )
            return EXIT_BAD, None, None
        _err(f"warning: the log is NOT INTACT; the output is marked NOT VERIFIED: {rep.problem}")
        status = EXIT_BAD
    try:
        rec = read_delivery(args.paths, args.delivery, Verification.of(rep, key, touched))
    except NoSuchDelivery:
        _err(
            f"--delivery {args.delivery}: no such delivery in the log "
            f"(list them with: iort-audit deliveries {' '.join(map(str, args.paths))})"
        )
        return EXIT_USAGE, None, None
    return status, rec, pubkey.name if pubkey else None


def _cmd_report(args: argparse.Namespace) -> int:
    if not _check_out(args.out, tuple(REPORT_SUFFIXES), "a report"):
        return EXIT_USAGE
    kind = REPORT_SUFFIXES[args.out.suffix.lower()]
    try:
        render = with_extra("iort-audit report", lambda: report_renderer(kind))
        ring = load_report_keyring(args.keyring) if args.keyring else None
    except UsageError as exc:
        _err(str(exc))
        return EXIT_USAGE
    status, rec, key_name = _verified_delivery(args)
    if rec is None:
        return status
    if ring is not None:  # the sign-offs' signatures checked, as verify --keyring does
        attach_verdicts(rec, args.paths, ring)
    data = render(rec, key_name, ring)
    if not _write_out(args.out, data):
        return EXIT_USAGE
    v = rec.verification
    state = "INTACT" if v.intact and not v.unvouched else "NOT VERIFIED"
    _out(
        f"wrote {args.out} ({len(data)} bytes): delivery {rec.delivery_id}, entries seq "
        f"{rec.first_seq}-{rec.last_seq}, log {state}"
    )
    return status


def _cmd_export(args: argparse.Namespace) -> int:
    if not _check_out(args.out, EXPORT_SUFFIXES[args.format], f"--format {args.format}"):
        return EXIT_USAGE
    if args.table and args.format != "csv":
        _err(f"--table {args.table}: only with --format csv")
        return EXIT_USAGE
    if args.store and args.format != "dicom":
        _err("--store: only with --format dicom (the hand-off to the hospital)")
        return EXIT_USAGE
    if args.allow_unverified and args.format != "json":
        _err(
            f"--allow-unverified: not with --format {args.format}, which has no place to say "
            "the log is not intact; use --format json (it records the verification result)"
        )
        return EXIT_USAGE
    dicom_export = None
    if args.format == "dicom":
        try:
            dicom_export = with_extra("iort-audit export --format dicom", dicom_exporter)
        except UsageError as exc:
            _err(str(exc))
            return EXIT_USAGE
    status, rec, _ = _verified_delivery(args)
    if rec is None:
        return status
    try:
        if dicom_export is not None:
            # The real Patient ID and plan UID go into the file only, never to the output.
            rx_id = rec.prescription_check.prescription.get("treatment_id")
            tid = str(rx_id or rec.plan.get("treatment_id") or "")
            data = dicom_export(rec, read_hand_off(args.store, tid) if args.store else None)
        elif args.format == "csv":
            table = {"events": events_csv, "applicator": applicator_csv}
            data = table.get(args.table or "samples", samples_csv)(rec)
        else:
            data = json_export(rec)
    except UsageError as exc:
        _err(str(exc))
        return EXIT_USAGE
    if not _write_out(args.out, data):
        return EXIT_USAGE
    _out(f"wrote {args.out} ({len(data)} bytes): delivery {rec.delivery_id}, {args.format}")
    return status


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="iort-audit", description="Verify and review iortd delivery logs."
    )
    p.add_argument("--version", action="version", version=f"iort-audit {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    k = sub.add_parser("keygen", help="make an Ed25519 key pair for signing checkpoints")
    k.add_argument("--name", required=True, help="key name, e.g. iortd-or-3 (no '+' or spaces)")
    k.add_argument("--out", type=Path, default=Path(), help="directory for NAME.key and NAME.pub")
    keyring_cli.add_parser(sub)
    bundle_cli.add_parsers(sub)
    send_cli.add_parser(sub)
    v = sub.add_parser("verify", help="check the chain, seqs and signatures of a log")
    v.add_argument("paths", nargs="+", type=Path, metavar="PATH", help="log directory or files")
    v.add_argument("--pubkey", type=Path, metavar="FILE", help="the daemon's public key (NAME.pub)")
    v.add_argument(
        "--checkpoint",
        type=Path,
        metavar="PATH",
        help="a checkpoint kept off the host: the signed note, the JSON payload saved from "
        "the audit/checkpoint topic, or a directory of them",
    )
    v.add_argument(
        "--archive",
        type=Path,
        metavar="DIR",
        help="where retention archived the log's segments (the share's archive_dir or the "
        "log's directory in it): the archived and local segments are verified as one log",
    )
    v.add_argument(
        "--keyring", type=Path, metavar="FILE", help="check the sign-offs' signatures against it"
    )
    witnessed.add_arguments(v)
    s = sub.add_parser("show", help="print entries, or one delivery's summary")
    s.add_argument("paths", nargs="+", type=Path, metavar="PATH")
    s.add_argument("--delivery", metavar="ID", help="summarise this delivery")
    s.add_argument("--entries", action="store_true", help="with --delivery: its entries too")
    s.add_argument("--type", action="append", metavar="T", help="only entries of this type")
    s.add_argument("--since", metavar="TS", help="only entries at or after TS (ISO 8601, UTC)")
    s.add_argument("--until", metavar="TS", help="only entries at or before TS")
    d = sub.add_parser("deliveries", help="list deliveries, one line each")
    d.add_argument("paths", nargs="+", type=Path, metavar="PATH")
    r = sub.add_parser("report", help="a delivery's report (PDF or HTML) from a verified log")
    r.add_argument("paths", nargs="+", type=Path, metavar="PATH", help="log directory or files")
    e = sub.add_parser("export", help="a delivery as CSV, JSON or a DICOM RT treatment record")
    e.add_argument("paths", nargs="+", type=Path, metavar="PATH", help="log directory or files")
    e.add_argument("--format", required=True, choices=["csv", "json", "dicom"])
    e.add_argument(
        "--table",
        choices=["samples", "events", "applicator"],
        help="with --format csv (default: samples; applicator: the reader's samples)",
    )
    e.add_argument(
        "--store",
        type=Path,
        metavar="DIR",
        help="with --format dicom: the protected store (iort-plan import --protected-store); "
        "the record then carries the real Patient ID and refers to the RT Plan",
    )
    r.add_argument(
        "--keyring",
        type=Path,
        metavar="FILE",
        help="the command keyring: physicists' names, and whether each was enrolled then",
    )
    for c in (r, e):
        c.add_argument("--delivery", required=True, metavar="ID", help="see: iort-audit deliveries")
        c.add_argument("--out", required=True, type=Path, metavar="FILE", help="the file to write")
        c.add_argument("--pubkey", type=Path, metavar="FILE", help="the daemon's public key")
        c.add_argument(
            "--allow-unverified",
            action="store_true",
            help="write even if the log is not intact, marked NOT VERIFIED (exit status 1)",
        )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return _main(argv)
    except BrokenPipeError:
        # `iort-audit show LOG | head`: the reader has gone; not an error of ours.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_OK


def _main(argv: Sequence[str] | None) -> int:
    args = _parser().parse_args(argv)
    handlers = {
        "keygen": _cmd_keygen,
        "keyring": keyring_cli.run,
        "verify": _cmd_verify,
        "show": _cmd_show,
        "deliveries": _cmd_deliveries,
        "report": _cmd_report,
        "export": _cmd_export,
        "prove": bundle_cli.run_prove,
        "verify-bundle": bundle_cli.run_verify_bundle,
        "send": send_cli.run,
    }
    return handlers[args.command](args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
