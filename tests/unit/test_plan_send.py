"""``iort-plan send`` (plan/send.py): what it refuses before signing, the signed command it
builds (verified with the daemon's own checks), the inbox write, and what it never prints."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import orjson
import pytest

from iortd.auditlog.command import NonceBook, check_command
from iortd.auditlog.keyring import parse_keyring
from iortd.auditlog.note import generate_keypair, write_keypair
from iortd.plan.cli import main

CURIE = generate_keypair("phys.curie")
RING = parse_keyring(
    (
        f'[[key]]\nholder = "phys.curie"\nname = "Staff"\nroles = ["physicist"]\n'
        f'public_key = "{CURIE.verifier.text}"\nvalid_from = "2026-01-01T00:00:00Z"\n'
        'valid_until = "2099-01-01T00:00:00Z"\n'
    ).encode(),
    Path("keyring.toml"),
)


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    key, _ = write_keypair(CURIE, tmp_path / "keys")
    other, _ = write_keypair(generate_keypair("phys-anna"), tmp_path / "keys")
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    return {"key": key, "other": other, "inbox": inbox, "dir": tmp_path}


def new_rx(directory: Path, *, approved_at: datetime | None = None, hours: str = "12") -> Path:
    at = approved_at or datetime.now(UTC) - timedelta(minutes=1)
    out = directory / "rx.json"
    code = main(
        [
            *("new", "--treatment-id", "T-2026-0042", "--plan-id", "IORT-P1"),
            *("--dose-gy", "20", "--applicator", "SPH30", "--diameter-mm", "30"),
            *("--planned-time-min", "23", "--approved-by", "phys.curie"),
            *("--approved-at", at.strftime("%Y-%m-%dT%H:%M:%SZ"), "--valid-hours", hours),
            *("--out", str(out)),
        ]
    )
    assert code == 0
    return out


def send(rx: Path, key: Path, inbox: Path, holder: str = "phys.curie") -> list[str]:
    return [
        *("send", str(rx), "--key", str(key), "--holder", holder),
        *("--site", "site-a", "--room", "or-3", "--inbox", str(inbox)),
    ]


def test_into_the_inbox_a_command_the_daemon_accepts(
    files: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    rx = new_rx(files["dir"])
    capsys.readouterr()
    assert main(send(rx, files["key"], files["inbox"])) == 0
    out, err = capsys.readouterr()
    [written] = list(files["inbox"].iterdir())  # one whole file, no hidden leftover
    assert not written.name.startswith(".")
    raw = written.read_bytes()
    cmd = check_command(
        raw, RING, site="site-a", room="or-3", now=datetime.now(UTC), skew_s=60, seen=NonceBook(60)
    )
    assert cmd.kind == "prescription"
    assert cmd.signer == "phys.curie"
    assert cmd.body == orjson.loads(rx.read_bytes())  # the body is the prescription
    assert cmd.nonce in out
    assert "PRIVATE" not in out + err
    # the key's base64 (itself may hold '+': split at the first four only, or a fragment
    # of two letters could be looked for, and found by chance in a nonce)
    secret = CURIE.text.split("+", 4)[4]
    assert len(secret) > 40
    assert secret not in out + err + raw.decode()


def test_refused_before_signing(files: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    rx = new_rx(files["dir"], approved_at=datetime.now(UTC) - timedelta(hours=3), hours="1")
    assert main(send(rx, files["key"], files["inbox"])) == 1
    assert "expired" in capsys.readouterr().err
    rx = new_rx(files["dir"])
    # signed by someone who did not approve it: refused (1), whatever the key
    assert main(send(rx, files["other"], files["inbox"], holder="phys-anna")) == 1
    assert "approved by phys.curie, not by --holder phys-anna" in capsys.readouterr().err
    # the approver's id with someone else's key: usage (2)
    assert main(send(rx, files["other"], files["inbox"])) == 2
    assert "the key is phys-anna's" in capsys.readouterr().err
    rx.write_text('{"v": 1}')
    assert main(send(rx, files["key"], files["inbox"])) == 1
    assert list(files["inbox"].iterdir()) == []  # nothing was sent


def test_a_broker_that_is_not_there_is_not_acknowledged(
    files: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    import socket  # noqa: PLC0415

    with socket.socket() as s:  # a free port, closed: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    rx = new_rx(files["dir"])
    argv = send(rx, files["key"], files["inbox"])
    argv[argv.index("--inbox") : argv.index("--inbox") + 2] = [
        "--broker",
        f"mqtt://127.0.0.1:{port}",
    ]
    assert main(argv) == 1
    assert "not sent or not acknowledged" in capsys.readouterr().err
    assert main([*argv[:-1], "mqtt://user:pw@127.0.0.1"]) == 2  # credentials in a URL
