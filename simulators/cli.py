"""``iort-sim``: run the simulated IORT source on its own, in simulated time.

    iort-sim profiles                        list built-in profiles and their applicators
    iort-sim run --applicator SPH30 [...]    one delivery, the trace as JSON Lines or CSV
    iort-sim serve --transport serial [...]  the console on a pty, speaking XRS-ASCII/1

``run`` needs no clock: the model is advanced in fixed simulated steps, so the same seed
gives the same trace byte for byte. ``serve`` runs in real time (or ``--speed`` times
faster) until SIGINT/SIGTERM and prints JSON lines on stdout: where it serves, each state
change, and the delivery's ground truth when it ends. Modbus and the control channel are
not built yet.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import csv
import importlib.resources
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

import orjson

from drivers.clock import Clock, ScaledClock, SystemClock
from drivers.types import DeviceState, InterlockState
from simulators.device import SimDevice
from simulators.model import ModelSnapshot, SourceModel
from simulators.profiles import Profile, ProfileError, available_profiles, load_profile
from simulators.scenario import ScenarioError, load_scenario
from simulators.sequence import ClinicalSequence
from simulators.serial_xrs import ConsoleProtocol, PtyConsole

__all__ = ["main"]

FIELDS = (
    "time_s",
    "state",
    "dose_rate_gy_min",
    "dose_primary_gy",
    "dose_secondary_gy",
    "preset_gy",
    "beam_on_s",
    "kv",
    "ua",
    "termination",
    "termination_reason",
    "simulated",
)


def _row(s: ModelSnapshot) -> dict[str, object]:
    row: dict[str, object] = {k: getattr(s, k) for k in FIELDS}
    row["interlocks"] = {str(k): str(v) for k, v in s.interlocks.items()}
    row["interlocks_clear"] = all(v is InterlockState.OK for v in s.interlocks.values())
    return row


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
    rows = [_row(model.snapshot())]
    limit = args.max_time
    while seq.time_s < limit:
        seq.process(args.step)
        snap = model.snapshot()
        rows.append(_row(snap))
        if snap.termination is not None:
            break
    _write(sys.stdout, args.format, rows)
    return 0


def _emit(event: str, **fields: object) -> None:
    # Best effort: a reader that went away must not stop the console answering.
    with contextlib.suppress(OSError, ValueError):
        sys.stdout.write(orjson.dumps({"event": event, **fields}).decode() + "\n")
        sys.stdout.flush()


async def _serve(args: argparse.Namespace, profile: Profile) -> int:
    clock: Clock = SystemClock() if args.speed == 1 else ScaledClock(args.speed)
    model = SourceModel(profile, seed=args.seed, serial=args.serial)
    seq = ClinicalSequence(
        model,
        preset_gy=args.preset,
        applicator_code=args.applicator,
        start_delay_s=args.start_delay,
    )
    scenario = None
    if args.scenario is not None:
        try:
            scenario = load_scenario(_scenario_path(args.scenario))
        except ScenarioError as exc:
            print(f"iort-sim: scenario: {exc}", file=sys.stderr)  # noqa: T201
            return 2
    device = SimDevice("console", seq, clock, scenario)
    protocol = ConsoleProtocol(device)
    device.on_step = lambda step, source: _emit(
        "scenario_step", action=step.action, at_s=step.at_s, time_s=round(seq.time_s, 3)
    )
    last: list[DeviceState] = []

    def watch(snap: ModelSnapshot) -> None:
        if not last or snap.state is not last[-1]:
            last.append(snap.state)
            _emit("state", state=snap.state.value, time_s=round(seq.time_s, 3))
            if snap.termination is not None:
                _emit("terminated", **_row(snap))

    device.on_snapshot = watch
    console = PtyConsole(protocol)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    console.start()
    _emit("serving", transport="serial", device=console.device, protocol="XRS-ASCII/1")
    try:
        await stop.wait()
    finally:
        console.close()
    _emit("stopped", requests=protocol.requests)
    return 0


def _scenario_path(name: str) -> Path:
    """A path, or the name of a bundled scenario (config/scenarios/NAME.toml)."""
    path = Path(name)
    if path.suffix == ".toml" or path.exists():
        return path
    return Path(str(importlib.resources.files("iort_config") / "scenarios" / f"{name}.toml"))


def _cmd_serve(args: argparse.Namespace) -> int:
    profile = _profile_for(args)
    if profile is None:
        return 2
    if not (args.speed > 0 and args.preset > 0 and args.start_delay >= 0):
        print(  # noqa: T201
            "iort-sim: --speed and --preset must be > 0, --start-delay >= 0", file=sys.stderr
        )
        return 2
    return asyncio.run(_serve(args, profile))


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
    serve = sub.add_parser("serve", help="serve the console over a wire protocol")
    serve.add_argument("--transport", choices=["serial"], required=True)
    serve.add_argument("--profile", default="intrabeam", help="built-in name or a TOML file")
    serve.add_argument("--applicator", required=True, help="applicator code, e.g. SPH30")
    serve.add_argument("--preset", type=float, default=20.0, help="preset dose in Gy")
    serve.add_argument("--start-delay", type=float, default=5.0, help="simulated seconds")
    serve.add_argument("--speed", type=float, default=1.0, help="simulated s per real s")
    serve.add_argument("--seed", type=int, default=0)
    serve.add_argument("--serial", default="SIM-0001", help="the console's serial number")
    serve.add_argument(
        "--scenario", metavar="NAME|FILE", help="timed faults (config/scenarios/NAME.toml)"
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "run" and not (args.step > 0 and args.preset > 0):
        print("iort-sim: --step and --preset must be > 0", file=sys.stderr)  # noqa: T201
        return 2
    handlers = {"profiles": _cmd_profiles, "run": _cmd_run, "serve": _cmd_serve}
    return handlers[args.command](args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
