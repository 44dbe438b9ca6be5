"""``iort-audit keyring add/list/check`` (audit/keyring_cli.py): enrol a keygen key, list
without keys, every problem named, and a refused add leaves the file as it was."""

from __future__ import annotations

from pathlib import Path

import pytest

from iortd.audit.cli import main
from iortd.auditlog.keyring import load_keyring
from iortd.auditlog.note import generate_keypair, write_keypair

WINDOW = ["--valid-from", "2026-01-01T00:00:00Z", "--valid-until", "2099-01-01T00:00:00Z"]


def add(ring: Path, pub: Path, holder: str, *extra: str) -> int:
    args = ["keyring", "add", str(ring), "--holder", holder, "--name", "A. Example"]
    return main([*args, "--role", "physicist", "--pubkey", str(pub), *WINDOW, *extra])


def test_add_list_check(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    signer = generate_keypair("phys-anna")
    _, pub = write_keypair(signer, tmp_path)
    ring = tmp_path / "keyring.toml"
    assert add(ring, pub, "phys-anna", "--role", "admin") == 0
    entry = load_keyring(ring).entries[0]
    assert entry.roles == {"physicist", "admin"}
    assert entry.verifier.text == signer.verifier.text
    capsys.readouterr()
    assert main(["keyring", "list", str(ring)]) == 0
    out = capsys.readouterr().out
    assert "phys-anna\tA. Example\tadmin,physicist\t" in out
    assert "valid now" in out
    assert signer.verifier.text.split("+", 2)[2] not in out  # no key material
    assert main(["keyring", "check", str(ring)]) == 0


def test_a_refused_add_changes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _, pub = write_keypair(generate_keypair("phys-anna"), tmp_path)
    ring = tmp_path / "keyring.toml"
    assert add(ring, pub, "phys-anna") == 0
    before = ring.read_bytes()
    assert add(ring, pub, "phys-bob") == 2  # the key is another holder's
    assert "not of --holder 'phys-bob'" in capsys.readouterr().err
    ring.write_bytes(before + b"\n[[key]]\nholder = 'x'\n")
    assert main(["keyring", "check", str(ring)]) == 1
    err = capsys.readouterr().err
    assert f"{ring}: key[1] (holder x): missing key 'public_key'" in err
    broken = ring.read_bytes()
    assert add(ring, pub, "phys-anna") == 1
    assert ring.read_bytes() == broken
