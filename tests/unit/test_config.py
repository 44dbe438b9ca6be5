"""load_config: every broken fixture is one precise issue; good configs load, typed and frozen.

The fixtures in tests/fixtures/broken_configs/ are demo.toml with exactly one defect each
(named in each file's first line). The table below says which key path the single
ConfigIssue must name and which words its message must contain to tell the reader what is
expected.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
from collections.abc import Callable, Mapping
from importlib.metadata import EntryPoint
from pathlib import Path
from types import MappingProxyType
from typing import Any, NamedTuple

import pytest
from pydantic import ValidationError

from iortd.auditlog.note import generate_keypair, write_keypair
from iortd.daemon.config import (
    ConfigError,
    ConfigIssue,
    LoadedConfig,
    MqttConfig,
    load_config,
    tracker_settings,
)
from iortd.drivers.registry import ENTRY_POINT_GROUP, DriverRegistry

ROOT = Path(__file__).resolve().parents[2]
CONFIG_DIR = ROOT / "config"
DEMO = CONFIG_DIR / "demo.toml"
SITE_EXAMPLE = CONFIG_DIR / "site.example.toml"
BROKEN = ROOT / "tests" / "fixtures" / "broken_configs"


class Broken(NamedTuple):
    fixture: str
    key: str  # the key path the single issue must name ("" = the file as a whole)
    expect: tuple[str, ...]  # substrings of the issue's message
    also_accepted_keys: tuple[str, ...] = ()


BROKEN_CASES = [
    Broken("bad_type.toml", "devices[0].poll_interval_s", ("valid number", "'0.1'")),
    Broken("unknown_top_level_key.toml", "log_level", ("unknown key",)),
    Broken("unknown_device_key.toml", "devices[0].poll_intervall_s", ("unknown key",)),
    Broken("unknown_driver_option.toml", "devices[0].options.start_dealy_s", ("unknown key",)),
    Broken("negative_dose.toml", "plan.prescribed_dose_gy", ("greater than 0", "-20.0")),
    Broken(
        "zero_poll_interval.toml",
        "devices[0].poll_interval_s",
        ("greater than or equal to 0.01", "got 0"),
    ),
    Broken("speed_out_of_range.toml", "simulation.speed", ("greater than or equal to 0.01",)),
    Broken("missing_site.toml", "site", ("required", "missing")),
    Broken(
        "missing_driver.toml",
        "devices[0].driver",
        ("'modbus-nope'", "not installed", "installed drivers: ", "sim"),
    ),
    Broken(
        "unknown_applicator.toml",
        "devices[0].options.applicator",
        ("'SPH99'", "'intrabeam'", "known: ", "SPH30"),
    ),
    Broken("bad_sim_transport.toml", "devices[0].transport", ("in-process",)),
    Broken("bad_slug_room.toml", "site.room", ("lower-case slug", "'OR 1'")),
    Broken("patient_name_as_treatment_id.toml", "plan.treatment_id", ("pseudonymous code",)),
    Broken(
        "password_in_toml.toml",
        "mqtt.password",
        ("never go in the TOML", "password_file", "password_env"),
    ),
    Broken(
        "signing_key_in_toml.toml",
        "log.signing_key",
        ("never go in the TOML", "signing_key_file"),
    ),
    Broken(
        "missing_ca_file.toml",
        "mqtt.ca_file",
        ("file not found", str(BROKEN / "no-such-dir" / "no-such-ca.pem")),
    ),
    Broken("bad_mqtt_scheme.toml", "mqtt.url", ("mqtts://HOST[:PORT]", "'http://")),
    Broken("toml_syntax_error.toml", "", ("TOML syntax error", "line 5")),
    Broken("not_utf8.toml", "", ("not UTF-8",)),
    Broken(
        "duplicate_device_name.toml",
        "devices[1].name",
        ("unique", "source-1"),
        also_accepted_keys=("devices",),
    ),
    # Hostile or mistaken inputs (issue 13 item 7): one issue each, never a traceback or hang.
    # Credentials in a URL (issue 12 item 5): refused, named, never repeated.
    Broken(
        "credentials_in_mqtt_url.toml",
        "mqtt.url",
        ("must not carry credentials", "mqtt.username", "password_file", "password_env"),
    ),
    Broken(
        "credentials_in_option_url.toml",
        "devices[0].options.note",
        ("must not carry credentials", "file or an environment variable"),
    ),
    Broken("log_directory_name_too_long.toml", "log.directory", ("path too long", "255")),
    Broken("nul_in_log_directory.toml", "log.directory", ("NUL",)),
    Broken("nested_5000_deep.toml", "", ("nested too deeply",)),
    Broken("utf8_bom.toml", "", ("byte-order mark", "without a BOM")),
    Broken(
        "profile_is_dev_zero.toml",
        "devices[0].options.profile",
        ("/dev/zero", "character device", "expected a regular file"),
    ),
    Broken(
        "relative_profile_missing.toml",
        "devices[0].options.profile",
        (str(BROKEN / "no-such-dir" / "site-profile.toml"), "file not found"),
    ),
]

# (Not covered by a fixture: simulation.speed != 1 with a real driver, because every
# installed driver is simulated; test_speed_must_be_1_with_a_real_driver uses a fake one.)

SECRETS = {
    "password_in_toml.toml": "hunter2-not-a-real-secret",
    "credentials_in_mqtt_url.toml": "hunter2-not-a-real-secret",
    "credentials_in_option_url.toml": "hunter2-not-a-real-secret",
    "signing_key_in_toml.toml": "MC4CAQAwBQYDK2VwBCIEINOTAREALKEY",
}


def _params() -> list[Any]:
    return [pytest.param(case, id=case.fixture.removesuffix(".toml")) for case in BROKEN_CASES]


@pytest.fixture(scope="module")
def registry() -> DriverRegistry:
    return DriverRegistry.from_entry_points()


def _issue(excinfo: pytest.ExceptionInfo[ConfigError]) -> ConfigIssue:
    issues = excinfo.value.issues
    assert len(issues) == 1, f"expected exactly one issue, got {[str(i) for i in issues]}"
    return issues[0]


def _write(directory: Path, text: str, name: str = "site.toml") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_text(text, encoding="utf-8")
    return path


def _demo_text() -> str:
    """The demo's source alone (its applicator reader, last in the file, cut off)."""
    text = DEMO.read_text(encoding="utf-8")
    return text.split("# The applicator reader and positioning stand", 1)[0]


def _replace_once(text: str, old: str, new: str) -> str:
    assert text.count(old) == 1, old
    return text.replace(old, new)


# --- broken fixtures ---------------------------------------------------------------------


@pytest.mark.parametrize("case", _params())
def test_broken_fixture_is_one_issue_naming_key_and_expectation(
    case: Broken, registry: DriverRegistry
) -> None:
    path = BROKEN / case.fixture
    with pytest.raises(ConfigError) as excinfo:
        load_config(path, registry)
    issue = _issue(excinfo)
    assert issue.key in (case.key, *case.also_accepted_keys), str(issue)
    assert issue.file == path
    for words in case.expect:
        assert words in issue.message, f"{words!r} not in {issue.message!r}"
    # The exception's text is what an operator reads: file, key, message on one line.
    text = str(excinfo.value)
    assert "\n" not in text
    assert text.startswith(f"{path}: {issue.key}: " if issue.key else f"{path}: ")


def test_every_fixture_is_in_the_table_and_names_its_defect() -> None:
    on_disk = sorted(p.name for p in BROKEN.glob("*.toml"))
    assert on_disk == sorted(c.fixture for c in BROKEN_CASES)
    assert len(on_disk) >= 12
    for name in on_disk:
        first_line = (BROKEN / name).read_bytes().split(b"\n", 1)[0]
        assert first_line.removeprefix(b"\xef\xbb\xbf").startswith(b"# Defect: "), name


@pytest.mark.parametrize("fixture", sorted(SECRETS))
def test_a_secret_in_the_toml_is_refused_without_repeating_it(
    fixture: str, registry: DriverRegistry
) -> None:
    with pytest.raises(ConfigError) as excinfo:
        load_config(BROKEN / fixture, registry)
    assert SECRETS[fixture] not in str(excinfo.value)


def test_every_problem_is_reported_not_just_the_first(
    tmp_path: Path, registry: DriverRegistry
) -> None:
    text = _replace_once(_demo_text(), 'room = "or-1"', 'room = "OR 1"')
    text = _replace_once(text, "prescribed_dose_gy = 20.0", "prescribed_dose_gy = -1.0")
    with pytest.raises(ConfigError) as excinfo:
        load_config(_write(tmp_path, text), registry)
    assert sorted(i.key for i in excinfo.value.issues) == ["plan.prescribed_dose_gy", "site.room"]


# --- good configs ------------------------------------------------------------------------


@pytest.fixture
def mqtt_password_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """site.example.toml takes the MQTT password from this variable."""
    monkeypatch.setenv("IORTD_MQTT_PASSWORD", "example-password")


@pytest.mark.usefixtures("mqtt_password_env")
@pytest.mark.parametrize("path", [DEMO, SITE_EXAMPLE], ids=["demo", "site.example"])
def test_shipped_configs_load(path: Path, registry: DriverRegistry) -> None:
    loaded = load_config(path, registry)
    assert isinstance(loaded, LoadedConfig)
    assert loaded.path == path
    assert loaded.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    config = loaded.config
    assert config.source.driver == "sim"
    assert config.source.name == "source-1"
    readers = [d for d in config.devices if d.role == "applicator"]
    assert [d.driver for d in readers] == (["sim"] if path == DEMO else [])
    assert config.source.options["applicator"] == "SPH30"
    assert config.log.directory.is_absolute()


def test_demo_values_are_typed(registry: DriverRegistry) -> None:
    config = load_config(DEMO, registry).config
    assert (config.site.id, config.site.room) == ("demo-site", "or-1")
    assert config.log.directory == CONFIG_DIR.resolve() / "demo-log"
    assert config.mqtt.enabled is True
    assert config.plan.prescribed_dose_gy == 20.0
    assert config.tolerances.stale_after_polls == 5
    assert config.simulation.speed == 60.0
    assert config.simulation.seed == 20261126


@pytest.mark.usefixtures("mqtt_password_env")
def test_site_example_values(registry: DriverRegistry) -> None:
    config = load_config(SITE_EXAMPLE, registry).config
    assert config.mqtt.url == "mqtts://broker.example.internal:8883"
    assert config.mqtt.password_env == "IORTD_MQTT_PASSWORD"  # noqa: S105 - a variable name
    assert config.mqtt.password_file is None
    assert config.log.directory == Path("/var/lib/iortd/log")
    assert config.log.checkpoint_interval_s == 300.0
    assert config.simulation.speed == 1.0


# --- paths -------------------------------------------------------------------------------


def test_relative_paths_resolve_against_the_config_files_directory(
    tmp_path: Path, registry: DriverRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    conf_dir = tmp_path / "etc" / "iortd"
    for rel in ("certs/ca.pem", "../shared/mqtt.password"):
        target = conf_dir / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text("x", encoding="utf-8")
        target.chmod(0o600)
    write_keypair(generate_keypair("signing"), conf_dir / "keys")
    text = _replace_once(
        _demo_text(),
        'directory = "demo-log"',
        'directory = "log"\nsigning_key_file = "keys/signing.key"',
    )
    text = _replace_once(
        text,
        "[mqtt]\n",
        '[mqtt]\nca_file = "certs/ca.pem"\npassword_file = "../shared/mqtt.password"\n',
    )
    text = _replace_once(text, 'url = "mqtt://', 'url = "mqtts://')
    _write(conf_dir, text)
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)

    # A relative path to the config file itself: resolution still uses the file's directory.
    config = load_config(Path("..") / "etc" / "iortd" / "site.toml", registry).config
    base = conf_dir.resolve()
    assert config.log.directory == base / "log"
    assert config.log.signing_key_file == base / "keys" / "signing.key"
    assert config.mqtt.ca_file == base / "certs" / "ca.pem"
    assert config.mqtt.password_file is not None
    assert config.mqtt.password_file.resolve() == (tmp_path / "etc" / "shared" / "mqtt.password")


def test_absolute_paths_are_kept(tmp_path: Path, registry: DriverRegistry) -> None:
    ca = tmp_path / "pki" / "ca.pem"
    ca.parent.mkdir()
    ca.write_text("x", encoding="utf-8")
    log_dir = tmp_path / "var" / "log"
    text = _replace_once(_demo_text(), 'directory = "demo-log"', f'directory = "{log_dir}"')
    text = _replace_once(text, "[mqtt]\n", f'[mqtt]\nca_file = "{ca}"\n')
    text = _replace_once(text, 'url = "mqtt://', 'url = "mqtts://')
    config = load_config(_write(tmp_path / "conf", text), registry).config
    assert config.log.directory == log_dir
    assert config.mqtt.ca_file == ca


def test_a_missing_referenced_file_is_named_by_its_resolved_path(
    tmp_path: Path, registry: DriverRegistry
) -> None:
    text = _replace_once(_demo_text(), "[mqtt]\n", '[mqtt]\npassword_file = "mqtt.password"\n')
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as excinfo:
        load_config(path, registry)
    issue = _issue(excinfo)
    assert issue.key == "mqtt.password_file"
    assert str(tmp_path.resolve() / "mqtt.password") in issue.message


def test_mqtt_password_env_must_be_set(
    tmp_path: Path, registry: DriverRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("IORTD_TEST_PW", raising=False)
    text = _replace_once(_demo_text(), "[mqtt]\n", '[mqtt]\npassword_env = "IORTD_TEST_PW"\n')
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as excinfo:
        load_config(path, registry)
    issue = _issue(excinfo)
    assert issue.key == "mqtt.password_env"
    assert "IORTD_TEST_PW is not set" in issue.message
    monkeypatch.setenv("IORTD_TEST_PW", "s3cret")
    assert load_config(path, registry).config.mqtt.password_env == "IORTD_TEST_PW"  # noqa: S105


def test_mqtt_password_file_readable_by_others_is_refused(
    tmp_path: Path, registry: DriverRegistry
) -> None:
    pw = tmp_path / "mqtt.password"
    pw.write_text("s3cret\n", encoding="utf-8")
    pw.chmod(0o644)
    text = _replace_once(_demo_text(), "[mqtt]\n", '[mqtt]\npassword_file = "mqtt.password"\n')
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as excinfo:
        load_config(path, registry)
    issue = _issue(excinfo)
    assert issue.key == "mqtt.password_file"
    assert "mode 0644" in issue.message
    assert "chmod 600" in issue.message
    pw.chmod(0o600)
    assert load_config(path, registry).config.mqtt.password_file == pw


def test_mqtt_tls_files_need_an_mqtts_url(tmp_path: Path, registry: DriverRegistry) -> None:
    (tmp_path / "ca.pem").write_text("x", encoding="utf-8")
    text = _replace_once(_demo_text(), "[mqtt]\n", '[mqtt]\nca_file = "ca.pem"\n')
    with pytest.raises(ConfigError) as excinfo:
        load_config(_write(tmp_path, text), registry)
    issue = _issue(excinfo)
    assert issue.key == "mqtt.url"
    assert "use mqtts://" in issue.message


# --- overrides ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "key", "expect"),
    [
        ({"simulation": {"speed": 0}}, "simulation.speed", "greater than or equal to 0.01"),
        ({"simulation": {"speed": 0.0}}, "simulation.speed", "greater than or equal to 0.01"),
        ({"simulation": {"speed": "fast"}}, "simulation.speed", "valid number"),
        ({"simulation": {"sped": 2.0}}, "simulation.sped", "unknown key"),
        ({"log": {"directory": 5}}, "log.directory", "path"),
        ({"site": {"room": "OR 3"}}, "site.room", "lower-case slug"),
    ],
    ids=["speed-zero-int", "speed-zero-float", "speed-string", "typo", "path-type", "slug"],
)
def test_overrides_are_validated_like_file_values(
    overrides: Mapping[str, Mapping[str, Any]], key: str, expect: str, registry: DriverRegistry
) -> None:
    with pytest.raises(ConfigError) as excinfo:
        load_config(DEMO, registry, overrides=overrides)
    issue = _issue(excinfo)
    assert issue.key == key
    assert expect in issue.message


def test_overrides_take_effect_and_leave_the_callers_mapping_alone(
    registry: DriverRegistry,
) -> None:
    overrides = {"simulation": MappingProxyType({"speed": 2.5}), "plan": {"fraction": 3}}
    before = {k: dict(v) for k, v in overrides.items()}
    loaded = load_config(DEMO, registry, overrides=overrides)
    assert loaded.config.simulation.speed == 2.5
    assert loaded.config.simulation.seed == 20261126  # the rest of the section is kept
    assert loaded.config.plan.fraction == 3
    assert loaded.config.plan.prescribed_dose_gy == 20.0
    assert {k: dict(v) for k, v in overrides.items()} == before
    # The hash is of the file as written, whatever the overrides.
    assert loaded.sha256 == hashlib.sha256(DEMO.read_bytes()).hexdigest()


def test_an_override_can_supply_a_section_the_file_lacks(
    tmp_path: Path, registry: DriverRegistry
) -> None:
    text = _replace_once(
        _demo_text(),
        "[log]\n# `iortd demo` replaces this with --log-dir or the per-user data directory.\n"
        'directory = "demo-log"\n',
        "",
    )
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as excinfo:
        load_config(path, registry)
    assert _issue(excinfo).key == "log"
    log_dir = tmp_path / "logs"
    loaded = load_config(path, registry, overrides={"log": {"directory": str(log_dir)}})
    assert loaded.config.log.directory == log_dir


# --- hash, unreadable files --------------------------------------------------------------


def test_sha256_is_of_the_files_bytes(tmp_path: Path, registry: DriverRegistry) -> None:
    raw = DEMO.read_bytes()
    a = tmp_path / "a.toml"
    a.write_bytes(raw)
    b = tmp_path / "b.toml"
    b.write_bytes(b"# a comment changes the bytes, not the config\n" + raw)
    la, lb = load_config(a, registry), load_config(b, registry)
    assert la.sha256 == hashlib.sha256(raw).hexdigest()
    assert lb.sha256 == hashlib.sha256(b.read_bytes()).hexdigest()
    assert la.sha256 != lb.sha256
    assert la.config == lb.config


def test_a_missing_file_is_one_issue_with_an_empty_key(
    tmp_path: Path, registry: DriverRegistry
) -> None:
    path = tmp_path / "nope.toml"
    with pytest.raises(ConfigError) as excinfo:
        load_config(path, registry)
    issue = _issue(excinfo)
    assert (issue.file, issue.key) == (path, "")
    assert "not found" in issue.message
    assert str(excinfo.value) == f"{path}: file not found"


def test_a_directory_is_one_issue_with_an_empty_key(
    tmp_path: Path, registry: DriverRegistry
) -> None:
    with pytest.raises(ConfigError) as excinfo:
        load_config(tmp_path, registry)
    issue = _issue(excinfo)
    assert (issue.file, issue.key) == (tmp_path, "")
    assert "directory" in issue.message
    assert "TOML file" in issue.message


# --- immutability ------------------------------------------------------------------------


def test_loaded_config_is_frozen(registry: DriverRegistry) -> None:
    loaded = load_config(DEMO, registry)
    config = loaded.config
    with pytest.raises(ValidationError, match="frozen"):
        config.site = config.site  # type: ignore[misc]
    with pytest.raises(ValidationError, match="frozen"):
        config.site.room = "or-2"  # type: ignore[misc]
    with pytest.raises(ValidationError, match="frozen"):
        config.simulation.speed = 1.0  # type: ignore[misc]
    with pytest.raises(ValidationError, match="frozen"):
        config.devices[0].poll_interval_s = 5.0  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        loaded.sha256 = "0" * 64  # type: ignore[misc]
    issue = ConfigIssue(DEMO, "site", "x")
    with pytest.raises(dataclasses.FrozenInstanceError):
        issue.key = "y"  # type: ignore[misc]
    assert config.site.room == "or-1"


def test_nested_containers_cannot_be_changed_in_place(registry: DriverRegistry) -> None:
    config = load_config(DEMO, registry).config
    mutations: list[Callable[[], object]] = [
        lambda: config.devices.append(config.devices[0]),  # type: ignore[attr-defined]
        lambda: config.devices[0].options.__setitem__("preset_gy", 50.0),  # type: ignore[index]
    ]
    for mutate in mutations:
        try:
            mutate()
        except (TypeError, AttributeError):
            continue
        raise AssertionError("a container of the loaded config was changed in place")


# --- driver checks with fake drivers ------------------------------------------------------


class FakeFactory:
    def __init__(self, name: str, *, simulated: bool, roles: frozenset[str]) -> None:
        self.name = name
        self.simulated = simulated
        self.roles = roles
        self.validated: list[tuple[dict[str, Any], dict[str, Any]]] = []

    def validate(self, options: Mapping[str, Any], transport: Mapping[str, Any]) -> None:
        self.validated.append((dict(options), dict(transport)))

    def create(self, spec: object, context: object) -> object:
        raise AssertionError("load_config must not build a driver")


def _demo_with_driver(tmp_path: Path, driver: str) -> Path:
    return _write(tmp_path, _replace_once(_demo_text(), 'driver = "sim"', f'driver = "{driver}"'))


def test_speed_must_be_1_with_a_real_driver(tmp_path: Path) -> None:
    real = FakeFactory("fake-real", simulated=False, roles=frozenset({"source"}))
    registry = DriverRegistry.of([real])  # type: ignore[list-item]
    path = _demo_with_driver(tmp_path, "fake-real")
    with pytest.raises(ConfigError) as excinfo:
        load_config(path, registry)
    issue = _issue(excinfo)
    assert issue.key == "simulation.speed"
    assert "must be 1" in issue.message
    assert "'fake-real'" in issue.message
    # With speed 1 the same file is fine, and the driver saw its own options.
    loaded = load_config(path, registry, overrides={"simulation": {"speed": 1.0}})
    assert loaded.config.simulation.speed == 1.0
    assert real.validated[-1] == (
        {
            "profile": "intrabeam",
            "applicator": "SPH30",
            "preset_gy": 20.0,
            "start_delay_s": 180.0,
            "serial": "SIM-IB-0001",
        },
        {},
    )


def test_a_role_the_driver_does_not_serve_is_named(tmp_path: Path) -> None:
    reader = FakeFactory("fake-reader", simulated=True, roles=frozenset({"applicator"}))
    registry = DriverRegistry.of([reader])  # type: ignore[list-item]
    with pytest.raises(ConfigError) as excinfo:
        load_config(_demo_with_driver(tmp_path, "fake-reader"), registry)
    issue = _issue(excinfo)
    assert issue.key == "devices[0].role"
    assert "applicator" in issue.message
    assert "'source'" in issue.message


def test_a_driver_that_fails_to_import_is_not_reported_as_missing(tmp_path: Path) -> None:
    broken = EntryPoint(
        name="broken", value="no_such_module_for_iortd_tests:Factory", group=ENTRY_POINT_GROUP
    )
    registry = DriverRegistry({"broken": broken})
    with pytest.raises(ConfigError) as excinfo:
        load_config(_demo_with_driver(tmp_path, "broken"), registry)
    issue = _issue(excinfo)
    assert issue.key == "devices[0].driver"
    assert "installed but failed to load" in issue.message
    assert "no_such_module_for_iortd_tests" in issue.message


@pytest.mark.parametrize(
    ("url", "ok"),
    [
        ("mqtt://127.0.0.1:1883", True),
        ("mqtts://broker.example.internal", True),
        ("mqtt://[::1]:1883", True),
        ("mqtt://host:99999", False),
        ("mqtt://host:0", False),
        ("mqtt://host/topic", False),
        ("tcp://host:1883", False),
        ("mqtt://", False),
    ],
)
def test_broker_url(url: str, ok: bool, registry: DriverRegistry) -> None:
    demo = Path(__file__).parents[2] / "config" / "demo.toml"
    overrides = {"mqtt": {"url": url}}
    if ok:
        assert load_config(demo, registry, overrides).config.mqtt.url == url
        return
    with pytest.raises(ConfigError) as excinfo:
        load_config(demo, registry, overrides)
    (issue,) = excinfo.value.issues
    assert issue.key == "mqtt.url"
    assert "mqtt://HOST[:PORT]" in issue.message
    assert "command line" in issue.message


def test_not_utf8_names_the_line(tmp_path: Path, registry: DriverRegistry) -> None:
    path = tmp_path / "latin1.toml"
    path.write_bytes(b'[site]\nid = "a"\nname = "Caf\xe9"\n')
    with pytest.raises(ConfigError) as excinfo:
        load_config(path, registry)
    (issue,) = excinfo.value.issues
    assert "line 3" in issue.message


def test_a_signing_key_readable_by_others_is_refused(tmp_path: Path) -> None:
    key, _ = write_keypair(generate_keypair("or-1"), tmp_path / "keys")
    key.chmod(0o644)
    cfg = tmp_path / "site.toml"
    demo = (Path(__file__).parents[2] / "config" / "demo.toml").read_text()
    cfg.write_text(demo.replace("[log]\n", '[log]\nsigning_key_file = "keys/or-1.key"\n'))
    with pytest.raises(ConfigError) as excinfo:
        load_config(cfg, DriverRegistry.from_entry_points())
    (issue,) = excinfo.value.issues
    assert issue.key == "log.signing_key_file"
    assert "chmod 600" in issue.message
    key.chmod(0o600)
    assert load_config(cfg, DriverRegistry.from_entry_points()).config.log.signing_key_file == key


def test_a_log_directory_that_cannot_be_created_is_named(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("x")
    demo = (Path(__file__).parents[2] / "config" / "demo.toml").read_text()
    cfg = tmp_path / "site.toml"
    cfg.write_text(demo.replace('directory = "demo-log"', 'directory = "a-file/log"'))
    with pytest.raises(ConfigError) as excinfo:
        load_config(cfg, DriverRegistry.from_entry_points())
    (issue,) = excinfo.value.issues
    assert issue.key == "log.directory"
    assert "a-file is not a directory" in issue.message


def _commented_examples() -> dict[str, str]:
    """The commented device examples of site.example.toml, uncommented, by driver."""
    out: dict[str, str] = {}
    name = None
    for line in SITE_EXAMPLE.read_text(encoding="utf-8").splitlines():
        if line.startswith("# ---- example: "):
            name = line.removeprefix("# ---- example: ")
            out[name] = ""
        elif line.startswith("# ---- end of example"):
            name = None
        elif name is not None:
            out[name] += line.removeprefix("# ") + "\n"
    return out


@pytest.mark.usefixtures("mqtt_password_env")
@pytest.mark.parametrize("driver", ["modbus-xrs", "serial-xrs"])
def test_the_commented_device_examples_are_valid(
    tmp_path: Path, registry: DriverRegistry, driver: str
) -> None:
    examples = _commented_examples()
    assert sorted(examples) == ["modbus-xrs", "serial-xrs"]
    head = SITE_EXAMPLE.read_text(encoding="utf-8").split("[[devices]]", 1)[0]
    path = _write(tmp_path, head + examples[driver])
    config = load_config(path, registry).config
    assert config.source.driver == driver


# --- hostile files and paths (issue 13 item 7) -------------------------------------------
# Inputs a fixture file cannot hold (a FIFO, a device, a path longer than the file system
# allows): each is one issue naming the file and key, found at once (pytest-timeout would
# catch a hang; the FIFO has no writer, so a blocking open would never return).


def test_a_fifo_as_the_config_file_is_one_issue(tmp_path: Path, registry: DriverRegistry) -> None:
    fifo = tmp_path / "site.toml"
    os.mkfifo(fifo)
    with pytest.raises(ConfigError) as excinfo:
        load_config(fifo, registry)
    issue = _issue(excinfo)
    assert (issue.file, issue.key) == (fifo, "")
    assert "FIFO" in issue.message


def test_dev_zero_as_the_config_file_is_one_issue(registry: DriverRegistry) -> None:
    with pytest.raises(ConfigError) as excinfo:
        load_config(Path("/dev/zero"), registry)
    assert "character device" in _issue(excinfo).message


def test_a_config_file_name_too_long_is_one_issue(tmp_path: Path, registry: DriverRegistry) -> None:
    with pytest.raises(ConfigError) as excinfo:
        load_config(tmp_path / ("a" * 300 + ".toml"), registry)
    assert "File name too long" in _issue(excinfo).message


def test_a_huge_config_file_is_refused_unread(tmp_path: Path, registry: DriverRegistry) -> None:
    path = tmp_path / "site.toml"
    with path.open("wb") as f:
        f.truncate(64 * 1024 * 1024)  # sparse: costs no disk
    with pytest.raises(ConfigError) as excinfo:
        load_config(path, registry)
    assert "too large" in _issue(excinfo).message


def test_a_fifo_as_the_profile_is_one_issue(tmp_path: Path, registry: DriverRegistry) -> None:
    os.mkfifo(tmp_path / "pipe.toml")
    text = _replace_once(_demo_text(), 'profile = "intrabeam"', 'profile = "pipe.toml"')
    with pytest.raises(ConfigError) as excinfo:
        load_config(_write(tmp_path, text), registry)
    issue = _issue(excinfo)
    assert issue.key == "devices[0].options.profile"
    assert "FIFO" in issue.message


def test_a_relative_profile_resolves_against_the_config_files_directory(
    tmp_path: Path, registry: DriverRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    conf_dir = tmp_path / "etc"
    (conf_dir / "profiles").mkdir(parents=True)
    shutil.copy(ROOT / "config" / "profiles" / "intrabeam.toml", conf_dir / "profiles" / "x.toml")
    text = _replace_once(_demo_text(), 'profile = "intrabeam"', 'profile = "profiles/x.toml"')
    _write(conf_dir, text)
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    config = load_config(Path("..") / "etc" / "site.toml", registry).config
    assert config.source.options["profile"] == str(conf_dir.resolve() / "profiles" / "x.toml")


def test_a_relative_map_resolves_against_the_config_files_directory(
    tmp_path: Path, registry: DriverRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    conf_dir = tmp_path / "etc"
    (conf_dir / "maps").mkdir(parents=True)
    shutil.copy(ROOT / "config" / "maps" / "xrs-mb1.toml", conf_dir / "maps" / "console.toml")
    text = _replace_once(_demo_text(), 'driver = "sim"', 'driver = "modbus-xrs"')
    start = text.index("[devices.options]")
    text = text[:start] + (
        '[devices.transport]\ntype = "tcp"\nhost = "127.0.0.1"\nport = 502\n'
        '[devices.options]\nmap = "maps/console.toml"\n'
    )
    text = _replace_once(text, "speed = 60.0", "speed = 1.0")
    _write(conf_dir, text)
    monkeypatch.chdir(tmp_path)
    config = load_config(conf_dir / "site.toml", registry).config
    assert config.source.options["map"] == str(conf_dir.resolve() / "maps" / "console.toml")
    # A bare name stays the bundled map, whatever files the current directory holds.
    (tmp_path / "xrs-mb1").write_text("not a map", encoding="utf-8")
    text = _replace_once(text, 'map = "maps/console.toml"', 'map = "xrs-mb1"')
    config = load_config(_write(conf_dir, text), registry).config
    assert config.source.options["map"] == "xrs-mb1"


@pytest.mark.parametrize(
    "url",
    [
        "mqtt://iortd:hunter2-not-a-real-secret@127.0.0.1:1883",
        "mqtts://hunter2-not-a-real-secret@broker.example",
        "mqtt://:hunter2-not-a-real-secret@host",
        "tcp://iortd:hunter2-not-a-real-secret@host/x",
    ],
)
def test_credentials_in_the_broker_url_are_refused_and_not_repeated(
    url: str, registry: DriverRegistry
) -> None:
    """From the file or the command line (`iortd demo --broker`), and whatever else is wrong
    with the URL: the credentials are the one issue, and the secret is not echoed."""
    with pytest.raises(ConfigError) as excinfo:
        load_config(DEMO, registry, {"mqtt": {"url": url}})
    issue = _issue(excinfo)
    assert issue.key == "mqtt.url"
    assert "must not carry credentials" in issue.message
    assert "command line" in issue.message
    assert "hunter2" not in str(excinfo.value)


def test_the_url_validator_itself_refuses_credentials() -> None:
    """Also when a model is built in code, not through load_config."""
    with pytest.raises(ValidationError) as excinfo:
        MqttConfig(url="mqtt://u:hunter2-not-a-real-secret@host")
    assert "hunter2" not in str(excinfo.value.errors(include_input=False))


READER = (
    '\n[[devices]]\nname = "stand-2"\nrole = "applicator"\ndriver = "sim"\n'
    '[devices.options]\nprofile = "intrabeam"\napplicator = "SPH30"\n'
)


def _source_only() -> str:
    """The demo without its applicator reader and the reader's tolerances."""
    return "".join(
        line
        for line in _demo_text().splitlines(keepends=True)
        if not line.startswith("applicator_")
    )


def test_an_applicator_reader_needs_its_tolerances(tmp_path: Path) -> None:
    """Movement tolerances have no default: a reader without them is a config error that
    names each key (exit 2), never a reader judged by a made-up figure."""
    with pytest.raises(ConfigError) as excinfo:
        load_config(_write(tmp_path, _source_only() + READER), DriverRegistry.from_entry_points())
    keys = {i.key: i.message for i in excinfo.value.issues}
    assert set(keys) == {"tolerances.applicator_displacement_mm", "tolerances.applicator_tilt_deg"}
    assert all("devices[1]" in m and "no default" in m for m in keys.values())


def test_an_applicator_reader_with_its_tolerances_loads(tmp_path: Path) -> None:
    text = _replace_once(
        _source_only() + READER,
        "[tolerances]\n",
        "[tolerances]\napplicator_displacement_mm = 2.0\napplicator_tilt_deg = 1.5\n",
    )
    loaded = load_config(_write(tmp_path, text), DriverRegistry.from_entry_points())
    st = tracker_settings(loaded.config, 1.0)
    assert (st.applicator_displacement_mm, st.applicator_tilt_deg) == (2.0, 1.5)
    # The reader's first reading is due within its connect, identify and first read, and
    # the stale bound in its own polls (clock seconds: scaled with the speed).
    reader = next(d for d in loaded.config.devices if d.role == "applicator")
    polls = loaded.config.tolerances.stale_after_polls
    due = 3 * reader.timeout_s + polls * reader.poll_interval_s
    assert st.applicator_first_reading_s == pytest.approx(due)
    assert tracker_settings(loaded.config, 60.0).applicator_first_reading_s == pytest.approx(
        60 * due
    )
    assert (
        tracker_settings(
            load_config(
                _write(tmp_path, _source_only()), DriverRegistry.from_entry_points()
            ).config,
            1.0,
        ).applicator_first_reading_s
        is None
    )


def test_one_applicator_reader_per_room(tmp_path: Path) -> None:
    text = DEMO.read_text(encoding="utf-8") + READER
    with pytest.raises(ConfigError) as excinfo:
        load_config(_write(tmp_path, text), DriverRegistry.from_entry_points())
    issue = _issue(excinfo)
    assert issue.key == "devices[2].role"
    assert "one applicator reader" in issue.message
