"""``iortd fabric-config --spec FABRIC.toml --out DIR [--check]``.

Writes (or, with ``--check``, compares) the central and site brokers' configs, ACLs and
password files and the accounts' secret files; prints what it wrote and the queue limits
with the figures they came from.

Exit status: 0 written, or everything matches the spec; 1 ``--check`` found a file that
is missing or differs; 2 usage or spec error (each names the file and key).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import check_fabric, load_spec, write_fabric
from .secrets import PasswordError
from .spec import FabricSpec, SpecError

__all__ = ["add_parser", "fabric_config"]

EXIT_OK, EXIT_BAD, EXIT_USAGE = 0, 1, 2


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "fabric-config",
        help="write the site and central Mosquitto configs of a bridged fabric",
        description="Write mosquitto.conf, ACL and password files for a central broker and "
        "each site's broker (bridged, QoS 1 both ways) from a fabric spec, and a secret "
        "file per account; existing secrets are kept. See docs/fabric.md.",
    )
    p.add_argument("--spec", required=True, type=Path, metavar="FABRIC.toml")
    p.add_argument("--out", required=True, type=Path, metavar="DIR")
    p.add_argument(
        "--check",
        action="store_true",
        help="write nothing; exit 1 if a file in DIR is missing or differs from the spec",
    )


def fabric_config(args: argparse.Namespace) -> int:
    try:
        spec = load_spec(args.spec)
    except SpecError as exc:
        print(f"config error: {exc}", file=sys.stderr)  # noqa: T201 - CLI output
        return EXIT_USAGE
    try:
        if args.check:
            return _check(spec, args)
        files = write_fabric(spec, args.out)
    except PasswordError as exc:
        print(f"error: {exc}", file=sys.stderr)  # noqa: T201 - CLI output
        return EXIT_USAGE
    except OSError as exc:
        print(f"error: cannot write under {args.out}: {exc}", file=sys.stderr)  # noqa: T201 - CLI output
        return EXIT_USAGE
    b = spec.bridge
    for broker in files.all():
        what = "central" if broker.name == "central" else f"site {broker.name}"
        print(  # noqa: T201 - CLI output
            f"{what}: {broker.conf.parent}/ (queue {broker.limits.messages} messages, "
            f"{broker.limits.bytes / 1e6:.0f} MB; {len(broker.passwords)} account(s))"
        )
    print(  # noqa: T201 - CLI output
        f"queues sized for {b.room_msgs_per_s:g} msg/s a room at {b.message_bytes} B: a "
        f"{b.outage_s} s central outage at each site, a {b.consumer_outage_s} s absence of a "
        f"central consumer; secrets in {args.out / 'secrets'}/ (0600)"
    )
    return EXIT_OK


def _check(spec: FabricSpec, args: argparse.Namespace) -> int:
    problems = check_fabric(spec, args.out)
    for line in problems:
        print(line)  # noqa: T201 - CLI output
    if problems:
        print(  # noqa: T201 - CLI output
            f"{args.out}: {len(problems)} file(s) differ from {args.spec}; "
            "run without --check to write them"
        )
        return EXIT_BAD
    print(f"{args.out}: matches {args.spec}")  # noqa: T201 - CLI output
    return EXIT_OK
