"""A sink plug-in from another package, configured by ``[[sinks]]``, in a real `iortd run`.

The plug-in (tests/plugins/iortd_sink_recorder.py) is installed the way importlib.metadata
finds any distribution: a ``*.dist-info`` directory with an ``entry_points.txt`` on the
path (here ``PYTHONPATH`` of the daemon's process), so no wheel and no venv are built.
Two sinks of that type run beside the real MQTT sink on a real Mosquitto during a short
simulated delivery: ``fast``, and ``slow`` (a second per callback, a queue of 5). The fast
one and the MQTT stream get every sample and the delivery's end; the slow one's drops are
in the audit log. `iortd check-config` validates the plug-in's options through its own
factory.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from daemonproc import Daemon, Site
from mqttobs import Observer, dedupe

from iortd.daemon.mqtt.broker import BrokerOptions, Mosquitto

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
PLUGINS = ROOT / "tests" / "plugins"
IORTD = Path(sys.executable).with_name("iortd")


def install_plugin(site_dir: Path) -> dict[str, str]:
    """The environment of a process that sees the recorder plug-in as installed."""
    dist = site_dir / "iortd_sink_recorder-0.1.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: iortd-sink-recorder\nVersion: 0.1\n", encoding="utf-8"
    )
    (dist / "entry_points.txt").write_text(
        "[iort.sinks]\nrecorder = iortd_sink_recorder:RecorderFactory\n", encoding="utf-8"
    )
    path = os.pathsep.join([str(site_dir), str(PLUGINS)])
    return {**os.environ, "PYTHONPATH": path}


def sinks_tables(tmp_path: Path) -> str:
    return f"""
[[sinks]]
type = "recorder"
name = "slow"
queue_size = 5
[sinks.options]
path = "{tmp_path / "slow.jsonl"}"
delay_s = 1.0

[[sinks]]
type = "recorder"
name = "fast"
[sinks.options]
path = "fast.jsonl"  # relative: taken from the config file's folder
"""


def records(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text("utf-8").splitlines() if line]


def audit_entries(log_dir: Path) -> list[dict[str, Any]]:
    out = []
    for seg in sorted(log_dir.glob("log-*.jsonl")):
        out += [json.loads(line) for line in seg.read_text("utf-8").splitlines() if line]
    return out


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Mosquitto]:
    with Mosquitto(BrokerOptions(persistence=False), tmp_path / "broker") as b:
        yield b


@pytest.fixture
async def observer(broker: Mosquitto) -> AsyncIterator[Observer]:
    obs = await Observer(broker.port).start()
    try:
        yield obs
    finally:
        await obs.stop()


async def test_a_plugin_sink_from_sinks_tables_gets_a_real_delivery_and_a_slow_one_delays_none(
    make_site: Callable[..., Site], tmp_path: Path, broker: Mosquitto, observer: Observer
) -> None:
    env = install_plugin(tmp_path / "site-packages")
    site = make_site(speed=300, poll=0.02, mqtt=f'url = "{broker.url}"\nkeepalive_s = 2')
    site.config.write_text(site.config.read_text("utf-8") + sinks_tables(tmp_path))
    daemon = await Daemon.follow(site, env=env)
    try:
        await daemon.seen(lambda r: r.get("event") == "delivery_terminated", "the delivery's end")
        # The end reaches the fast sink and the broker promptly, whatever the slow one does.
        await observer.wait_for(
            lambda m: m.name == "events" and m.payload["kind"] == "delivery_terminated",
            "the delivery's end on MQTT",
            within_s=5,
        )
        fast = tmp_path / "fast.jsonl"
        async with asyncio.timeout(5):
            # A file another process writes: a bounded poll (no event to wait on).
            while not any("Terminated" in r.get("kinds", ()) for r in records(fast)):  # noqa: ASYNC110
                await asyncio.sleep(0.05)
        assert await daemon.stop() == 0
    finally:
        await daemon.ensure_dead()

    samples = [e for e in audit_entries(site.log_dir) if e["type"] == "sample"]
    fast_recs, slow_recs = records(tmp_path / "fast.jsonl"), records(tmp_path / "slow.jsonl")
    # The fast plug-in: started, identified, every recorded sample, the events, closed.
    assert fast_recs[0] == {"cb": "start", "t": fast_recs[0]["t"], "simulated": True}
    assert [r["cb"] for r in fast_recs].count("started") == 1
    assert sum(r["cb"] == "sample" for r in fast_recs) == len(samples) > 50
    kinds = [k for r in fast_recs if r["cb"] == "events" for k in r["kinds"]]
    assert "DeliveryStarted" in kinds
    assert "Terminated" in kinds
    assert any(r["cb"] == "checkpoint" for r in fast_recs)
    assert fast_recs[-1]["cb"] == "close"
    # MQTT (policy block, fast callbacks): the whole stream.
    telemetry = dedupe(observer.of("telemetry"))
    assert len(telemetry) == len(samples)
    # The slow plug-in saw a few calls; what its queue dropped is in the record.
    assert sum(r["cb"] == "sample" for r in slow_recs) < len(samples) / 4
    dropped = [e["data"] for e in audit_entries(site.log_dir) if e["type"] == "sink_overflow"]
    assert dropped
    assert {d["sink"] for d in dropped} == {"slow"}
    assert sum(d["dropped"].get("sample", 0) for d in dropped) > 0


def check_config(path: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(IORTD), "check-config", str(path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )


# The other problems a table can have are unit tests (tests/unit/test_config_sinks.py);
# here, the installed plug-in's own factory and the installed list, through the command.
@pytest.mark.parametrize(
    ("table", "key", "words"),
    [
        (
            '[[sinks]]\ntype = "recorder"\n[sinks.options]\npath = "/tmp/x.jsonl"\ndealy_s = 1\n',
            "sinks[0].options.dealy_s",
            "unknown key",
        ),
        (
            '[[sinks]]\ntype = "recoder"\n',
            "sinks[0].type",
            "installed sinks: dicom, mqtt, recorder",  # dicom: the DICOM sender (issue 23)
        ),
    ],
)
def test_check_config_validates_sinks_through_the_plugins_factory(
    make_site: Callable[..., Site], tmp_path: Path, table: str, key: str, words: str
) -> None:
    env = install_plugin(tmp_path / "site-packages")
    site = make_site()
    site.config.write_text(site.config.read_text("utf-8") + table)
    r = check_config(site.config, env)
    assert r.returncode == 2, r.stdout + r.stderr
    assert r.stdout == ""
    [line] = r.stderr.splitlines()
    assert line.startswith(f"iortd: config error: {site.config}: {key}: "), line
    assert words in line


def test_check_config_accepts_a_valid_plugin_sink(
    make_site: Callable[..., Site], tmp_path: Path
) -> None:
    env = install_plugin(tmp_path / "site-packages")
    site = make_site()
    site.config.write_text(site.config.read_text("utf-8") + sinks_tables(tmp_path))
    r = check_config(site.config, env)
    assert r.returncode == 0, r.stdout + r.stderr
