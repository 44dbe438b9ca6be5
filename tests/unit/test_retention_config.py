"""``[log.retention]``: validated with everything else; each problem names its key."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

from iortd.daemon.cli import main as cli_main
from iortd.daemon.config import ConfigError, load_config
from iortd.drivers.registry import DriverRegistry

DEMO = Path(__file__).resolve().parents[2] / "config" / "demo.toml"


def load(tmp_path: Path, retention: str) -> object:
    path = tmp_path / "site.toml"
    path.write_text(DEMO.read_text("utf-8") + "\n[log.retention]\n" + retention, "utf-8")
    return load_config(path, DriverRegistry.from_entry_points())


def issue(tmp_path: Path, retention: str) -> tuple[str, str]:
    with pytest.raises(ConfigError) as err:
        load(tmp_path, retention)
    assert len(err.value.issues) == 1, err.value.issues
    return err.value.issues[0].key, err.value.issues[0].message


def test_defaults_and_archive_resolved_against_the_config_file(tmp_path: Path) -> None:
    (tmp_path / "share").mkdir()
    loaded = load(tmp_path, 'archive_dir = "share"\n')
    ret = loaded.config.log.retention  # type: ignore[attr-defined]
    assert ret.archive_dir == tmp_path / "share"
    assert (ret.budget_mb, ret.warn_fraction, ret.keep_fraction) == (4096, 0.8, 0.7)
    assert ret.archive_mount_required is True


@pytest.mark.parametrize(
    ("text", "key", "words"),
    [
        ('archive_dir = "demo-log/archive"\n', "log.retention.archive_dir", "inside log.directory"),
        ('archive_dir = "."\n', "log.retention.archive_dir", "holds log.directory"),
        ('archive_dir = "missing"\n', "log.retention.archive_dir", "not a directory"),
        ("budget_mb = 100\n", "log.retention.budget_mb", "fewer than 4 segments"),
        ("warn_fraction = 0.6\n", "log.retention", "keep_fraction must be below"),
        ("warn_fraction = 1.5\n", "log.retention.warn_fraction", "less than 1"),
        ("budget = 10\n", "log.retention.budget", "unknown key"),
    ],
)
def test_each_problem_names_its_key(tmp_path: Path, text: str, key: str, words: str) -> None:
    got_key, message = issue(tmp_path, text)
    assert got_key == key
    assert words in message


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


@pytest.mark.usefixtures("_logging_restored")
def test_check_config_says_what_retention_will_do_on_this_host(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "share").mkdir()
    path = tmp_path / "site.toml"
    path.write_text(DEMO.read_text("utf-8") + '\n[log.retention]\narchive_dir = "share"\n')
    assert cli_main(["check-config", str(path)]) == 0
    out = capsys.readouterr().out
    assert f"archive_dir {tmp_path / 'share'} is not a mount point now" in out
