"""`iortd demo` without Mosquitto installed: it says how to install it and runs on
without the stream, rather than failing or reaching for a system broker."""

from __future__ import annotations

import argparse
import contextlib
import tempfile
from pathlib import Path

import pytest

from iortd.daemon import demo
from iortd.daemon.mqtt.broker import MOSQUITTO_INSTALL_HINT


def test_no_mosquitto_means_no_stream_and_the_exact_install_command(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    monkeypatch.setattr(demo, "find_mosquitto", lambda: None)
    with contextlib.ExitStack() as stack:
        assert demo._embedded_broker(stack, tmp_path / "mqtt") is None
    err = capsys.readouterr().err
    assert "Mosquitto is not installed" in err
    assert MOSQUITTO_INSTALL_HINT in err
    assert "apt-get install -y mosquitto" in err
    assert "--broker" in err


def test_demo_turns_mqtt_off_when_there_is_no_broker() -> None:
    overrides = {"log": {"directory": "demo-log"}}
    off = demo._mqtt_off(overrides)
    assert off["mqtt"] == {"enabled": False}
    assert off["log"] == overrides["log"]
    assert "mqtt" not in overrides  # the caller's overrides are not changed


def test_no_room_for_the_scratch_directory_is_a_usage_error_naming_the_place(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """The demo's temporary directory cannot be made (here: the temporary directory is a
    file): exit 2, saying where and what to do, before any process is started."""
    not_a_dir = tmp_path / "tmp-is-a-file"
    not_a_dir.write_text("")
    monkeypatch.setattr(tempfile, "tempdir", str(not_a_dir))
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    monkeypatch.setattr(demo, "find_mosquitto", _must_not_be_called)
    args = argparse.Namespace(
        config=None,
        speed=None,
        duration=None,
        log_dir=tmp_path / "log",
        broker=None,
        no_dashboard=True,
    )
    assert demo.run_demo(args) == 2
    err = capsys.readouterr().err
    assert str(not_a_dir) in err
    assert "TMPDIR" in err


def _must_not_be_called() -> None:
    raise AssertionError("the broker was looked for after the scratch directory failed")
