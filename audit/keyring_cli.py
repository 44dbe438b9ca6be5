"""``iort-audit keyring``: enrol, list and check the keys that may sign commands.

    iort-audit keyring check FILE
    iort-audit keyring list FILE
    iort-audit keyring add FILE --holder ID --name NAME --role ROLE [--role ...]
                                --pubkey HOLDER.pub --valid-from TS --valid-until TS

The file is the keyring of auditlog/keyring.py (docs/commands.md). ``check`` prints every
problem (file, entry, key) and exits 1 when there is one; ``list`` prints each entry's
holder, printed name, roles, window and whether it is valid now, and the file's SHA-256 (the
one the daemon records in ``keyring_loaded``); never a key. ``add`` appends one ``[[key]]``
table for a public key written by ``iort-audit keygen``, and only if the whole file still
checks afterwards: it is written to a temporary file and renamed over the old one, so a
crash leaves the old keyring or the new one, never half of it.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from iortd.auditlog.keyring import (
    MAX_KEYRING_BYTES,
    ROLES,
    KeyringError,
    load_keyring,
    parse_keyring,
    parse_utc,
)
from iortd.auditlog.note import KeyFileError, load_verifier
from iortd.kernel.durable import write_atomic

__all__ = ["add_parser", "run"]

EXIT_OK, EXIT_BAD, EXIT_USAGE = 0, 1, 2


def _out(msg: str) -> None:
    print(msg)  # noqa: T201 - CLI output


def _err(msg: str) -> None:
    print(f"iort-audit: {msg}", file=sys.stderr)  # noqa: T201 - CLI output


def add_parser(sub: Any) -> None:
    k = sub.add_parser("keyring", help="check, list or add the keys that may sign commands")
    ks = k.add_subparsers(dest="keyring_command", required=True)
    for name, what in (("check", "every problem of a keyring"), ("list", "its entries")):
        c = ks.add_parser(name, help=what)
        c.add_argument("file", type=Path, metavar="FILE")
    a = ks.add_parser("add", help="enrol a public key written by iort-audit keygen")
    a.add_argument("file", type=Path, metavar="FILE", help="the keyring (created if missing)")
    a.add_argument("--holder", required=True, help="holder id, e.g. phys-anna (= the key name)")
    a.add_argument("--name", required=True, help="printed name for signatures (staff)")
    a.add_argument("--role", required=True, action="append", choices=sorted(ROLES), dest="roles")
    a.add_argument("--pubkey", required=True, type=Path, metavar="HOLDER.pub")
    a.add_argument("--valid-from", required=True, metavar="TS", help="RFC 3339 UTC, with Z")
    a.add_argument("--valid-until", required=True, metavar="TS")


def run(args: argparse.Namespace) -> int:
    if args.keyring_command == "add":
        return _add(args)
    try:
        ring = load_keyring(args.file)
    except KeyringError as exc:
        for p in exc.problems:
            _err(p)
        return EXIT_BAD
    if args.keyring_command == "check":
        _out(f"{args.file}: {len(ring.entries)} key(s), no problems; sha256 {ring.sha256}")
        return EXIT_OK
    now = datetime.now(UTC)
    _out(f"# {args.file} sha256 {ring.sha256}")
    for e in ring:
        s = e.summary()
        state = "valid now" if e.valid_at(now) else "NOT valid now"
        roles = ",".join(s["roles"])
        _out(
            f"{e.holder}\t{e.name}\t{roles}\t{s['valid_from']} .. {s['valid_until']}\t"
            f"{state}\tkey {e.verifier.key_hash:08x}"
        )
    return EXIT_OK


def _add(args: argparse.Namespace) -> int:
    path: Path = args.file
    try:
        verifier = load_verifier(args.pubkey)
        for ts in (args.valid_from, args.valid_until):
            parse_utc(ts)
        old = path.read_bytes() if path.exists() else b""
    except (KeyFileError, OSError) as exc:
        _err(str(exc))
        return EXIT_USAGE
    except ValueError as exc:
        _err(f"--valid-from/--valid-until: {exc}")
        return EXIT_USAGE
    if verifier.name != args.holder:
        _err(
            f"--pubkey {args.pubkey} is the key of {verifier.name!r}, not of --holder "
            f"{args.holder!r}: make it with iort-audit keygen --name {args.holder}"
        )
        return EXIT_USAGE
    block = "\n".join(
        [
            "[[key]]",
            f"holder = {json.dumps(args.holder)}",
            f"name = {json.dumps(args.name)}",
            f"roles = {json.dumps(sorted(set(args.roles)))}",
            f"public_key = {json.dumps(verifier.text)}",
            f"valid_from = {json.dumps(args.valid_from)}",
            f"valid_until = {json.dumps(args.valid_until)}",
        ]
    )
    sep = b"" if not old or old.endswith(b"\n\n") else (b"\n" if old.endswith(b"\n") else b"\n\n")
    new = old + sep + block.encode() + b"\n"
    if len(new) > MAX_KEYRING_BYTES:
        _err(f"{path}: would exceed {MAX_KEYRING_BYTES} bytes")
        return EXIT_BAD
    try:
        parse_keyring(new, path)
    except KeyringError as exc:
        for p in exc.problems:
            _err(p)
        _err(f"{path}: not changed")
        return EXIT_BAD
    write_atomic(path, new)
    _out(f"{path}: added {args.holder} ({','.join(sorted(set(args.roles)))}); restart iortd")
    return EXIT_OK
