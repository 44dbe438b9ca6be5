"""`iortd fabric-config` and `iortd.daemon.fabric`: the spec's checks (every error names
its key), the generated files (the bridge settings that hold, queues sized from the spec,
ACLs that keep a room to its own topics), secrets that are kept across runs, ``--check``
and the exit codes. The real brokers run in tests/integration/test_fabric_bridges.py."""

from __future__ import annotations

import logging
import os
import shutil
import stat
import subprocess
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog

from iortd.daemon.cli import main
from iortd.daemon.fabric import (
    SpecError,
    check_fabric,
    load_spec,
    parse_spec,
    room_user,
    write_fabric,
)
from iortd.daemon.fabric.render import central_limits, site_limits
from iortd.daemon.fabric.secrets import hash_line, matches

EXAMPLE = Path(__file__).resolve().parents[2] / "config" / "fabric" / "fabric.example.toml"


@pytest.fixture
def _logging_restored() -> Iterator[None]:
    """``main`` configures logging onto the stderr pytest captures and then closes: put
    back what was there, or later tests log into a closed file."""
    saved = structlog.get_config()
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    structlog.configure(**saved)
    root.handlers[:] = handlers
    root.setLevel(level)


def example() -> dict[str, Any]:
    return tomllib.loads(EXAMPLE.read_text("utf-8"))


def issues(data: dict[str, Any]) -> list[tuple[str, str]]:
    with pytest.raises(SpecError) as info:
        parse_spec(data)
    return [(i.key, i.message) for i in info.value.issues]


def test_example_spec_is_valid() -> None:
    spec = load_spec(EXAMPLE)
    assert [s.id for s in spec.sites] == ["hospital-a", "hospital-b"]
    assert spec.room_count == 3


@pytest.mark.parametrize(
    ("change", "key", "words"),
    [
        (lambda d: d["central"].update(colour="red"), "central.colour", "unknown key"),
        (lambda d: d["sites"][1].update(rooms=["or-1", "OR 2"]), "sites[1].rooms[1]", "slug"),
        (lambda d: d["sites"][0].update(rooms=["or-1", "or-1"]), "sites[0]", "'or-1' given twice"),
        (lambda d: d["sites"][1].update(id="hospital-a"), "", "'hospital-a' given twice"),
        (lambda d: d["sites"][0].update(id="_bridge"), "sites[0].id", "slug"),
        (lambda d: d["central"].pop("certfile"), "central.certfile", "required"),
        (lambda d: d["central"].update(cafile="ca.pem"), "central.cafile", "absolute path"),
        (lambda d: d["central"].update(keyfile="/etc/my key"), "central.keyfile", "without spaces"),
        (lambda d: d["central"].update(client_port=8884), "central", "must all differ"),
        (lambda d: d["bridge"].update(restart_timeout_s=[10, 1]), "bridge", "restart_timeout_s"),
        (lambda d: d["bridge"].update(outage_s=5), "bridge.outage_s", "greater than or equal"),
        (
            lambda d: d["central"]["accounts"].append({"name": "iortd-x-y", "role": "observer"}),
            "central",
            "rooms' and bridges' own",
        ),
        (
            lambda d: d["central"]["accounts"].append({"name": "ops", "role": "admin"}),
            "central.accounts[3].role",
            "dashboard",
        ),
        (
            lambda d: d["sites"][0].update(password="x"),  # noqa: S106 - refused, never used
            "sites[0].password",
            "no password",
        ),
    ],
)
def test_spec_errors_name_the_key(change: Any, key: str, words: str) -> None:
    data = example()
    change(data)
    found = issues(data)
    assert any(k == key and words in m for k, m in found), found


def test_generated_files_carry_the_bridge_settings_that_hold(tmp_path: Path) -> None:
    spec = load_spec(EXAMPLE)
    files = write_fabric(spec, tmp_path)
    conf = files.sites["hospital-a"].conf.read_text()
    for line in (
        "address central.example.org:8884",
        "bridge_protocol_version mqttv50",
        "cleansession false",
        "keepalive_interval 5",
        "restart_timeout 1 10",
        "notifications true",
        "notification_topic iort/v1/_bridge/hospital-a/state",
        "topic iort/v1/hospital-a/# out 1",
        "topic iort/v1/hospital-a/+/cmd/# in 1",
        "bridge_certfile /etc/mosquitto/iortd/bridge-hospital-a.pem",
        "bridge_insecure false",
        "autosave_on_changes true",
        "autosave_interval 100",
        "persistence true",
        "max_queued_messages 108000",  # 2 rooms x 15 msg/s x 3600 s
        f"max_queued_bytes {108000 * 1024}",
        "allow_anonymous false",
        "password_file /etc/mosquitto/iortd/passwd",
    ):
        assert line + "\n" in conf, line
    central = files.central.conf.read_text()
    for line in (
        "listener 8884 0.0.0.0",
        "require_certificate true",
        "use_identity_as_username true",
        "listener 8883 0.0.0.0",
        "max_queued_messages 162000",  # 3 rooms x 15 msg/s x 3600 s
    ):
        assert line + "\n" in central, line
    # No password in any config text: only in secret files and as hashes.
    for b in files.all():
        text = b.conf.read_text() + b.acl.read_text() + b.passwd.read_text()
        for secret in b.passwords.values():
            assert secret.read_text().strip() not in text


def test_queue_limits_follow_the_spec() -> None:
    data = example()
    data["bridge"].update(outage_s=600, room_msgs_per_s=10.0, message_bytes=2000)
    spec = parse_spec(data)
    assert site_limits(spec, spec.sites[0]).messages == 2 * 10 * 600
    assert site_limits(spec, spec.sites[0]).bytes == 2 * 10 * 600 * 2000
    # Never below a floor (a tiny site still rides out a burst).
    assert site_limits(spec, spec.sites[1]).messages == 10_000
    assert central_limits(spec).messages == 3 * 10 * 3600


def test_room_acl_is_its_own_topics_and_commands_only(tmp_path: Path) -> None:
    files = write_fabric(load_spec(EXAMPLE), tmp_path)
    acl = files.sites["hospital-a"].acl.read_text()
    block = acl.split(f"user {room_user('hospital-a', 'or-1')}\n")[1].split("\n\n")[0]
    lines = block.splitlines()
    writes = [ln.split()[-1] for ln in lines if ln.startswith(("topic write", "topic readwrite"))]
    assert all(t.startswith("iort/v1/hospital-a/or-1/") for t in writes), writes
    assert not any("cmd" in t or "#" in t or "+" in t for t in writes), writes
    reads = [ln.split()[-1] for ln in lines if ln.startswith(("topic read ", "topic readwrite"))]
    assert sorted(reads) == [
        "iort/v1/hospital-a/or-1/audit/checkpoint",
        "iort/v1/hospital-a/or-1/cmd/#",
        "iort/v1/hospital-a/or-1/status",
    ]
    # A site's dashboard sees its rooms directly: it must not read the site's link to the
    # centre (it would show them UNKNOWN while only the centre is cut off).
    site_dash = acl.split("user dashboard\n")[1].split("\n\n")[0]
    assert "_bridge" not in site_dash
    central = files.central.acl.read_text()
    bridge = central.split("user bridge-hospital-a\n")[1].split("\n\n")[0].splitlines()
    assert bridge == [
        "topic write iort/v1/hospital-a/#",
        "topic read iort/v1/hospital-a/+/cmd/#",
        "topic write iort/v1/_bridge/hospital-a/state",
    ]


def test_secrets_are_made_once_and_kept(tmp_path: Path) -> None:
    spec = load_spec(EXAMPLE)
    first = write_fabric(spec, tmp_path)
    user = room_user("hospital-a", "or-1")
    secret = first.sites["hospital-a"].passwords[user]
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "secrets").stat().st_mode) == 0o700
    password = secret.read_text().strip()
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    write_fabric(spec, tmp_path)
    after = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    assert after == before  # same spec, same secrets: same bytes (salts kept too)
    line = next(
        ln
        for ln in first.sites["hospital-a"].passwd.read_text().splitlines()
        if ln.startswith(user)
    )
    assert matches(line, user, password)
    assert not matches(line, user, password + "x")
    assert check_fabric(spec, tmp_path) == []


@pytest.mark.skipif(shutil.which("mosquitto_passwd") is None, reason="mosquitto-clients")
def test_password_lines_agree_with_mosquitto_passwd(tmp_path: Path) -> None:
    pw = tmp_path / "pw"
    pw.write_text("")
    subprocess.run(["mosquitto_passwd", "-b", str(pw), "alice", "s3cret-token-xyz"], check=True)
    assert matches(pw.read_text().strip(), "alice", "s3cret-token-xyz")
    assert matches(hash_line("bob", "another-token-1234"), "bob", "another-token-1234")


@pytest.mark.usefixtures("_logging_restored")
def test_cli_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    assert main(["fabric-config", "--spec", str(EXAMPLE), "--out", str(out), "--check"]) == 1
    assert "secret file missing" in capsys.readouterr().out
    assert main(["fabric-config", "--spec", str(EXAMPLE), "--out", str(out)]) == 0
    assert "site hospital-a" in capsys.readouterr().out
    assert main(["fabric-config", "--spec", str(EXAMPLE), "--out", str(out), "--check"]) == 0
    acl = out / "sites" / "hospital-b" / "acl"
    acl.write_text(acl.read_text() + "topic write #\n")
    assert main(["fabric-config", "--spec", str(EXAMPLE), "--out", str(out), "--check"]) == 1
    assert f"{acl}: differs" in capsys.readouterr().out
    bad = tmp_path / "bad.toml"
    bad.write_text(EXAMPLE.read_text().replace('id = "hospital-b"', 'id = "Hospital B"'))
    assert main(["fabric-config", "--spec", str(bad), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"{bad}: sites[1].id: expected a lower-case slug" in err
    assert main(["fabric-config", "--spec", str(tmp_path / "none.toml"), "--out", str(out)]) == 2
    assert "file not found" in capsys.readouterr().err


@pytest.mark.usefixtures("_logging_restored")
def test_unusable_secret_file_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    secret = out / "secrets" / "central" / "dashboard.password"
    secret.parent.mkdir(parents=True)
    secret.write_text("short\n")
    os.chmod(secret, 0o600)
    assert main(["fabric-config", "--spec", str(EXAMPLE), "--out", str(out)]) == 2
    assert f"{secret}: expected 16 to 200 characters" in capsys.readouterr().err
