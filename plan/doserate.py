"""The independent time check: the treatment time a prescription should take, computed from
the site's own commissioned dose-rate table, beside the time the console was given.

IHE-RO QAPV calls this a "quick recalculation of treatment duration"; with a low-kV source
it is the one recalculation available: expected time = prescribed dose / (reference dose
rate for the applicator at the prescription's reference x the day's output factor).

**The table** (``config/doserate/*.toml``; docs/prescriptions.md, "Dose-rate tables") is
data the site's physicist owns: per applicator code the dose rate at the applicator surface
in Gy/min and optionally at depths in water, with where it comes from (``source``: the
commissioning report's id), its ``date`` and the ``machine`` (source model and serial) it
was measured on. It is separate from the simulator's profiles (``config/profiles``), which
describe a simulated device, not a commissioned one. The bundled tables are marked
``example = true`` and say EXAMPLE in their source: they copy the simulator's rates so an
end-to-end run agrees, and are not commissioning data. Treatment time is not monotonic in
applicator size and depends on the source's calibration (docs/domain.md), so nothing here is
a formula of size: a code not in the table is refused.

**Depth.** Only when the table gives depth rates for that applicator; between two tabulated
depths the rate is interpolated log-linearly (dose falls off close to 1/r^3 in water,
docs/domain.md: roughly exponential over a few mm, so linear interpolation of the rate would
overestimate it between points); outside the tabulated range it is refused, never
extrapolated.

**The output factor** is the day's QA result (measured output / reference output). Its data
form is a small JSON document (:func:`parse_output_factor`); the signing that makes it
"entered and signed like a prescription" comes with the command envelope. A factor more than
5 % from 1 is refused: 5 % calls for recalibration (OAR 333-123-0095/0145; AAPM TG-142), so
such a source should not be treating.

Pure: no clock reads; the table loader reads one small file (kernel/files.py).
"""

from __future__ import annotations

import hashlib
import itertools
import math
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any, Final

import orjson

from iortd.auditlog.canonical import canonical
from iortd.auditlog.keyring import HOLDER_RE
from iortd.kernel.files import FileReadError, read_small_file, toml_error
from iortd.plan.model import DoseReference, Prescription

__all__ = [
    "MAX_FACTOR_DEVIATION",
    "ApplicatorRates",
    "DoseRateError",
    "DoseRateTable",
    "OutputFactor",
    "expected_time_s",
    "factor_date_problem",
    "load_doserate_table",
    "output_factor_bytes",
    "parse_output_factor",
    "read_doserate_table",
    "time_agrees",
]

TABLE_FORMAT: Final = 1
MAX_FACTOR_DEVIATION: Final = 0.05
_MAX_RATE_GY_MIN: Final = 100.0  # far above any IORT source (0.45-3.4 Gy/min: docs/domain.md)
_CODE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,31}")
_HOLDER = HOLDER_RE  # the keyring's holder id


class DoseRateError(ValueError):
    """A table, a factor or a question the table cannot answer; one line saying which."""


@dataclass(frozen=True, slots=True)
class ApplicatorRates:
    surface_gy_min: float
    depth: tuple[tuple[float, float], ...] = ()  # (mm, Gy/min), increasing mm


@dataclass(frozen=True, slots=True)
class DoseRateTable:
    path: Path
    machine: str
    source: str
    date: date
    example: bool
    applicators: Mapping[str, ApplicatorRates]


@dataclass(frozen=True, slots=True)
class OutputFactor:
    value: float
    measured_on: date
    measured_by: str  # keyring holder id of the physicist who measured it
    machine: str

    def valid_on(self, day: date) -> bool:
        """The day's factor is the day's: yesterday's does not count."""
        return self.measured_on == day


def _rate(where: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise DoseRateError(f"{where}: must be a number (Gy/min)")
    x = float(value)
    if not (math.isfinite(x) and 0 < x <= _MAX_RATE_GY_MIN):
        raise DoseRateError(f"{where}: {x:g} Gy/min is out of bounds (0 < x <= 100)")
    return x


def _text(where: str, doc: Mapping[str, Any], key: str) -> str:
    value = doc.get(key)
    if value is None:
        raise DoseRateError(f"{where}{key}: missing")
    if not isinstance(value, str) or not value.strip() or len(value) > 200:
        raise DoseRateError(f"{where}{key}: must be text of 1-200 characters")
    return value


def _unknown(where: str, doc: Mapping[str, Any], keys: set[str]) -> None:
    for k in sorted(set(doc) - keys):
        raise DoseRateError(f"{where}{k}: unknown key (allowed: {', '.join(sorted(keys))})")


def _applicator(where: str, doc: object) -> ApplicatorRates:
    if not isinstance(doc, dict):
        raise DoseRateError(f"{where}: must be a table")
    _unknown(f"{where}.", doc, {"surface_gy_min", "depth"})
    if "surface_gy_min" not in doc:
        raise DoseRateError(f"{where}.surface_gy_min: missing")
    surface = _rate(f"{where}.surface_gy_min", doc["surface_gy_min"])
    rows = doc.get("depth", [])
    if not isinstance(rows, list):
        raise DoseRateError(f"{where}.depth: must be an array of {{ mm = ..., gy_min = ... }}")
    depth: list[tuple[float, float]] = []
    for i, row in enumerate(rows):
        at = f"{where}.depth[{i}]"
        if not isinstance(row, dict) or set(row) != {"mm", "gy_min"}:
            raise DoseRateError(f"{at}: must be {{ mm = ..., gy_min = ... }}")
        mm = row["mm"]
        if isinstance(mm, bool) or not isinstance(mm, int | float) or not 0 < mm <= 100:
            raise DoseRateError(f"{at}.mm: must be a depth in mm, 0 < mm <= 100")
        if depth and mm <= depth[-1][0]:
            raise DoseRateError(f"{at}.mm: depths must increase (sort the rows by mm)")
        depth.append((float(mm), _rate(f"{at}.gy_min", row["gy_min"])))
    return ApplicatorRates(surface, tuple(depth))


def load_doserate_table(path: Path) -> DoseRateTable:
    """The table in ``path``; DoseRateError naming the file and the key otherwise."""
    return read_doserate_table(path)[0]


def read_doserate_table(path: Path) -> tuple[DoseRateTable, str]:
    """The table in ``path`` and the SHA-256 of the very bytes it was parsed from (one
    read: what a check records is the table it used); DoseRateError as above."""
    try:
        raw = read_small_file(path, expected="a dose-rate table (TOML)")
        doc = tomllib.loads(raw.decode("utf-8"))
    except FileReadError as exc:
        raise DoseRateError(f"{path}: {exc.reason}") from None
    except UnicodeDecodeError:
        raise DoseRateError(f"{path}: not UTF-8 text") from None
    except (tomllib.TOMLDecodeError, RecursionError) as exc:
        raise DoseRateError(f"{path}: not valid TOML: {toml_error(exc, raw)}") from None
    try:
        return _table(path, doc), hashlib.sha256(raw).hexdigest()
    except DoseRateError as exc:
        raise DoseRateError(f"{path}: {exc}") from None


def _table(path: Path, doc: dict[str, Any]) -> DoseRateTable:
    _unknown("", doc, {"format", "example", "machine", "source", "date", "applicators"})
    if doc.get("format") != TABLE_FORMAT or isinstance(doc.get("format"), bool):
        raise DoseRateError(f"format: must be {TABLE_FORMAT} (the dose-rate table format)")
    example = doc.get("example", False)
    if not isinstance(example, bool):
        raise DoseRateError("example: must be true or false")
    when = doc.get("date")
    if not isinstance(when, date) or hasattr(when, "hour"):
        raise DoseRateError("date: must be a TOML date, e.g. date = 2026-07-01 (no quotes)")
    apps = doc.get("applicators")
    if not isinstance(apps, dict) or not apps:
        raise DoseRateError("applicators: missing (one [applicators.CODE] table per applicator)")
    rates: dict[str, ApplicatorRates] = {}
    for code, entry in apps.items():
        if not _CODE.fullmatch(code):
            raise DoseRateError(f"applicators.{code}: not an applicator code (e.g. SPH30)")
        rates[code] = _applicator(f"applicators.{code}", entry)
    return DoseRateTable(
        path=path,
        machine=_text("", doc, "machine"),
        source=_text("", doc, "source"),
        date=when,
        example=example,
        applicators=rates,
    )


def _rate_at(code: str, rates: ApplicatorRates, depth_mm: float) -> float:
    if not rates.depth:
        raise DoseRateError(
            f"{code}: the table gives no depth dose rates, so a prescription at depth cannot "
            "be checked; add [[applicators.CODE.depth]] rows from commissioning"
        )
    rows = rates.depth
    lo, hi = rows[0][0], rows[-1][0]
    if not lo <= depth_mm <= hi:
        raise DoseRateError(
            f"{code}: depth {depth_mm:g} mm: outside the table's depths ({lo:g}-{hi:g} mm); "
            "never extrapolated"
        )
    for (d0, r0), (d1, r1) in itertools.pairwise(rows):
        if d0 <= depth_mm <= d1:
            w = (depth_mm - d0) / (d1 - d0)
            return math.exp(math.log(r0) + w * (math.log(r1) - math.log(r0)))
    return rows[0][1]  # a single row, at exactly its depth


def expected_time_s(
    prescription: Prescription, table: DoseRateTable, output_factor: OutputFactor
) -> float:
    """Seconds of beam-on that deliver the prescribed dose: dose / (rate x factor) x 60."""
    code = prescription.applicator_code
    rates = table.applicators.get(code)
    if rates is None:
        raise DoseRateError(
            f"{code}: not in the dose-rate table {table.path.name} (it has "
            f"{', '.join(sorted(table.applicators))})"
        )
    if prescription.dose_reference is DoseReference.DEPTH:
        assert prescription.depth_mm is not None  # noqa: S101 - the model guarantees it
        rate = _rate_at(code, rates, prescription.depth_mm)
    else:
        rate = rates.surface_gy_min
    return prescription.prescribed_dose_gy / (rate * output_factor.value) * 60.0


def time_agrees(planned_s: float, expected_s: float, tolerance_rel: float) -> tuple[bool, str]:
    """Whether the planned time is within ``tolerance_rel`` of the expected one, and a line
    that says by how much (for the record and the physicist)."""
    if not (math.isfinite(expected_s) and expected_s > 0):
        raise ValueError(f"expected_s must be a positive time, not {expected_s!r}")
    if not math.isfinite(planned_s):
        return False, f"planned time {planned_s!r} is not a number"
    dev = (planned_s - expected_s) / expected_s
    ok = abs(dev) <= tolerance_rel + 1e-12  # a deviation equal to the tolerance is within it
    return ok, (
        f"planned {planned_s:.1f} s, expected {expected_s:.1f} s: {dev * 100:+.2f} % "
        f"(tolerance {tolerance_rel * 100:.2f} %)"
    )


def parse_output_factor(raw: bytes) -> OutputFactor:
    """The day's output factor in its JSON form (docs/prescriptions.md, "Output factor")."""
    if len(raw) > 4096:
        raise DoseRateError("output factor: too large (at most 4096 bytes)")
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise DoseRateError(f"output factor: not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise DoseRateError("output factor: not a JSON object")
    keys = {"v", "output_factor", "measured_on", "measured_by", "machine"}
    _unknown("output factor: ", doc, keys)
    for k in sorted(keys - set(doc)):
        raise DoseRateError(f"output factor: {k}: missing")
    if doc["v"] != 1 or isinstance(doc["v"], bool):
        raise DoseRateError("output factor: v: must be 1")
    value = doc["output_factor"]
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not abs(float(value) - 1.0) <= MAX_FACTOR_DEVIATION
    ):
        raise DoseRateError(
            "output factor: output_factor: must be a number within 5 % of 1 (0.95-1.05); "
            "beyond that the source calls for recalibration, not a correction"
        )
    try:
        on = date.fromisoformat(doc["measured_on"]) if isinstance(doc["measured_on"], str) else None
    except ValueError:
        on = None
    if on is None or len(doc["measured_on"]) != 10:
        raise DoseRateError("output factor: measured_on: must be a date, YYYY-MM-DD")
    by = doc["measured_by"]
    if not isinstance(by, str) or not _HOLDER.fullmatch(by):
        raise DoseRateError("output factor: measured_by: must be a keyring holder id")
    machine = _text("output factor: ", doc, "machine")
    return OutputFactor(value=float(value), measured_on=on, measured_by=by, machine=machine)


def output_factor_bytes(value: float, measured_on: date, measured_by: str, machine: str) -> bytes:
    """The output factor's JSON form, canonical (as a prescription's), after the same checks
    :func:`parse_output_factor` makes: what ``iort-plan factor`` writes is what it reads."""
    raw = canonical(
        {
            "v": 1,
            "output_factor": value,
            "measured_on": measured_on.isoformat(),
            "measured_by": measured_by,
            "machine": machine,
        }
    )
    parse_output_factor(raw)
    return raw


def factor_date_problem(
    measured_on: date, now: datetime, skew: timedelta
) -> tuple[str, str] | None:
    """Why a factor measured on ``measured_on`` is not taken at ``now`` (UTC): a fixed word
    (``measured_in_future``, ``too_old``) and a line; None when it is taken. A day that has
    not begun yet (beyond ``skew``) is a mistake or a factor entered ahead; one more than a
    day old is stale (yesterday's is still taken, for a factor sent just after midnight UTC,
    but it is not today's: :meth:`OutputFactor.valid_on`). The sender and the daemon
    (daemon/output_factor.py) apply this same rule."""
    if measured_on > (now + skew).date():
        return (
            "measured_in_future",
            f"measured_on {measured_on}: in the future (today is {now.date()}, UTC)",
        )
    if measured_on < (now - skew).date() - timedelta(days=1):
        return (
            "too_old",
            f"measured_on {measured_on}: more than 1 day ago (today is {now.date()}, UTC); "
            "measure and send today's factor",
        )
    return None
