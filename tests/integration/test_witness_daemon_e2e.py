"""The daemon submitting its checkpoints to a real `iort-witness serve` (issue 20): the
witness is down at first (the daemon keeps running and recording), then started; the
daemon catches up and the log holds ``witness_cosigned``, the retained
``audit/checkpoint`` on a real Mosquitto carries the cosignature, and `iort-audit verify
--witness-key ... --quorum 1` requires it (and refuses with another key)."""

from __future__ import annotations

import asyncio
import socket
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from daemonproc import BIN, Daemon, Site
from mqttobs import Observer, schema_errors
from test_witness_e2e import serve

from iortd.auditlog.cosignature import CosignerKey, verify_cosignature
from iortd.auditlog.logdir import read_anchor
from iortd.daemon.mqtt.broker import BrokerOptions, Mosquitto

pytestmark = pytest.mark.integration


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=60, check=False)


async def test_daemon_catches_up_with_a_witness_that_was_down(
    tmp_path: Path, make_site: Callable[..., Site]
) -> None:
    keygen = await asyncio.to_thread(
        _run, str(BIN / "iort-witness"), "keygen", "witness.test/w1", "--out",
        str(tmp_path / "w.key"),
    )  # fmt: skip
    assert keygen.returncode == 0, keygen.stderr
    vkey = (tmp_path / "w.pub").read_text("ascii").strip()
    port = _free_port()
    with Mosquitto(BrokerOptions(), tmp_path / "broker") as broker:
        site = make_site(checkpoint_s=1, mqtt=f'url = "{broker.url}"\nkeepalive_s = 2\n')
        with site.config.open("a", encoding="utf-8") as f:
            f.write(
                f'\n[[witness]]\nname = "w1"\nurl = "http://127.0.0.1:{port}/"\n'
                f'vkey = "{vkey}"\ntimeout_s = 2\n'
            )
        daemon = await Daemon.follow(site)
        witness = None
        try:
            # Down: the daemon says so and goes on recording (more checkpoints follow).
            await daemon.seen(lambda r: r.get("event") == "witness_unavailable", "witness down")
            await daemon.seen(
                lambda r: len(daemon.events("witness_unavailable")) >= 2, "a second attempt"
            )
            note = read_anchor(site.log_dir / "checkpoint")
            assert note is not None
            origin = note.split("\n", 1)[0]
            config = tmp_path / "witness.toml"
            config.write_text(
                f'[witness]\nlisten = "127.0.0.1:{port}"\nkey_file = "w.key"\n'
                'database = "state.sqlite"\n'
                f'[[logs]]\norigin = "{origin}"\nvkeys = ["{site.pubkey.read_text().strip()}"]\n',
                "utf-8",
            )
            witness = await serve(config, tmp_path / "witness.log")
            rec = await daemon.seen(lambda r: r.get("event") == "witness_cosigned", "a cosignature")
            assert rec["witness"] == "w1"
            assert rec["size"] > 1
            obs = await Observer(broker.port, topic="iort/+/+/+/audit/checkpoint").start()
            try:
                msg = await obs.wait_for(
                    lambda m: m.name == "audit/checkpoint" and "cosignatures" in m.payload,
                    "a cosigned checkpoint on MQTT",
                )
            finally:
                await obs.stop()
            assert schema_errors([msg]) == []
            [line] = msg.payload["cosignatures"]
            text = msg.payload["note"].split("\n\n", 1)[0] + "\n"
            verify_cosignature(vkey, text, line)
            assert msg.payload["note"].endswith(line + "\n")
            assert await daemon.stop() == 0
        finally:
            await daemon.ensure_dead()
            if witness is not None:
                witness.proc.terminate()
                async with asyncio.timeout(15):
                    await witness.proc.wait()

    audit = str(BIN / "iort-audit")
    log_dir, pub = str(site.log_dir), str(site.pubkey)
    ok = await asyncio.to_thread(
        _run, audit, "verify", log_dir, "--pubkey", pub, "--witness-key", vkey, "--quorum", "1"
    )
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "witnessed: the checkpoint of size" in ok.stdout
    other = CosignerKey.generate("witness.test/w1").verifier.text  # same name, another key
    bad = await asyncio.to_thread(
        _run, audit, "verify", log_dir, "--pubkey", pub, "--witness-key", other
    )
    assert bad.returncode == 1, bad.stdout + bad.stderr
    assert "WITNESS: no checkpoint of the log is cosigned by 1 of witness.test/w1" in bad.stderr
