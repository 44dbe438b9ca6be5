"""Shared fixtures for integration tests: a site config with a real signing key."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from daemonproc import Site

from iortd.auditlog.note import generate_keypair, write_keypair

SITE_TEMPLATE = """
[site]
id = "test-site"
room = "or-7"
[log]
directory = "log"
signing_key_file = "keys/or-7.key"
group_commit_ms = 50
rotate_max_bytes = {rotate}
checkpoint_interval_s = {checkpoint_s}
idle_sample_interval_s = {idle_sample_s}
[health]
listen = ""
[mqtt]
{mqtt}
[simulation]
speed = {speed}
seed = 11
[tolerances]
stale_after_polls = 5
[[devices]]
name = "source-1"
driver = "sim"
poll_interval_s = {poll}
timeout_s = 1.0
[devices.options]
profile = "axxent"
applicator = "BAL34"
start_delay_s = 5.0
"""


@pytest.fixture
def make_site(tmp_path: Path) -> Callable[..., Site]:
    def make(
        *,
        speed: float = 300,
        poll: float = 0.02,
        rotate: int = 1024 * 1024,
        checkpoint_s: float = 2,
        mqtt: str | None = None,
        idle_sample_s: float = 60.0,
    ) -> Site:
        """``mqtt``: the [mqtt] section's body; by default MQTT is off, so that no test
        reaches a broker it did not start. ``idle_sample_s``: the idle heartbeat (0: every
        reading is logged, for a test that counts the log's samples against the stream)."""
        _, pub = write_keypair(generate_keypair("or-7"), tmp_path / "keys")
        cfg = tmp_path / "site.toml"
        cfg.write_text(
            SITE_TEMPLATE.format(
                speed=speed,
                poll=poll,
                rotate=rotate,
                checkpoint_s=checkpoint_s,
                idle_sample_s=idle_sample_s,
                mqtt="enabled = false" if mqtt is None else mqtt,
            )
        )
        return Site(cfg, tmp_path / "log", pub)

    return make
