"""``iort-ingest``: the central consumer of every room's stream, with gap repair.

    iort-ingest run --config ingest.toml        until SIGTERM/SIGINT
    iort-ingest check-config ingest.toml
    iort-ingest report --db central.sqlite [--json]

``report`` prints per room: received, repaired, skipped (declared by the room), still
missing, repeats, invalid, requests, and the time to repair (median and longest); exit 1
when anything is still missing, 0 otherwise, 2 for a usage or configuration error.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
from pathlib import Path

import orjson

from iortd.auditlog.note import KeyFileError, load_signer
from iortd.ingest.config import ConfigError, load
from iortd.ingest.report import room_report
from iortd.ingest.service import Ingest
from iortd.ingest.store import Store, StoreError
from iortd.kernel.logs import configure_logging

__all__ = ["main"]


def _err(msg: str) -> int:
    sys.stderr.write(f"iort-ingest: {msg}\n")
    return 2


async def _run(config: Path) -> int:
    cfg = load(config)
    signer = load_signer(cfg.replay.key_file)
    store = Store.open(cfg.database)
    try:
        ingest = Ingest(cfg, store, signer)
        await asyncio.to_thread(ingest.rebuild)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await ingest.run(stop)
    finally:
        store.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="iort-ingest", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="consume, store and repair until stopped")
    r.add_argument("--config", type=Path, required=True)
    r.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    c = sub.add_parser("check-config", help="check a configuration and its key file")
    c.add_argument("config", type=Path)
    rep = sub.add_parser("report", help="per room: received, repaired, skipped, missing")
    rep.add_argument("--db", type=Path, required=True)
    rep.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    try:
        if args.cmd == "check-config":
            cfg = load(args.config)
            load_signer(cfg.replay.key_file)
            print(f"{args.config}: ok (ingest {cfg.name}, key {cfg.replay.key_file.name})")  # noqa: T201
            return 0
        if args.cmd == "report":
            rooms = room_report(args.db)
            if args.json:
                sys.stdout.buffer.write(orjson.dumps(rooms, option=orjson.OPT_INDENT_2) + b"\n")
            else:
                print(_table(rooms))  # noqa: T201
            return 1 if any(r["missing"] for r in rooms) else 0
        configure_logging(args.log_level, json=True)
        code = 0
        with contextlib.suppress(KeyboardInterrupt):
            code = asyncio.run(_run(args.config))
    except (ConfigError, KeyFileError, StoreError) as exc:
        return _err(str(exc))
    return code


def _table(rooms: list[dict[str, object]]) -> str:
    cols = ("site", "room", "received", "repaired", "skipped", "missing", "repeats",
            "invalid", "requests", "repair_p50_s", "repair_max_s")  # fmt: skip
    rows = [cols] + [tuple(str(r[c]) for c in cols) for r in rooms]
    widths = [max(len(row[i]) for row in rows) for i in range(len(cols))]
    return "\n".join(
        "  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in rows
    )


if __name__ == "__main__":
    sys.exit(main())
