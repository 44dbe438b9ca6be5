"""Site configuration: TOML validated into typed, frozen models before anything starts.

Every problem is reported as a :class:`ConfigIssue` naming the file, the key path (as a
reader of the TOML would write it, e.g. ``devices[0].poll_interval_s``) and what was
expected. Nothing is touched (no device, no broker, no log directory) until the whole file
has been validated, including each device's driver options by the driver itself.

The models are :mod:`iortd.daemon.config.model`; the checks beyond them
:mod:`iortd.daemon.config.checks`; :func:`load_config` here reads the file and runs both.
"""

from __future__ import annotations

import hashlib
import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from iortd.daemon.sink_registry import SinkRegistry
from iortd.drivers.registry import DriverRegistry
from iortd.kernel.files import BOM_ERROR, UTF8_BOM, FileReadError, read_small_file

from .checks import (
    _SECRET_KEYS,
    MAX_CONFIG_BYTES,
    MAX_NESTING,
    _check_devices,
    _check_drivers,
    _check_files,
    _check_shared_lines,
    _check_sinks,
    _credentials_in_urls,
    _describe,
    _key_path,
    _resolve_credentials,
    _resolve_paths,
    _too_deep,
)
from .model import (
    MQTT_CREDENTIALS_HINT,
    Config,
    ConfigError,
    ConfigIssue,
    DeviceConfig,
    HealthConfig,
    LoadedConfig,
    MqttConfig,
    PlanConfig,
    SinkConfig,
    SiteConfig,
    Tolerances,
    tracker_settings,
)

__all__ = [
    "MQTT_CREDENTIALS_HINT",
    "Config",
    "ConfigError",
    "ConfigIssue",
    "DeviceConfig",
    "HealthConfig",
    "LoadedConfig",
    "MqttConfig",
    "PlanConfig",
    "SinkConfig",
    "SiteConfig",
    "Tolerances",
    "load_config",
    "tracker_settings",
]


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
    # credential:NAME first: what it resolves to is absolute, so left alone below.
    config, credential_issues = _resolve_credentials(config, path, os.environ)
    config = _resolve_paths(config, path.parent.resolve(), registry, sinks)
    # Device structure first: with duplicate names or no source, per-driver checks would
    # only add noise about the wrong device.
    issues = _check_devices(config, path)
    if not issues:
        issues = _check_files(config, path) + _check_drivers(config, path, registry)
        issues += _check_shared_lines(config, path, registry)
        issues += _check_sinks(config, path, sinks)
    issues = credential_issues + issues
    if issues:
        raise ConfigError(issues)
    return LoadedConfig(config=config, path=path, sha256=hashlib.sha256(raw_bytes).hexdigest())
