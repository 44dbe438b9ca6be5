"""The site configuration's typed, frozen models (pydantic), and what a loaded config is.

Every section of the TOML is a model here; unknown keys are errors, identifiers that reach
topics and file names are slugs, and secrets have no field at all (they come from files or
the environment). The defaults of ``[tolerances]`` come from the tracker's
:class:`~iortd.daemon.tracker.settings.TrackerSettings`, the single source of each one.
Loading and the checks that need more than one field are :mod:`iortd.daemon.config`.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Annotated, Any, Literal, Self
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    field_serializer,
    field_validator,
    model_validator,
)

from iortd.auditlog.cosignature import CosignerVerifier
from iortd.auditlog.signed_note import NoteError
from iortd.daemon.sinks import Overflow
from iortd.daemon.tracker.settings import STALE_AFTER_POLLS, TrackerSettings
from iortd.daemon.tracker.settings import setting_default as _d
from iortd.kernel.broker import parse_broker_url

from .credentials import credential_name

# Identifiers that appear in MQTT topics and file names: lower-case slugs only, so that no
# free text (and so no patient name) can end up there.
_SLUG_RE = r"^[a-z0-9][a-z0-9-]{0,62}$"
Slug = Annotated[str, Field(pattern=_SLUG_RE)]
# Treatment, plan and operator identifiers are pseudonymous codes, never names.
_ID_RE = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
PseudonymousId = Annotated[str, Field(pattern=_ID_RE)]
_DRIVER_RE = r"^[a-z0-9][a-z0-9_.-]{0,62}$"
_ENV_RE = r"^[A-Z_][A-Z0-9_]*$"
# The same shape as a driver name, written apart so that its error says "sink type".
_SINK_RE = r"^[a-z0-9][a-z0-9._-]{0,62}$"
# What a pattern means, in words, for error messages (a regex is no help to a reader).
_PATTERN_MEANING: Mapping[str, str] = {
    _SLUG_RE: "a lower-case slug (a-z, 0-9 and '-', at most 63 characters)",
    _ID_RE: "a pseudonymous code (letters, digits, '.', '_', '-'; never a name)",
    _DRIVER_RE: "a driver name as installed (lower-case, e.g. 'sim')",
    _ENV_RE: "an environment variable name (A-Z, 0-9, '_')",
    _SINK_RE: "a sink type as installed (lower-case, e.g. 'mqtt')",
}


# Linux limits (NAME_MAX, PATH_MAX); checked here so that a typo is one line, not ENAMETOOLONG
# in a traceback when the daemon first touches the path.
_NAME_MAX = 255
_PATH_MAX = 4095


def _usable_path(path: Path) -> Path:
    # A NUL cannot be in a file name: os calls would raise ValueError at start-up instead.
    if "\0" in str(path):
        raise ValueError("a path cannot contain a NUL character; remove it")
    if len(os.fsencode(path)) > _PATH_MAX:
        raise ValueError(f"path too long (at most {_PATH_MAX} bytes)")
    longest = max((len(os.fsencode(part)) for part in path.parts), default=0)
    if longest > _NAME_MAX:
        raise ValueError(
            f"path too long: a file or directory name is {longest} bytes (at most {_NAME_MAX})"
        )
    return path


# Paths come from TOML strings; resolved against the config file's directory on load.
ConfigPath = Annotated[Path, Field(strict=False), AfterValidator(_usable_path)]


def _credential_form(path: Path) -> Path:
    credential_name(path)  # raises ValueError for credential:NAME with a bad NAME
    return path


# A secret file: a path, or "credential:NAME" for a file systemd hands over (credentials.py).
SecretPath = Annotated[ConfigPath, AfterValidator(_credential_form)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class SiteConfig(_Model):
    id: Slug
    room: Slug
    name: str | None = Field(default=None, max_length=200)


class SampleDeadband(_Model):
    """How far an analog value may move, while the room is idle, before its sample is
    recorded as a change (daemon/thinning.py). Well inside any tolerance: a reading out of
    tolerance is an event, recorded whatever the deadband."""

    kv: float = Field(default=0.5, ge=0, le=5)
    ua: float = Field(default=1.0, ge=0, le=10)
    dose_rate_gy_min: float = Field(default=0.01, ge=0, le=0.1)
    displacement_mm: float = Field(default=0.2, ge=0, le=1)
    tilt_deg: float = Field(default=0.2, ge=0, le=1)
    extra: float = Field(default=0.0, ge=0)  # the device's extra numbers, in their own unit


class RetentionConfig(_Model):
    """``[log.retention]``: a disk budget for the log directory and an archive
    (docs/operations.md, "Disk budget, archive and retention"). Absent: nothing is ever
    deleted and no budget is watched."""

    # 4 GiB: 64 default segments; over 5 days at the full idle rate of 10 samples/s
    # (~780 MB a day), far more with idle thinning.
    budget_mb: int = Field(default=4096, ge=1, le=16 * 1024 * 1024)
    warn_fraction: float = Field(default=0.8, gt=0, lt=1)
    keep_fraction: float = Field(default=0.7, gt=0, lt=1)
    archive_dir: ConfigPath | None = None
    archive_mount_required: bool = True
    interval_s: float = Field(default=60.0, ge=1, le=3600)

    @model_validator(mode="after")
    def _keep_below_warn(self) -> Self:
        if self.keep_fraction >= self.warn_fraction:
            raise ValueError(
                "keep_fraction must be below warn_fraction (deletion brings the directory "
                "down to keep_fraction once it reaches warn_fraction)"
            )
        return self


class LogConfig(_Model):
    directory: ConfigPath
    group_commit_ms: int = Field(default=50, ge=1, le=10_000)
    rotate_max_bytes: int = Field(default=64 * 1024 * 1024, ge=64 * 1024)
    checkpoint_interval_s: float = Field(default=300.0, gt=0, le=86_400)
    signing_key_file: SecretPath | None = None
    retention: RetentionConfig | None = None
    # Samples while the room is idle: a heartbeat at this interval plus every change; 0
    # records every reading (daemon/thinning.py). In the clock's seconds.
    idle_sample_interval_s: float = Field(default=60.0, ge=0, le=3600)
    # Full rate for this long after the last reading of a delivery (or of a console in a
    # delivery state).
    sample_window_s: float = Field(default=60.0, ge=0, le=3600)
    sample_deadband: SampleDeadband = SampleDeadband()

    @field_validator("idle_sample_interval_s")
    @classmethod
    def _heartbeat(cls, v: float) -> float:
        if 0 < v < 1:
            raise ValueError(
                "must be 0 (record every reading) or at least 1 second (a heartbeat "
                "sample at that interval while idle)"
            )
        return v


# Where the daemon's broker credentials go instead of the URL.
MQTT_CREDENTIALS_HINT = "use mqtt.username and mqtt.password_file or mqtt.password_env"


class MqttConfig(_Model):
    enabled: bool = True
    url: str = "mqtt://127.0.0.1:1883"
    prefix: Slug = "iort"
    keepalive_s: int = Field(default=10, ge=1, le=3600)
    # The reconnect backoff's cap (it starts at 0.5 s and doubles up to this).
    reconnect_max_s: float = Field(default=10.0, ge=0.5, le=3600)
    username: str | None = Field(default=None, min_length=1, max_length=200)
    password_file: SecretPath | None = None
    password_env: str | None = Field(default=None, pattern=_ENV_RE)
    ca_file: ConfigPath | None = None
    cert_file: ConfigPath | None = None
    key_file: SecretPath | None = None
    # About 3.5 h of a 10 Hz outage at ~500 B a sample; held in memory as well as on disk.
    outbox_max_bytes: int = Field(default=64 * 1024 * 1024, ge=1024 * 1024, le=4 * 1024**3)
    # Replay requests (cmd/replay, daemon/mqtt/replay.py): acknowledged outbox segments are
    # held this long (within outbox_max_bytes) to serve them; messages a second sent again;
    # requests a minute taken (beyond: refused, recorded).
    replay_retention_s: float = Field(default=3600.0, ge=0, le=7 * 24 * 3600)
    replay_rate: float = Field(default=200.0, ge=1, le=100_000)
    replay_max_per_minute: int = Field(default=30, ge=1, le=10_000)

    @field_validator("url")
    @classmethod
    def _broker_url(cls, url: str) -> str:
        # The rules every MQTT client of iortd shares (iortd.kernel.broker).
        parse_broker_url(url, credentials_hint=MQTT_CREDENTIALS_HINT)
        return url

    @model_validator(mode="after")
    def _one_password_source(self) -> Self:
        if self.password_file is not None and self.password_env is not None:
            raise ValueError("set password_file or password_env, not both")
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together (client certificate)")
        return self


DEFAULT_HEALTH_LISTEN = "127.0.0.1:9108"


def parse_listen(value: str) -> tuple[str, int] | None:
    """``host:port`` (an IP address; IPv6 in brackets: ``[::1]:9108``) as (host, port);
    None for ``""`` (off). Raises ValueError saying what is expected."""
    if value == "":
        return None
    host, sep, port_text = value.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"{value!r}: write an IPv6 address in brackets, e.g. '[::1]:9108'")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(
            f"{value!r}: expected IP:PORT with an IP address (e.g. '127.0.0.1:9108'), or "
            "'' to turn the endpoint off"
        ) from None
    if not sep or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"{value!r}: expected a port number 0-65535 after the ':'")
    return host, int(port_text)


class HealthConfig(_Model):
    """The health, readiness and metrics endpoint (daemon/health_http.py)."""

    listen: str = DEFAULT_HEALTH_LISTEN
    # Host names a request may carry besides the listen address and the loopback names
    # (what a Prometheus server on another host calls this one).
    allowed_hosts: tuple[Annotated[str, Field(min_length=1, max_length=253)], ...] = Field(
        default=(), strict=False, max_length=32
    )

    @field_validator("listen")
    @classmethod
    def _listen(cls, value: str) -> str:
        parse_listen(value)
        return value

    @property
    def address(self) -> tuple[str, int] | None:
        return parse_listen(self.listen)


class CommandsConfig(_Model):
    """Signed commands in (daemon/commands.py, docs/commands.md). Without ``keyring`` the
    daemon takes no commands at all: it does not subscribe and reads no inbox."""

    # The keyring file (auditlog/keyring.py); a path or credential:NAME.
    keyring: SecretPath | None = None
    # How far the sender's clock may be off ours, both ways (issued_at, expires_at).
    clock_skew_s: float = Field(default=60.0, ge=0, le=3600)
    # Refusals recorded (and reported) one by one per minute; beyond, one summary a minute.
    max_per_minute: int = Field(default=60, ge=1, le=100_000)
    # A directory watched for command files (moved to accepted/ or rejected/ once judged).
    inbox: ConfigPath | None = None
    inbox_poll_s: float = Field(default=1.0, ge=0.05, le=60)


class VerificationConfig(_Model):
    """Verification before beam-on (daemon/verification.py, docs/prescriptions.md): the
    console checked against the room's prescription at READY."""

    # None: on exactly when [commands] keyring is set (only then can a prescription come).
    enabled: bool | None = None
    # The site's commissioned dose-rate table (plan/doserate.py); without it the time is
    # never checked (time_unchecked). config/doserate/*.toml are EXAMPLES only.
    doserate_table: ConfigPath | None = None
    # False: an output factor of 1.0 is assumed (and recorded so) when none is in for today.
    require_output_factor: bool = True
    # Applicator code -> the type the console reports (e.g. SPH30 = "spherical"): the type
    # is compared too for the codes named here; the diameter always.
    applicator_types: dict[str, Annotated[str, Field(min_length=1, max_length=32)]] = Field(
        default_factory=dict, max_length=256
    )

    def on(self, keyring: Path | None) -> bool:
        return keyring is not None if self.enabled is None else self.enabled


class PlanConfig(_Model):
    """Plan defaults; a console that reports its own preset overrides prescribed_dose_gy."""

    treatment_id: PseudonymousId = "T-0001"
    plan_id: PseudonymousId = "P-0001"
    fraction: int = Field(default=1, ge=1, le=100)
    prescribed_dose_gy: float = Field(default=20.0, gt=0, le=50)
    applicator: str | None = Field(default=None, min_length=1, max_length=64)
    # Expected surface dose rate; when absent the tracker takes the console's nominal rate.
    expected_dose_rate_gy_min: float | None = Field(default=None, gt=0, le=100)


class Tolerances(_Model):
    """Per-site settings (docs/domain.md: not public constants). Written to the log in force.

    The defaults are the tracker's (``TrackerSettings``, the single source); this table
    only adds the bounds a config value must keep. docs/alarms.md lists which alarm each
    one sets."""

    dose_channel_rel: float = Field(default=_d("dose_channel_rel"), gt=0, le=1)
    dose_channel_abs_gy: float = Field(default=_d("dose_channel_abs_gy"), ge=0, le=5)
    dose_rate_rel: float = Field(default=_d("dose_rate_rel"), gt=0, le=1)
    rate_settle_s: float = Field(default=_d("rate_settle_s"), ge=0, le=600)
    overdose_rel: float = Field(default=_d("overdose_rel"), ge=0, le=1)
    # How far below the preset a console may stop and still call it a normal termination.
    stop_accuracy_rel: float = Field(default=_d("stop_accuracy_rel"), ge=0, le=0.2)
    backup_timer_margin_rel: float = Field(default=_d("backup_timer_margin_rel"), ge=0, le=2)
    # Tube voltage with the beam on: nominal and the band around it (kv_out_of_range).
    nominal_kv: float = Field(default=_d("nominal_kv"), gt=0, le=500)
    kv_tolerance_kv: float = Field(default=_d("kv_tolerance_kv"), gt=0, le=100)
    stale_after_polls: int = Field(default=STALE_AFTER_POLLS, ge=2, le=100)
    # The applicator reader's movement tolerances: no default (no public figure exists), so
    # a config with an applicator device must set both (checks.py says so, naming the key).
    applicator_displacement_mm: float | None = Field(default=None, gt=0, le=50)
    applicator_tilt_deg: float | None = Field(default=None, gt=0, le=45)


class SimulationConfig(_Model):
    speed: float = Field(default=1.0, ge=0.01, le=10_000)
    seed: int = Field(default=0, ge=0, le=2**63 - 1)


class DeviceConfig(_Model):
    name: Slug
    role: Literal["source", "applicator"] = "source"
    driver: Annotated[str, Field(pattern=_DRIVER_RE)]
    poll_interval_s: float = Field(default=0.1, ge=0.01, le=60)
    timeout_s: float = Field(default=1.0, gt=0, le=60)
    # Opaque to the daemon: each driver validates its own transport and options. Read-only
    # views, so that nothing (a driver included) can change the config after validation.
    transport: Mapping[str, Any] = Field(default_factory=dict, strict=False)
    options: Mapping[str, Any] = Field(default_factory=dict, strict=False)

    @field_validator("transport", "options", mode="after")
    @classmethod
    def _read_only(cls, value: Mapping[str, Any]) -> Mapping[str, Any]:
        frozen: Mapping[str, Any] = _freeze(value)
        return frozen

    @field_serializer("transport", "options")
    def _plain(self, value: Mapping[str, Any]) -> dict[str, Any]:
        thawed: dict[str, Any] = _thaw(value)
        return thawed


class SinkConfig(_Model):
    """One ``[[sinks]]`` table: a sink plug-in (entry point group ``iort.sinks``) by its
    ``type``, its queue (daemon/sink_queue.py) and its own ``options``, which the sink's
    factory validates (docs/engineers.md, "Writing a sink")."""

    type: Annotated[str, Field(pattern=_SINK_RE)]
    # Names it in the logs and in the audit log; the type unless given (two sinks of one
    # type need names of their own).
    name: Slug | None = None
    queue_size: int = Field(default=1000, ge=1, le=1_000_000)
    overflow: Overflow = "drop_oldest"
    timeout_s: float = Field(default=10.0, gt=0, le=600)
    options: Mapping[str, Any] = Field(default_factory=dict, strict=False)

    @field_validator("options", mode="after")
    @classmethod
    def _read_only(cls, value: Mapping[str, Any]) -> Mapping[str, Any]:
        frozen: Mapping[str, Any] = _freeze(value)
        return frozen

    @field_serializer("options")
    def _plain(self, value: Mapping[str, Any]) -> dict[str, Any]:
        thawed: dict[str, Any] = _thaw(value)
        return thawed


def _witness_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("expected http(s)://HOST[:PORT][/PREFIX], the witness's submission prefix")
    if parts.query or parts.fragment or parts.username or parts.password:
        raise ValueError("no query, fragment or credentials in a witness URL")
    try:
        parts.port  # noqa: B018 - parsing it is the check
    except ValueError:
        raise ValueError("the port is not a number 0..65535") from None
    return url


def _witness_vkey(text: str) -> str:
    try:
        CosignerVerifier.parse(text)
    except NoteError as exc:
        raise ValueError(
            f"{exc}; give the line `iort-witness keygen` printed (NAME+KEYID+BASE64)"
        ) from None
    return text


class WitnessConfig(_Model):
    """One ``[[witness]]`` table: a C2SP tlog-witness the daemon submits its checkpoints
    to (daemon/witnessing.py; docs/witness.md)."""

    name: Slug  # names it in the log's witness_cosigned / witness_refused entries
    url: Annotated[str, Field(min_length=1, max_length=2000), AfterValidator(_witness_url)]
    vkey: Annotated[str, Field(min_length=1, max_length=500), AfterValidator(_witness_vkey)]
    timeout_s: float = Field(default=10.0, gt=0, le=120)
    alarm_after_s: float = Field(default=900.0, ge=10, le=7 * 86400)


class Config(_Model):
    site: SiteConfig
    log: LogConfig
    mqtt: MqttConfig = MqttConfig()
    health: HealthConfig = HealthConfig()
    plan: PlanConfig = PlanConfig()
    commands: CommandsConfig = CommandsConfig()
    verification: VerificationConfig = VerificationConfig()
    tolerances: Tolerances = Tolerances()
    simulation: SimulationConfig = SimulationConfig()
    # No length bounds here: pydantic reports a bound again when an item fails, which would
    # double every device error. _check_devices bounds the count instead.
    devices: tuple[DeviceConfig, ...] = Field(strict=False)
    # Sinks besides the built-in ones ([mqtt], the operational log), in the order they are
    # told; bounded by _check_sinks, like devices.
    sinks: tuple[SinkConfig, ...] = Field(default=(), strict=False)
    # [[witness]] tables: where the log's tree checkpoints are submitted for cosigning.
    witness: tuple[WitnessConfig, ...] = Field(default=(), strict=False, max_length=16)

    @field_validator("witness", mode="after")
    @classmethod
    def _unique_witnesses(cls, value: tuple[WitnessConfig, ...]) -> tuple[WitnessConfig, ...]:
        names = [w.name for w in value]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"witness names must be unique: {', '.join(twice)} given twice")
        return value

    @property
    def source(self) -> DeviceConfig:
        """The one source device (load_config has checked there is exactly one)."""
        return next(d for d in self.devices if d.role == "source")


def tracker_settings(config: Config, clock_speed: float) -> TrackerSettings:
    """The tracker's settings from a validated config. Tolerances are in clock seconds:
    poll periods are real seconds, and under a speed factor the tracker's time runs
    faster, so the stale bound is scaled to match."""
    src = config.source
    t = config.tolerances
    return TrackerSettings(
        stale_after_s=t.stale_after_polls * src.poll_interval_s * clock_speed,
        expected_rate_gy_min=config.plan.expected_dose_rate_gy_min,
        dose_channel_rel=t.dose_channel_rel,
        dose_channel_abs_gy=t.dose_channel_abs_gy,
        dose_rate_rel=t.dose_rate_rel,
        rate_settle_s=t.rate_settle_s,
        overdose_rel=t.overdose_rel,
        stop_accuracy_rel=t.stop_accuracy_rel,
        backup_timer_margin_rel=t.backup_timer_margin_rel,
        nominal_kv=t.nominal_kv,
        kv_tolerance_kv=t.kv_tolerance_kv,
        delivery_id_prefix=f"{config.site.room}",
        applicator_displacement_mm=t.applicator_displacement_mm,
        applicator_tilt_deg=t.applicator_tilt_deg,
        applicator_first_reading_s=_first_reading_grace_s(config, clock_speed),
    )


def _first_reading_grace_s(config: Config, clock_speed: float) -> float | None:
    """How long the applicator reader may take, from the daemon's start, to give its
    first reading before the monitor's interlock alarms with the beam off: its connect,
    identify and first read, each within its ``timeout_s``, plus the stale bound in its
    own poll periods (clock seconds). None without a reader."""
    readers = [d for d in config.devices if d.role == "applicator"]
    if not readers:
        return None
    polls = config.tolerances.stale_after_polls
    return max(3 * d.timeout_s + polls * d.poll_interval_s for d in readers) * clock_speed


def _thaw(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _thaw(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return [_thaw(v) for v in value]
    return value


def _freeze(value: Any) -> Any:
    if isinstance(value, Mapping):
        return MappingProxyType({k: _freeze(v) for k, v in value.items()})
    if isinstance(value, list | tuple):
        return tuple(_freeze(v) for v in value)
    return value


@dataclass(frozen=True, slots=True)
class ConfigIssue:
    file: Path
    key: str  # "" for the file as a whole
    message: str

    def __str__(self) -> str:
        where = f"{self.file}: {self.key}" if self.key else str(self.file)
        return f"{where}: {self.message}"


class ConfigError(Exception):
    """The configuration cannot be used; ``issues`` says where and why."""

    def __init__(self, issues: Sequence[ConfigIssue]) -> None:
        self.issues = tuple(issues)
        super().__init__("\n".join(str(i) for i in self.issues))


@dataclass(frozen=True, slots=True)
class LoadedConfig:
    config: Config
    path: Path
    sha256: str  # of the file's bytes, as logged at load
