"""``iortd demo``: one simulated delivery, time-compressed, with everything a new user looks at.

What only the demo does, around the same composition root as ``iortd run``
(daemon/app.py):

- its **signing key**, made once in the per-user data directory (XDG), so that the demo's
  log verifies with ``--pubkey`` like any other;
- **verification before beam-on**, shown: a demo physicist's key and keyring (beside the
  signing key), a signed demo prescription matching the simulated console and the day's
  output factor in a command inbox of its own (in the scratch directory), and the EXAMPLE
  dose-rate table (daemon/demo_commands.py), set as config overrides; the daemon handles
  its inbox before it polls the console, so the first check at READY is VERIFIED
  (``--no-prescription``: none sent, the check says so);
- a **private Mosquitto** (127.0.0.1, a free port, no persistence) unless ``--broker`` names
  one; without Mosquitto installed it says how to install it and runs with the stream off;
- the **live dashboard** (``iort-dashboard``) on that stream, as a child process;
- the **console output**: a header (where the log is, how to verify it, how to watch the
  stream, the demo prescription and where to see its check) and the live console view
  (daemon/console.py) as one more sink;
- the **linger**: at a terminal, the broker and the dashboard stay up after the delivery
  until Enter (or Ctrl-C, or SIGTERM).

Every process it starts is stopped by PID when the demo ends (an ``ExitStack``), also when
the run fails. Nothing is left behind when the demo is killed outright either (SIGKILL, a
crash, a closed terminal; docs/operations.md, "Nothing left behind"):

- the broker and the dashboard are **tethered** (kernel/reaper.py): a watcher per child
  stops it (SIGTERM, SIGKILL after a grace) as soon as the demo's end of a pipe closes,
  which the kernel does at the demo's death; where the system cannot tether (no
  ``pidfd_open``) the demo says so and names the PIDs to stop;
- its temporary files live in one **scratch directory** (kernel/scratch.py,
  ``$TMPDIR/iortd-demo-PID-START-*``) that it locks for its lifetime and removes at a
  normal end; each start first reclaims the directories of demos that were killed, never
  a live demo's.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.resources
import os
import select
import signal
import subprocess
import sys
import tempfile
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from iortd.auditlog.note import KeyFileError, Signer, generate_keypair, load_signer, write_keypair
from iortd.daemon import __version__
from iortd.daemon.app import (
    EXIT_OK,
    EXIT_USAGE,
    SHUTDOWN_TIMEOUT_S,
    App,
    clock_for,
    load_or_report,
    run_to_exit,
    usage_error,
)
from iortd.daemon.config import LoadedConfig
from iortd.daemon.console import ConsoleView
from iortd.daemon.demo_commands import (
    DEMO_PHYSICIST,
    DemoCommandsError,
    keyring_text,
    prepare,
)
from iortd.daemon.mqtt.broker import (
    MOSQUITTO_INSTALL_HINT,
    BrokerError,
    BrokerOptions,
    Mosquitto,
    find_mosquitto,
)
from iortd.drivers.registry import DriverRegistry
from iortd.kernel.reaper import Tether, tether_unavailable
from iortd.kernel.scratch import ScratchDir, reclaim

__all__ = ["default_data_dir", "default_demo_config", "run_demo"]

DEMO_KEY_NAME = "iortd-demo"
SCRATCH_KIND = "demo"
DASHBOARD_START_S = 10.0


# The EXAMPLE dose-rate table equal to the simulator's rates: never commissioning data.
EXAMPLE_TABLE = Path(str(importlib.resources.files("iortd.config.doserate") / "intrabeam.toml"))


def default_demo_config() -> Path:
    return Path(str(importlib.resources.files("iortd.config") / "demo.toml"))


def default_data_dir() -> Path:
    """Per-user data directory (XDG), where the demo keeps its log unless told otherwise."""
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "iortd"


def run_demo(args: argparse.Namespace) -> int:
    """``iortd demo`` with its parsed arguments; the exit status."""
    overrides: dict[str, dict[str, Any]] = {}
    if args.speed is not None:
        overrides["simulation"] = {"speed": args.speed}
    if args.duration is not None and not args.duration > 0:
        print("iortd: --duration must be > 0 seconds", file=sys.stderr)  # noqa: T201
        return EXIT_USAGE
    log_dir = args.log_dir or (default_data_dir() / "demo-log")
    # A directory given on the command line is relative to where the user is, not to the
    # config file (which is where relative paths inside the file are taken from).
    overrides["log"] = {"directory": str(log_dir.expanduser().resolve())}
    # Like its broker and dashboard, the demo keeps to itself: no health endpoint on the
    # port a real `iortd run` on this host would use (docs/operations.md).
    overrides["health"] = {"listen": ""}
    if args.broker is not None:
        overrides["mqtt"] = {"url": args.broker, "enabled": True}
    loaded = load_or_report(args.config or default_demo_config(), overrides)
    if loaded is None:
        return EXIT_USAGE
    try:
        signer, pub = _demo_key(DEMO_KEY_NAME)
        physicist, _ = _demo_key(DEMO_PHYSICIST)
    except (OSError, KeyFileError) as exc:
        return usage_error(f"demo signing key: {exc}")
    with contextlib.ExitStack() as stack:
        try:
            scratch = _scratch(stack)
        except OSError as exc:
            return usage_error(
                f"cannot make the demo's temporary directory in {tempfile.gettempdir()}: "
                f"{exc.strerror or exc}; point TMPDIR at a writable directory"
            )
        try:
            sent = _commands(loaded, scratch, physicist, overrides, not args.no_prescription)
        except OSError as exc:
            return usage_error(f"cannot write the demo's commands in {scratch}: {exc}")
        broker_url = args.broker
        if broker_url is None and loaded.config.mqtt.enabled:
            started = _embedded_broker(stack, scratch / "mqtt")
            if isinstance(started, int):
                return started
            broker_url = started
        if broker_url is None and loaded.config.mqtt.enabled:
            overrides = _mqtt_off(overrides)
        # Again with what was added: the keyring and the inbox (and the stream off).
        loaded = load_or_report(args.config or default_demo_config(), overrides)
        if loaded is None:
            return EXIT_USAGE
        dashboard_url = None
        if broker_url is not None and not args.no_dashboard:
            dashboard_url = _demo_dashboard(stack, broker_url, loaded.config.mqtt.prefix)
        code = _run(loaded, signer, pub, broker_url, args.duration, sent)
        if dashboard_url is not None and code == 0 and sys.stdin.isatty() and sys.stdout.isatty():
            _linger(dashboard_url)
        return code


def _scratch(stack: contextlib.ExitStack) -> Path:
    """Reclaim what killed demos left in the temporary directory, then make this demo's
    own scratch directory (removed when the stack closes); say if children cannot be
    tethered here."""
    removed = reclaim(SCRATCH_KIND)
    if removed:
        print(  # noqa: T201 - CLI output
            f"iortd demo: removed {len(removed)} temporary directory(ies) left by demos "
            f"that were killed: {', '.join(str(p) for p in removed)}",
            file=sys.stderr,
        )
    unavailable = tether_unavailable()
    if unavailable is not None:
        print(  # noqa: T201 - CLI output
            f"iortd demo: {unavailable}, so if this demo is killed outright (SIGKILL) its "
            "broker and dashboard keep running: stop them by the PIDs printed below",
            file=sys.stderr,
        )
    return stack.enter_context(ScratchDir(SCRATCH_KIND)).path


def _demo_key(name: str) -> tuple[Signer, Path]:
    """A key of the demo's own, made once in the per-user data directory: the one the
    demo's log is signed with, and the demo physicist's (daemon/demo_commands.py)."""
    directory = default_data_dir() / "demo-key"
    key = directory / f"{name}.key"
    if not key.exists():
        write_keypair(generate_keypair(name), directory)
    return load_signer(key), directory / f"{name}.pub"


def _commands(
    loaded: LoadedConfig,
    scratch: Path,
    physicist: Signer,
    overrides: dict[str, dict[str, Any]],
    prescription: bool,
) -> str:
    """The demo's keyring and inbox, with the signed prescription and output factor in it
    (daemon/demo_commands.py), added to ``overrides``; the header's line about them."""
    keyring, inbox, now = _demo_keyring(physicist), scratch / "inbox", datetime.now(UTC)
    c = loaded.config
    try:
        sent = prepare(c, keyring, inbox, physicist, now, prescription=prescription)
    except DemoCommandsError as exc:
        sent = prepare(c, keyring, inbox, physicist, now, prescription=False)
        sent = replace(sent, summary=f"none ({exc})")
    overrides["commands"] = {"keyring": str(keyring), "inbox": str(inbox)}
    if c.verification.doserate_table is None:  # a --config with its own table keeps it
        overrides["verification"] = {
            "doserate_table": str(EXAMPLE_TABLE),
            "applicator_types": dict(sent.applicator_types),
        }
    log_dir = overrides["log"]["directory"]
    said = "demo prescription: "
    if sent.prescription_sha256 is not None:
        said += f"sent by the demo physicist into the daemon's inbox: {sent.summary}\n"
    else:
        said += (
            f"{sent.summary}: the check before beam-on will be NOT_VERIFIED (no_prescription;\n"
            "  already_delivered instead when this log holds an earlier demo's prescription)\n"
        )
    return said + (
        "  the check before beam-on: the dashboard's verification panel; after the run,\n"
        f"  iort-audit deliveries {log_dir}, then iort-audit report {log_dir} --delivery ID "
        f"--keyring {keyring} --out report.html"
    )


def _demo_keyring(physicist: Signer) -> Path:
    """The demo physicist's keyring beside its key (daemon/demo_commands.py)."""
    key = default_data_dir() / "demo-key" / f"{DEMO_PHYSICIST}.key"
    since = datetime.fromtimestamp(key.stat().st_mtime, UTC)
    path = key.with_name("demo-keyring.toml")
    text = keyring_text(physicist, since)
    if not path.exists() or path.read_text("utf-8") != text:
        path.write_text(text, "utf-8")
    return path


def _linger(url: str) -> None:
    """At a terminal, keep the broker and the dashboard up after the delivery so that the
    user can look at it in a browser, until Enter (or Ctrl-C, or SIGTERM); then stop them
    by PID as usual. Enter ends it quietly under `make demo` too (Ctrl-C also interrupts
    make). Not at all when the demo is not run from a terminal (scripts, tests)."""
    print(  # noqa: T201 - CLI output
        f"The delivery is over; the dashboard stays up at {url} (retained state). "
        "Press Enter (or Ctrl-C) to stop it.",
        flush=True,
    )
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        sys.stdin.readline()  # returns at Enter, or at once at end of input
    except KeyboardInterrupt:
        print()  # noqa: T201 - end the ^C line
    finally:
        signal.signal(signal.SIGTERM, previous)


def _mqtt_off(overrides: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {**overrides, "mqtt": {"enabled": False}}


def _embedded_broker(stack: contextlib.ExitStack, workdir: Path) -> str | int | None:
    """A private Mosquitto for the demo (127.0.0.1, a free port, no persistence, its files
    in ``workdir``), stopped by PID when the demo ends and tethered to the demo. None
    (stream off) when Mosquitto is not installed."""
    exe = find_mosquitto()
    if exe is None:
        print(  # noqa: T201 - CLI output
            "iortd demo: Mosquitto is not installed, so the live MQTT stream is off. "
            f"Install it with: {MOSQUITTO_INSTALL_HINT} (or pass --broker mqtt://HOST:PORT)",
            file=sys.stderr,
        )
        return None
    try:
        broker = Mosquitto.start_sync(BrokerOptions(), workdir, executable=exe, tethered=True)
    except BrokerError as exc:
        return usage_error(f"the demo's private Mosquitto did not start: {exc}")
    stack.callback(broker.stop_sync)
    print(  # noqa: T201 - CLI output
        f"MQTT broker: private Mosquitto (pid {broker.pid}) on {broker.url}, for this demo only",
    )
    return broker.url


def _demo_dashboard(stack: contextlib.ExitStack, broker_url: str, prefix: str) -> str | None:
    """`iort-dashboard` on the demo's stream (127.0.0.1, a free port), as a process
    stopped by PID when the demo ends and tethered to the demo; its URL. The demo goes on
    without it if it cannot start (None)."""
    argv = [sys.executable, "-m", "iortd.dashboard.cli", "--broker", broker_url, "--port", "0"]
    tether = stack.enter_context(Tether("iort-dashboard"))  # closed after the stop below
    proc = subprocess.Popen(  # noqa: S603 - our own module, with our own arguments
        tether.argv([*argv, "--prefix", prefix, "--log-level", "warning"]),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        text=True,
        pass_fds=tether.pass_fds,
    )
    tether.started()
    stack.callback(_stop_process, proc)
    out = proc.stdout
    ready, _, _ = select.select([] if out is None else [out], [], [], DASHBOARD_START_S)
    line = out.readline() if out is not None and ready else ""
    if not line.startswith("iort-dashboard: serving "):
        print("iortd demo: the live dashboard did not start", file=sys.stderr)  # noqa: T201
        return None
    url = line.split()[-1]
    print(f"live dashboard: {url} (pid {proc.pid}): open it in a browser")  # noqa: T201
    return url


def _stop_process(proc: subprocess.Popen[str]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=SHUTDOWN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _run(
    loaded: LoadedConfig,
    signer: Signer,
    pub: Path,
    broker_url: str | None,
    duration_s: float | None,
    prescription: str,
) -> int:
    """The header, then the run with the console view as one more sink."""
    c = loaded.config
    out = sys.stdout
    print(
        f"iortd demo {__version__}: site {c.site.id}, room {c.site.room}, "
        f"speed x{c.simulation.speed:g}, seed {c.simulation.seed}\n"
        f"audit log: {c.log.directory}\n"
        f"verify it: iort-audit verify {c.log.directory} --pubkey {pub}",
        file=out,
    )
    if broker_url is not None:
        parts = urlsplit(broker_url)
        prefix = f"{c.mqtt.prefix}/v1/{c.site.id}/{c.site.room}"
        print(
            f"live stream: {prefix}/... on {broker_url}; watch it with\n"
            f"  mosquitto_sub -h {parts.hostname} -p {parts.port or 1883} -t '{prefix}/#' -v",
            file=out,
        )
    else:
        print("live stream: off (no MQTT broker)", file=out)
    print(prescription, file=out)
    out.flush()
    app = App(
        loaded,
        DriverRegistry.from_entry_points(),
        clock_for(loaded),
        [ConsoleView(out, live=out.isatty())],
        signer=signer,
        broker_url=broker_url,
        stop_after_delivery=True,
    )
    result = run_to_exit(app, duration_s=duration_s)
    if isinstance(result, int):
        return result
    if not result.terminated:
        print("demo stopped before the delivery ended", file=out)
    return EXIT_OK
