"""``iort-audit send``: hand a delivery's instances to a DICOM destination by hand (issue 23).

    iort-audit send --delivery ID --to NAME --config SITE.toml [--log DIR] [--archive DIR]
                    [--store DIR] [--pubkey FILE] [--keyring FILE] [--listen HOST:PORT]
    iort-audit send --echo --to NAME --config SITE.toml

What the daemon's DICOM sink does after a delivery, done once by a person: the log is
verified first (against ``--pubkey``, else the key recorded in it; a log that is not intact,
or a delivery with unvouched entries, sends nothing, exit 1), the instances are built by
audit/dicom_handoff.py (the same bytes as ``export --format dicom`` and ``report FILE.pdf``
with the same options, so a resend is the same SOP instance to the receiver), sent to the
destination NAME of the site's ``type = "dicom"`` sink over one association, and, when the
destination has ``commitment = true``, Storage Commitment is asked for and awaited.

From the site config it reads only what it needs, resolved against the file's directory:
``[log] directory`` (``--log`` overrides it, e.g. for a copy), ``[log.retention]
archive_dir`` (``--archive`` overrides it: the log is verified across the directory and
the archive, as ``iort-audit verify --archive`` does), and of the
``[[sinks]]`` table of ``type = "dicom"`` naming the destination: ``calling_ae``, ``send``
(default both), ``when`` (``signoff``: a delivery without a sign-off is refused, exit 1),
``protected_store`` (``--store`` overrides it) and ``commitment_listen`` (``--listen``
overrides it); the destination table through audit/dicom_config.py. Its other keys are
the sink's (``iortd check-config`` checks them).

``--echo`` sends nothing: a C-ECHO to the destination, for checking the link, the AE
titles and TLS before the first delivery (exit 0 answered with success, 1 otherwise).

Output: one line per instance (its SOP class, SOP Instance UID, the outcome and the DIMSE
status or the reason of a refusal), then the commitment's answer. No patient data: the
Patient ID and plan UID from the protected store are in the objects sent and nowhere else.
Nothing is written to the audit log (the auditors' tools never write it); the daemon's sink
records its own attempts.

Exit status: 0 every instance stored (with a warning status too: the peer kept it; the line
says so) and, with commitment, committed; 1 the log is not intact or unvouched, the delivery
is not signed off where the site requires it, or any instance was not stored or not
committed; 2 usage or configuration (an option, the config, no such delivery or
destination, the extra ``reports`` not installed).
"""

from __future__ import annotations

import argparse
import sys
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from iortd.audit.dicom_config import (
    Destination,
    DestinationError,
    parse_ae_title,
    parse_destinations,
    parse_listen,
)
from iortd.audit.extra import with_extra
from iortd.audit.inputs import UsageError
from iortd.kernel.files import FileReadError, read_small_file

__all__ = ["SendPlan", "add_parser", "run", "send_plan"]

EXIT_OK, EXIT_BAD, EXIT_USAGE = 0, 1, 2
_SOP_NAMES = {
    "1.2.840.10008.5.1.4.1.1.481.4": "RT Beams Treatment Record",
    "1.2.840.10008.5.1.4.1.1.104.1": "Encapsulated PDF",
}


def _err(msg: str) -> None:
    print(f"iort-audit: {msg}", file=sys.stderr)  # noqa: T201 - CLI output


def _out(msg: str) -> None:
    print(msg)  # noqa: T201 - CLI output


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "send", help="send a delivery's DICOM instances to a destination of the site's dicom sink"
    )
    p.add_argument("--delivery", metavar="ID", help="see: iort-audit deliveries")
    p.add_argument(
        "--echo",
        action="store_true",
        help="instead of sending: a C-ECHO to the destination (is the link up, our AE known)",
    )
    p.add_argument("--to", required=True, metavar="NAME", help="the destination's name")
    p.add_argument("--config", required=True, type=Path, metavar="SITE.toml", help="site config")
    p.add_argument("--log", type=Path, metavar="DIR", help="the log directory (default: [log])")
    p.add_argument(
        "--archive",
        type=Path,
        metavar="DIR",
        help="where retention archived the log's segments (default: [log.retention])",
    )
    p.add_argument(
        "--store", type=Path, metavar="DIR", help="the protected store (default: the sink's)"
    )
    p.add_argument("--pubkey", type=Path, metavar="FILE", help="the daemon's public key")
    p.add_argument(
        "--keyring", type=Path, metavar="FILE", help="the command keyring (the report's names)"
    )
    p.add_argument(
        "--listen",
        metavar="HOST:PORT",
        help="our Storage Commitment listener (default: the sink's commitment_listen)",
    )


@dataclass(frozen=True, slots=True)
class SendPlan:
    """What the config says about one destination of a dicom sink."""

    log_dir: Path
    archive: Path | None
    calling_ae: str
    dest: Destination
    what: tuple[str, ...]
    signoff_only: bool
    store_dir: Path | None
    listen: tuple[str, int] | None


def _table(value: Any, where: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise UsageError(f"{where}: must be a table")
    return value


def _rel(value: Any, where: str, base: Path) -> Path:
    if not isinstance(value, str) or not value or "\x00" in value:
        raise UsageError(f"{where}: must be a path (a non-empty string)")
    p = Path(value)
    return p if p.is_absolute() else base / p


def send_plan(config: Path, to: str) -> SendPlan:
    """Read ``config`` for destination ``to`` (UsageError naming the file and key)."""
    try:
        raw = read_small_file(config, expected="a TOML file")
        data = tomllib.loads(raw.decode("utf-8"))
    except FileReadError as exc:
        raise UsageError(f"--config {config}: {exc.reason}") from None
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise UsageError(f"--config {config}: not a TOML file ({exc})") from None
    base = config.resolve().parent
    log = _table(data.get("log", {}), f"{config}: [log]")
    log_dir = _rel(log.get("directory"), f"{config}: log.directory", base)
    retention = _table(log.get("retention", {}), f"{config}: [log.retention]")
    archive = retention.get("archive_dir")
    sinks = data.get("sinks", [])
    if not isinstance(sinks, list):
        raise UsageError(f"{config}: sinks: must be an array of tables ([[sinks]])")
    found: list[tuple[int, Mapping[str, Any], Destination]] = []
    names: list[str] = []
    for i, sink in enumerate(sinks):
        if not isinstance(sink, Mapping) or sink.get("type") != "dicom":
            continue
        where = f"sinks[{i}].options"
        options = _table(sink.get("options", {}), f"{config}: {where}")
        try:
            dests = parse_destinations(options, where, base=base)
        except DestinationError as exc:
            raise UsageError(f"{config}: {exc}") from None
        names += [d.name for d in dests]
        found += [(i, options, d) for d in dests if d.name == to]
    if not found:
        known = ", ".join(names) if names else "none: the config has no [[sinks]] type = dicom"
        raise UsageError(f"--to {to}: no such destination in {config} (destinations: {known})")
    if len(found) > 1:
        raise UsageError(f"--to {to}: {config} has two dicom sinks with that destination")
    i, options, dest = found[0]
    where = f"{config}: sinks[{i}].options"
    try:
        calling_ae = parse_ae_title(options.get("calling_ae"), f"{where}.calling_ae")
        listen = (
            parse_listen(options["commitment_listen"], f"{where}.commitment_listen")
            if "commitment_listen" in options
            else None
        )
    except DestinationError as exc:
        raise UsageError(str(exc)) from None
    send = options.get("send", ["record", "report"])
    if (
        not isinstance(send, list)
        or not send
        or any(w not in ("record", "report") for w in send)
        or len(set(send)) != len(send)
    ):
        raise UsageError(f'{where}.send: {send!r}: give one or both of "record", "report"')
    when = options.get("when", "termination")
    if when not in ("termination", "signoff"):
        raise UsageError(f'{where}.when: {when!r}: "termination" or "signoff"')
    store = options.get("protected_store")
    return SendPlan(
        log_dir=log_dir,
        archive=None
        if archive is None
        else _rel(archive, f"{config}: log.retention.archive_dir", base),
        calling_ae=calling_ae,
        dest=dest,
        what=tuple(send),
        signoff_only=when == "signoff",
        store_dir=None if store is None else _rel(store, f"{where}.protected_store", base),
        listen=listen,
    )


def run(args: argparse.Namespace) -> int:
    try:
        plan = send_plan(args.config, args.to)
        listen = parse_listen(args.listen, "--listen") if args.listen else plan.listen
        net, handoff = with_extra("iort-audit send", _load)
    except (UsageError, DestinationError) as exc:
        _err(str(exc))
        return EXIT_USAGE
    dest = plan.dest
    if args.echo:
        return _echo(net, plan, args)
    if not args.delivery:
        _err("send: give --delivery ID or --echo")
        return EXIT_USAGE
    if dest.commitment and listen is None:
        _err(
            f"--to {dest.name}: commitment = true needs our listener for the peer's "
            "N-EVENT-REPORT: set commitment_listen in the sink's options or give --listen"
        )
        return EXIT_USAGE
    try:
        instances = handoff.handoff_instances(
            args.log or plan.log_dir,
            args.delivery,
            what=plan.what,
            store_dir=args.store or plan.store_dir,
            keyring=args.keyring,
            pubkey=args.pubkey,
            require_signoff=plan.signoff_only,
            archive=args.archive or plan.archive,
        )
    except handoff.HandoffError as exc:
        _err(str(exc))
        return EXIT_USAGE if exc.usage else EXIT_BAD
    peer = f"{dest.ae_title} at {dest.host}:{dest.port}"
    _out(f"sending delivery {args.delivery} to {dest.name} ({peer}) as {plan.calling_ae}")
    outcomes = net.store(plan.calling_ae, dest, instances)
    status = EXIT_OK
    for ds, o in zip(instances, outcomes, strict=True):
        kind = _SOP_NAMES.get(str(ds.SOPClassUID), str(ds.SOPClassUID))
        _out(f"  {o.outcome.upper():<11} {kind} {o.sop_instance_uid}: {o.detail}")
        status = status if o.outcome in ("stored", "warning") else EXIT_BAD
    if not dest.commitment or status != EXIT_OK or listen is None:
        return status
    refs = [(str(ds.SOPClassUID), str(ds.SOPInstanceUID)) for ds in instances]
    c = net.request_commitment(
        plan.calling_ae,
        dest,
        refs,
        listen_host=listen[0],
        listen_port=listen[1],
        timeout_s=dest.timeout_s,
    )
    _out(f"  storage commitment (transaction {c.transaction_uid}): {c.detail}")
    for uid in c.committed:
        _out(f"  COMMITTED   {uid}")
    for uid, reason in c.failed:
        _out(f"  NOT COMMITTED {uid}: failure reason 0x{reason:04X}")
    return EXIT_OK if c.outcome == "reported" and len(c.committed) == len(refs) else EXIT_BAD


def _echo(net: Any, plan: SendPlan, args: argparse.Namespace) -> int:
    if args.delivery:
        _err("send: --echo sends nothing; give it without --delivery")
        return EXIT_USAGE
    dest = plan.dest
    _out(f"C-ECHO to {dest.name} ({dest.ae_title} at {dest.host}:{dest.port}) as {plan.calling_ae}")
    e = net.echo(plan.calling_ae, dest)
    _out(f"  {e.outcome.upper():<11} {e.detail}")
    return EXIT_OK if e.outcome == "ok" else EXIT_BAD


def _load() -> tuple[Any, Any]:
    from iortd.audit import dicom_handoff, dicom_net  # noqa: PLC0415 - the extra 'reports'

    return dicom_net, dicom_handoff
