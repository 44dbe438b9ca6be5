"""Device profiles: a simulated source described as data (the pyvisa-sim idea).

A profile is a TOML file. The built-in ones ship in the data package
``iortd.config.profiles`` (``config/profiles/`` in the source tree); a site can pass the
path of its own file instead. Files are validated strictly: a typo in a key, a string where
a number belongs or a non-positive dose rate is a :class:`ProfileError` that names the
file, the key and what was expected, because a silently ignored key in a device description
would make the simulator lie about the device.
"""

from __future__ import annotations

import math
import os
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from types import MappingProxyType
from typing import Any

from iortd.kernel.files import FileReadError, read_small_file, toml_error

__all__ = [
    "BUILTIN_PROFILES_PACKAGE",
    "ApplicatorSpec",
    "Profile",
    "ProfileError",
    "available_profiles",
    "is_builtin_profile",
    "load_profile",
]

BUILTIN_PROFILES_PACKAGE = "iortd.config.profiles"


class ProfileError(ValueError):
    """A profile file cannot be used; the message names the file, the key and the fix."""

    def __init__(
        self,
        source: str,
        problem: str,
        *,
        key: str | None = None,
        expected: str | None = None,
    ) -> None:
        self.source = source
        self.key = key
        self.expected = expected
        where = f"{source}: key {key!r}: " if key is not None else f"{source}: "
        super().__init__(where + problem)


@dataclass(frozen=True, slots=True)
class ApplicatorSpec:
    """One applicator the source accepts, with its calibrated surface dose rate."""

    code: str
    type: str  # "spherical", "balloon", "flat", ...
    diameter_mm: float
    surface_dose_rate_gy_min: float


@dataclass(frozen=True, slots=True, kw_only=True)
class Profile:
    """Everything the simulator needs to behave like one model of source.

    Relative quantities are fractions (0.009 means 0.9 %). Tolerances and margins are
    per-device settings, not physics: docs/domain.md records that they are not public.
    """

    name: str
    manufacturer: str
    model: str
    firmware: str
    nominal_kv: float
    nominal_ua: float
    kv_tolerance_rel: float
    ua_tolerance_rel: float
    output_noise_rel_sd: float
    output_drift_rel_per_30min: float
    secondary_gain: float = 1.0
    secondary_noise_rel_sd: float
    monitor_stop_accuracy_rel: float
    backup_timer_margin_rel: float
    dose_channel_tolerance_rel: float
    dose_rate_tolerance_rel: float
    self_test_s: float
    # A read-only mapping cannot be hashed; the other fields identify a profile anyway.
    applicators: Mapping[str, ApplicatorSpec] = field(hash=False)


# --- validation rules -------------------------------------------------------------------

_Check = Callable[[float], bool]

_TEXT = "a non-empty string"


def _positive(x: float) -> bool:
    return x > 0


def _non_negative(x: float) -> bool:
    return x >= 0


def _fraction(x: float) -> bool:
    return 0 < x < 1


def _non_negative_fraction(x: float) -> bool:
    return 0 <= x < 1


def _signed_fraction(x: float) -> bool:
    return -1 < x < 1


_NUMBER_RULES: Mapping[_Check, str] = {
    _positive: "a positive number",
    _non_negative: "a number >= 0",
    _fraction: "a fraction between 0 and 1 (exclusive)",
    _non_negative_fraction: "a fraction >= 0 and < 1",
    _signed_fraction: "a fraction between -1 and 1 (exclusive)",
}

# key -> None for text, or the numeric check. Order is the order of Profile's fields.
_PROFILE_KEYS: Mapping[str, _Check | None] = {
    "name": None,
    "manufacturer": None,
    "model": None,
    "firmware": None,
    "nominal_kv": _positive,
    "nominal_ua": _positive,
    "kv_tolerance_rel": _fraction,
    "ua_tolerance_rel": _fraction,
    "output_noise_rel_sd": _non_negative_fraction,
    "output_drift_rel_per_30min": _signed_fraction,
    "secondary_gain": _positive,
    "secondary_noise_rel_sd": _non_negative_fraction,
    "monitor_stop_accuracy_rel": _non_negative_fraction,
    "backup_timer_margin_rel": _positive,
    "dose_channel_tolerance_rel": _fraction,
    "dose_rate_tolerance_rel": _fraction,
    "self_test_s": _non_negative,
}
_OPTIONAL_KEYS = frozenset({"secondary_gain"})
_APPLICATOR_KEYS: Mapping[str, _Check | None] = {
    "type": None,
    "diameter_mm": _positive,
    "surface_dose_rate_gy_min": _positive,
}


def _expected(check: _Check | None) -> str:
    return _TEXT if check is None else _NUMBER_RULES[check]


def _value(source: str, key: str, raw: object, check: _Check | None) -> str | float:
    expected = _expected(check)
    if check is None:
        if isinstance(raw, str) and raw.strip():
            return raw
    # bool is an int subclass in Python; "true" is never a number in a device description.
    elif isinstance(raw, int | float) and not isinstance(raw, bool):
        number = float(raw)
        if math.isfinite(number) and check(number):
            return number
    raise ProfileError(source, f"expected {expected}, got {raw!r}", key=key, expected=expected)


def _table(
    source: str, prefix: str, raw: Mapping[str, Any], rules: Mapping[str, _Check | None]
) -> dict[str, str | float]:
    for key in raw:
        if key not in rules:
            expected = "one of " + ", ".join(rules)
            raise ProfileError(
                source, f"unknown key, expected {expected}", key=prefix + key, expected=expected
            )
    out: dict[str, str | float] = {}
    for key, check in rules.items():
        if key in raw:
            out[key] = _value(source, prefix + key, raw[key], check)
        elif key not in _OPTIONAL_KEYS:
            expected = _expected(check)
            raise ProfileError(
                source, f"missing, expected {expected}", key=prefix + key, expected=expected
            )
    return out


def _applicators(source: str, raw: object) -> Mapping[str, ApplicatorSpec]:
    expected = "a table of applicator tables, e.g. [applicators.SPH30]"
    if not isinstance(raw, dict) or not raw:
        raise ProfileError(
            source, f"expected {expected}, got {raw!r}", key="applicators", expected=expected
        )
    specs: dict[str, ApplicatorSpec] = {}
    for code, table in raw.items():
        key = f"applicators.{code}"
        if not code.strip() or not isinstance(table, dict):
            raise ProfileError(
                source, f"expected {expected}, got {table!r}", key=key, expected=expected
            )
        fields = _table(source, key + ".", table, _APPLICATOR_KEYS)
        specs[code] = ApplicatorSpec(
            code=code,
            type=str(fields["type"]),
            diameter_mm=float(fields["diameter_mm"]),
            surface_dose_rate_gy_min=float(fields["surface_dose_rate_gy_min"]),
        )
    return MappingProxyType(specs)


def _parse(data: bytes, source: str) -> Profile:
    try:
        document = tomllib.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError, RecursionError) as exc:
        problem = f"not a valid UTF-8 TOML file: {toml_error(exc, data)}"
        raise ProfileError(source, problem) from None
    if "applicators" not in document:
        expected = "a table of applicator tables, e.g. [applicators.SPH30]"
        raise ProfileError(source, f"missing, expected {expected}", key="applicators")
    applicators = _applicators(source, document.pop("applicators"))
    f = _table(source, "", document, _PROFILE_KEYS)
    return Profile(
        name=str(f["name"]),
        manufacturer=str(f["manufacturer"]),
        model=str(f["model"]),
        firmware=str(f["firmware"]),
        nominal_kv=float(f["nominal_kv"]),
        nominal_ua=float(f["nominal_ua"]),
        kv_tolerance_rel=float(f["kv_tolerance_rel"]),
        ua_tolerance_rel=float(f["ua_tolerance_rel"]),
        output_noise_rel_sd=float(f["output_noise_rel_sd"]),
        output_drift_rel_per_30min=float(f["output_drift_rel_per_30min"]),
        secondary_gain=float(f.get("secondary_gain", 1.0)),
        secondary_noise_rel_sd=float(f["secondary_noise_rel_sd"]),
        monitor_stop_accuracy_rel=float(f["monitor_stop_accuracy_rel"]),
        backup_timer_margin_rel=float(f["backup_timer_margin_rel"]),
        dose_channel_tolerance_rel=float(f["dose_channel_tolerance_rel"]),
        dose_rate_tolerance_rel=float(f["dose_rate_tolerance_rel"]),
        self_test_s=float(f["self_test_s"]),
        applicators=applicators,
    )


def available_profiles() -> list[str]:
    """Names of the built-in profiles, sorted."""
    root = resources.files(BUILTIN_PROFILES_PACKAGE)
    return sorted(
        entry.name.removesuffix(".toml")
        for entry in root.iterdir()
        if entry.name.endswith(".toml") and entry.is_file()
    )


def is_builtin_profile(value: str | os.PathLike[str]) -> bool:
    """Whether ``load_profile`` takes ``value`` as a built-in name rather than a path."""
    if not isinstance(value, str):
        return False
    return bool(value) and Path(value).name == value and not value.endswith(".toml")


def load_profile(name_or_path: str | os.PathLike[str]) -> Profile:
    """Load a built-in profile by name (``"intrabeam"``) or a profile file by path.

    A bare word without ``.toml`` and without a directory part is a built-in name;
    anything else is a path.
    """
    if is_builtin_profile(name_or_path):
        name = str(name_or_path)
        resource = resources.files(BUILTIN_PROFILES_PACKAGE).joinpath(f"{name}.toml")
        if not resource.is_file():
            known = ", ".join(available_profiles()) or "none"
            raise ProfileError(
                name,
                f"no built-in profile of that name (built-in: {known}); "
                "pass a path to a .toml file for a site profile",
            )
        return _parse(resource.read_bytes(), str(resource))
    path = Path(name_or_path)
    try:
        data = read_small_file(path)
    except FileReadError as exc:
        raise ProfileError(str(path), f"cannot read profile file: {exc.reason}") from None
    return _parse(data, str(path))
