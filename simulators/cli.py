"""``iort-sim``: run the simulated IORT source on its own, in simulated time.

    iort-sim profiles                           list built-in profiles and their applicators
    iort-sim run --applicator SPH30 [...]       one delivery, the trace as JSON Lines or CSV
    iort-sim serve --transport serial [...]     the console on a pty, speaking XRS-ASCII/1
    iort-sim serve --transport modbus-tcp|modbus-rtu [...]   XRS-MB/1 over Modbus
    iort-sim serve --kind applicator --transport modbus-tcp|modbus-rtu [...]   APL-MB/1
    iort-sim serve --devices FILE.toml          several devices, each on its own endpoint
    iort-sim ctl [--control PATH] [--device NAME] ACTION [key=value ...]

``run`` needs no clock: the model is advanced in fixed simulated steps, so the same seed
gives the same trace byte for byte. ``serve`` runs in real time (or ``--speed`` times
faster) until SIGINT/SIGTERM and prints JSON lines on stdout: where each device is served
and the control socket (``serving``, then ``ready``), each state change, each scenario
step and control action, and each delivery's ground truth when it ends. ``ctl`` sends one
request to a running simulator's control channel (docs/simulators.md).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import csv
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

import orjson

from iortd.simulators.control import ControlError, request
from iortd.simulators.model import SourceModel
from iortd.simulators.profiles import Profile, ProfileError, available_profiles, load_profile
from iortd.simulators.scenario import KINDS
from iortd.simulators.sequence import ClinicalSequence
from iortd.simulators.serve import (
    FIELDS,
    TRANSPORTS,
    ServeError,
    SpecError,
    build_spec,
    load_devices,
    serve,
    trace_row,
)

__all__ = ["main"]


def _write(out: TextIO, fmt: str, rows: list[dict[str, object]]) -> None:
    if fmt == "jsonl":
        for row in rows:
            out.write(orjson.dumps(row, option=orjson.OPT_SORT_KEYS).decode() + "\n")
        return
    writer = csv.DictWriter(out, fieldnames=[*FIELDS, "interlocks_clear"], extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)


def _cmd_profiles(_: argparse.Namespace) -> int:
    for name in available_profiles():
        p = load_profile(name)
        print(f"{name}: {p.model} ({p.nominal_kv:g} kV, {p.nominal_ua:g} uA)")  # noqa: T201
        for code, a in sorted(p.applicators.items()):
            minutes = 20.0 / a.surface_dose_rate_gy_min
            print(  # noqa: T201
                f"  {code:8} {a.type:10} {a.diameter_mm:5.1f} mm  "
                f"{a.surface_dose_rate_gy_min:.3f} Gy/min  (20 Gy in {minutes:.1f} min)"
            )
    return 0


def _profile_for(args: argparse.Namespace) -> Profile | None:
    """The profile named by --profile, if it has --applicator; else None, said on stderr."""
    try:
        profile = load_profile(args.profile)
    except ProfileError as exc:
        print(f"iort-sim: {exc}", file=sys.stderr)  # noqa: T201
        return None
    if args.applicator not in profile.applicators:
        known = ", ".join(sorted(profile.applicators))
        print(  # noqa: T201
            f"iort-sim: unknown applicator {args.applicator!r} for profile {profile.name!r} "
            f"(known: {known})",
            file=sys.stderr,
        )
        return None
    return profile


def _cmd_run(args: argparse.Namespace) -> int:
    profile = _profile_for(args)
    if profile is None:
        return 2
    model = SourceModel(profile, seed=args.seed)
    seq = ClinicalSequence(
        model, preset_gy=args.preset, applicator_code=args.applicator, start_delay_s=0.0
    )
    rows = [trace_row(model.snapshot())]
    limit = args.max_time
    while seq.time_s < limit:
        seq.process(args.step)
        snap = model.snapshot()
        rows.append(trace_row(snap))
        if snap.termination is not None:
            break
    _write(sys.stdout, args.format, rows)
    return 0


def _emit(event: str, **fields: object) -> None:
    # Best effort: a reader that went away must not stop the console answering.
    with contextlib.suppress(OSError, ValueError):
        sys.stdout.write(orjson.dumps({"event": event, **fields}).decode() + "\n")
        sys.stdout.flush()


def _fail(message: str) -> int:
    print(f"iort-sim: {message}", file=sys.stderr)  # noqa: T201
    return 2


# Single-device flags: each is the devices-file key of the same name (- for _).
_DEVICE_FLAGS = (
    "transport",
    "profile",
    "applicator",
    "preset",
    "start_delay",
    "seed",
    "serial",
    "scenario",
    "port",
    "unit_id",
    "baudrate",
    "map",
    "name",
    "hold_until_polled",
    "kind",
    "reply_delay_ms",
    "uses_left",
)


def _cmd_serve(args: argparse.Namespace) -> int:
    given = {k: getattr(args, k) for k in _DEVICE_FLAGS if getattr(args, k) is not None}
    try:
        if args.devices is not None:
            if given:
                flags = ", ".join("--" + k.replace("_", "-") for k in sorted(given))
                return _fail(
                    f"serve --devices takes each device's settings from the file, not {flags}"
                )
            specs, file_speed = load_devices(Path(args.devices))
            speed = args.speed if args.speed is not None else (file_speed or 1.0)
        else:
            reader = given.get("kind") == "applicator"
            if "transport" not in given or ("applicator" not in given and not reader):
                return _fail(
                    "serve needs --transport and --applicator (or --devices FILE); "
                    "see iort-sim serve --help"
                )
            given.setdefault("name", "applicator" if reader else "console")
            specs = [build_spec(given, lambda k: "--" + k.replace("_", "-"), {})]
            speed = args.speed if args.speed is not None else 1.0
    except SpecError as exc:
        return _fail(str(exc))
    if not 0 < speed <= 1000:
        return _fail(f"--speed must be in (0, 1000], got {speed!r}")
    control = Path(args.control) if args.control is not None else None
    try:
        return asyncio.run(serve(specs, speed, control, _emit))
    except ServeError as exc:
        return _fail(str(exc))


def _ctl_value(text: str) -> object:
    """``key=value`` values: JSON numbers, ``null``, ``true``/``false``; else the text."""
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError:
        return text
    return value if isinstance(value, int | float | bool) or value is None else text


def _cmd_ctl(args: argparse.Namespace) -> int:
    if args.control is None:
        return _fail("ctl needs --control PATH (the 'control' field of the 'serving' line)")
    req: dict[str, object] = {"action": args.action}
    if args.device is not None:
        req["device"] = args.device
    for pair in args.args:
        key, sep, value = pair.partition("=")
        if not sep or not key or key in req:
            return _fail(f"ctl: expected key=value (e.g. duration=5s), got {pair!r}")
        req[key] = _ctl_value(value)
    try:
        reply = request(Path(args.control), req, timeout_s=args.timeout)
    except ControlError as exc:
        return _fail(str(exc))
    print(orjson.dumps(reply).decode())  # noqa: T201
    if reply.get("ok") is True:
        return 0
    print(f"iort-sim ctl: refused: {reply.get('error')}", file=sys.stderr)  # noqa: T201
    return 1


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="iort-sim", description="Simulated IORT X-ray source.")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("profiles", help="list built-in profiles and applicators")
    run = sub.add_parser("run", help="run one delivery in simulated time and print its trace")
    run.add_argument("--profile", default="intrabeam", help="built-in name or a TOML file")
    run.add_argument("--applicator", required=True, help="applicator code, e.g. SPH30")
    run.add_argument("--preset", type=float, default=20.0, help="preset dose in Gy")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--step", type=float, default=1.0, help="simulated seconds per sample")
    run.add_argument("--max-time", type=float, default=4 * 3600.0, help="simulated seconds")
    run.add_argument("--format", choices=["jsonl", "csv"], default="jsonl")
    serve = sub.add_parser(
        "serve",
        help="serve consoles over wire protocols",
        description="Serve one console (flags) or several (--devices FILE); see "
        "docs/simulators.md. Prints JSON lines on stdout until SIGINT/SIGTERM.",
    )
    serve.add_argument("--devices", metavar="FILE", help="[[device]] tables, one per console")
    serve.add_argument(
        "--kind",
        choices=KINDS,
        help="source (a console, the default) or applicator (an APL-MB/1 reader and stand)",
    )
    serve.add_argument("--transport", choices=TRANSPORTS)
    serve.add_argument("--name", help="the device's name in JSON lines and ctl (console)")
    serve.add_argument("--profile", help="built-in name or a TOML file (intrabeam)")
    serve.add_argument(
        "--applicator", help="applicator code, e.g. SPH30 (a reader: the one seated; none)"
    )
    serve.add_argument("--preset", type=float, help="preset dose in Gy (20)")
    serve.add_argument("--start-delay", type=float, help="simulated seconds (5)")
    serve.add_argument(
        "--hold-until-polled",
        action="store_true",
        default=None,
        help="the console's clock (and its scenario) starts at the first request, not at start",
    )
    serve.add_argument("--seed", type=int, help="model noise seed (0)")
    serve.add_argument(
        "--serial", help="the device's serial number (SIM-0001; a reader: APL-SIM-0001)"
    )
    serve.add_argument(
        "--scenario", metavar="NAME|FILE", help="timed faults (config/scenarios/NAME.toml)"
    )
    serve.add_argument("--port", type=int, help="modbus-tcp: TCP port on 127.0.0.1 (0: free)")
    serve.add_argument("--unit-id", type=int, help="modbus: unit id / RTU address (1; a reader: 2)")
    serve.add_argument(
        "--map", metavar="FILE", help="modbus: register map (xrs-mb1; a reader: apl-mb1)"
    )
    serve.add_argument(
        "--reply-delay-ms", type=float, help="modbus: the device's own turnaround (0)"
    )
    serve.add_argument(
        "--uses-left", type=int, help="applicator: uses left on the seated applicator (not counted)"
    )
    serve.add_argument(
        "--baudrate", type=int, help="modbus-rtu: line time modelled at this rate (19200; 0: off)"
    )
    serve.add_argument("--speed", type=float, help="simulated s per real s, all devices (1)")
    serve.add_argument(
        "--control", metavar="PATH", help="control socket (default: a new temporary path)"
    )
    ctl = sub.add_parser(
        "ctl",
        help="send one request to a running simulator's control channel",
        description="Actions of a console: open_door close_door press_estop release_estop "
        "resume swap_applicator [code=X] set_output_factor factor=F drop_link duration=5s "
        "garble duration=5s delay_replies duration=10s delay=0.8s restore_link status list. "
        "Of an applicator reader: drift rate=MM_PER_MIN [direction=x|-z|1,0,0] bump mm=N "
        "[direction=..] tilt deg=N [direction=x|1,0] release_brakes engage_brakes lock "
        "unseat seat [code=X] swap code=X unlatch_source latch_source fault [code=READER] "
        "clear_fault, and the link actions above. "
        "Exit 0: done; 1: refused; 2: usage error or no simulator.",
    )
    ctl.add_argument("--control", metavar="PATH", help="the simulator's control socket")
    ctl.add_argument("--device", metavar="NAME", help="which device (if it serves several)")
    ctl.add_argument("--timeout", type=float, default=5.0, help="seconds to wait (5)")
    ctl.add_argument("action")
    ctl.add_argument("args", nargs="*", metavar="key=value")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "run" and not (args.step > 0 and args.preset > 0):
        print("iort-sim: --step and --preset must be > 0", file=sys.stderr)  # noqa: T201
        return 2
    handlers = {
        "profiles": _cmd_profiles,
        "run": _cmd_run,
        "serve": _cmd_serve,
        "ctl": _cmd_ctl,
    }
    return handlers[args.command](args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
