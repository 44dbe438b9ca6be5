"""``iort-witness``: the witness's command line.

    iort-witness keygen NAME [--out FILE]     the witness's Ed25519 key (FILE, 0600) and
                                              its cosignature verifier key (FILE.pub)
    iort-witness serve --config FILE          serve add-checkpoint until SIGTERM/SIGINT
    iort-witness status --config FILE         per log: size, root, time last cosigned

Exit status: 0 done; 1 (``status``) the witness holds proof of a log's misbehaviour (the
log's signature on another root for a size it cosigned: docs/witness.md says what to do);
2 usage or configuration error, naming the file and the key. ``serve`` prints one line on stdout
when it listens (``iort-witness: serving http://HOST:PORT/ as NAME``), logs as JSON
lines on stderr (a console format on a terminal), and on SIGTERM or SIGINT lets requests
in progress finish (bounded) and exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import logging
import signal
import socket
import sqlite3
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Final

import structlog
import uvicorn

from iortd.auditlog.cosignature import CosignerKey, write_cosigner
from iortd.auditlog.note import NoteError
from iortd.kernel.logs import configure_logging
from iortd.kernel.timefmt import utc_ts
from iortd.witness.app import UvicornServer, build_app
from iortd.witness.config import ConfigError, WitnessConfig, load_config
from iortd.witness.core import Witness, proven_forks
from iortd.witness.store import Store, StoreError

__all__ = ["main"]

EXIT_OK: Final = 0
EXIT_BAD: Final = 1
EXIT_USAGE: Final = 2
SHUTDOWN_TIMEOUT_S: Final = 10.0

log = structlog.get_logger("iort-witness")


def _err(msg: str) -> None:
    print(f"iort-witness: {msg}", file=sys.stderr)  # noqa: T201 - CLI output


def _out(msg: str) -> None:
    print(msg, flush=True)  # noqa: T201 - CLI output


def _cmd_keygen(args: argparse.Namespace) -> int:
    out: Path = args.out
    try:
        key = CosignerKey.generate(args.name)
        pub = write_cosigner(key, out)
    except NoteError as exc:
        _err(f"NAME {args.name!r}: {exc}")
        return EXIT_USAGE
    except FileExistsError:
        _err(f"{out} exists; not overwriting a witness key")
        return EXIT_USAGE
    except OSError as exc:
        _err(f"--out {out}: {exc.strerror or exc}")
        return EXIT_USAGE
    _out(f"private key: {out} (mode 0600; point witness.key_file at it)")
    _out(f"public key:  {pub}")
    _out("give the log operators and auditors this verifier key (cosignature/v1, type 0x04):")
    _out(key.verifier.text)
    return EXIT_OK


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)
    except OSError:
        sock.close()
        raise
    return sock


async def _serve(cfg: WitnessConfig, store: Store, sock: socket.socket) -> int:
    witness = Witness(cfg.key, cfg.logs, store, clock=time.time)
    app = build_app(
        witness, request_timeout_s=cfg.request_timeout_s, max_body_bytes=cfg.max_body_bytes
    )
    config = uvicorn.Config(
        app,
        log_config=None,
        access_log=False,
        lifespan="off",
        ws="none",
        proxy_headers=False,
        server_header=False,
        timeout_keep_alive=5,
        limit_concurrency=64,
        timeout_graceful_shutdown=int(SHUTDOWN_TIMEOUT_S / 2),
    )
    server = UvicornServer(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    host, port = sock.getsockname()[:2]
    url = f"http://{f'[{host}]' if ':' in host else host}:{port}/"
    try:
        async with asyncio.TaskGroup() as tg:
            web = tg.create_task(server.serve(sockets=[sock]), name="http")
            stopper = tg.create_task(stop.wait(), name="stop")
            log.info("witness_serving", url=url, name=cfg.key.name, logs=len(cfg.logs))
            _out(f"iort-witness: serving {url} as {cfg.key.name}")
            await asyncio.wait({web, stopper}, return_when=asyncio.FIRST_COMPLETED)
            log.info("witness_stopping")
            server.should_exit = True
            stopper.cancel()
            done, _ = await asyncio.wait({web}, timeout=SHUTDOWN_TIMEOUT_S)
            if not done:
                log.error("shutdown_timeout", timeout_s=SHUTDOWN_TIMEOUT_S)
                web.cancel(msg="shutdown timed out")
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        sock.close()
    log.info("witness_stopped")
    return EXIT_OK


def _cmd_serve(args: argparse.Namespace) -> int:
    try:
        cfg = load_config(args.config)
    except ConfigError as exc:
        _err(str(exc))
        return EXIT_USAGE
    try:
        cfg.database.parent.mkdir(parents=True, exist_ok=True)
        store = Store.open(cfg.database)
    except (OSError, sqlite3.Error, StoreError) as exc:
        _err(f"{args.config}: witness.database {cfg.database}: {exc}")
        return EXIT_USAGE
    try:
        try:
            sock = _bind(*cfg.listen)
        except OSError as exc:
            _err(f"{args.config}: witness.listen {cfg.listen[0]}:{cfg.listen[1]}: {exc.strerror}")
            return EXIT_USAGE
        # Configured once everything is checked: the errors before are one line each.
        configure_logging(args.log_level)
        logging.getLogger("uvicorn").setLevel(logging.WARNING)
        return asyncio.run(_serve(cfg, store, sock))
    finally:
        store.close()


def _cmd_status(args: argparse.Namespace) -> int:
    try:
        cfg = load_config(args.config)
    except ConfigError as exc:
        _err(str(exc))
        return EXIT_USAGE
    if not cfg.database.exists():
        for origin in cfg.logs:
            _out(f"{origin}: never cosigned")
        _out(f"(no state yet: {cfg.database} does not exist)")
        return EXIT_OK
    try:
        store = Store.open(cfg.database, readonly=True)
    except (sqlite3.Error, StoreError) as exc:
        _err(f"{args.config}: witness.database {cfg.database}: {exc}")
        return EXIT_USAGE
    bad = False
    try:
        known = {x.origin: x for x in store.all_latest()}
        for origin in sorted(set(cfg.logs) | set(known)):
            latest = known.get(origin)
            where = "" if origin in cfg.logs else " (no longer configured)"
            if latest is None:
                _out(f"{origin}: never cosigned{where}")
                continue
            at = utc_ts(datetime.fromtimestamp(latest.cosigned_at, UTC))
            root = base64.b64encode(latest.root).decode("ascii")
            count = len(store.history(origin))
            _out(
                f"{origin}: size {latest.size} root {root} cosigned {at} "
                f"({count} checkpoints in all){where}"
            )
            evidence = store.evidence(origin)
            forks = proven_forks(store.history(origin), evidence)
            if forks:
                bad = True
                _out(
                    f"  FORK: the log signed {len(forks)} checkpoint(s) with another root for "
                    "a size this witness cosigned: its log was rolled back or split; "
                    "see docs/witness.md"
                )
            unproven = len(evidence) - len(forks)
            if unproven:
                _out(
                    f"  {unproven} signed checkpoint(s) refused for a proof that did not "
                    "verify (a fork not yet proven, or a wrong proof anyone could send)"
                )
    finally:
        store.close()
    return EXIT_BAD if bad else EXIT_OK


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="iort-witness",
        description="A transparency-log witness (c2sp.org/tlog-witness) for iortd's audit "
        "logs: cosigns a checkpoint only if it extends the last one cosigned.",
    )
    sub = p.add_subparsers(dest="command", required=True)
    k = sub.add_parser("keygen", help="make the witness's Ed25519 key")
    k.add_argument("name", help="the witness's name, e.g. witness.example.org/iort-1")
    k.add_argument(
        "--out", type=Path, default=Path("iort-witness.key"),
        help="private key file (created, mode 0600); the verifier key goes beside it as .pub",
    )  # fmt: skip
    s = sub.add_parser("serve", help="serve add-checkpoint")
    s.add_argument("--config", type=Path, required=True, metavar="FILE")
    s.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    st = sub.add_parser("status", help="what the witness last cosigned, per log")
    st.add_argument("--config", type=Path, required=True, metavar="FILE")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "keygen":
        return _cmd_keygen(args)
    if args.command == "serve":
        return _cmd_serve(args)
    return _cmd_status(args)


if __name__ == "__main__":
    sys.exit(main())
