"""The checks of a site configuration that go beyond its models: secrets and credentials
in the wrong place, paths resolved against the config's folder and usable, the devices'
structure, each driver's and each sink's own validation of its options, nesting and size.
Each returns :class:`~iortd.daemon.config.model.ConfigIssue` values naming the file and key.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from iortd.auditlog.keyring import KeyringError, load_keyring
from iortd.auditlog.note import KeyFileError, load_signer
from iortd.daemon.sink_registry import BUILT_IN_NAMES, CONFIGURED_BY_SECTION, SinkRegistry
from iortd.daemon.sinks import SinkConfigError, SinkOptionError
from iortd.drivers.errors import DriverConfigError, DriverOptionError
from iortd.drivers.registry import DriverRegistry
from iortd.drivers.transport.config import SERIAL_SETTINGS, serial_line
from iortd.plan.doserate import DoseRateError, load_doserate_table

from .credentials import SECRET_FILE_KEYS, credential_name
from .model import (
    _PATTERN_MEANING,
    Config,
    ConfigIssue,
    DeviceConfig,
    SinkConfig,
    _freeze,
    _thaw,
)

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


def _resolve_credentials(
    config: Config, file: Path, environ: Mapping[str, str]
) -> tuple[Config, list[ConfigIssue]]:
    """Replace every ``credential:NAME`` secret-file value by its file in
    ``$CREDENTIALS_DIRECTORY``; a credential that cannot be resolved is an issue (and its
    key is cleared, so that no later check reports it a second time)."""
    issues: list[ConfigIssue] = []
    updates: dict[str, dict[str, Path | None]] = {}
    directory = environ.get("CREDENTIALS_DIRECTORY", "")
    for section, key in SECRET_FILE_KEYS:
        value = getattr(getattr(config, section), key)
        name = None if value is None else credential_name(value)  # the models checked the form
        if name is None:
            continue
        if not directory:
            msg = (
                f"the systemd credential {name!r} is not available: $CREDENTIALS_DIRECTORY is "
                f"not set (systemd sets it for a unit with LoadCredential={name}:FILE, as "
                f"iortd.service does). Run under the unit; to check by hand: "
                f"iortd check-config --credential {name}:FILE CONFIG"
            )
        elif not Path(directory).is_absolute():
            msg = f"$CREDENTIALS_DIRECTORY must be an absolute path; got {directory!r}"
        else:
            updates.setdefault(section, {})[key] = Path(directory) / name
            continue
        issues.append(ConfigIssue(file, f"{section}.{key}", msg))
        updates.setdefault(section, {})[key] = None
    if not updates:
        return config, issues
    changed = {
        section: getattr(config, section).model_copy(update=values)
        for section, values in updates.items()
    }
    return config.model_copy(update=changed), issues


def _resolve_paths(
    config: Config, base: Path, registry: DriverRegistry, sinks: SinkRegistry
) -> Config:
    def fix(p: Path | None) -> Path | None:
        return None if p is None else (p if p.is_absolute() else (base / p))

    ret = config.log.retention
    log = config.log.model_copy(
        update={
            "directory": fix(config.log.directory),
            "signing_key_file": fix(config.log.signing_key_file),
            "retention": ret and ret.model_copy(update={"archive_dir": fix(ret.archive_dir)}),
        }
    )
    mqtt = config.mqtt.model_copy(
        update={
            k: fix(getattr(config.mqtt, k))
            for k in ("password_file", "ca_file", "cert_file", "key_file")
        }
    )
    commands = config.commands.model_copy(
        update={k: fix(getattr(config.commands, k)) for k in ("keyring", "inbox")}
    )
    verification = config.verification.model_copy(
        update={"doserate_table": fix(config.verification.doserate_table)}
    )
    devices = tuple(_resolve_device_paths(d, base, registry) for d in config.devices)
    tables = tuple(_resolve_sink_paths(t, base, sinks) for t in config.sinks)
    return config.model_copy(
        update={
            "log": log,
            "mqtt": mqtt,
            "commands": commands,
            "verification": verification,
            "devices": devices,
            "sinks": tables,
        }
    )


def _check_files(config: Config, file: Path) -> list[ConfigIssue]:
    try:
        return _check_file_system(config, file)
    except OSError as exc:
        # Whatever the probes below did not foresee (a path made too long by the config
        # file's own directory, an I/O error): one line, not a traceback.
        where = f" ({exc.filename})" if exc.filename else ""
        return [ConfigIssue(file, "", f"a configured path cannot be used: {exc.strerror}{where}")]


def _check_commands(config: Config, file: Path) -> list[ConfigIssue]:
    """The keyring is read and checked now (each of its problems one issue), so that a bad
    entry is found by check-config, not by the first command."""
    c = config.commands
    issues = []
    if c.keyring is not None and c.keyring.is_file():
        try:
            load_keyring(c.keyring)
        except KeyringError as exc:
            issues += [ConfigIssue(file, "commands.keyring", p) for p in exc.problems]
    if c.inbox is not None and c.keyring is None:
        issues.append(
            ConfigIssue(file, "commands.inbox", "needs commands.keyring (who may sign them)")
        )
    if c.inbox is not None and c.inbox.exists() and not c.inbox.is_dir():
        issues.append(ConfigIssue(file, "commands.inbox", f"not a directory: {c.inbox}"))
    v = config.verification
    if v.enabled and c.keyring is None:
        issues.append(
            ConfigIssue(
                file,
                "verification.enabled",
                "needs commands.keyring: without it no prescription can reach the room",
            )
        )
    if v.doserate_table is not None:
        try:
            load_doserate_table(v.doserate_table)
        except DoseRateError as exc:
            issues.append(ConfigIssue(file, "verification.doserate_table", str(exc)))
    return issues


def _check_file_system(config: Config, file: Path) -> list[ConfigIssue]:
    issues = []
    for section, key, value in (
        ("log", "signing_key_file", config.log.signing_key_file),
        ("mqtt", "password_file", config.mqtt.password_file),
        ("mqtt", "ca_file", config.mqtt.ca_file),
        ("mqtt", "cert_file", config.mqtt.cert_file),
        ("mqtt", "key_file", config.mqtt.key_file),
        ("commands", "keyring", config.commands.keyring),
    ):
        if value is not None and not value.is_file():
            issues.append(ConfigIssue(file, f"{section}.{key}", f"file not found: {value}"))
    issues += _check_commands(config, file)
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
    issues += _check_retention(config, file)
    key_file = config.log.signing_key_file
    if key_file is not None and key_file.is_file():
        # Refused here, before anything starts, rather than at the first checkpoint.
        try:
            load_signer(key_file)
        except KeyFileError as exc:
            issues.append(ConfigIssue(file, "log.signing_key_file", str(exc)))
    return issues


def _check_retention(config: Config, file: Path) -> list[ConfigIssue]:
    """``[log.retention]``: a budget that holds more than the segments retention may never
    delete, and an archive that is a directory of its own, apart from the log."""
    ret, log = config.log.retention, config.log
    if ret is None:
        return []
    issues = []
    if ret.budget_mb * 1024 * 1024 < 4 * log.rotate_max_bytes:
        issues.append(
            ConfigIssue(
                file,
                "log.retention.budget_mb",
                f"{ret.budget_mb} MiB holds fewer than 4 segments of log.rotate_max_bytes "
                f"({log.rotate_max_bytes} bytes): raise it, or lower rotate_max_bytes",
            )
        )
    arch = ret.archive_dir
    if arch is None:
        return issues
    a, d = arch.resolve(), log.directory.resolve()
    key = "log.retention.archive_dir"
    if a == d or a.is_relative_to(d):
        why = f"{arch} is inside log.directory: an archive is a copy kept elsewhere"
        issues.append(ConfigIssue(file, key, why))
    elif d.is_relative_to(a):
        why = f"{arch} holds log.directory: give the archive a directory of its own"
        issues.append(ConfigIssue(file, key, why))
    elif not arch.is_dir():
        issues.append(
            ConfigIssue(file, key, f"not a directory: {arch} (create it, or its mount point)")
        )
    # Whether the share is mounted is not checked here: it may be mounted after the start
    # (each retention round checks it, and an unmounted share is an alarm, not a refusal).
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
    readers = [i for i, d in enumerate(config.devices) if d.role == "applicator"]
    if not issues and len(readers) > 1:
        # One applicator per delivery: the rules compare THE applicator with the console's.
        msg = (
            f"one applicator reader per room; devices[{readers[0]}] is one already "
            "(run a daemon per room)"
        )
        issues.append(ConfigIssue(file, f"devices[{readers[1]}].role", msg))
    if not issues and readers:
        # No public figure exists for how far an IORT applicator may move during a delivery
        # (docs/alarms.md): a site that watches one states its own, never a made-up default.
        t = config.tolerances
        for key, unit in (("applicator_displacement_mm", "mm"), ("applicator_tilt_deg", "deg")):
            if getattr(t, key) is None:
                msg = (
                    f"required with an applicator reader (devices[{readers[0]}]) and it has no "
                    f"default: set {key} ({unit}) in [tolerances] to your site's tolerance"
                )
                issues.append(ConfigIssue(file, f"tolerances.{key}", msg))
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


def _check_shared_lines(config: Config, file: Path, registry: DriverRegistry) -> list[ConfigIssue]:
    """Devices whose serial transport names one port share that line (an RS-485 bus):
    allowed only for drivers that can share one (Modbus RTU: the factory's
    ``shared_line_unit``), at distinct unit ids, with the same serial settings. A device
    whose driver or transport is already reported bad is left out (no noise on noise)."""
    issues: list[ConfigIssue] = []
    first: dict[str, tuple[int, tuple[Any, ...]]] = {}  # port -> (device, its settings)
    units: dict[str, dict[int, int]] = {}  # port -> unit id -> device
    lines: dict[str, list[int]] = {}
    for i, dev in enumerate(config.devices):
        try:
            line = serial_line(dev.transport) if dev.transport else None
        except DriverOptionError:
            continue
        if line is not None:
            lines.setdefault(line[0], []).append(i)
    for port, members in lines.items():
        if len(members) < 2:
            continue
        for i in members:
            dev = config.devices[i]
            key = f"devices[{i}]"
            line = serial_line(dev.transport)
            assert line is not None  # noqa: S101 - grouped by it above
            settings = line[1]
            j, first_settings = first.setdefault(port, (i, settings))
            others = ", ".join(f"devices[{m}]" for m in members if m != i)
            try:
                factory = registry.get(dev.driver)
                unit_of = getattr(factory, "shared_line_unit", None)
                unit = unit_of(dev.options, dev.transport) if unit_of else None
            except (DriverConfigError, DriverOptionError):
                continue  # reported by _check_drivers
            if unit is None:
                msg = (
                    f"port {port!r} is also {others}'s: only Modbus RTU devices can share "
                    f"a serial line (driver {dev.driver!r} cannot); give it a port of its own"
                )
                issues.append(ConfigIssue(file, f"{key}.driver", msg))
                continue
            if j != i:
                for name, mine, theirs in zip(
                    SERIAL_SETTINGS, settings, first_settings, strict=True
                ):
                    if mine != theirs:
                        msg = (
                            f"{mine!r} but devices[{j}] on the same line (port {port!r}) has "
                            f"{theirs!r}: every device on one RS-485 line needs the same "
                            f"{', '.join(SERIAL_SETTINGS)}"
                        )
                        issues.append(ConfigIssue(file, f"{key}.transport.{name}", msg))
            seen = units.setdefault(port, {})
            if unit in seen:
                msg = (
                    f"unit id {unit} is already devices[{seen[unit]}]'s on the same line "
                    f"(port {port!r}): each device on one RS-485 line needs its own unit id"
                )
                issues.append(ConfigIssue(file, f"{key}.options.unit_id", msg))
            seen.setdefault(unit, i)
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
