"""``iort-plan``: the physicist's tool for prescriptions (docs/prescriptions.md).

    iort-plan new --treatment-id ID --plan-id ID [--fraction N] [--fractions N]
                  --dose-gy GY [--reference surface|depth] [--depth-mm MM]
                  --applicator CODE --diameter-mm MM
                  (--planned-time-min MIN | --planned-time-s S)
                  --approved-by HOLDER [--approved-at TIME] [--valid-hours H | --not-after TIME]
                  [--dose-tolerance REL] [--time-tolerance REL] [--out FILE]
    iort-plan import PLAN.dcm --treatment-id ID --plan-id ID [--fraction N]
                  [--reference surface|depth] [--depth-mm MM] [--diameter-mm MM]
                  --approved-by HOLDER [--approved-at TIME] [--valid-hours H | --not-after TIME]
                  [--dose-tolerance REL] [--time-tolerance REL]
                  [--protected-store DIR] [--out FILE]
    iort-plan check RX.json [--doserate TABLE.toml --output-factor FACTOR.json [--on DATE]]
    iort-plan factor --value F --measured-by HOLDER --machine TEXT [--measured-on DATE]
                  [--out FILE]
    iort-plan send [--kind prescription|output_factor] FILE --key KEYFILE --holder ID
                  --site S --room R
                  (--broker URL [--username U --password-file F] [--tls ...] | --inbox DIR)
                  [--ttl S]
    iort-plan override --delivery ID --prescription SHA256 --item ITEM [--item ...]
                  --reason TEXT --key ... --holder ... --site ... --room ... (as send)

``new`` and ``import`` write the prescription's canonical JSON to FILE (atomically) or to
stdout. ``import`` takes the dose, fractions, applicator and planned time from the RT Plan
(plan/dicom_import.py) and what the plan cannot say from the flags; the plan's Patient ID
and SOP Instance UID go only to ``--protected-store`` (plan/store.py), never to the output.
``check`` reads a prescription and, given a dose-rate table and the day's output factor,
runs the independent time check (plan/doserate.py). ``factor`` writes the day's output
factor in its JSON form. ``send`` signs a prescription with the approving physicist's key,
or the day's output factor with the measuring physicist's (``--kind output_factor``), and
sends it to the room's daemon over MQTT or into its inbox (plan/send.py). ``override``
signs and sends, the same way, a physicist's override of named verification mismatches
(plan/override.py).

Exit status: 0 done (``check``: valid and, when asked, the time agrees); 1 the thing checked
is bad: an RT Plan that cannot be imported (not DICOM, not an RT Plan, something missing or
contradictory: one line naming the DICOM attribute), a protected-store entry that already
holds another plan, a prescription file that is not valid, a time that disagrees; 2 usage:
a flag's value (out of bounds, not a pseudonym, an id built from the plan's patient), a file
that cannot be read, a protected store open to others, pydicom not installed.

Nothing is logged; stdout carries the prescription (or ``check``'s report) only; errors are
one line on stderr, and never quote a value read from a DICOM file.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from iortd.kernel.durable import write_atomic
from iortd.kernel.files import FileReadError, read_small_file
from iortd.kernel.timefmt import utc_ts
from iortd.plan import override, send
from iortd.plan.doserate import (
    DoseRateError,
    expected_time_s,
    load_doserate_table,
    output_factor_bytes,
    parse_output_factor,
    time_agrees,
)
from iortd.plan.model import (
    DEFAULT_DOSE_REL,
    DEFAULT_TIME_REL,
    Prescription,
    PrescriptionError,
    Tolerances,
    check_holder,
    check_pseudonym,
    make_prescription,
    parse_prescription,
    parse_utc,
    prescription_bytes,
)

if TYPE_CHECKING:
    from iortd.plan.dicom_import import PlanFacts

__all__ = ["main"]

EXIT_OK, EXIT_BAD, EXIT_USAGE = 0, 1, 2
MAX_PLAN_BYTES = 32 * 1024 * 1024  # an RT Plan with many control points is a few MB
INSTALL_PLAN = "pip install 'iortd[plan]'"
# An approval is now, give or take two machines' clocks: one dated ahead would keep a
# prescription valid for longer than the physicist meant.
APPROVAL_SKEW = timedelta(minutes=5)
# fields of a prescription that `import` takes from the plan: an error there is the plan's
_FROM_PLAN = ("prescribed_dose_gy", "fractions", "applicator.", "planned_time_s")


class Failed(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


def _usage(msg: str) -> NoReturn:
    raise Failed(EXIT_USAGE, msg)


def _bad(msg: str) -> NoReturn:
    raise Failed(EXIT_BAD, msg)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--treatment-id", required=True, help="pseudonymous treatment id")
    p.add_argument("--plan-id", required=True, help="pseudonymous plan id")
    p.add_argument("--fraction", type=int, default=1, help="this delivery is fraction N")
    p.add_argument("--reference", choices=("surface", "depth"), default="surface")
    p.add_argument("--depth-mm", type=float, help="with --reference depth")
    p.add_argument("--approved-by", required=True, help="the physicist's keyring holder id")
    p.add_argument("--approved-at", help="UTC, RFC 3339 with Z (default: now)")
    when = p.add_mutually_exclusive_group()
    when.add_argument("--valid-hours", type=float, default=24.0, help="default 24")
    when.add_argument("--not-after", help="UTC, RFC 3339 with Z")
    p.add_argument("--dose-tolerance", type=float, default=DEFAULT_DOSE_REL)
    p.add_argument("--time-tolerance", type=float, default=DEFAULT_TIME_REL)
    p.add_argument("--out", type=Path, help="write here (atomically) instead of stdout")


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="iort-plan", description="Prescriptions for iortd (docs/prescriptions.md)."
    )
    sub = ap.add_subparsers(dest="command", required=True)
    new = sub.add_parser("new", help="write a prescription from flags")
    _common(new)
    new.add_argument("--fractions", type=int, default=1)
    new.add_argument("--dose-gy", type=float, required=True, help="Gy, this fraction")
    new.add_argument("--applicator", required=True, help="applicator code, e.g. SPH30")
    new.add_argument("--diameter-mm", type=float, required=True)
    t = new.add_mutually_exclusive_group(required=True)
    t.add_argument("--planned-time-min", type=float)
    t.add_argument("--planned-time-s", type=float)
    imp = sub.add_parser("import", help="a prescription from a DICOM RT Plan")
    imp.add_argument("plan", type=Path, metavar="PLAN.dcm")
    _common(imp)
    imp.add_argument("--diameter-mm", type=float, help="only for a plan without geometry")
    imp.add_argument("--protected-store", type=Path, help="where Patient ID and plan UID go")
    chk = sub.add_parser("check", help="check a prescription file, and its time")
    chk.add_argument("prescription", type=Path, metavar="RX.json")
    chk.add_argument("--doserate", type=Path, help="the commissioned dose-rate table")
    chk.add_argument("--output-factor", type=Path, help="the day's output factor (JSON)")
    chk.add_argument("--on", help="the day the factor must be from (default: today, UTC)")
    fac = sub.add_parser("factor", help="write the day's output factor (JSON)")
    fac.add_argument("--value", type=float, required=True, help="measured / reference output")
    fac.add_argument("--measured-on", help="YYYY-MM-DD (default: today, UTC)")
    fac.add_argument("--measured-by", required=True, help="the physicist's keyring holder id")
    fac.add_argument("--machine", required=True, help="the source model and serial")
    fac.add_argument("--out", type=Path, help="write here (atomically) instead of stdout")
    send.add_parser(sub)
    override.add_parser(sub)
    return ap


def _times(args: argparse.Namespace) -> tuple[datetime, datetime]:
    now = datetime.now(UTC)
    try:
        approved = parse_utc("--approved-at", args.approved_at) if args.approved_at else now
        if approved > now + APPROVAL_SKEW:
            _usage(
                f"--approved-at: in the future (more than {APPROVAL_SKEW.seconds // 60} min "
                "ahead of this machine's clock); give the time of the approval"
            )
        if args.not_after:
            return approved, parse_utc("--not-after", args.not_after)
    except PrescriptionError as exc:
        _usage(str(exc))
    if not 0 < args.valid_hours <= 24 * 7:
        _usage("--valid-hours: must be more than 0 and at most 168 (7 days)")
    return approved, approved + timedelta(hours=args.valid_hours)


def _build(args: argparse.Namespace, **fields: object) -> Prescription:
    approved, not_after = _times(args)
    return make_prescription(
        treatment_id=args.treatment_id,
        plan_id=args.plan_id,
        fraction=args.fraction,
        dose_reference=args.reference,
        depth_mm=args.depth_mm,
        approved_by=args.approved_by,
        approved_at=approved,
        not_after=not_after,
        tolerances=Tolerances(args.dose_tolerance, args.time_tolerance),
        **fields,
    )


def _write(args: argparse.Namespace, p: Prescription) -> None:
    _write_bytes(args, prescription_bytes(p) + b"\n")


def _write_bytes(args: argparse.Namespace, data: bytes) -> None:
    if args.out is None:
        sys.stdout.write(data.decode("utf-8"))
        return
    try:
        write_atomic(args.out, data)
    except OSError as exc:
        _usage(f"--out {args.out}: cannot write: {exc.strerror}")


def _cmd_new(args: argparse.Namespace) -> int:
    minutes = args.planned_time_min
    try:
        p = _build(
            args,
            fractions=args.fractions,
            prescribed_dose_gy=args.dose_gy,
            applicator_code=args.applicator,
            applicator_diameter_mm=args.diameter_mm,
            planned_time_s=minutes * 60.0 if minutes is not None else args.planned_time_s,
        )
    except PrescriptionError as exc:
        _usage(str(exc))
    _write(args, p)
    return EXIT_OK


def _not_from_patient(flag: str, value: str, facts: PlanFacts) -> None:
    low = value.lower()
    found = [facts.patient_id, facts.patient_birth_date, *facts.patient_name_parts]
    if any(len(x) >= 3 and x.lower() in low for x in found):
        _usage(
            f"{flag}: contains the plan's Patient ID, a part of its Patient Name or its "
            "birth date; choose a pseudonym with none of them"
        )


def _cmd_import(args: argparse.Namespace) -> int:
    try:  # the flags first: nothing is read while they are wrong
        check_pseudonym("treatment_id", args.treatment_id)
        check_pseudonym("plan_id", args.plan_id)
        check_holder("approved_by", args.approved_by)
    except PrescriptionError as exc:
        _usage(str(exc))
    try:
        from iortd.plan.dicom_import import PlanRefused, read_rt_plan  # noqa: PLC0415 - extra
    except ModuleNotFoundError as exc:
        if (exc.name or "").partition(".")[0] != "pydicom":
            raise
        _usage(f"import needs pydicom, which is not installed: install it with: {INSTALL_PLAN}")
    try:
        raw = read_small_file(args.plan, MAX_PLAN_BYTES, expected="a DICOM RT Plan file")
    except FileReadError as exc:
        _usage(f"{args.plan}: {exc.reason}")
    try:
        facts = read_rt_plan(raw)
    except PlanRefused as exc:
        _bad(f"{args.plan}: {exc}")
    for flag, value in (("--treatment-id", args.treatment_id), ("--plan-id", args.plan_id)):
        _not_from_patient(flag, value, facts)
    diameter = facts.applicator_diameter_mm
    if diameter is None:
        if args.diameter_mm is None:
            _bad(
                f"{args.plan}: Applicator Geometry Sequence (300A,0431): missing, so the plan "
                "gives no applicator diameter; give --diameter-mm"
            )
        diameter = args.diameter_mm
    elif args.diameter_mm is not None and abs(args.diameter_mm - diameter) > 1e-6:
        _bad(f"{args.plan}: --diameter-mm disagrees with Applicator Opening (300A,0433)")
    try:
        p = _build(
            args,
            fractions=facts.fractions,
            prescribed_dose_gy=facts.dose_per_fraction_gy,
            applicator_code=facts.applicator_code,
            applicator_diameter_mm=diameter,
            planned_time_s=facts.planned_time_s,
        )
    except PrescriptionError as exc:
        if str(exc).startswith(_FROM_PLAN):
            _bad(f"{args.plan}: the plan's {exc}")
        _usage(str(exc))
    if args.protected_store is not None:
        from iortd.plan.store import (  # noqa: PLC0415 - only when asked
            HandOff,
            StoreConflict,
            StoreError,
            save_hand_off,
        )

        entry = HandOff(p.treatment_id, p.plan_id, facts.patient_id, facts.sop_instance_uid)
        try:  # before the prescription: none exists without its hand-off entry
            save_hand_off(args.protected_store, entry, utc_ts(datetime.now(UTC)))
        except StoreError as exc:
            _usage(str(exc))
        except StoreConflict as exc:
            _bad(str(exc))
    _write(args, p)
    return EXIT_OK


def _read(flag: str, path: Path) -> bytes:
    try:
        return read_small_file(path, 64 * 1024)
    except FileReadError as exc:
        _usage(f"{flag} {path}: {exc.reason}")


def _cmd_check(args: argparse.Namespace) -> int:
    raw = _read("prescription", args.prescription)
    try:
        p = parse_prescription(raw)
    except PrescriptionError as exc:
        _bad(f"{args.prescription}: {exc}")
    at = "the applicator surface" if p.depth_mm is None else f"{p.depth_mm:g} mm depth"
    out = [
        f"prescription {p.treatment_id}, plan {p.plan_id}, fraction {p.fraction} of "
        f"{p.fractions}: {p.prescribed_dose_gy:g} Gy at {at}, applicator "
        f"{p.applicator_code} ({p.applicator_diameter_mm:g} mm), planned "
        f"{p.planned_time_s:.1f} s; approved by {p.approved_by} at {utc_ts(p.approved_at)}, "
        f"not after {utc_ts(p.not_after)}"
    ]
    code = EXIT_OK
    if args.doserate is not None or args.output_factor is not None:
        if args.doserate is None or args.output_factor is None:
            _usage("--doserate and --output-factor go together (the time check needs both)")
        try:
            table = load_doserate_table(args.doserate)
            factor = parse_output_factor(_read("--output-factor", args.output_factor))
        except DoseRateError as exc:
            _usage(str(exc))
        try:
            day = date.fromisoformat(args.on) if args.on else datetime.now(UTC).date()
        except ValueError:
            _usage("--on: must be a date, YYYY-MM-DD")
        out.append(
            f"dose-rate table: {table.path.name}: {table.machine}; source: {table.source}; "
            f"dated {table.date.isoformat()}"
        )
        if table.example:
            out.append("WARNING: the dose-rate table is an EXAMPLE, not commissioning data")
        out.append(
            f"output factor: {factor.value:.4f}, measured {factor.measured_on.isoformat()} "
            f"by {factor.measured_by}"
        )
        if not factor.valid_on(day):
            print("\n".join(out))  # noqa: T201 - CLI output
            _bad(f"output factor measured on {factor.measured_on}, not on {day}: measure today's")
        try:
            expected = expected_time_s(p, table, factor)
        except DoseRateError as exc:
            print("\n".join(out))  # noqa: T201 - CLI output
            _bad(f"time check: cannot be done: {exc}")
        ok, detail = time_agrees(p.planned_time_s, expected, p.tolerances.time_rel)
        out.append(f"time check: {'agrees' if ok else 'DISAGREES'}: {detail}")
        code = EXIT_OK if ok else EXIT_BAD
    print("\n".join(out))  # noqa: T201 - CLI output
    return code


def _cmd_factor(args: argparse.Namespace) -> int:
    try:
        day = date.fromisoformat(args.measured_on) if args.measured_on else datetime.now(UTC).date()
    except ValueError:
        _usage("--measured-on: must be a date, YYYY-MM-DD")
    try:
        raw = output_factor_bytes(args.value, day, args.measured_by, args.machine)
    except DoseRateError as exc:
        _usage(str(exc))
    _write_bytes(args, raw + b"\n")
    return EXIT_OK


def _cmd_send(args: argparse.Namespace) -> int:
    try:
        print(send.send(args))  # noqa: T201 - CLI output
    except send.SendFailed as exc:
        raise Failed(exc.code, str(exc)) from None
    return EXIT_OK


def _cmd_override(args: argparse.Namespace) -> int:
    try:
        print(override.override(args))  # noqa: T201 - CLI output
    except send.SendFailed as exc:
        raise Failed(exc.code, str(exc)) from None
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    handlers = {
        "new": _cmd_new,
        "import": _cmd_import,
        "check": _cmd_check,
        "factor": _cmd_factor,
        "send": _cmd_send,
        "override": _cmd_override,
    }
    try:
        return handlers[args.command](args)
    except Failed as exc:
        print(f"iort-plan: {exc}", file=sys.stderr)  # noqa: T201 - CLI output
        return exc.code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
