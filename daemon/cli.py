"""``iortd``: argument parsing and dispatch: run the daemon, run the demo, check a config,
wait until a running daemon is idle (daemon/waitidle.py), write a bridged broker fabric's
configs (daemon/fabric/cli.py). ``check-config`` is daemon/check.py.

The daemon itself is built and run by the composition root (daemon/app.py); what only the
demo does is in daemon/demo.py.

Exit status: 0 success; 1 the thing checked is bad; 2 usage or configuration error.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from iortd.auditlog.note import KeyFileError, load_signer
from iortd.daemon import __version__
from iortd.daemon.app import (
    EXIT_OK,
    EXIT_USAGE,
    App,
    clock_for,
    load_or_report,
    run_to_exit,
    usage_error,
)
from iortd.daemon.check import check_config
from iortd.daemon.demo import default_data_dir, run_demo
from iortd.daemon.fabric import cli as fabric_cli
from iortd.daemon.waitidle import DEFAULT_URL, UsageError, parse_url, wait_idle
from iortd.drivers.registry import DriverRegistry
from iortd.kernel.logs import configure_logging

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="iortd",
        description="IORT device integration and delivery logging daemon.",
    )
    p.add_argument("--version", action="version", version=f"iortd {__version__}")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the daemon with a site configuration")
    run.add_argument("--config", required=True, type=Path, metavar="FILE")
    run.add_argument(
        "--accept-log-rollback",
        action="store_true",
        help="start on a log that is behind its own seal or checkpoint file (a restored "
        "backup); recorded in the log as log_rollback_accepted",
    )

    demo = sub.add_parser(
        "demo", help="one simulated 20 Gy delivery, time-compressed, with a live console view"
    )
    demo.add_argument("--config", type=Path, metavar="FILE", help="default: bundled demo.toml")
    demo.add_argument("--speed", type=float, metavar="N", help="simulated seconds per real second")
    demo.add_argument("--duration", type=float, metavar="S", help="stop after S real seconds")
    demo.add_argument(
        "--log-dir",
        type=Path,
        metavar="DIR",
        help=f"where the audit log goes (default: {default_data_dir() / 'demo-log'})",
    )

    demo.add_argument(
        "--broker",
        metavar="URL",
        help="publish to this broker (mqtt://host:port) instead of a private Mosquitto",
    )
    demo.add_argument(
        "--no-dashboard", action="store_true", help="do not start the live web dashboard"
    )
    demo.add_argument(
        "--no-prescription",
        action="store_true",
        help="send no demo prescription: the check before beam-on says no_prescription",
    )

    check = sub.add_parser("check-config", help="validate a configuration file and exit")
    check.add_argument("file", type=Path, metavar="FILE")
    check.add_argument(
        "--credential",
        action="append",
        default=[],
        metavar="NAME:FILE",
        help="check as if systemd's LoadCredential=NAME:FILE had handed FILE over as NAME "
        "(for a config that names credential:NAME; repeat for each)",
    )

    idle = sub.add_parser(
        "wait-idle",
        help="wait until the running daemon follows no delivery (before a restart)",
        description="Exit 0 when the daemon at URL reports no delivery in progress or is not "
        "running; 1 when it is still delivering at the timeout or its reply cannot be read.",
    )
    idle.add_argument(
        "--url", default=DEFAULT_URL, help=f"the daemon's status endpoint (default {DEFAULT_URL})"
    )
    idle.add_argument(
        "--timeout",
        type=float,
        default=3600.0,
        metavar="S",
        help="wait at most S seconds (default 3600; 0: ask once)",
    )
    idle.add_argument(
        "--interval", type=float, default=2.0, metavar="S", help="between polls (default 2)"
    )
    idle.add_argument(
        "--expect-running",
        action="store_true",
        help="the daemon is known to run (systemctl is-active): a refused connection means "
        "its state cannot be read (exit 1), not that it is stopped",
    )
    fabric_cli.add_parser(sub)
    return p


def _cmd_wait_idle(args: argparse.Namespace) -> int:
    try:
        return wait_idle(
            parse_url(args.url),
            args.timeout,
            interval_s=args.interval,
            expect_running=args.expect_running,
        )
    except UsageError as exc:
        return usage_error(f"wait-idle: {exc}")


def _cmd_run(args: argparse.Namespace) -> int:
    loaded = load_or_report(args.config)
    if loaded is None:
        return EXIT_USAGE
    key = loaded.config.log.signing_key_file
    if key is None:
        return usage_error(
            f"config error: {args.config}: log.signing_key_file: required by `iortd run` "
            "(the audit log's checkpoints are signed); create one with: iort-audit keygen"
        )
    try:
        signer = load_signer(key)
    except KeyFileError as exc:
        return usage_error(f"config error: {args.config}: log.signing_key_file: {exc}")
    app = App(
        loaded,
        DriverRegistry.from_entry_points(),
        clock_for(loaded),
        signer=signer,
        accept_rollback=args.accept_log_rollback,
    )
    result = run_to_exit(app)
    return result if isinstance(result, int) else EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    # Operational logs go to stderr; the demo's console view owns stdout.
    configure_logging("warning" if args.command == "demo" else args.log_level)
    handlers = {
        "run": _cmd_run,
        "demo": run_demo,
        "check-config": check_config,
        "wait-idle": _cmd_wait_idle,
        "fabric-config": fabric_cli.fabric_config,
    }
    return handlers[args.command](args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
