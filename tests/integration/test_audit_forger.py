"""A forger between a crash and the restart, against the real daemon and ``iort-audit``.

The daemon is SIGKILLed mid-delivery; then someone with write access to the log directory
and no key (tests/integration/forger.py) (a) appends a correctly chained
``delivery_terminated`` NORMAL, (b) deletes the seal and checkpoint file and rewrites the
entries after the last signature with halved doses, (c) rewrites sealed entries, (d) cuts
the log, (e) puts an older copy back. Each case runs on its own copy of the crashed log,
all at once. What must hold: every case is reported (recovery entry, verify, deliveries,
report), nothing forged is ever vouched for, and the daemon starts or refuses (exit 2,
with a deliberate, recorded way on) as docs/audit-log.md says.
"""

from __future__ import annotations

import asyncio
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest
from daemonproc import Daemon, Site
from forger import append, entries, halve_doses, rewrite_from
from mqttobs import Observer

from iortd.auditlog.note import Checkpoint
from iortd.auditlog.verify import collect_files
from iortd.daemon.mqtt.broker import BrokerOptions, Mosquitto

pytestmark = pytest.mark.integration

BIN = Path(sys.executable).parent
TIMEOUT_S = 30


async def run(*args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    try:
        async with asyncio.timeout(TIMEOUT_S):
            out, err = await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def audit(site: Site, *args: str) -> tuple[int, str, str]:
    return await run(str(BIN / "iort-audit"), *args)


def clone(site: Site, root: Path) -> Site:
    """The crashed site copied whole (config, key, log): one per forgery."""
    root.mkdir()
    shutil.copy2(site.config, root / "site.toml")
    shutil.copytree(site.config.parent / "keys", root / "keys")
    shutil.copytree(site.log_dir, root / "log")
    return Site(root / "site.toml", root / "log", site.pubkey)


def seal_count(log_dir: Path) -> int:
    cp, _ = Checkpoint.parse_verified((log_dir / "seal").read_text(), None)
    return cp.count


async def restart(site: Site) -> list[dict[str, Any]]:
    """Start the daemon on the forged log, let it connect, stop it cleanly: its log."""
    d = await Daemon.follow(site)
    try:
        await d.seen(lambda r: r.get("event") == "device_connected", "device_connected")
        assert await d.stop() == 0
    finally:
        await d.ensure_dead()
    return entries(site.log_dir)


async def refused(site: Site, *extra: str) -> str:
    rc, _, err = await run(str(BIN / "iortd"), "run", "--config", str(site.config), *extra)
    assert rc == 2, f"exit {rc}: {err}"
    assert "--accept-log-rollback" in err, err
    return err


def recovery_of(log: list[dict[str, Any]]) -> dict[str, Any]:
    [rec] = [e for e in log if e["type"] == "recovery"]
    return rec


async def reported_everywhere(site: Site, did: str, forged: set[int]) -> None:
    """verify, deliveries, show, report, export: each names the delivery as unvouched,
    exit 1."""
    pub = str(site.pubkey)
    csv = site.log_dir.parent / "samples.csv"
    (
        (rc, out, _),
        (rc_d, out_d, _),
        (rc_r, out_r, err_r),
        (rc_s, out_s, _),
        (rc_e, _, _),
    ) = await asyncio.gather(
        audit(site, "verify", str(site.log_dir), "--pubkey", pub),
        audit(site, "deliveries", str(site.log_dir)),
        audit(
            site,
            *("report", str(site.log_dir), "--delivery", did, "--pubkey", pub),
            *("--out", str(site.log_dir.parent / "report.html")),
        ),
        audit(site, "show", str(site.log_dir), "--delivery", did),
        audit(
            site,
            *("export", str(site.log_dir), "--delivery", did),
            *("--format", "csv", "--out", str(csv)),
        ),
    )
    assert rc_s == 1
    assert "UNVOUCHED" in out_s, out_s
    assert rc_e == 1
    assert not csv.exists(), "CSV has no place to say it: not written"
    assert rc == 1, out
    assert out.startswith("INTACT: "), out  # the chain itself is whole
    assert f"UNVOUCHED: delivery {did} has entries in seq " in out, out
    assert "RESULT: the chain is intact, but" in out, out
    ranges = [line for line in out.splitlines() if line.startswith("UNVOUCHED: seq ")]
    covered = set()
    for line in ranges:
        lo, hi = line.removeprefix("UNVOUCHED: seq ").split(" ")[0].split("..")
        covered |= set(range(int(lo), int(hi) + 1))
    assert forged <= covered, (forged, out)
    assert rc_d == 1
    [line] = [x for x in out_d.splitlines() if x.startswith(did)]
    assert "UNVOUCHED entries seq " in line, out_d
    assert rc_r == 1, out_r + err_r
    assert "UNVOUCHED" in out_r, out_r
    assert not (site.log_dir.parent / "report.html").exists(), "no report passes it off"


async def forged_end(site: Site, did: str) -> None:
    """(a) A correctly chained fake end: unvouched, and the delivery is closed by the
    daemon's own (vouched) entry after the restart, never by the fake one."""
    summary = {"preset_gy": 20.0, "delivered_primary_gy": 20.0, "termination": "NORMAL"}
    forged = append(
        site.log_dir,
        {"type": "sample", "delivery_id": did, "data": {"dose_primary_gy": 20.0}},
        {
            "type": "delivery_terminated",
            "delivery_id": did,
            "data": {"status": "NORMAL", "reason": "preset reached", "summary": summary},
        },
    )
    log = await restart(site)
    rec = recovery_of(log)
    u = rec["data"]["unvouched"]
    assert (u["first_seq"], u["last_seq"]) == (forged[0], forged[-1]), u
    ends = [e for e in log if e["type"] == "delivery_terminated" and e.get("delivery_id") == did]
    assert [e["seq"] for e in ends if e["seq"] > rec["seq"]], "the daemon closes it itself"
    await reported_everywhere(site, did, set(forged))


async def rewritten_tail(site: Site, did: str) -> None:
    """(b) Seal and checkpoint file deleted, the entries after the last signature
    rewritten with halved doses: all of them are unvouched."""
    (site.log_dir / "seal").unlink()
    (site.log_dir / "checkpoint").unlink()
    log = entries(site.log_dir)
    last_cp = max(e["seq"] for e in log if e["type"] == "checkpoint")
    assert rewrite_from(site.log_dir, last_cp + 1, halve_doses) > 0
    head = log[-1]["seq"]
    rec = recovery_of(await restart(site))
    u = rec["data"]["unvouched"]
    assert (u["first_seq"], u["last_seq"]) == (last_cp + 1, head), u
    assert rec["data"]["vouched_by"] == "checkpoint entry"
    await reported_everywhere(site, did, set(range(last_cp + 1, head + 1)))
    # For an investigation: written, but stamped on every page, and still exit 1.
    out = site.log_dir.parent / "investigation.html"
    rc, _, _ = await audit(
        site,
        *("report", str(site.log_dir), "--delivery", did, "--pubkey", str(site.pubkey)),
        *("--out", str(out), "--allow-unverified"),
    )
    assert rc == 1
    html = out.read_text()
    assert "NOT VERIFIED: UNVOUCHED entries" in html
    assert f"seq {last_cp + 1}..{head}" in html


async def rewritten_sealed(site: Site) -> None:
    """(c) Entries the seal covers, rewritten: the daemon refuses to sign the fork."""
    count = seal_count(site.log_dir)
    log = entries(site.log_dir)
    first = max(e["seq"] for e in log if e["type"] == "checkpoint") + 1
    assert first < count
    rewrite_from(site.log_dir, first, halve_doses)
    err = await refused(site)
    assert f"seq {count - 1} differs from its seal" in err
    rc, out, _ = await audit(site, "verify", str(site.log_dir), "--pubkey", str(site.pubkey))
    assert rc == 1
    assert out.startswith("NOT INTACT: "), out


async def truncated(site: Site) -> None:
    """(d) Cut at a line boundary before the seal: refused; then accepted on purpose,
    which is recorded, and the log verifies again from there on."""
    seg = collect_files([site.log_dir])[-1]
    lines = seg.read_bytes().splitlines(keepends=True)
    seg.write_bytes(b"".join(lines[:-3]))
    err = await refused(site)
    assert "the log has" in err
    assert f"its seal covers {seal_count(site.log_dir)}" in err
    d = await Daemon.follow(site, args=("--accept-log-rollback",))
    try:
        await d.seen(lambda r: r.get("event") == "device_connected", "device_connected")
        assert await d.stop() == 0
    finally:
        await d.ensure_dead()
    [rb] = [e for e in entries(site.log_dir) if e["type"] == "log_rollback_accepted"]
    assert rb["data"]["log_count"] < rb["data"]["seal_count"]
    _, out, err = await audit(site, "verify", str(site.log_dir), "--pubkey", str(site.pubkey))
    assert "--accept-log-rollback" in err, err  # said every time the log is verified
    assert out.startswith("INTACT: "), out


async def older_copy(site: Site, older: Path) -> None:
    """(e) The log replaced with a copy taken earlier in the run: refused."""
    for seg in collect_files([site.log_dir]):
        seg.unlink()
    for seg in collect_files([older]):
        shutil.copy2(seg, site.log_dir / seg.name)
    err = await refused(site)
    assert "behind what this daemon signed" in err


@pytest.mark.timeout(120)
async def test_a_forger_between_crash_and_restart_is_always_reported(
    make_site: Any, tmp_path: Path
) -> None:
    site: Site = make_site(speed=300, poll=0.02, checkpoint_s=60)
    d = await Daemon.follow(site)
    try:
        started = await d.seen(lambda r: r.get("event") == "delivery_started", "a delivery")
        did = str(started["delivery_id"])
        older = tmp_path / "older-copy"
        shutil.copytree(site.log_dir, older, ignore=shutil.ignore_patterns("LOCK", "*.tmp"))
        await d.seen(lambda r: r.get("dst") == "IRRADIATING", "beam on")
        # A young log, being written: it verifies with --pubkey (signed at start), and the
        # entries past the seal are the current commit, not an alarm.
        rc, out, _ = await audit(site, "verify", str(site.log_dir), "--pubkey", str(site.pubkey))
        assert rc == 0, out
        assert not d.events("delivery_terminated"), "killed mid-delivery: slow the sim down"
        await d.kill()
    finally:
        await d.ensure_dead()
    assert seal_count(site.log_dir) > len(entries(older)), "the run went on after the copy"
    cases = tmp_path / "cases"
    cases.mkdir()
    await asyncio.gather(
        forged_end(clone(site, cases / "a"), did),
        rewritten_tail(clone(site, cases / "b"), did),
        rewritten_sealed(clone(site, cases / "c")),
        truncated(clone(site, cases / "d")),
        older_copy(clone(site, cases / "e"), older),
    )


@pytest.mark.timeout(120)
async def test_a_log_behind_the_brokers_retained_checkpoint_never_overwrites_it(
    make_site: Any, tmp_path: Path
) -> None:
    """A backup restored without its seal and checkpoint file (nothing on the host shows
    the rollback): the daemon starts, but the broker's retained checkpoint, signed by the
    same key for the same log, is ahead; it is kept, and the refusal is alarmed and
    recorded."""
    with Mosquitto(BrokerOptions(), tmp_path / "broker") as broker:
        mqtt = f'url = "{broker.url}"\nkeepalive_s = 2\n'
        site: Site = make_site(speed=300, poll=0.02, checkpoint_s=60, mqtt=mqtt)
        d = await Daemon.follow(site)
        try:
            await d.seen(lambda r: r.get("dst") == "IRRADIATING", "beam on")
            await d.seen(lambda r: r.get("event") == "mqtt_connected", "mqtt connected")
            assert await d.stop() == 0
        finally:
            await d.ensure_dead()
        log = entries(site.log_dir)
        held = log[-1]["data"]["count"]  # the shutdown checkpoint, retained on the broker
        # The restored backup: the log as it was at its start checkpoint, no seal/file.
        start_cp = next(e["seq"] for e in log if e["type"] == "checkpoint")
        seg = collect_files([site.log_dir])[-1]
        seg.write_bytes(b"".join(seg.read_bytes().splitlines(keepends=True)[: start_cp + 1]))
        (site.log_dir / "seal").unlink()
        (site.log_dir / "checkpoint").unlink()

        d = await Daemon.follow(site)
        try:
            await d.seen(lambda r: r.get("event") == "mqtt_checkpoint_not_published", "the refusal")
            alarm = await d.seen(
                lambda r: r.get("event") == "notice" and r.get("level") == "critical", "alarm"
            )
            assert "audit checkpoint NOT published" in alarm["message"]
            assert await d.stop() == 0
        finally:
            await d.ensure_dead()
        [refused] = [e for e in entries(site.log_dir) if e["type"] == "checkpoint_publish_refused"]
        assert refused["data"]["broker_count"] == held
        obs = await Observer(broker.port, topic="iort/+/+/+/audit/checkpoint").start()
        try:
            msg = await obs.wait_for(lambda m: m.name == "audit/checkpoint", "the retained one")
        finally:
            await obs.stop()
        assert msg.retained
        assert msg.payload["count"] == held, "the off-host copy is not overwritten"
