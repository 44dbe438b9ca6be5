"""Site configuration: TOML validated into typed, frozen models before anything starts.

Every problem is reported as a :class:`ConfigIssue` naming the file, the key path (as a
reader of the TOML would write it, e.g. ``devices[0].poll_interval_s``) and what was
expected. Nothing is touched (no device, no broker, no log directory) until the whole file
has been validated, including each device's driver options by the driver itself.
"""

from __future__ import annotations

import hashlib
import os
import re
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Annotated, Any, Literal, Self

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_serializer,
    field_validator,
    model_validator,
)

from iortd.auditlog.note import KeyFileError, load_signer
from iortd.daemon.sink_registry import BUILT_IN_NAMES, CONFIGURED_BY_SECTION, SinkRegistry
from iortd.daemon.sinks import Overflow, SinkConfigError, SinkOptionError
from iortd.daemon.tracker.settings import STALE_AFTER_POLLS, TrackerSettings
from iortd.daemon.tracker.settings import setting_default as _d
from iortd.drivers.errors import DriverConfigError, DriverOptionError
from iortd.drivers.registry import DriverRegistry
from iortd.kernel.broker import parse_broker_url
from iortd.kernel.files import BOM_ERROR, UTF8_BOM, FileReadError, read_small_file

__all__ = [
    "Config",
    "ConfigError",
    "ConfigIssue",
    "DeviceConfig",
    "LoadedConfig",
    "SinkConfig",
    "load_config",
    "tracker_settings",
]

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


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class SiteConfig(_Model):
    id: Slug
    room: Slug
    name: str | None = Field(default=None, max_length=200)


class LogConfig(_Model):
    directory: ConfigPath
    group_commit_ms: int = Field(default=50, ge=1, le=10_000)
    rotate_max_bytes: int = Field(default=64 * 1024 * 1024, ge=64 * 1024)
    checkpoint_interval_s: float = Field(default=300.0, gt=0, le=86_400)
    signing_key_file: ConfigPath | None = None


# Where the daemon's broker credentials go instead of the URL.
MQTT_CREDENTIALS_HINT = "use mqtt.username and mqtt.password_file or mqtt.password_env"


class MqttConfig(_Model):
    enabled: bool = True
    url: str = "mqtt://127.0.0.1:1883"
    prefix: Slug = "iort"
    keepalive_s: int = Field(default=10, ge=1, le=3600)
    username: str | None = Field(default=None, min_length=1, max_length=200)
    password_file: ConfigPath | None = None
    password_env: str | None = Field(default=None, pattern=_ENV_RE)
    ca_file: ConfigPath | None = None
    cert_file: ConfigPath | None = None
    key_file: ConfigPath | None = None
    # About 3.5 h of a 10 Hz outage at ~500 B a sample; held in memory as well as on disk.
    outbox_max_bytes: int = Field(default=64 * 1024 * 1024, ge=1024 * 1024, le=4 * 1024**3)

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


class Config(_Model):
    site: SiteConfig
    log: LogConfig
    mqtt: MqttConfig = MqttConfig()
    plan: PlanConfig = PlanConfig()
    tolerances: Tolerances = Tolerances()
    simulation: SimulationConfig = SimulationConfig()
    # No length bounds here: pydantic reports a bound again when an item fails, which would
    # double every device error. _check_devices bounds the count instead.
    devices: tuple[DeviceConfig, ...] = Field(strict=False)
    # Sinks besides the built-in ones ([mqtt], the operational log), in the order they are
    # told; bounded by _check_sinks, like devices.
    sinks: tuple[SinkConfig, ...] = Field(default=(), strict=False)

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
    )


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


_SECRET_KEYS = (
    ("mqtt", "password", "use mqtt.password_file or mqtt.password_env"),
    ("log", "signing_key", "point log.signing_key_file at a key file (mode 0600)"),
)


# scheme://user[:password]@host: userinfo in any URL-like value, anywhere in the file (a
# driver's transport or options included: they are recorded in the audit log as well).
_URL_USERINFO_RE = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^/?#@\s]*@")
_CREDENTIALS_HINT: Mapping[str, str] = {
    "mqtt.url": "put the user in mqtt.username and the password in a file named by "
    "mqtt.password_file (mode 0600) or a variable named by mqtt.password_env",
}


def _credentials_in_urls(data: Mapping[str, Any], file: Path, given: set[str]) -> list[ConfigIssue]:
    """Every string that carries URL credentials, named by key path and never repeated:
    the config is written to the audit log (``config_loaded``), which keeps it for ever."""
    issues = []
    todo: list[tuple[Any, tuple[int | str, ...]]] = [(data, ())]
    while todo:
        value, loc = todo.pop()
        if isinstance(value, Mapping):
            todo.extend((v, (*loc, k)) for k, v in value.items())
        elif isinstance(value, list):
            todo.extend((v, (*loc, i)) for i, v in enumerate(value))
        elif isinstance(value, str) and _URL_USERINFO_RE.search(value):
            key = _key_path(loc)
            hint = _CREDENTIALS_HINT.get(
                key, "give credentials through a file or an environment variable"
            )
            msg = (
                "a URL must not carry credentials (user:password@): secrets never go in the "
                f"TOML or a URL, and the config is recorded in the audit log; {hint}"
            )
            if key in given:
                msg += " (value given on the command line)"
            issues.append(ConfigIssue(file, key, msg))
    return sorted(issues, key=lambda i: i.key)


def _key_path(loc: Sequence[int | str]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


_EXPECTATIONS: Mapping[str, str] = {
    "extra_forbidden": "unknown key (check its spelling against config/site.example.toml)",
    "missing": "required key is missing",
}


def _describe(err: Mapping[str, Any]) -> str:
    kind = err["type"]
    if kind in _EXPECTATIONS:
        return _EXPECTATIONS[kind]
    if kind == "string_pattern_mismatch":
        pattern = str(err.get("ctx", {}).get("pattern", ""))
        meaning = _PATTERN_MEANING.get(pattern, f"text matching {pattern}")
        return f"expected {meaning}; got {err['input']!r}"
    msg = str(err["msg"])
    msg = re.sub(r"^Value error, ", "", msg)
    if "input" in err and kind != "value_error" and not isinstance(err["input"], dict):
        return f"{msg}; got {err['input']!r}"
    return msg


def _names_a_file(value: str) -> bool:
    return "/" in value or value.endswith(".toml")


def _resolve_device_paths(dev: DeviceConfig, base: Path, registry: DriverRegistry) -> DeviceConfig:
    """Make the driver's file options (a profile, a register map) relative to ``base``."""
    try:
        keys: frozenset[str] = getattr(registry.get(dev.driver), "path_options", frozenset())
    except DriverConfigError:
        return dev  # reported by _check_drivers
    update = {
        k: str(base / v)
        for k in keys
        if isinstance(v := dev.options.get(k), str)
        and _names_a_file(v)
        and "\0" not in v
        and not Path(v).is_absolute()
    }
    if not update:
        return dev
    return dev.model_copy(update={"options": _freeze({**_thaw(dev.options), **update})})


def _resolve_sink_paths(table: SinkConfig, base: Path, registry: SinkRegistry) -> SinkConfig:
    """Make a sink's file options (its factory's ``path_options``) relative to ``base``."""
    try:
        keys: frozenset[str] = getattr(registry.get(table.type), "path_options", frozenset())
    except SinkConfigError:
        return table  # reported by _check_sinks
    update = {
        k: str(base / v)
        for k in keys
        if isinstance(v := table.options.get(k), str)
        and v
        and "\0" not in v
        and not Path(v).is_absolute()
    }
    if not update:
        return table
    return table.model_copy(update={"options": _freeze({**_thaw(table.options), **update})})


def _resolve_paths(
    config: Config, base: Path, registry: DriverRegistry, sinks: SinkRegistry
) -> Config:
    def fix(p: Path | None) -> Path | None:
        return None if p is None else (p if p.is_absolute() else (base / p))

    log = config.log.model_copy(
        update={
            "directory": fix(config.log.directory),
            "signing_key_file": fix(config.log.signing_key_file),
        }
    )
    mqtt = config.mqtt.model_copy(
        update={
            k: fix(getattr(config.mqtt, k))
            for k in ("password_file", "ca_file", "cert_file", "key_file")
        }
    )
    devices = tuple(_resolve_device_paths(d, base, registry) for d in config.devices)
    tables = tuple(_resolve_sink_paths(t, base, sinks) for t in config.sinks)
    return config.model_copy(update={"log": log, "mqtt": mqtt, "devices": devices, "sinks": tables})


def _check_files(config: Config, file: Path) -> list[ConfigIssue]:
    try:
        return _check_file_system(config, file)
    except OSError as exc:
        # Whatever the probes below did not foresee (a path made too long by the config
        # file's own directory, an I/O error): one line, not a traceback.
        where = f" ({exc.filename})" if exc.filename else ""
        return [ConfigIssue(file, "", f"a configured path cannot be used: {exc.strerror}{where}")]


def _check_file_system(config: Config, file: Path) -> list[ConfigIssue]:
    issues = []
    for section, key, value in (
        ("log", "signing_key_file", config.log.signing_key_file),
        ("mqtt", "password_file", config.mqtt.password_file),
        ("mqtt", "ca_file", config.mqtt.ca_file),
        ("mqtt", "cert_file", config.mqtt.cert_file),
        ("mqtt", "key_file", config.mqtt.key_file),
    ):
        if value is not None and not value.is_file():
            issues.append(ConfigIssue(file, f"{section}.{key}", f"file not found: {value}"))
    # The log directory is created at start if missing, so its nearest existing
    # ancestor must be a writable directory; found here rather than as a traceback.
    target = config.log.directory
    probe = target
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if probe == target and not target.is_dir():
        issues.append(ConfigIssue(file, "log.directory", f"not a directory: {target}"))
    elif not probe.is_dir():
        issues.append(
            ConfigIssue(file, "log.directory", f"cannot be created: {probe} is not a directory")
        )
    elif not os.access(probe, os.W_OK | os.X_OK):
        issues.append(ConfigIssue(file, "log.directory", f"not writable: {probe}"))
    mqtt = config.mqtt
    if mqtt.enabled and mqtt.password_env is not None and mqtt.password_env not in os.environ:
        issues.append(
            ConfigIssue(
                file,
                "mqtt.password_env",
                f"environment variable {mqtt.password_env} is not set",
            )
        )
    pw = mqtt.password_file
    if mqtt.enabled and pw is not None and pw.is_file():
        mode = pw.stat().st_mode & 0o777
        if mode & 0o077:
            issues.append(
                ConfigIssue(
                    file,
                    "mqtt.password_file",
                    f"{pw} is readable by others (mode {mode:04o}); chmod 600 it",
                )
            )
        elif not os.access(pw, os.R_OK):
            issues.append(ConfigIssue(file, "mqtt.password_file", f"cannot read {pw}"))
    if mqtt.enabled and (mqtt.ca_file or mqtt.cert_file) and not mqtt.url.startswith("mqtts:"):
        issues.append(
            ConfigIssue(
                file,
                "mqtt.url",
                "ca_file/cert_file are set but the url is mqtt:// (plain TCP); use mqtts://",
            )
        )
    key_file = config.log.signing_key_file
    if key_file is not None and key_file.is_file():
        # Refused here, before anything starts, rather than at the first checkpoint.
        try:
            load_signer(key_file)
        except KeyFileError as exc:
            issues.append(ConfigIssue(file, "log.signing_key_file", str(exc)))
    return issues


MAX_DEVICES = 32
MAX_SINKS = 16
# Far beyond any real config (the shipped ones are a few KB and 4 levels deep); what is
# bounded here is the damage a hostile or mistaken file can do.
MAX_CONFIG_BYTES = 1024 * 1024
MAX_NESTING = 32


def _too_deep(data: Mapping[str, Any]) -> str | None:
    """The key path of the first value nested deeper than MAX_NESTING, or None."""
    todo: list[tuple[Any, tuple[int | str, ...]]] = [(data, ())]
    while todo:
        value, loc = todo.pop()
        if len(loc) > MAX_NESTING:
            return _key_path(loc)
        if isinstance(value, Mapping):
            todo.extend((v, (*loc, k)) for k, v in value.items())
        elif isinstance(value, list):
            todo.extend((v, (*loc, i)) for i, v in enumerate(value))
    return None


def _check_devices(config: Config, file: Path) -> list[ConfigIssue]:
    if len(config.devices) > MAX_DEVICES:
        msg = f"at most {MAX_DEVICES} devices per daemon; found {len(config.devices)}"
        return [ConfigIssue(file, "devices", msg)]
    issues = []
    first: dict[str, int] = {}
    for i, dev in enumerate(config.devices):
        if dev.name in first:
            msg = f"device names must be unique: {dev.name!r} is already devices[{first[dev.name]}]"
            issues.append(ConfigIssue(file, f"devices[{i}].name", msg))
        first.setdefault(dev.name, i)
    sources = [i for i, d in enumerate(config.devices) if d.role == "source"]
    if not issues and len(sources) != 1:
        where = ", ".join(f"devices[{i}]" for i in sources) or "none"
        msg = f"exactly one device with role 'source' is needed; found {len(sources)} ({where})"
        issues.append(ConfigIssue(file, "devices", msg))
    return issues


def _check_drivers(config: Config, file: Path, registry: DriverRegistry) -> list[ConfigIssue]:
    issues = []
    for i, dev in enumerate(config.devices):
        key = f"devices[{i}]"
        try:
            factory = registry.get(dev.driver)
        except DriverConfigError as exc:
            issues.append(ConfigIssue(file, f"{key}.driver", str(exc)))
            continue
        if dev.role not in factory.roles:
            roles = ", ".join(sorted(factory.roles))
            issues.append(
                ConfigIssue(
                    file, f"{key}.role", f"driver {dev.driver!r} serves {roles}, not {dev.role!r}"
                )
            )
        try:
            factory.validate(dev.options, dev.transport)
        except DriverOptionError as exc:
            issues.append(ConfigIssue(file, f"{key}.{exc.key}", exc.message))
        if config.simulation.speed != 1.0 and not factory.simulated:
            issues.append(
                ConfigIssue(
                    file,
                    "simulation.speed",
                    f"must be 1 when a real device is configured (devices[{i}] uses "
                    f"driver {dev.driver!r}); time compression is for simulators only",
                )
            )
    return issues


# Option names that hold a secret themselves (rather than naming its file or variable).
_SECRET_OPTION_NAMES = frozenset(
    {"password", "passwd", "secret", "token", "api_key", "apikey", "access_key", "private_key"}
)


def _secret_keys(options: Mapping[str, Any], where: str) -> list[str]:
    found = []
    for k, v in options.items():
        path = f"{where}.{k}"
        if k.lower() in _SECRET_OPTION_NAMES:
            found.append(path)
        elif isinstance(v, Mapping):
            found += _secret_keys(v, path)
    return found


def _check_sinks(config: Config, file: Path, registry: SinkRegistry) -> list[ConfigIssue]:
    """Each ``[[sinks]]`` table: a unique name, an installed type, and options its own
    factory accepts (validated without touching anything)."""
    if len(config.sinks) > MAX_SINKS:
        msg = f"at most {MAX_SINKS} sinks per daemon; found {len(config.sinks)}"
        return [ConfigIssue(file, "sinks", msg)]
    issues = []
    first: dict[str, int] = {}
    for i, table in enumerate(config.sinks):
        key = f"sinks[{i}]"
        name = table.name or table.type
        name_key = f"{key}.name" if table.name else f"{key}.type"
        if table.type in CONFIGURED_BY_SECTION:
            section = CONFIGURED_BY_SECTION[table.type]
            msg = f"the {table.type!r} sink is configured by the {section} table, not [[sinks]]"
            issues.append(ConfigIssue(file, f"{key}.type", msg))
            continue
        if name in BUILT_IN_NAMES:
            msg = (
                f"{name!r} is the name of a built-in sink; give this one a name of its own "
                '(name = "...")'
            )
            issues.append(ConfigIssue(file, name_key, msg))
        elif name in first:
            msg = (
                f"sink names must be unique: {name!r} is already sinks[{first[name]}]; "
                'give this one a name of its own (name = "...")'
            )
            issues.append(ConfigIssue(file, name_key, msg))
        first.setdefault(name, i)
        secrets = _secret_keys(table.options, f"{key}.options")
        for where in secrets:
            msg = (
                "secrets never go in the TOML (the config is recorded in the audit log); "
                "give the sink a file (e.g. password_file, mode 0600) or an environment "
                "variable (e.g. password_env) instead"
            )
            issues.append(ConfigIssue(file, where, msg))
        if secrets:
            continue
        try:
            factory = registry.get(table.type)
        except SinkConfigError as exc:
            issues.append(ConfigIssue(file, f"{key}.type", str(exc)))
            continue
        try:
            factory.validate(table.options)
        except SinkOptionError as exc:
            issues.append(ConfigIssue(file, f"{key}.{exc.key}", exc.message))
        except Exception as exc:
            # A plug-in's bug, not the user's: still one line naming the table.
            msg = f"sink {table.type!r} could not check its options: {type(exc).__name__}: {exc}"
            issues.append(ConfigIssue(file, f"{key}.options", msg))
    return issues


def load_config(
    path: Path,
    registry: DriverRegistry,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
    *,
    sinks: SinkRegistry | None = None,
) -> LoadedConfig:
    """Read, parse and validate a config file; raise ConfigError naming every problem.

    ``overrides`` (from command-line options) are merged into their sections before
    validation, so they are checked exactly like the file's own values. ``sinks``: where
    ``[[sinks]]`` types are looked up (default: the installed ``iort.sinks`` entry points).
    """
    try:
        raw_bytes = read_small_file(path, MAX_CONFIG_BYTES, expected="a TOML file")
    except FileReadError as exc:
        raise ConfigError([ConfigIssue(path, "", exc.reason)]) from None
    try:
        data = tomllib.loads(raw_bytes.decode("utf-8"))
    except UnicodeDecodeError as exc:
        line = raw_bytes[: exc.start].count(b"\n") + 1
        msg = f"not UTF-8 text (line {line}, byte {exc.start}); save the file as UTF-8"
        raise ConfigError([ConfigIssue(path, "", msg)]) from None
    except tomllib.TOMLDecodeError as exc:
        msg = BOM_ERROR if raw_bytes.startswith(UTF8_BOM) else f"TOML syntax error: {exc}"
        raise ConfigError([ConfigIssue(path, "", msg)]) from None
    except RecursionError:
        # tomllib parses nesting recursively: thousands of levels exhaust the stack.
        msg = f"TOML nested too deeply (a config needs at most {MAX_NESTING} levels)"
        raise ConfigError([ConfigIssue(path, "", msg)]) from None
    if (deep := _too_deep(data)) is not None:
        msg = f"nested too deeply (more than {MAX_NESTING} levels of tables and arrays)"
        raise ConfigError([ConfigIssue(path, deep, msg)])

    # Say why a secret is refused, rather than a bare "unknown key".
    for section, key, hint in _SECRET_KEYS:
        if isinstance(data.get(section), dict) and key in data[section]:
            msg = f"secrets never go in the TOML; {hint}"
            raise ConfigError([ConfigIssue(path, f"{section}.{key}", msg)])

    for section, values in (overrides or {}).items():
        table = data.setdefault(section, {})
        if isinstance(table, dict):
            table.update(values)

    given = {f"{sec}.{key}" for sec, values in (overrides or {}).items() for key in values}
    if credentials := _credentials_in_urls(data, path, given):
        raise ConfigError(credentials)

    try:
        config = Config.model_validate(data)
    except ValidationError as exc:
        issues = []
        for e in exc.errors(include_url=False):
            key = _key_path(e["loc"])
            msg = _describe(e)
            if key in given:
                msg += " (value given on the command line)"
            issues.append(ConfigIssue(path, key, msg))
        raise ConfigError(issues) from None

    sinks = sinks or SinkRegistry.from_entry_points()
    config = _resolve_paths(config, path.parent.resolve(), registry, sinks)
    # Device structure first: with duplicate names or no source, per-driver checks would
    # only add noise about the wrong device.
    issues = _check_devices(config, path)
    if not issues:
        issues = _check_files(config, path) + _check_drivers(config, path, registry)
        issues += _check_sinks(config, path, sinks)
    if issues:
        raise ConfigError(issues)
    return LoadedConfig(config=config, path=path, sha256=hashlib.sha256(raw_bytes).hexdigest())
