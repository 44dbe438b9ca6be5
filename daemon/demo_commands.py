"""The demo's signed commands: verification before beam-on, shown to a new user.

``iortd demo`` (daemon/demo.py) runs with a keyring and a command inbox of its own so that
the console is checked against a prescription before beam-on (docs/prescriptions.md), as
at a site. Before the daemon starts, the demo writes:

- ``demo-keyring.toml``, beside the demo's keys in the per-user data directory (never in
  the repository; daemon/demo.py): one key, the **demo physicist**'s (holder
  ``demo-physicist``, printed name "Demo Physicist (simulated)", role physicist), the key
  pair made once, the file the same at every run, so that the user can give it to
  ``iort-audit report --keyring`` after the run;
- ``inbox/`` in the demo's scratch directory (removed with it), and in it
  (:func:`prepare`) two commands signed by that key, as ``iort-plan send --inbox`` would
  drop them: a **prescription** that matches the simulated console (the config's
  pseudonymous ``[plan]`` treatment and plan ids, ``T-DEMO-0001``/``P-DEMO-0001`` in the
  bundled demo.toml; the source's preset as the surface dose; its applicator's code and
  diameter; the planned time the simulated console will report, preset / the profile's
  surface rate; approved a minute ago, valid for four hours) and the day's **output
  factor** (1.00, measured today by the demo physicist, on a machine named as simulated).

The daemon reads what waits in its inbox before it polls any device (daemon/commands.py,
``first_read``), so the console's first check at READY is made with both in force:
VERIFIED, with no NOT_VERIFIED flash before it and no sleep that hopes. The demo points
``[verification] doserate_table`` at the EXAMPLE table equal to the simulator's rates
(config/doserate/intrabeam.toml) unless its config names one.

Every value is a demonstration value and says so; nothing identifies a person or a
patient. A new prescription each run (its ``approved_at`` differs), so a demo log kept
across runs never finds it ``already_delivered``.

The simulated console's applicator diameter, type and rate come from its profile, read as
data (as the simulator reads it): the simulators package is beside the daemon, not below
it. A config whose source is not the simulator, or names an applicator its profile lacks,
gets no prescription (:class:`DemoCommandsError` says why, before anything is written) and
the demo shows the check without one, as with ``--no-prescription``.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson

from iortd.auditlog.command import sign_command
from iortd.auditlog.note import Signer
from iortd.daemon.config import Config
from iortd.kernel.timefmt import utc_ts
from iortd.plan.doserate import output_factor_bytes
from iortd.plan.model import Tolerances, make_prescription, prescription_bytes

__all__ = [
    "DEMO_PHYSICIST",
    "DEMO_PHYSICIST_NAME",
    "DemoCommands",
    "DemoCommandsError",
    "keyring_text",
    "prepare",
]

DEMO_PHYSICIST = "demo-physicist"
DEMO_PHYSICIST_NAME = "Demo Physicist (simulated)"
APPROVED_AGO = timedelta(minutes=1)
VALID_FOR = timedelta(hours=4)
COMMAND_TTL_S = 600.0  # signed before the broker and the dashboard start (up to ~10 s)
KEY_SLACK = timedelta(days=1)  # a clock set a little back still finds it valid
KEY_VALID = timedelta(days=3650)
DEMO_FACTOR = 1.0


class DemoCommandsError(Exception):
    """Why the demo sends no prescription with this config (one line)."""


@dataclass(frozen=True, slots=True)
class DemoCommands:
    """What :func:`prepare` wrote, for the config overrides and the demo's header."""

    keyring: Path
    inbox: Path
    prescription_sha256: str | None  # None: the demo runs without a prescription
    summary: str
    # The prescribed code -> the type the console reports, for [verification]
    # applicator_types (the type is then compared too, not only the diameter).
    applicator_types: Mapping[str, str] = field(default_factory=dict)


def keyring_text(physicist: Signer, since: datetime) -> str:
    """The demo's keyring: the demo physicist alone (auditlog/keyring.py's format), valid
    from ``since`` (when the key was made) for ten years: the same bytes at every run, so
    that ``iort-audit report --keyring`` judges every demo delivery's approval alike."""
    return (
        "# iortd demo: the demo physicist's key (simulated; not a site's keyring)\n"
        "[[key]]\n"
        f'holder = "{DEMO_PHYSICIST}"\n'
        f'name = "{DEMO_PHYSICIST_NAME}"\n'
        'roles = ["physicist"]\n'
        f'public_key = "{physicist.verifier.text}"\n'
        f'valid_from = "{utc_ts(since - KEY_SLACK)}"\n'
        f'valid_until = "{utc_ts(since + KEY_VALID)}"\n'
    )


def prepare(
    config: Config,
    keyring: Path,
    inbox: Path,
    physicist: Signer,
    now: datetime,
    *,
    prescription: bool = True,
) -> DemoCommands:
    """Make the ``inbox`` directory and, with ``prescription``, put the signed
    prescription and output factor in it; ``keyring`` is the demo physicist's (written by
    the caller, :func:`keyring_text`). Raises DemoCommandsError, before anything is
    written, when the config's console cannot be matched; OSError when the directory
    cannot be written."""
    now = now.astimezone(UTC)
    if not prescription:
        inbox.mkdir(mode=0o700)
        return DemoCommands(keyring, inbox, None, "none (--no-prescription)")
    console = _console(config)
    try:
        p = make_prescription(
            treatment_id=config.plan.treatment_id,
            plan_id=config.plan.plan_id,
            fraction=1,
            fractions=1,
            prescribed_dose_gy=console.preset_gy,
            dose_reference="surface",
            depth_mm=None,
            applicator_code=console.applicator,
            applicator_diameter_mm=console.diameter_mm,
            planned_time_s=console.planned_time_s,
            approved_by=DEMO_PHYSICIST,
            approved_at=now - APPROVED_AGO,
            not_after=now - APPROVED_AGO + VALID_FOR,
            tolerances=Tolerances(),
        )
        body = prescription_bytes(p)
        factor = output_factor_bytes(DEMO_FACTOR, now.date(), DEMO_PHYSICIST, console.machine)
    except ValueError as exc:  # PrescriptionError, DoseRateError: the config's values
        raise DemoCommandsError(f"no prescription can match this console: {exc}") from None
    inbox.mkdir(mode=0o700)
    # The factor first: both are handled before the first check anyway (first_read).
    _drop(config, inbox, "1-output_factor", "output_factor", factor, physicist, now)
    _drop(config, inbox, "2-prescription", "prescription", body, physicist, now)
    sha = hashlib.sha256(body).hexdigest()
    return DemoCommands(
        keyring,
        inbox,
        sha,
        f"{p.treatment_id}/{p.plan_id}, {p.prescribed_dose_gy:g} Gy surface, "
        f"{p.applicator_code} {p.applicator_diameter_mm:g} mm, planned "
        f"{p.planned_time_s:g} s, approved by {DEMO_PHYSICIST} (simulated), "
        f"output factor {DEMO_FACTOR:.2f}",
        {console.applicator: console.applicator_type},
    )


@dataclass(frozen=True, slots=True)
class _Console:
    preset_gy: float
    applicator: str
    applicator_type: str
    diameter_mm: float
    planned_time_s: float
    machine: str


def _console(config: Config) -> _Console:
    """What the simulated source console will report, from its options and its profile."""
    source = next((d for d in config.devices if d.role == "source"), None)
    if source is None or source.driver != "sim":
        raise DemoCommandsError("the config's source is not the simulator (driver = 'sim')")
    opts = source.options
    profile_name = str(opts.get("profile", "intrabeam"))
    profile = _profile(profile_name)
    code = opts.get("applicator") or config.plan.applicator
    preset = opts.get("preset_gy", config.plan.prescribed_dose_gy)
    entry = profile.get("applicators", {}).get(code) if isinstance(code, str) else None
    if not isinstance(entry, dict) or not isinstance(preset, int | float):
        raise DemoCommandsError(
            f"the simulated console's applicator {code!r} is not in profile {profile_name!r}"
        )
    serial = str(opts.get("serial", "SIM"))
    try:
        rate = float(entry["surface_dose_rate_gy_min"])
        return _Console(
            preset_gy=float(preset),
            applicator=str(code),
            applicator_type=str(entry["type"]),
            diameter_mm=float(entry["diameter_mm"]),
            # As the simulated console computes it (simulators/driver.py): preset / rate.
            planned_time_s=round(float(preset) / rate * 60.0, 1),
            machine=f"iortd simulator, profile {profile.get('name', profile_name)} "
            f"(simulated, s/n {serial})"[:128],
        )
    except (KeyError, TypeError, ValueError, ZeroDivisionError) as exc:
        raise DemoCommandsError(f"profile {profile_name!r}, applicator {code}: {exc!r}") from None


def _profile(name: str) -> dict[str, Any]:
    """The simulator's profile as data: a built-in name, else the path the config check
    made absolute. Read here rather than through the simulators package, below the
    daemon's layer (tests/unit/test_layers.py)."""
    try:
        if "/" not in name and not name.endswith(".toml"):
            res = importlib.resources.files("iortd.config.profiles").joinpath(f"{name}.toml")
            return tomllib.loads(res.read_text("utf-8"))
        return tomllib.loads(Path(name).read_text("utf-8"))
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise DemoCommandsError(f"cannot read the simulator's profile {name!r}: {exc}") from None


def _drop(
    config: Config,
    inbox: Path,
    stem: str,
    kind: str,
    body: bytes,
    physicist: Signer,
    now: datetime,
) -> None:
    """One signed command into the inbox, written whole (``.NAME`` then renamed: the
    daemon skips hidden files), as ``iort-plan send --inbox`` does."""
    envelope = sign_command(
        kind,
        orjson.loads(body),
        signer=physicist,
        holder=DEMO_PHYSICIST,
        site=config.site.id,
        room=config.site.room,
        ttl_s=COMMAND_TTL_S,
        now=now,
    )
    tmp, final = inbox / f".{stem}.json", inbox / f"{stem}.json"
    tmp.write_bytes(orjson.dumps(envelope))
    tmp.rename(final)
