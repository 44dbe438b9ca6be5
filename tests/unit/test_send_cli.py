"""``iort-audit send`` (audit/send_cli.py) without a DICOM peer: what it reads of the site
config and the exit status of each way it can refuse. Against Orthanc and storescp:
tests/integration/test_dicom_peers.py."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from iortd.audit import cli

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "golden-log"
DELIVERY = "or-5-20261206T035245018711Z"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def site(
    tmp_path: Path, options: str = "", dest: str = "", port: int = 104, ae: str = "IORTD_OR9"
) -> Path:
    path = tmp_path / "site.toml"
    path.write_text(
        f"""
[site]
id = "report-site"
room = "or-9"
[log]
directory = "{FIXTURE / "log"}"
[[sinks]]
type = "mqtt-extra"
[[sinks]]
type = "dicom"
[sinks.options]
calling_ae = "{ae}"
{options}
[[sinks.options.destinations]]
name = "ois"
ae_title = "OIS_SCP"
host = "127.0.0.1"
port = {port}
timeout_s = 5
{dest}
""",
        "utf-8",
    )
    return path


def run(config: Path, *extra: str, to: str = "ois") -> int:
    return cli.main(["send", "--delivery", DELIVERY, "--to", to, "--config", str(config), *extra])


@pytest.mark.parametrize(
    ("options", "dest", "to", "message"),
    [
        ("", "", "pacs", "--to pacs: no such destination in {site} (destinations: ois)"),
        ("", "colour = 1", "ois", "{site}: sinks[1].options.destinations[0].colour: unknown"),
        ('send = ["images"]', "", "ois", "{site}: sinks[1].options.send: ['images']"),
        ('when = "later"', "", "ois", "{site}: sinks[1].options.when: 'later'"),
        ("ae=A\\\\B", "", "ois", "{site}: sinks[1].options.calling_ae: 'A\\\\B' is not"),
        ("", "commitment = true", "ois", "--to ois: commitment = true needs our listener"),
    ],
)
def test_config_problems_are_usage_errors_naming_the_key(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    options: str,
    dest: str,
    to: str,
    message: str,
) -> None:
    if options.startswith("ae="):
        config = site(tmp_path, dest=dest, ae=options.removeprefix("ae="))
    else:
        config = site(tmp_path, options, dest)
    assert run(config, to=to) == 2
    err = capsys.readouterr().err
    assert message.format(site=config) in err, err


def test_a_config_that_is_not_there_or_not_toml(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(tmp_path / "nope.toml") == 2
    assert f"--config {tmp_path / 'nope.toml'}:" in capsys.readouterr().err
    bad = tmp_path / "bad.toml"
    bad.write_text("[log\n")
    assert run(bad) == 2
    assert "not a TOML file" in capsys.readouterr().err
    none = tmp_path / "none.toml"
    none.write_text(f'[log]\ndirectory = "{FIXTURE / "log"}"\n')
    assert run(none) == 2
    assert "none: the config has no [[sinks]] type = dicom" in capsys.readouterr().err


def test_a_site_that_sends_only_signed_deliveries_refuses_an_unsigned_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(site(tmp_path, 'when = "signoff"')) == 1
    out, err = capsys.readouterr()
    assert "has no sign-off in the log" in err
    assert "sending" not in out


def test_no_such_delivery_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = site(tmp_path)
    rc = cli.main(["send", "--delivery", "or-5-nope", "--to", "ois", "--config", str(config)])
    assert rc == 2
    assert "no such delivery" in capsys.readouterr().err


def test_an_unreachable_destination_is_exit_1_with_each_instance_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = site(tmp_path, 'send = ["record"]', port=_free_port())
    assert run(config, "--pubkey", str(FIXTURE / "or-9.pub")) == 1
    out, _ = capsys.readouterr()
    lines = out.splitlines()
    assert lines[0].startswith(f"sending delivery {DELIVERY} to ois (OIS_SCP at 127.0.0.1:")
    assert lines[0].endswith(" as IORTD_OR9")
    assert len(lines) == 2
    assert lines[1].startswith("  UNREACHABLE RT Beams Treatment Record 2.25.")
    assert "no connection to 127.0.0.1" in lines[1]


def test_the_archive_of_the_config_is_verified_with_the_log(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """[log.retention] archive_dir: the log is verified across the directory and the
    archive (a log whose oldest segments retention moved away verifies only so)."""
    archive = tmp_path / "archive"
    archive.mkdir()
    (seg,) = (FIXTURE / "log").glob("log-*.jsonl")
    (archive / seg.name).write_bytes(seg.read_bytes()[:-10] + b"x" * 10)
    config = site(tmp_path, 'send = ["record"]', port=_free_port())
    text = config.read_text().replace(
        "[[sinks]]", '[log.retention]\narchive_dir = "archive"\n[[sinks]]', 1
    )
    config.write_text(text)
    assert run(config) == 1
    assert "differs from its archived copy" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert run(config, "--archive", str(empty)) == 1  # verified; nobody listening
    assert "UNREACHABLE" in capsys.readouterr().out


def test_echo_checks_the_link_without_a_delivery(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = site(tmp_path, port=_free_port())
    rc = cli.main(["send", "--echo", "--to", "ois", "--config", str(config)])
    assert rc == 1, "nobody listens"
    out = capsys.readouterr().out
    assert out.startswith("C-ECHO to ois (OIS_SCP at 127.0.0.1:")
    assert "UNREACHABLE" in out
    # neither --delivery nor --echo: a usage error
    assert cli.main(["send", "--to", "ois", "--config", str(config)]) == 2
    assert "--delivery ID or --echo" in capsys.readouterr().err
