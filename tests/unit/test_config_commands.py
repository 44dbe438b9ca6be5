"""``[commands]``: the keyring is read and checked with the config (every problem one issue
naming the key and the entry), relative paths resolve against the config file, and the
keyring may be a systemd credential."""

from __future__ import annotations

from pathlib import Path

import pytest

from iortd.auditlog.note import generate_keypair
from iortd.daemon.config import ConfigError, load_config
from iortd.drivers.registry import DriverRegistry

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "config" / "demo.toml"
KEY = generate_keypair("phys-anna")
GOOD = (
    '[[key]]\nholder = "phys-anna"\nname = "A. Example"\nroles = ["physicist"]\n'
    f'public_key = "{KEY.verifier.text}"\nvalid_from = "2026-01-01T00:00:00Z"\n'
    'valid_until = "2027-01-01T00:00:00Z"\n'
)


@pytest.fixture
def registry() -> DriverRegistry:
    return DriverRegistry.from_entry_points()


def site(tmp_path: Path, commands: str) -> Path:
    demo = DEMO.read_text(encoding="utf-8")
    text = demo.split("# The applicator reader and positioning stand", 1)[0]
    path = tmp_path / "etc" / "site.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + f"\n[commands]\n{commands}\n", encoding="utf-8")
    return path


def issues(path: Path, registry: DriverRegistry) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(path, registry)
    return [str(i) for i in info.value.issues]


def test_keyring_and_inbox_resolve_against_the_config_file(
    tmp_path: Path, registry: DriverRegistry
) -> None:
    cfg = site(tmp_path, 'keyring = "keyring.toml"\ninbox = "inbox"\nclock_skew_s = 30')
    (cfg.parent / "keyring.toml").write_text(GOOD)
    c = load_config(cfg, registry).config.commands
    assert c.keyring == cfg.parent / "keyring.toml"
    assert c.inbox == cfg.parent / "inbox"
    assert c.clock_skew_s == 30
    assert c.max_per_minute == 60


def test_commands_are_off_without_a_keyring(tmp_path: Path, registry: DriverRegistry) -> None:
    assert load_config(site(tmp_path, ""), registry).config.commands.keyring is None


def test_a_bad_keyring_is_one_issue_per_problem(tmp_path: Path, registry: DriverRegistry) -> None:
    cfg = site(tmp_path, 'keyring = "keyring.toml"')
    bad = GOOD.replace('["physicist"]', '["surgeon"]').replace('"2026-01-01T00:00:00Z"', '"x"')
    (cfg.parent / "keyring.toml").write_text(bad)
    found = issues(cfg, registry)
    assert len(found) == 2, found
    assert all("commands.keyring" in f and "key[0] (holder phys-anna)" in f for f in found)
    assert any("roles: unknown role(s) ['surgeon']" in f for f in found)
    assert any("valid_from:" in f for f in found)


def test_missing_keyring_unknown_key_and_inbox_without_keyring(
    tmp_path: Path, registry: DriverRegistry
) -> None:
    found = issues(site(tmp_path, 'keyring = "nope.toml"\nmax_per_minute = 0'), registry)
    assert any("max_per_minute" in f for f in found), found
    cfg = site(tmp_path, 'keyring = "nope.toml"')
    assert any("commands.keyring" in f and "file not found" in f for f in issues(cfg, registry))
    cfg = site(tmp_path, 'inbox = "in"')
    assert any(
        "commands.inbox" in f and "needs commands.keyring" in f for f in issues(cfg, registry)
    )
    cfg = site(tmp_path, 'keyrings = "k.toml"')
    assert any("keyrings" in f for f in issues(cfg, registry))


def test_the_keyring_may_be_a_credential(
    tmp_path: Path, registry: DriverRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "iort-keyring").write_text(GOOD)
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    cfg = site(tmp_path, 'keyring = "credential:iort-keyring"')
    assert load_config(cfg, registry).config.commands.keyring == creds / "iort-keyring"


# ---- [verification] (daemon/verifier.py) -------------------------------------------------


def test_verification_is_on_exactly_with_a_keyring_and_its_table_resolves(
    tmp_path: Path, registry: DriverRegistry
) -> None:
    cfg = site(tmp_path, "")
    c = load_config(cfg, registry).config
    assert c.verification.on(c.commands.keyring) is False
    table = (ROOT / "config" / "doserate" / "axxent.toml").read_text(encoding="utf-8")
    cfg = site(
        tmp_path,
        'keyring = "keyring.toml"\n[verification]\ndoserate_table = "table.toml"\n'
        'require_output_factor = false\napplicator_types = { BAL34 = "balloon" }',
    )
    (cfg.parent / "keyring.toml").write_text(GOOD)
    (cfg.parent / "table.toml").write_text(table)
    c = load_config(cfg, registry).config
    assert c.verification.on(c.commands.keyring) is True
    assert c.verification.doserate_table == cfg.parent / "table.toml"
    assert c.verification.require_output_factor is False
    assert c.verification.applicator_types == {"BAL34": "balloon"}


def test_verification_on_without_a_keyring_and_a_bad_table_are_issues(
    tmp_path: Path, registry: DriverRegistry
) -> None:
    cfg = site(tmp_path, '[verification]\nenabled = true\ndoserate_table = "table.toml"')
    (cfg.parent / "table.toml").write_text("format = 1\n")
    found = issues(cfg, registry)
    assert any("verification.enabled" in i and "commands.keyring" in i for i in found), found
    assert any("verification.doserate_table" in i and "table.toml" in i for i in found), found
