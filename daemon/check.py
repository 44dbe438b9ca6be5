"""``iortd check-config``: load and check a site configuration, say what it will do, exit.

With ``--credential NAME:FILE`` it checks the config as the systemd unit will run it: a
private directory stands in for ``$CREDENTIALS_DIRECTORY`` (each FILE linked as NAME), so
``"credential:NAME"`` paths resolve as they will under ``LoadCredential=``. Notes after
the OK line say what the daemon will refuse or hold back (no signing key; retention with no
archive, or an archive that is not mounted now).

Exit status: 0 the config is good; 2 usage or configuration error.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

from iortd.daemon.app import EXIT_OK, EXIT_USAGE, load_or_report, usage_error
from iortd.daemon.config import Config
from iortd.daemon.config.credentials import CREDENTIAL_PREFIX, credential_name

__all__ = ["check_config"]


def check_config(args: argparse.Namespace) -> int:
    """``iortd check-config FILE [--credential NAME:FILE ...]``; the exit status."""
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
    _witness_notes(c)
    return EXIT_OK


def _witness_notes(c: Config) -> None:
    """Where the checkpoints will be submitted (the daemon's side of docs/witness.md)."""
    for w in c.witness:
        key = w.vkey.rsplit("+", 1)[0]
        print(  # noqa: T201 - CLI output
            f"witness {w.name}: {w.url} (key {key}); alarm after {w.alarm_after_s / 60:g} min "
            "without a cosignature"
        )
    if c.witness and c.log.signing_key_file is None:
        print("note: [[witness]] needs log.signing_key_file: nothing to submit without it")  # noqa: T201 - CLI output


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
        before = os.environ.get("CREDENTIALS_DIRECTORY")
        os.environ["CREDENTIALS_DIRECTORY"] = directory
        try:
            return check_config(argparse.Namespace(**{**vars(args), "credential": []}))
        finally:
            if before is None:
                del os.environ["CREDENTIALS_DIRECTORY"]
            else:
                os.environ["CREDENTIALS_DIRECTORY"] = before


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
