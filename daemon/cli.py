"""``iortd``: run the daemon, run the demo, or check a configuration.

Exit status: 0 success; 1 the thing checked is bad; 2 usage or configuration error.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.resources
import os
import select
import signal
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import structlog

from iortd.auditlog.note import (
    KeyFileError,
    Signer,
    generate_keypair,
    load_signer,
    write_keypair,
)
from iortd.auditlog.writer import (
    DEFAULT_SPILL_DIR,
    AuditLog,
    LogDamaged,
    LogInUse,
    LogRolledBack,
    LogUnusable,
    new_origin,
)
from iortd.daemon import __version__
from iortd.daemon.config import ConfigError, LoadedConfig, load_config
from iortd.daemon.console import ConsoleView
from iortd.daemon.mqtt.broker import (
    MOSQUITTO_INSTALL_HINT,
    BrokerError,
    BrokerOptions,
    Mosquitto,
    find_mosquitto,
)
from iortd.daemon.service import SHUTDOWN_TIMEOUT_S, Daemon, RunResult
from iortd.daemon.sink_registry import SinkRegistry, open_sinks
from iortd.daemon.sinks import OperationalLogSink, Sink, SinkConfigError
from iortd.drivers.registry import DriverRegistry
from iortd.kernel.clock import Clock, ScaledClock, SystemClock
from iortd.kernel.logs import configure_logging

__all__ = ["main"]

EXIT_OK = 0
EXIT_BAD = 1
EXIT_USAGE = 2
DEMO_KEY_NAME = "iortd-demo"

log = structlog.get_logger("iortd")


def default_demo_config() -> Path:
    return Path(str(importlib.resources.files("iortd.config") / "demo.toml"))


def default_data_dir() -> Path:
    """Per-user data directory (XDG), where the demo keeps its log unless told otherwise."""
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "iortd"


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
    return p


def _load(path: Path, overrides: dict[str, dict[str, Any]] | None = None) -> LoadedConfig | None:
    try:
        return load_config(path, DriverRegistry.from_entry_points(), overrides)
    except ConfigError as exc:
        for issue in exc.issues:
            print(f"iortd: config error: {issue}", file=sys.stderr)  # noqa: T201 - CLI output
        return None


async def _serve(
    loaded: LoadedConfig,
    sinks: list[Sink],
    signer: Signer | None,
    *,
    duration_s: float | None = None,
    stop_after_delivery: bool = False,
    broker_url: str | None = None,
    accept_rollback: bool = False,
) -> RunResult:
    c = loaded.config
    # Signals only request a stop, from the very start: a SIGINT while a large log is
    # being recovered must not tear through the recovery.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        # The log is opened (and recovered after a crash) before any device is touched.
        try:
            audit = await AuditLog.open(
                c.log.directory,
                origin=new_origin(c.site.id, c.site.room),
                group_commit_s=c.log.group_commit_ms / 1000,
                rotate_max_bytes=c.log.rotate_max_bytes,
                signer=signer,
                accept_rollback=accept_rollback,
                spill_dir=DEFAULT_SPILL_DIR,
            )
        except OSError as exc:
            raise _LogDirectoryError(
                f"log.directory: cannot use {c.log.directory}: {exc.strerror or exc}"
            ) from None
        if stop.is_set():
            await audit[0].close()
            return RunResult()
        try:
            # The [[sinks]] tables and [mqtt], each a plug-in behind its own queue.
            mqtt = None
            if c.mqtt.enabled:
                url = broker_url or c.mqtt.url
                mqtt = {**c.mqtt.model_dump(exclude={"enabled"}), "url": url}
            sinks = [
                *sinks,
                *await open_sinks(
                    c.sinks,
                    SinkRegistry.from_entry_points(),
                    mqtt=mqtt,
                    site=c.site.id,
                    room=c.site.room,
                    simulated=DriverRegistry.from_entry_points().get(c.source.driver).simulated,
                    log_directory=c.log.directory,
                    origin=audit[0].origin,
                    verifier=None if signer is None else signer.verifier,
                ),
            ]
        except SinkConfigError as exc:
            await audit[0].close()
            raise _LogDirectoryError(str(exc)) from None
        daemon = Daemon(
            loaded,
            DriverRegistry.from_entry_points(),
            _clock_for(loaded),
            sinks,
            audit=audit,
            stop_after_delivery=stop_after_delivery,
        )
        return await _run_until_stopped(daemon, stop, duration_s)
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


async def _run_until_stopped(
    daemon: Daemon, stop: asyncio.Event, duration_s: float | None
) -> RunResult:
    task = asyncio.create_task(daemon.run(stop), name="daemon")
    try:
        waiter = asyncio.create_task(stop.wait(), name="stop")
        await asyncio.wait({task, waiter}, timeout=duration_s, return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        stop.set()
        # Shutdown is bounded: whatever has not finished in time is cancelled, with a reason.
        done, _ = await asyncio.wait({task}, timeout=SHUTDOWN_TIMEOUT_S * 2)
        if not done:
            log.error("shutdown_timeout", timeout_s=SHUTDOWN_TIMEOUT_S * 2)
            task.cancel(msg="shutdown timed out")
        return await task
    finally:
        if not task.done():
            task.cancel(msg="shutdown")
            with contextlib.suppress(asyncio.CancelledError):
                await task


def _cmd_check(args: argparse.Namespace) -> int:
    loaded = _load(args.file)
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
    return EXIT_OK


def _clock_for(loaded: LoadedConfig) -> Clock:
    speed = loaded.config.simulation.speed
    return SystemClock() if speed == 1.0 else ScaledClock(speed)


class _LogDirectoryError(Exception):
    pass


def _serve_or_exit(
    loaded: LoadedConfig,
    sinks: list[Sink],
    signer: Signer | None,
    **kw: Any,
) -> RunResult | int:
    """Run the daemon; an exit status instead when the audit log cannot be used."""
    try:
        return asyncio.run(_serve(loaded, sinks, signer, **kw))
    except LogInUse as exc:
        return _error(str(exc))
    except LogRolledBack as exc:
        return _error(f"audit log: {exc}")
    except _LogDirectoryError as exc:
        return _error(f"config error: {loaded.path}: {exc}")
    except LogUnusable as exc:
        # A FIFO, a device or a link put in the log directory: refused before any reading.
        return _error(f"audit log: {exc}")
    except LogDamaged as exc:
        print(f"iortd: audit log: {exc}", file=sys.stderr)  # noqa: T201 - CLI output
        return EXIT_BAD
    except OSError as exc:
        # The final flush failed (disk still failing at shutdown): say so, loudly.
        print(  # noqa: T201 - CLI output
            f"iortd: audit log: entries could not be written at shutdown: {exc}; they are "
            f"kept in {DEFAULT_SPILL_DIR} (see the operational log) and restored, marked "
            "unvouched, by the next start",
            file=sys.stderr,
        )
        return EXIT_BAD


def _error(message: str) -> int:
    print(f"iortd: {message}", file=sys.stderr)  # noqa: T201 - CLI output
    return EXIT_USAGE


def _cmd_run(args: argparse.Namespace) -> int:
    loaded = _load(args.config)
    if loaded is None:
        return EXIT_USAGE
    key = loaded.config.log.signing_key_file
    if key is None:
        return _error(
            f"config error: {args.config}: log.signing_key_file: required by `iortd run` "
            "(the audit log's checkpoints are signed); create one with: iort-audit keygen"
        )
    try:
        signer = load_signer(key)
    except KeyFileError as exc:
        return _error(f"config error: {args.config}: log.signing_key_file: {exc}")
    result = _serve_or_exit(
        loaded, [OperationalLogSink()], signer, accept_rollback=args.accept_log_rollback
    )
    return result if isinstance(result, int) else EXIT_OK


def _demo_signer() -> tuple[Signer, Path]:
    """The demo signs with a key of its own, made once in the per-user data directory."""
    directory = default_data_dir() / "demo-key"
    key = directory / f"{DEMO_KEY_NAME}.key"
    if not key.exists():
        write_keypair(generate_keypair(DEMO_KEY_NAME), directory)
    return load_signer(key), directory / f"{DEMO_KEY_NAME}.pub"


def _cmd_demo(args: argparse.Namespace) -> int:
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
    if args.broker is not None:
        overrides["mqtt"] = {"url": args.broker, "enabled": True}
    loaded = _load(args.config or default_demo_config(), overrides)
    if loaded is None:
        return EXIT_USAGE
    try:
        signer, pub = _demo_signer()
    except (OSError, KeyFileError) as exc:
        return _error(f"demo signing key: {exc}")
    with contextlib.ExitStack() as stack:
        broker_url = args.broker
        if broker_url is None and loaded.config.mqtt.enabled:
            started = _embedded_broker(stack)
            if isinstance(started, int):
                return started
            broker_url = started
        if broker_url is None and loaded.config.mqtt.enabled:
            loaded = _load(args.config or default_demo_config(), _mqtt_off(overrides))
            if loaded is None:
                return EXIT_USAGE
        dashboard_url = None
        if broker_url is not None and not args.no_dashboard:
            dashboard_url = _demo_dashboard(stack, broker_url, loaded.config.mqtt.prefix)
        code = _run_demo(args, loaded, signer, pub, broker_url)
        if dashboard_url is not None and code == 0 and sys.stdin.isatty() and sys.stdout.isatty():
            _linger(dashboard_url)
        return code


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


def _embedded_broker(stack: contextlib.ExitStack) -> str | int | None:
    """A private Mosquitto for the demo (127.0.0.1, a free port, no persistence), stopped
    by PID when the demo ends. None (stream off) when Mosquitto is not installed."""
    exe = find_mosquitto()
    if exe is None:
        print(  # noqa: T201 - CLI output
            "iortd demo: Mosquitto is not installed, so the live MQTT stream is off. "
            f"Install it with: {MOSQUITTO_INSTALL_HINT} (or pass --broker mqtt://HOST:PORT)",
            file=sys.stderr,
        )
        return None
    workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="iortd-demo-mqtt-")))
    try:
        broker = Mosquitto.start_sync(BrokerOptions(), workdir, executable=exe)
    except BrokerError as exc:
        return _error(f"the demo's private Mosquitto did not start: {exc}")
    stack.callback(broker.stop_sync)
    print(  # noqa: T201 - CLI output
        f"MQTT broker: private Mosquitto (pid {broker.pid}) on {broker.url}, for this demo only",
    )
    return broker.url


DASHBOARD_START_S = 10.0


def _demo_dashboard(stack: contextlib.ExitStack, broker_url: str, prefix: str) -> str | None:
    """`iort-dashboard` on the demo's stream (127.0.0.1, a free port), as a process
    stopped by PID when the demo ends; its URL. The demo goes on without it if it cannot
    start (None)."""
    argv = [sys.executable, "-m", "iortd.dashboard.cli", "--broker", broker_url, "--port", "0"]
    proc = subprocess.Popen(  # noqa: S603 - our own module, with our own arguments
        [*argv, "--prefix", prefix, "--log-level", "warning"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        text=True,
    )
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


def _run_demo(
    args: argparse.Namespace,
    loaded: LoadedConfig,
    signer: Signer,
    pub: Path,
    broker_url: str | None,
) -> int:
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
    out.flush()
    view = ConsoleView(out, live=out.isatty())
    sinks: list[Sink] = [OperationalLogSink(), view]
    result = _serve_or_exit(
        loaded,
        sinks,
        signer,
        duration_s=args.duration,
        stop_after_delivery=True,
        broker_url=broker_url,
    )
    if isinstance(result, int):
        return result
    if not result.terminated:
        print("demo stopped before the delivery ended", file=out)
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    # Operational logs go to stderr; the demo's console view owns stdout.
    configure_logging("warning" if args.command == "demo" else args.log_level)
    handlers = {"run": _cmd_run, "demo": _cmd_demo, "check-config": _cmd_check}
    return handlers[args.command](args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
