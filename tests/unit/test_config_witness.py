"""``[[witness]]`` tables at config load: name, url, vkey (the line iort-witness keygen
prints), timeout_s, alarm_after_s; each problem names the file and the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from iortd.auditlog.cosignature import CosignerKey
from iortd.daemon.config import ConfigError, load_config
from iortd.drivers.registry import DriverRegistry

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "config" / "demo.toml"
VKEY = CosignerKey.generate("witness.example.org/w1").verifier.text


def config_with(tmp_path: Path, tables: str) -> Path:
    text = DEMO.read_text("utf-8").replace('directory = "', f'directory = "{tmp_path}/', 1)
    path = tmp_path / "site.toml"
    path.write_text(text + "\n" + tables, encoding="utf-8")
    return path


def problems(path: Path) -> list[tuple[str, str]]:
    with pytest.raises(ConfigError) as excinfo:
        load_config(path, DriverRegistry.from_entry_points())
    return [(i.key, i.message) for i in excinfo.value.issues]


def test_witness_tables_load(tmp_path: Path) -> None:
    path = config_with(
        tmp_path,
        f'[[witness]]\nname = "w1"\nurl = "http://10.0.0.5:7380/"\nvkey = "{VKEY}"\n'
        f'[[witness]]\nname = "w2"\nurl = "https://w.example.org/iort"\nvkey = "{VKEY}"\n'
        "timeout_s = 3\nalarm_after_s = 600\n",
    )
    c = load_config(path, DriverRegistry.from_entry_points()).config
    assert [(w.name, w.timeout_s, w.alarm_after_s) for w in c.witness] == [
        ("w1", 10.0, 900.0),
        ("w2", 3.0, 600.0),
    ]
    assert c.witness[0].vkey == VKEY


def test_bad_witness_tables_name_the_key(tmp_path: Path) -> None:
    plain = "iortd-or-1+1a2b3c4d+AXb9XwvtbZNPeGLrTkbCz9vnhFkxEw2Jt6pwEHKbaOXs"
    path = config_with(
        tmp_path,
        f'[[witness]]\nname = "W 1"\nurl = "ftp://x/"\nvkey = "{plain}"\nextra = 1\n'
        f'[[witness]]\nname = "w2"\nurl = "http://h/?token=x"\nvkey = "{VKEY}"\n',
    )
    got = dict(problems(path))
    assert "witness[0].name" in got
    assert "http(s)://HOST" in got["witness[0].url"]
    assert "iort-witness keygen" in got["witness[0].vkey"]
    assert "witness[0].extra" in got
    assert "no query" in got["witness[1].url"]


def test_witness_names_are_unique(tmp_path: Path) -> None:
    path = config_with(
        tmp_path,
        f'[[witness]]\nname = "w2"\nurl = "http://h/"\nvkey = "{VKEY}"\n'
        f'[[witness]]\nname = "w2"\nurl = "http://h/"\nvkey = "{VKEY}"\n',
    )
    assert problems(path) == [("witness", "witness names must be unique: w2 given twice")]


def test_check_config_lists_the_witnesses(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import argparse  # noqa: PLC0415

    from iortd.daemon.check import check_config  # noqa: PLC0415

    path = config_with(
        tmp_path,
        f'[[witness]]\nname = "w1"\nurl = "http://10.0.0.5:7380/"\nvkey = "{VKEY}"\n'
        "alarm_after_s = 600\n",
    )
    assert check_config(argparse.Namespace(file=path, credential=[])) == 0
    name_id = VKEY.rsplit("+", 1)[0]
    assert (
        f"witness w1: http://10.0.0.5:7380/ (key {name_id}); alarm after 10 min without a "
        "cosignature"
    ) in capsys.readouterr().out
