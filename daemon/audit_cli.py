"""``iort-audit``: the auditors' tool for the delivery log.

Not built yet: the hash-chained audit log, and with it ``keygen``, ``verify``, ``show`` and
``deliveries``, are the next piece of work. Until then this command says so plainly and
exits 2, rather than pretending to verify anything.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from daemon import __version__

__all__ = ["main"]

PLANNED = ("keygen", "verify", "show", "deliveries")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="iort-audit",
        description="Verify and review iortd delivery logs (not built yet: "
        + ", ".join(PLANNED)
        + " arrive with the audit log).",
    )
    p.add_argument("--version", action="version", version=f"iort-audit {__version__}")
    p.add_argument("command", nargs="?", help=f"one of: {', '.join(PLANNED)}")
    args, _ = p.parse_known_args(argv)
    name = args.command or "(none)"
    print(  # noqa: T201
        f"iort-audit: {name}: not built yet; this version of iortd writes no audit log to verify",
        file=sys.stderr,
    )
    return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
