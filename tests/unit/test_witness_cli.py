"""iort-witness's configuration and command line, in process (witness/config.py,
witness/cli.py): every error names the file and the key and exits 2."""

from __future__ import annotations

from pathlib import Path

import pytest

from iortd.auditlog.cosignature import CosignerVerifier, load_cosigner
from iortd.auditlog.note import generate_keypair
from iortd.witness.cli import main
from iortd.witness.config import load_config

ORIGIN = "iortd/site-a/or-1/5f0c"


@pytest.fixture
def site(tmp_path: Path) -> Path:
    assert main(["keygen", "witness.example.org/w1", "--out", str(tmp_path / "w.key")]) == 0
    return tmp_path


def write(site: Path, witness: str = "", logs: str | None = None) -> Path:
    vkey = generate_keypair("iortd-or-1").verifier.text
    if logs is None:
        logs = f'[[logs]]\norigin = "{ORIGIN}"\nvkeys = ["{vkey}"]\n'
    path = site / "witness.toml"
    path.write_text(
        '[witness]\nlisten = "127.0.0.1:7380"\nkey_file = "w.key"\ndatabase = "db/w.sqlite"\n'
        + witness
        + logs,
        "utf-8",
    )
    return path


def test_keygen_writes_the_key_and_prints_the_cosigner_vkey(
    site: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["keygen", "witness.example.org/w2", "--out", str(site / "w2.key")]) == 0
    out = capsys.readouterr().out
    key = load_cosigner(site / "w2.key")
    assert key.verifier.text in out.splitlines()
    assert CosignerVerifier.parse((site / "w2.pub").read_text("ascii")) == key.verifier
    assert main(["keygen", "witness.example.org/w1", "--out", str(site / "w.key")]) == 2
    assert "not overwriting" in capsys.readouterr().err
    assert main(["keygen", "has space", "--out", str(site / "x.key")]) == 2
    assert not (site / "x.key").exists()


def test_a_good_config_reads_whole(site: Path) -> None:
    cfg = load_config(write(site, "request_timeout_s = 3\n"))
    assert cfg.listen == ("127.0.0.1", 7380)
    assert cfg.database == site / "db" / "w.sqlite"
    assert list(cfg.logs) == [ORIGIN]
    assert cfg.request_timeout_s == 3.0
    assert cfg.key.name == "witness.example.org/w1"


@pytest.mark.parametrize(
    ("witness", "logs", "names"),
    [
        ("lissten = 1\n", None, "unknown key witness.lissten"),
        ("", '[[logs]]\norigin = "o"\nvkey = "x"\n', "unknown key logs[0].vkey"),
        ("", '[[logs]]\norigin = "o"\nvkeys = ["nope"]\n', "logs[0].vkeys[0]"),
        ("", '[[logs]]\norigin = "o"\nvkeys = []\n', "logs[0].vkeys"),
        ("", "", "[[logs]]"),
        ("request_timeout_s = 0\n", None, "witness.request_timeout_s"),
        ("max_body_bytes = 10\n", None, "witness.max_body_bytes"),
    ],
)
def test_config_errors_name_the_key(
    site: Path, capsys: pytest.CaptureFixture[str], witness: str, logs: str | None, names: str
) -> None:
    path = write(site, witness, logs)
    assert main(["status", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert str(path) in err
    assert names in err


def test_a_repeated_origin_a_host_name_and_a_readable_key_are_refused(
    site: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    vkey = generate_keypair("iortd-or-1").verifier.text
    twice = f'[[logs]]\norigin = "o"\nvkeys = ["{vkey}"]\n' * 2
    assert main(["status", "--config", str(write(site, "", twice))]) == 2
    assert "configured twice" in capsys.readouterr().err
    path = write(site)
    path.write_text(path.read_text("utf-8").replace("127.0.0.1:7380", "localhost:7380"), "utf-8")
    assert main(["serve", "--config", str(path)]) == 2
    assert "witness.listen" in capsys.readouterr().err
    (site / "w.key").chmod(0o644)
    assert main(["serve", "--config", str(write(site))]) == 2
    assert "chmod 600" in capsys.readouterr().err


def test_status_before_anything_was_cosigned(
    site: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    capsys.readouterr()
    assert main(["status", "--config", str(write(site))]) == 0
    assert f"{ORIGIN}: never cosigned" in capsys.readouterr().out
    assert not (site / "db").exists()  # status never creates the state
