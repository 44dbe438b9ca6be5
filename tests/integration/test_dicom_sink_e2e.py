"""The ``dicom`` sink in a real `iortd run` against real DICOM peers (issue 23, items 2, 3, 5).

Orthanc 1.10 (tests/integration/dicompeers.py: started on free ports, taking stores only
from this room's AE title on loopback, tethered, stopped by PID: SIGKILL here, nothing of it
is kept) receives; a simulated delivery at 300x speed ends in seconds (the sink says
``allow_simulated = true``: these are test destinations).

1. At termination the RT Beams Treatment Record and the Encapsulated PDF go to Orthanc,
   Storage Commitment says committed, and every step is in the audit log
   (``dicom_handoff``: queued, stored, committed) and on MQTT ``events``. In the same run a
   wrong called AE title is recorded ``refused`` with the reason, and a store the second
   Orthanc throws away (a Lua filter: it still answers 0x0000) is caught by commitment
   (``commit_failed``, 0x0112) and retried; the delivery itself is undisturbed: ended
   NORMAL, every recorded sample on MQTT, the log verifies.
2. ``when = "signoff"``: the delivery ends and nothing is sent until a physicist's signed
   ``approved`` sign-off (through the command inbox) is recorded; then the record goes.
3. The peer is down when the delivery ends (attempts recorded ``unreachable``), the daemon
   is SIGKILLed with the instances in its outbox, the peer comes back, the daemon restarts:
   each instance is delivered, and Orthanc holds each SOP Instance UID exactly once; the
   instances were queued once (not rebuilt), the attempt numbers go on.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from daemonproc import Daemon, Site
from dicompeers import START_BOUND_S, Orthanc, free_port
from mqttobs import Observer, dedupe

from iortd.auditlog.command import sign_command
from iortd.auditlog.note import generate_keypair
from iortd.auditlog.signoff import delivery_record
from iortd.daemon.mqtt.broker import BrokerOptions, Mosquitto
from iortd.kernel.reaper import Tether

pytestmark = pytest.mark.integration

CALLING = "IORTD_OR7"
AUDIT = Path(sys.executable).with_name("iort-audit")
DROP_ALL = """
function ReceivedInstanceFilter(dicom, origin, info)
  return false
end
"""


def sink_tables(dests: list[dict[str, Any]], **options: Any) -> str:
    def value(v: Any) -> str:
        return json.dumps(v)  # TOML's basic strings, numbers, booleans and arrays read alike

    lines = ["", "[[sinks]]", 'type = "dicom"', "[sinks.options]"]
    opts = {
        "calling_ae": CALLING,
        "retry_initial_s": 0.2,
        "retry_max_s": 1.0,
        "allow_simulated": True,  # the simulator's deliveries, to the tests' own Orthancs
        **options,
    }
    lines += [f"{k} = {value(v)}" for k, v in opts.items()]
    for d in dests:
        lines.append("[[sinks.options.destinations]]")
        lines += [f"{k} = {value(v)}" for k, v in d.items()]
    return "\n".join(lines) + "\n"


def us(listen: int = 0) -> dict[str, tuple[str, str, int]]:
    """The test Orthanc's modalities: this room's AE title from loopback (it takes stores
    only from those it lists: tests/integration/dicompeers.py); ``listen``: our
    commitment listener's port, where Orthanc sends its reports."""
    return {"iortd": (CALLING, "127.0.0.1", listen or free_port())}


def dest(name: str, o: Orthanc, **over: Any) -> dict[str, Any]:
    return {"name": name, "ae_title": o.aet, "host": "127.0.0.1", "port": o.dicom_port} | over


def all_entries(log_dir: Path) -> list[dict[str, Any]]:
    out = []
    for seg in sorted(log_dir.glob("log-*.jsonl")):
        out += [json.loads(line) for line in seg.read_text("utf-8").splitlines() if line]
    return out


def entries(log_dir: Path, kind: str) -> list[dict[str, Any]]:
    return [e for e in all_entries(log_dir) if e["type"] == kind]


def handoffs(log_dir: Path, destination: str) -> list[dict[str, Any]]:
    return [
        e["data"]
        for e in entries(log_dir, "dicom_handoff")
        if e["data"]["destination"] == destination
    ]


def said(event: str, **fields: Any) -> Callable[[dict[str, Any]], bool]:
    return lambda r: r.get("event") == event and all(r.get(k) == v for k, v in fields.items())


def verify(site: Site) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(AUDIT), "verify", str(site.log_dir), "--pubkey", str(site.pubkey)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def relaunch(o: Orthanc) -> Orthanc:
    """The same Orthanc (config, ports, storage) started again after it stopped."""
    exe = shutil.which("Orthanc")
    assert exe is not None
    tether = Tether("orthanc")
    with o.log.open("ab") as out:
        proc = subprocess.Popen(
            tether.argv([exe, str(o.base / "orthanc.json")]),
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            pass_fds=tether.pass_fds,
            cwd=o.base,
        )
    tether.started()
    again = Orthanc(o.base, o.aet, o.dicom_port, o.http_port, proc, tether, o.log)
    t0 = time.monotonic()
    while True:
        assert proc.poll() is None, f"Orthanc exited again: {o.log.read_text()[-800:]}"
        try:
            again.rest("/system", timeout=1.0)
        except OSError:
            assert time.monotonic() - t0 < START_BOUND_S, "Orthanc did not come back"
            time.sleep(0.05)  # a bounded poll of its REST API (it has no readiness signal)
        else:
            return again


def kill(o: Orthanc) -> None:
    """Orthanc gone at once (SIGKILL, by PID): a peer that crashed. Its clean stop takes
    ~3.5 s here, which a test with nothing to keep need not wait for."""
    if o.proc.poll() is None:
        o.proc.kill()
        o.proc.wait(timeout=10)
    o.tether.close()


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


@pytest.fixture
def orthancs(tmp_path: Path) -> Iterator[Callable[..., Orthanc]]:
    started: list[Orthanc] = []

    def start(name: str, **kw: Any) -> Orthanc:
        o = Orthanc.start(tmp_path / name, **kw)
        started.append(o)
        return o

    yield start
    for o in started:
        kill(o)


async def test_handed_off_at_termination_committed_and_every_outcome_recorded(
    make_site: Callable[..., Site],
    broker: Mosquitto,
    observer: Observer,
    orthancs: Callable[..., Orthanc],
) -> None:
    listen = free_port()
    modalities = us(listen)
    ois = orthancs("ois", aet="OIS_SCP", modalities=modalities)
    dropper = orthancs("dropper", aet="DROP_SCP", modalities=modalities, lua=DROP_ALL)
    # idle_sample_s = 0: every reading recorded, so the stream can be counted against the log
    mqtt = f'url = "{broker.url}"\nkeepalive_s = 2'
    site = make_site(speed=300, poll=0.02, mqtt=mqtt, idle_sample_s=0)
    tables = sink_tables(
        [
            dest("ois", ois, commitment=True),
            dest("wrong", ois, ae_title="NOT_THE_OIS"),
            dest("dropper", dropper, commitment=True),
        ],
        commitment_listen=f"127.0.0.1:{listen}",
    )
    site.config.write_text(site.config.read_text("utf-8") + tables)
    daemon = await Daemon.follow(site)
    try:
        await daemon.seen(said("delivery_terminated"), "the delivery's end")
        for what in ("record", "report"):
            await daemon.seen(
                said("dicom_handoff", destination="ois", what=what, outcome="committed"),
                f"the {what} committed by the OIS",
                within_s=60,
            )
        await daemon.seen(said("dicom_handoff", destination="wrong", outcome="refused"), "refused")
        await daemon.seen(
            said("dicom_handoff", destination="dropper", outcome="commit_failed", status=0x0112),
            "the dropped store found out by commitment",
            within_s=60,
        )
        await observer.wait_for(
            lambda m: (
                m.name == "events"
                and m.payload["kind"] == "dicom_handoff"
                and m.payload["outcome"] == "committed"
            ),
            "a hand-off outcome on MQTT events",
            within_s=10,
        )
        assert await daemon.stop() == 0
    finally:
        await daemon.ensure_dead()

    # The OIS: both instances, each queued, stored and committed, and out of the outbox.
    got = handoffs(site.log_dir, "ois")
    uids = {h["what"]: h["sop_instance_uid"] for h in got}
    assert set(uids) == {"record", "report"}
    for uid in uids.values():
        assert [h["outcome"] for h in got if h["sop_instance_uid"] == uid] == [
            "queued",
            "stored",
            "committed",
        ]
        oid = ois.instance_id(uid)
        assert oid is not None
        assert ois.rest(f"/instances/{oid}/metadata?expand")["RemoteAET"] == CALLING
    assert not list((site.log_dir / "sinks" / "dicom" / "outbox" / "ois").iterdir())
    # The wrong AE title: refused with the reason, and still in the outbox (retried).
    wrong = [h for h in handoffs(site.log_dir, "wrong") if h["outcome"] == "refused"]
    assert "called AE title" in wrong[0]["detail"] or "called ae title" in wrong[0]["detail"]
    assert (
        site.log_dir / "sinks" / "dicom" / "outbox" / "wrong" / f"{uids['record']}.json"
    ).exists()
    # The dropper said "stored" and kept nothing: commitment found out, the store is retried.
    dropped = [h["outcome"] for h in handoffs(site.log_dir, "dropper")]
    assert "commit_failed" in dropped
    assert "committed" not in dropped
    assert dropper.instance_id(uids["record"]) is None
    # Each outcome was recorded before it was published; nothing of the patient either way.
    events = [m.payload for m in dedupe(observer.of("events"))]
    published = [e for e in events if e["kind"] == "dicom_handoff"]
    assert {e["outcome"] for e in published} >= {"queued", "stored", "committed", "refused"}
    # The delivery itself is undisturbed: ended, every recorded sample on the stream.
    [end] = entries(site.log_dir, "delivery_terminated")
    assert end["data"]["status"] == "NORMAL"
    samples = entries(site.log_dir, "sample")
    assert len(dedupe(observer.of("telemetry"))) == len(samples)
    assert any(e["kind"] == "delivery_terminated" for e in events)
    for e in entries(site.log_dir, "dicom_handoff"):
        assert "delivery_id" not in e  # never extends the delivery's range
    result = verify(site)
    assert result.returncode == 0, result.stdout + result.stderr


async def test_peer_down_then_sigkill_then_back_each_instance_held_once(
    make_site: Callable[..., Site], orthancs: Callable[..., Orthanc]
) -> None:
    ois = orthancs("ois", aet="OIS_SCP", modalities=us())
    kill(ois)  # down (crashed) when the delivery ends
    site = make_site(speed=300, poll=0.02)
    site.config.write_text(
        site.config.read_text("utf-8") + sink_tables([dest("ois", ois)], send=["record"])
    )
    daemon = await Daemon.follow(site)
    try:
        await daemon.seen(said("delivery_terminated"), "the delivery's end")
        await daemon.seen(
            lambda r: (
                r.get("event") == "dicom_handoff"
                and r.get("outcome") in ("unreachable", "refused")
                and r.get("attempt") == 2
            ),
            "two attempts while the peer is down",
            within_s=60,
        )
        await daemon.kill()  # SIGKILL with the instance in the outbox
    finally:
        await daemon.ensure_dead()
    before = handoffs(site.log_dir, "ois")
    [queued] = [h for h in before if h["outcome"] == "queued"]
    uid, did = queued["sop_instance_uid"], queued["delivery_id"]
    tries = max(h["attempt"] for h in before)

    back = relaunch(ois)
    try:
        daemon = await Daemon.follow(site)
        try:
            await daemon.seen(
                said("dicom_handoff", outcome="stored", sop_instance_uid=uid),
                "the same instance stored after the restart",
                within_s=60,
            )
            assert await daemon.stop() == 0
        finally:
            await daemon.ensure_dead()
        # What the receiver holds is what was queued, each instance once: the resend after
        # the SIGKILL was the same SOP Instance UID. (The simulator starts another delivery
        # after the restart, which may be handed off too: its own, other UID.)
        queued_all = {h["sop_instance_uid"] for h in handoffs(site.log_dir, "ois")}
        held = back.rest("/instances")
        ids = {back.instance_id(u) for u in queued_all}
        assert sorted(held) == sorted(i for i in ids if i is not None)
        assert back.instance_id(uid) in held
    finally:
        kill(back)
    after = [h for h in handoffs(site.log_dir, "ois") if h["delivery_id"] == did]
    assert [h["outcome"] for h in after].count("queued") == 1  # not built again
    stored = [h for h in after if h["outcome"] == "stored"]
    assert len(stored) == 1
    assert stored[0]["attempt"] > tries  # the count goes on across the restart
    box = site.log_dir / "sinks" / "dicom" / "outbox" / "ois"
    assert not (box / f"{uid}.json").exists()
    assert not (box / f"{uid}.dcm").exists()


async def test_with_when_signoff_nothing_goes_until_a_physicist_approves(
    make_site: Callable[..., Site], orthancs: Callable[..., Orthanc], tmp_path: Path
) -> None:
    """``when = "signoff"``: the delivery ends and nothing is sent; a physicist's signed
    ``approved`` sign-off (through the command inbox) is recorded, and then the record goes."""
    ois = orthancs("ois", aet="OIS_SCP", modalities=us())
    phys = generate_keypair("phys-anna")
    ring = tmp_path / "keyring.toml"
    ring.write_text(
        f'[[key]]\nholder = "phys-anna"\nname = "A. Example, MPE"\nroles = ["physicist"]\n'
        f'public_key = "{phys.verifier.text}"\nvalid_from = "2026-01-01T00:00:00Z"\n'
        'valid_until = "2099-01-01T00:00:00Z"\n'
    )
    inbox = tmp_path / "inbox"
    inbox.mkdir(mode=0o700)
    site = make_site(speed=300, poll=0.02)
    site.config.write_text(
        site.config.read_text("utf-8")
        + f'\n[commands]\nkeyring = "{ring}"\ninbox = "{inbox}"\ninbox_poll_s = 0.1\n'
        + sink_tables([dest("ois", ois)], send=["record"], when="signoff")
    )
    daemon = await Daemon.follow(site)
    try:
        end = await daemon.seen(said("delivery_terminated"), "the delivery's end")
        did = end["delivery_id"]
        record = None
        async with asyncio.timeout(30):
            # The signed checkpoint after the end covers it (one is signed at every end):
            # a bounded poll of the log, which another process writes.
            while record is None:
                rng = delivery_record(all_entries(site.log_dir), did)
                record = None if rng is None else rng.record()
                if record is None:
                    await asyncio.sleep(0.1)
        assert not entries(site.log_dir, "dicom_handoff")  # ended, not signed: nothing sent
        body = {
            "delivery_id": did,
            "meaning": "approved",
            "name": "A. Example, MPE",
            "utc_offset_min": 0,
            "record": record,
        }
        env = sign_command(
            "signoff",
            body,
            signer=phys,
            holder="phys-anna",
            site="test-site",
            room="or-7",
            ttl_s=300,
        )
        (inbox / ".signoff.json").write_bytes(orjson.dumps(env))
        (inbox / ".signoff.json").rename(inbox / "signoff.json")
        await daemon.seen(said("delivery_signed"), "the sign-off recorded")
        stored = await daemon.seen(
            said("dicom_handoff", outcome="stored", delivery=did), "the record sent", within_s=60
        )
        assert await daemon.stop() == 0
    finally:
        await daemon.ensure_dead()
    assert ois.instance_id(stored["sop_instance_uid"]) is not None
    [signed_entry] = entries(site.log_dir, "delivery_signed")
    [queued] = [h for h in handoffs(site.log_dir, "ois") if h["outcome"] == "queued"]
    assert queued["delivery_id"] == did
    seqs = {e["type"]: e["seq"] for e in all_entries(site.log_dir)}
    assert seqs["delivery_signed"] == signed_entry["seq"] < seqs["dicom_handoff"]
