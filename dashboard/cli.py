"""``iort-dashboard``: the live delivery dashboard, an MQTT consumer with a web page.

Exit status: 0 after a requested stop (SIGINT/SIGTERM); 2 for a usage or configuration
error (a bad broker URL, a password that cannot be read, a port in use, a limit out of
range, an account store that does not check or is in use by another dashboard, a TLS
certificate and key that cannot be used), named on stderr. The byte limits and the
age-out bound go to `iortd.dashboard.state`; the allowed hosts to
`iortd.dashboard.app.TrustedHosts`. With ``--users-dir`` it builds the login
(dashboard/login.py) and runs the access record's writer (users/access.py) in its task
group; at a stop it records the end of every session, then closes the record.
On start it prints one line to stdout, ``iort-dashboard: serving http://HOST:PORT/``
(``https://`` with ``--tls-cert``), so that a script (``iortd demo``) can learn the port
when ``--port 0`` picked it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import ipaddress
import logging
import os
import signal
import socket
import ssl
import sys
import time
from collections.abc import Generator, Sequence
from pathlib import Path
from urllib.parse import urlsplit

import structlog
import uvicorn

from iortd.dashboard import state
from iortd.dashboard.app import DEFAULT_HOSTS, build_app
from iortd.dashboard.hub import Hub
from iortd.dashboard.login import Auth, AuthSettings
from iortd.dashboard.mqtt import KEEPALIVE_S, UrlError, consume, parse_broker_url
from iortd.dashboard.sessions import DEFAULT_IDLE_S, DEFAULT_MAX_S
from iortd.dashboard.state import Rooms
from iortd.kernel.broker import BrokerSettings
from iortd.kernel.logs import configure_logging
from iortd.users import Store, StoreError, load_checked_store
from iortd.users.access import ACCESS_DIR, AccessRecord, AccessRecordError

__all__ = ["main"]

EXIT_OK = 0
EXIT_USAGE = 2
SHUTDOWN_TIMEOUT_S = 5.0
SWEEP_S = 1.0
log = structlog.get_logger("iort_dashboard")


class UsageError(Exception):
    """A usage or configuration error: the message names the option and what to do."""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="iort-dashboard",
        description="Live IORT delivery dashboard: subscribes to {prefix}/v1/# on an MQTT "
        "broker and serves a web page per room and an overview of all rooms.",
    )
    p.add_argument("--broker", required=True, metavar="URL", help="mqtt://HOST[:PORT] or mqtts://")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8080, help="HTTP port (default 8080; 0: any free)")
    p.add_argument("--prefix", default="iort", help="topic prefix, as the daemons' [mqtt] prefix")
    p.add_argument("--tls", action="store_true", help="TLS to the broker (as an mqtts:// URL)")
    p.add_argument("--ca-file", type=Path, metavar="FILE", help="the broker's CA (default: system)")
    p.add_argument("--cert-file", type=Path, metavar="FILE", help="client certificate (TLS)")
    p.add_argument("--key-file", type=Path, metavar="FILE", help="its key")
    p.add_argument("--username", help="broker user name")
    pw = p.add_mutually_exclusive_group()
    pw.add_argument("--password-file", type=Path, metavar="FILE", help="file holding the password")
    pw.add_argument("--password-env", metavar="VAR", help="environment variable holding it")
    p.add_argument(
        "--stale-after",
        type=float,
        default=5.0,
        metavar="S",
        help="a room with no telemetry for S seconds is shown stale (default 5)",
    )
    p.add_argument(
        "--history-points",
        type=int,
        default=4000,
        metavar="N",
        help="points kept per room for the plots, and as many for the applicator's "
        "displacement trace (default 4000)",
    )
    p.add_argument(
        "--allowed-host",
        action="append",
        default=[],
        metavar="NAME",
        help="a host name browsers use to reach the dashboard (repeatable); the listen "
        "address, localhost, 127.0.0.1 and [::1] are always allowed; any other Host gets 400",
    )
    p.add_argument(
        "--max-payload-kib",
        type=int,
        default=state.MAX_PAYLOAD_BYTES // 1024,
        metavar="N",
        help="a larger MQTT payload is rejected and counted (default 256)",
    )
    p.add_argument(
        "--events-kib",
        type=int,
        default=state.EVENTS_BYTES // 1024,
        metavar="N",
        help="events kept per room, in KiB (default 1024; at most 200 events either way)",
    )
    p.add_argument(
        "--max-state-mib",
        type=int,
        default=state.MAX_BYTES // (1024 * 1024),
        metavar="N",
        help="all rooms together, in MiB; beyond it the room longest without a valid message "
        "is evicted (default 256)",
    )
    p.add_argument(
        "--age-out",
        type=float,
        default=state.AGE_OUT_S,
        metavar="S",
        help="a room with no valid message for S seconds is shown AGED OUT, and removed "
        "after 2 x S (default 86400, a day)",
    )
    auth = p.add_argument_group("login (docs/dashboard.md, Login)")
    auth.add_argument(
        "--users-dir",
        type=Path,
        metavar="DIR",
        help="the account store (iort-users --dir): with it, seeing the rooms needs a login "
        "(but see --anonymous-view) and logins are recorded in DIR/access; run as its owner",
    )
    auth.add_argument(
        "--anonymous-view",
        action="append",
        default=[],
        metavar="CIDR",
        help="clients in this network see rooms and alarms without a login, e.g. the room's "
        "own display 10.20.30.41/32 (repeatable; 0.0.0.0/0 and ::/0: everyone)",
    )
    auth.add_argument(
        "--session-idle",
        type=float,
        default=DEFAULT_IDLE_S,
        metavar="S",
        help="a session unused for S seconds ends (default 900: 15 min)",
    )
    auth.add_argument(
        "--session-max",
        type=float,
        default=DEFAULT_MAX_S,
        metavar="S",
        help="a session ends S seconds after its login however busy (default 43200: 12 h)",
    )
    p.add_argument("--tls-cert", type=Path, metavar="FILE", help="serve HTTPS: certificate (PEM)")
    p.add_argument("--tls-key", type=Path, metavar="FILE", help="and its private key (PEM, 0600)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return p


def _password(args: argparse.Namespace) -> str | None:
    if args.password_file is not None:
        f: Path = args.password_file
        try:
            mode = f.stat().st_mode & 0o777
            if mode & 0o077:
                raise UsageError(
                    f"--password-file: {f} is readable by others (mode {mode:04o}); chmod 600 it"
                )
            return f.read_text(encoding="utf-8").rstrip("\r\n")
        except OSError as exc:
            raise UsageError(f"--password-file: cannot read {f}: {exc.strerror}") from None
    if args.password_env is not None:
        value = os.environ.get(args.password_env)
        if value is None:
            raise UsageError(f"--password-env: the variable {args.password_env} is not set")
        return value
    return None


def settings_from_args(args: argparse.Namespace) -> BrokerSettings:
    try:
        host, port, tls = parse_broker_url(args.broker)
    except UrlError as exc:
        raise UsageError(f"--broker: {exc}") from None
    if args.tls and not tls:
        tls = True
        port = 8883 if urlsplit(args.broker).port is None else port
    for opt in ("ca_file", "cert_file", "key_file"):
        path: Path | None = getattr(args, opt)
        flag = "--" + opt.replace("_", "-")
        if path is not None and not tls:
            raise UsageError(f"{flag}: only with TLS (an mqtts:// URL or --tls)")
        if path is not None and not path.is_file():
            raise UsageError(f"{flag}: no such file: {path}")
    if (args.cert_file is None) != (args.key_file is None):
        raise UsageError("--cert-file and --key-file go together (a client certificate)")
    if "/" in args.prefix or "+" in args.prefix or "#" in args.prefix or not args.prefix:
        raise UsageError(f"--prefix: {args.prefix!r} must be non-empty, without '/', '+', '#'")
    if not args.stale_after > 0:
        raise UsageError(f"--stale-after: must be > 0 seconds; got {args.stale_after}")
    if not 100 <= args.history_points <= 100_000:
        raise UsageError(f"--history-points: must be 100..100000; got {args.history_points}")
    if not 0 <= args.port <= 65535:
        raise UsageError(f"--port: must be 0..65535; got {args.port}")
    if not 1 <= args.max_payload_kib <= 64 * 1024:
        raise UsageError(f"--max-payload-kib: must be 1..65536; got {args.max_payload_kib}")
    if not args.max_payload_kib <= args.events_kib <= 1024 * 1024:
        raise UsageError(
            f"--events-kib: must be at least --max-payload-kib ({args.max_payload_kib}) and "
            f"at most 1048576; got {args.events_kib}"
        )
    if not 1 <= args.max_state_mib <= 1024 * 1024:
        raise UsageError(f"--max-state-mib: must be 1..1048576; got {args.max_state_mib}")
    if args.max_state_mib * 1024 < 8 * args.max_payload_kib + args.events_kib:
        raise UsageError(
            "--max-state-mib: too small to hold one room "
            "(8 x --max-payload-kib + --events-kib); raise it"
        )
    if not args.age_out > 0:
        raise UsageError(f"--age-out: must be > 0 seconds; got {args.age_out}")
    for name in args.allowed_host:
        # Starlette's rule: "*" alone, or a leading "*." and no other "*".
        wildcard_ok = (
            "*" not in name
            or name == "*"
            or (name.startswith("*.") and len(name) > 2 and "*" not in name[1:])
        )
        if not name or any(c in name for c in "/ \t@?#") or not wildcard_ok:
            raise UsageError(
                f"--allowed-host: {name!r} is not a host name (no scheme, port or path; "
                "a wildcard only as *.example.org)"
            )
    return BrokerSettings(
        host=host,
        port=port,
        tls=tls,
        prefix=args.prefix,
        keepalive_s=KEEPALIVE_S,
        username=args.username,
        password=_password(args),
        ca_file=args.ca_file,
        cert_file=args.cert_file,
        key_file=args.key_file,
    )


def tls_from_args(args: argparse.Namespace) -> tuple[Path, Path] | None:
    """The dashboard's own certificate and key, checked now (a usage error, not a crash
    in the server's start)."""
    cert: Path | None = args.tls_cert
    key: Path | None = args.tls_key
    if cert is None and key is None:
        return None
    if cert is None or key is None:
        raise UsageError("--tls-cert and --tls-key go together (the dashboard's own HTTPS)")
    try:
        mode = key.stat().st_mode & 0o777
    except OSError as exc:
        raise UsageError(f"--tls-key: cannot read {key}: {exc.strerror}") from None
    if mode & 0o077:
        raise UsageError(f"--tls-key: {key} is readable by others (mode {mode:04o}); chmod 600 it")
    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise UsageError(
            f"--tls-cert/--tls-key: {cert} and {key} are not a PEM certificate and its key: {exc}"
        ) from None
    return cert, key


def auth_from_args(args: argparse.Namespace, *, secure: bool) -> tuple[AuthSettings, Store] | None:
    """The login's settings and the account store, checked now; None without --users-dir."""
    nets = []
    for text in args.anonymous_view:
        try:
            nets.append(ipaddress.ip_network(text, strict=False))
        except ValueError:
            raise UsageError(
                f"--anonymous-view: {text!r} is not an address or network (10.20.30.41/32)"
            ) from None
    if args.users_dir is None:
        if nets:
            raise UsageError("--anonymous-view: only with --users-dir (without it all may see)")
        return None
    if not 60 <= args.session_idle <= 86400:
        raise UsageError(f"--session-idle: must be 60..86400 seconds; got {args.session_idle}")
    if not args.session_idle <= args.session_max <= 7 * 86400:
        raise UsageError(
            f"--session-max: must be at least --session-idle ({args.session_idle}) and at most "
            f"604800 seconds; got {args.session_max}"
        )
    try:
        store = load_checked_store(args.users_dir)
    except StoreError as exc:
        raise UsageError(f"--users-dir: {exc}") from None
    settings = AuthSettings(
        args.users_dir, args.session_idle, args.session_max, tuple(nets), secure=secure
    )
    return settings, store


def _bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound here so that a port in use is a clear usage error."""
    try:
        family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    except ValueError:
        raise UsageError(f"--host: expected an IP address; got {host!r}") from None
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise UsageError(
                f"--port: {host}:{port} is already in use; choose another port (or --port 0)"
            ) from None
        raise UsageError(f"--host/--port: cannot listen on {host}:{port}: {exc.strerror}") from None
    sock.setblocking(False)
    return sock


class _Server(uvicorn.Server):
    """uvicorn without its own signal handling: our composition root owns the signals
    (a signal only requests a stop; the stop is ordered and bounded)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


def rooms_from_args(prefix: str, args: argparse.Namespace) -> Rooms:
    return Rooms(
        prefix,
        history_points=args.history_points,
        max_payload_bytes=args.max_payload_kib * 1024,
        events_bytes=args.events_kib * 1024,
        max_bytes=args.max_state_mib * 1024 * 1024,
        age_out_s=args.age_out,
    )


def allowed_hosts(bind_host: str, extra: Sequence[str]) -> list[str]:
    """Who may be named in a request's Host header: the listen address (unless it is a
    wildcard), the loopback names, and what ``--allowed-host`` adds."""
    hosts = list(DEFAULT_HOSTS)
    if not ipaddress.ip_address(bind_host).is_unspecified:
        hosts.append(bind_host)
    return hosts + list(extra)


async def sweep(hub: Hub, auth: Auth | None) -> None:
    """Remove aged-out rooms and end expired sessions, once a second."""
    while True:
        await asyncio.sleep(SWEEP_S)
        hub.sweep()
        if auth is not None:
            await auth.sweep()


async def serve(
    settings: BrokerSettings,
    sock: socket.socket,
    *,
    stale_after_s: float,
    rooms: Rooms,
    hosts: Sequence[str],
    tls: tuple[Path, Path] | None = None,
    login: tuple[AuthSettings, Store] | None = None,
) -> int:
    record: AccessRecord | None = None
    auth: Auth | None = None
    if login is not None:
        try:
            record = await AccessRecord.open(login[0].users_dir / ACCESS_DIR)
        except AccessRecordError as exc:
            print(f"iort-dashboard: --users-dir: {exc}", file=sys.stderr)  # noqa: T201 - CLI output
            sock.close()
            return EXIT_USAGE
        auth = Auth(login[0], login[1], record)
    try:
        return await _serve(
            settings, sock, stale_after_s=stale_after_s, rooms=rooms, hosts=hosts, tls=tls,
            auth=auth, record=record,
        )  # fmt: skip
    finally:
        if record is not None:
            await record.close()


async def _serve(
    settings: BrokerSettings,
    sock: socket.socket,
    *,
    stale_after_s: float,
    rooms: Rooms,
    hosts: Sequence[str],
    tls: tuple[Path, Path] | None,
    auth: Auth | None,
    record: AccessRecord | None,
) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    hub = Hub(rooms, settings.url, clock=time.monotonic)
    app = build_app(
        hub,
        stale_after_s=stale_after_s,
        history_points=rooms.history_points,
        allowed_hosts=hosts,
        auth=auth,
    )
    config = uvicorn.Config(
        app,
        log_config=None,
        access_log=False,
        lifespan="off",
        timeout_graceful_shutdown=int(SHUTDOWN_TIMEOUT_S / 2),
        ws="none",
        # X-Forwarded-For/-Proto are not trusted from anyone (uvicorn trusts them from
        # 127.0.0.1 by default): the client's address decides anonymous view and the
        # back-off, and the scheme the same-origin check.
        proxy_headers=False,
        ssl_certfile=tls[0] if tls else None,
        ssl_keyfile=tls[1] if tls else None,
    )
    server = _Server(config)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    url = f"{'https' if tls else 'http'}://{shown}:{port}/"
    try:
        async with asyncio.TaskGroup() as tg:
            web = tg.create_task(server.serve(sockets=[sock]), name="http")
            mqtt = tg.create_task(consume(settings, hub), name="mqtt")
            sweeper = tg.create_task(sweep(hub, auth), name="sweep")
            writer = tg.create_task(record.run(), name="access") if record else None
            log.info("dashboard_serving", url=url, broker=settings.url, prefix=settings.prefix)
            print(f"iort-dashboard: serving {url}", flush=True)  # noqa: T201 - the ready line
            stopper = tg.create_task(stop.wait(), name="stop")
            await asyncio.wait({web, stopper}, return_when=asyncio.FIRST_COMPLETED)
            log.info("dashboard_stopping", subscribers=hub.subscribers)
            # Ordered: end the browser streams, let the HTTP server finish, then the MQTT
            # connection; everything bounded.
            hub.close()
            server.should_exit = True
            stopper.cancel()
            done, _ = await asyncio.wait({web}, timeout=SHUTDOWN_TIMEOUT_S)
            if not done:
                log.error("shutdown_timeout", timeout_s=SHUTDOWN_TIMEOUT_S)
                web.cancel(msg="shutdown timed out")
            mqtt.cancel(msg="shutdown")
            sweeper.cancel(msg="shutdown")
            if auth is not None:
                await auth.end_all("stopped")
            if record is not None and writer is not None:
                await record.close()  # the access record last: its writer ends by itself
                await asyncio.wait({writer}, timeout=SHUTDOWN_TIMEOUT_S)
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        sock.close()
    log.info("dashboard_stopped")
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    configure_logging(args.log_level)
    # uvicorn logs through the standard library: warnings and errors only, as JSON lines.
    logging.getLogger("uvicorn").setLevel(logging.WARNING)
    try:
        settings = settings_from_args(args)
        tls = tls_from_args(args)
        login = auth_from_args(args, secure=tls is not None)
        sock = _bind(args.host, args.port)
    except UsageError as exc:
        print(f"iort-dashboard: {exc}", file=sys.stderr)  # noqa: T201 - CLI output
        return EXIT_USAGE
    return asyncio.run(
        serve(
            settings,
            sock,
            stale_after_s=args.stale_after,
            rooms=rooms_from_args(settings.prefix, args),
            hosts=allowed_hosts(sock.getsockname()[0], args.allowed_host),
            tls=tls,
            login=login,
        )
    )


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
