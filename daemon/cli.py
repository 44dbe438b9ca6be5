"""``iortd``: argument parsing and dispatch: run the daemon, run the demo, check a config,
wait until a running daemon is idle (daemon/waitidle.py).

The daemon itself is built and run by the composition root (daemon/app.py); what only the
demo does is in daemon/demo.py.

Exit status: 0 success; 1 the thing checked is bad; 2 usage or configuration error.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
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
from iortd.daemon.config import Config
from iortd.daemon.config.credentials import CREDENTIAL_PREFIX, credential_name
from iortd.daemon.demo import default_data_dir, run_demo
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


def _cmd_check(args: argparse.Namespace) -> int:
    if args.credential:
        return _check_with_credentials(args)
    loaded = load_or_report(args.file)
    if loaded is None:
        return EXIT_USAGE
    c = loaded.config
    print(  # noqa: T201 - CLI output
        f"{args.file}: OK (sha256 {loaded.sha256[:16]}...; site {c.site.id}, room {c.site.room}, "
        f"{len(c.devices)} device(s): " + ", ".join(f"{d.name}={d.driver}" for d in c.devices) + ")"
    )
    if c.log.signing_key_file is None:
        print(  # noqa: T201 - CLI output
            "note: log.signing_key_file is not set: `iortd run` will refuse to start "
            "(`iortd demo` makes its own key); create one with: iort-audit keygen --name NAME"
        )
    _retention_notes(c)
    return EXIT_OK


def _check_with_credentials(args: argparse.Namespace) -> int:
    """What the unit's LoadCredential= lines do, for a check outside the unit: a private
    directory with each FILE as NAME (a link: the file itself is what is checked)."""
    with tempfile.TemporaryDirectory(prefix="iortd-credentials-") as directory:
        for spec in args.credential:
            name, _, file = str(spec).partition(":")
            try:
                valid = credential_name(CREDENTIAL_PREFIX + name) is not None
            except ValueError as exc:
                return usage_error(f"--credential {spec}: {exc}")
            if not (valid and file):
                return usage_error(f"--credential {spec}: expected NAME:FILE")
            source = Path(file).absolute()
            if not source.is_file():
                return usage_error(f"--credential {spec}: file not found: {source}")
            link = Path(directory) / name
            if link.is_symlink():
                return usage_error(f"--credential {spec}: {name} is given twice")
            link.symlink_to(source)
        os.environ["CREDENTIALS_DIRECTORY"] = directory
        try:
            return _cmd_check(argparse.Namespace(**{**vars(args), "credential": []}))
        finally:
            del os.environ["CREDENTIALS_DIRECTORY"]


def _retention_notes(c: Config) -> None:
    """What ``[log.retention]`` will do with this host as it is now."""
    ret = c.log.retention
    if ret is None:
        return
    arch = ret.archive_dir
    if arch is None:
        what = "has no archive_dir: nothing is ever deleted, only alarmed"
    elif ret.archive_mount_required and not os.path.ismount(arch):
        what = (
            f"archive_dir {arch} is not a mount point now: retention alarms (archive "
            "unreachable) and deletes nothing until the share is mounted"
        )
    else:
        return
    print(f"note: log.retention {what}")  # noqa: T201 - CLI output


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
        "check-config": _cmd_check,
        "wait-idle": _cmd_wait_idle,
    }
    return handlers[args.command](args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
