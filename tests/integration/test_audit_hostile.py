"""``iort-audit`` against hostile files.

Someone with write access to the log directory (no key) can put a FIFO, a link to
``/dev/zero`` or an endless line where a segment was; an auditor can pass a wrong key file or
a checkpoint saved from MQTT. Every case: no hang, no traceback, one clear stderr line (or
verify's NOT INTACT line), and the contract's exit status: 1 the log is bad, 2 usage.

Most cases call the tool's ``main`` in this process (fast; pytest-timeout bounds a hang);
the FIFO and /dev/zero cases also run the installed console script, as an auditor would.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import io
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import orjson
import pytest

from iortd.audit.cli import main
from iortd.auditlog.note import Checkpoint, Signer, generate_keypair, write_keypair
from iortd.auditlog.writer import AuditLog
from iortd.daemon.mqtt.payloads import Envelope, checkpoint_payload

pytestmark = pytest.mark.integration

IORT_AUDIT = str(Path(sys.executable).parent / "iort-audit")
TIMEOUT_S = 30


def audit(*args: str | Path) -> subprocess.CompletedProcess[str]:
    """``iort-audit ARGS`` in this process."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in args])
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


def audit_script(*args: str | Path) -> subprocess.CompletedProcess[str]:
    """The installed console script, as an auditor runs it."""
    p = subprocess.run(
        [IORT_AUDIT, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        check=False,
    )
    assert "Traceback" not in p.stderr, p.stderr
    return p


async def _write_log(directory: Path, signer: Signer, entries: int) -> list[str]:
    """A small real log: samples, with a signed checkpoint after each third of them."""
    log, _ = await AuditLog.open(
        directory, origin="test/or-9/hostile", signer=signer, group_commit_s=0.001
    )
    task = asyncio.create_task(log.run())
    log.append("daemon_start", {"verifier_key": signer.verifier.text})
    notes = []
    for i in range(entries):
        log.append("sample", {"i": i, "state": "IRRADIATING"})
        if i % (entries // 3) == entries // 3 - 1:
            note = await log.checkpoint("test")
            assert note is not None
            notes.append(note)
    await log.close()
    await task
    return notes


class Log:
    def __init__(self, base: Path) -> None:
        self.signer = generate_keypair("iortd-or-9")
        _, self.pub = write_keypair(self.signer, base / "keys")
        self.dir = base / "log"
        self.notes = asyncio.run(_write_log(self.dir, self.signer, 30))
        [self.seg] = sorted(self.dir.glob("log-*.jsonl"))

    def payload(self, note: str, seq: int = 0) -> dict[str, object]:
        env = Envelope(seq=seq, session=1, ts="2026-12-06T01:00:00.000000Z")
        return checkpoint_payload(env, note)

    def next_segment(self) -> Path:
        """A name the tools take for the segment after the real one."""
        return self.dir / "log-9999999999999999-20261206.jsonl"


@pytest.fixture
def log(tmp_path: Path) -> Log:
    return Log(tmp_path)


def one_err(p: subprocess.CompletedProcess[str]) -> str:
    lines = p.stderr.splitlines()
    assert len(lines) == 1, p.stderr
    return lines[0]


# ---- segments that are not regular files --------------------------------------------------


def test_a_fifo_segment_is_a_bad_log_not_a_hang(log: Log) -> None:
    fifo = log.next_segment()
    os.mkfifo(fifo)
    p = audit_script("verify", log.dir, "--pubkey", log.pub)
    assert p.returncode == 1, p
    assert f"NOT INTACT: {fifo}: is a FIFO (named pipe), not a segment file" in p.stdout
    for cmd in ("deliveries", "show"):
        p = audit(cmd, log.dir)
        assert p.returncode == 1, p
        assert "NOT INTACT" in one_err(p)
        assert "FIFO" in p.stderr
    out = log.dir.parent / "d.json"
    p = audit("export", log.dir, "--delivery", "D", "--format", "json", "--out", out)
    assert p.returncode == 1, p
    assert "FIFO" in one_err(p)
    assert not out.exists()


def test_a_segment_linked_to_dev_zero_is_a_bad_log_not_a_memory_error(log: Log) -> None:
    link = log.next_segment()
    link.symlink_to("/dev/zero")
    p = audit("verify", log.dir, "--pubkey", log.pub)
    assert p.returncode == 1, p
    assert f"NOT INTACT: {link}: is a symbolic link, not a segment file" in p.stdout
    p = audit_script("deliveries", log.dir)
    assert p.returncode == 1, p
    assert "symbolic link" in one_err(p)
    for cmd in ("deliveries", "show"):
        p = audit(cmd, log.dir)
        assert p.returncode == 1, p
        assert "symbolic link" in one_err(p)


def test_a_segment_linked_to_a_regular_copy_is_refused_too(log: Log, tmp_path: Path) -> None:
    """The daemon never makes links: one in the log directory is someone else's change."""
    real = tmp_path / "elsewhere.jsonl"
    log.seg.rename(real)
    log.seg.symlink_to(real)
    p = audit("verify", log.dir, "--pubkey", log.pub)
    assert p.returncode == 1, p
    assert "symbolic link" in p.stdout
    # The user may name a link on the command line: that is their choice.
    p = audit("verify", log.seg, "--pubkey", log.pub)
    assert p.returncode == 0, p


def test_an_endless_line_is_a_bad_log_read_in_bounded_memory(log: Log) -> None:
    """/dev/zero's content in a regular (sparse) file: refused at the line bound."""
    with log.next_segment().open("wb") as f:
        f.truncate(64 * 1024 * 1024)
    p = audit("verify", log.dir, "--pubkey", log.pub)
    assert p.returncode == 1, p
    assert f"NOT INTACT: {log.next_segment()}:1: not a log entry (a line longer than" in p.stdout


def test_a_fifo_named_on_the_command_line_is_a_usage_error(tmp_path: Path) -> None:
    fifo = tmp_path / "log-0000000000000000-20261206.jsonl"
    os.mkfifo(fifo)
    for cmd in ("verify", "deliveries", "show"):
        p = audit(cmd, fifo)
        assert p.returncode == 2, p
        assert (
            one_err(p)
            == f"iort-audit: {fifo}: not a log directory or segment file (not a regular file)"
        )


# ---- --pubkey and keygen -------------------------------------------------------------------


def test_a_wrong_pubkey_is_named_as_pubkey(log: Log, tmp_path: Path) -> None:
    bad = tmp_path / "bad.pub"
    bad.write_text("not a key\n", encoding="ascii")
    missing = tmp_path / "missing.pub"
    fifo = tmp_path / "fifo.pub"
    os.mkfifo(fifo)
    for key, words in ((bad, ""), (missing, "file not found"), (fifo, "FIFO")):
        for args in (
            ("verify", log.dir, "--pubkey", key),
            (
                "export",
                log.dir,
                "--delivery",
                "x",
                "--format",
                "json",
                "--out",
                tmp_path / "o.json",
                "--pubkey",
                key,
            ),
        ):
            p = audit(*args)
            assert p.returncode == 2, p
            line = one_err(p)
            assert line.startswith(f"iort-audit: --pubkey {key}: "), line
            assert words in line
            assert "--checkpoint" not in line


def test_keygen_into_a_file_says_not_a_directory(tmp_path: Path) -> None:
    file = tmp_path / "a-file"
    file.write_text("x", encoding="ascii")
    p = audit("keygen", "--name", "k", "--out", file)
    assert p.returncode == 2
    assert one_err(p) == (
        f"iort-audit: --out {file}: not a directory; give the directory for NAME.key and NAME.pub"
    )
    assert audit("keygen", "--name", "k", "--out", tmp_path).returncode == 0
    p = audit("keygen", "--name", "k", "--out", tmp_path)
    assert p.returncode == 2
    assert one_err(p) == f"iort-audit: {tmp_path / 'k.key'} exists; not overwriting a signing key"


# ---- --checkpoint as saved from MQTT ---------------------------------------------------------


def test_checkpoint_accepts_the_saved_topic_payload(log: Log, tmp_path: Path) -> None:
    saved = tmp_path / "checkpoint.json"
    saved.write_text(json.dumps(log.payload(log.notes[-1])), encoding="utf-8")
    p = audit("verify", log.dir, "--pubkey", log.pub, "--checkpoint", saved)
    assert p.returncode == 0, p
    assert "checkpoint held elsewhere: covers entries 0.." in p.stdout


def test_checkpoint_accepts_a_directory_of_payloads_and_notes(log: Log, tmp_path: Path) -> None:
    held = tmp_path / "held"
    held.mkdir()
    for i, note in enumerate(log.notes[:-1]):
        (held / f"{i}.json").write_text(json.dumps(log.payload(note, i)), encoding="utf-8")
    (held / "last.note").write_text(log.notes[-1], encoding="utf-8")
    p = audit("verify", log.dir, "--pubkey", log.pub, "--checkpoint", held)
    assert p.returncode == 0, p
    assert f"{len(log.notes)} checkpoints, the latest covering" in p.stdout
    assert "all consistent" in p.stdout


def test_a_held_checkpoint_the_log_no_longer_matches_is_found(log: Log, tmp_path: Path) -> None:
    """An earlier checkpoint in the directory is checked too, not only the latest."""
    held = tmp_path / "held"
    held.mkdir()
    (held / "first.json").write_text(json.dumps(log.payload(log.notes[0])), encoding="utf-8")
    lines = log.seg.read_bytes().splitlines(keepends=True)
    log.seg.write_bytes(b"".join(lines[:3]))  # cut before the first checkpoint's head
    p = audit("verify", log.dir, "--pubkey", log.pub, "--checkpoint", held)
    assert p.returncode == 1, p
    assert "were removed" in p.stdout


def test_bad_saved_checkpoints_are_usage_errors(log: Log, tmp_path: Path) -> None:
    edited = log.payload(log.notes[-1])
    edited["count"] = 1
    other = generate_keypair("someone-else")
    cases = {
        "edited.json": (json.dumps(edited), "differ from its signed note"),
        "no-note.json": (json.dumps({"schema": "iort/v1"}), "without a 'note'"),
        "broken.json": ("{not json", "not a note nor JSON"),
        "other-key.json": (
            json.dumps(log.payload(log.notes[0].split("\n\n")[0] + "\n\n" + _resign(log, other))),
            "not signed by --pubkey",
        ),
    }
    for name, (text, words) in cases.items():
        f = tmp_path / name
        f.write_text(text, encoding="utf-8")
        p = audit("verify", log.dir, "--pubkey", log.pub, "--checkpoint", f)
        assert p.returncode == 2, p
        line = one_err(p)
        assert line.startswith(f"iort-audit: --checkpoint {f}: "), line
        assert words in line, line
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    p = audit("verify", log.dir, "--pubkey", log.pub, "--checkpoint", fifo)
    assert p.returncode == 2
    assert "FIFO" in one_err(p)


def _resign(log: Log, other: Signer) -> str:
    """The signature lines of the first checkpoint signed by another key."""
    cp, _ = Checkpoint.parse_verified(log.notes[0], None)
    return cp.signed(other).split("\n\n", 1)[1]


# ---- a held LOCK is not a daemon ----------------------------------------------------------


def _append_entry(log: Log) -> dict[str, object]:
    """A correctly chained entry at the end of the log (a fake delivery end), as the
    daemon would write one, or a forger without the key."""
    last = orjson.loads(log.seg.read_bytes().splitlines()[-1])
    entry = {
        "seq": last["seq"] + 1,
        "ts": last["ts"],
        "mono_ns": last["mono_ns"] + 1,
        "type": "delivery_terminated",
        "data": {"delivery_id": "D-FORGED", "reason": "NORMAL", "dose_gy": 20.0},
        "prev": last["hash"],
    }
    entry["hash"] = hashlib.sha256(orjson.dumps(entry, option=orjson.OPT_SORT_KEYS)).hexdigest()
    with log.seg.open("ab") as f:
        f.write(orjson.dumps(entry, option=orjson.OPT_SORT_KEYS) + b"\n")
    return entry


def _forge_tail(log: Log) -> int:
    """What a forger without the key does while no daemon runs: append a correctly chained
    entry and delete the seal and checkpoint files, which would show the log's genuine
    size. Returns the forged entry's seq."""
    entry = _append_entry(log)
    (log.dir / "seal").unlink()
    (log.dir / "checkpoint").unlink()
    return int(str(entry["seq"]))


def test_a_forger_holding_the_lock_does_not_pass_as_the_running_daemon(log: Log) -> None:
    """verify excused the entries past the seal whenever some process held LOCK ("the
    daemon is writing this log", exit 0): a forger who can write the directory can also
    hold a lock on a file in it. A running daemon seals within its commit window; verify
    now waits that long for the seal to cover the head, else the entries are unvouched."""
    seq = _forge_tail(log)
    fd = os.open(log.dir / "LOCK", os.O_RDWR | os.O_CREAT, 0o640)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        t0 = time.monotonic()
        p = audit("verify", log.dir, "--pubkey", log.pub)
        waited = time.monotonic() - t0
    finally:
        os.close(fd)
    assert p.returncode == 1, p.stdout
    assert f"UNVOUCHED: seq {seq}..{seq} (1 entry)" in p.stdout, p.stdout
    assert "holds the log directory's LOCK" in p.stdout, p.stdout
    assert waited < 10, waited  # the log's commit window (50 ms) and the margin, not more


def test_a_running_daemons_unsealed_commit_is_excused_once_its_seal_comes(log: Log) -> None:
    """The other side: behind a running daemon (it holds LOCK), the entries past the seal
    are its current group commit; verify waits for the seal that covers them and then
    reports them as such, exit 0 (no false alarm while the daemon writes)."""
    assert (log.dir / "seal").is_file()  # the daemon keeps one: the last commit's
    last = _append_entry(log)  # the current commit, not sealed yet
    covering = Checkpoint(
        "test/or-9/hostile", int(str(last["seq"])) + 1, str(last["hash"]), ("reason seal",)
    ).signed(log.signer)
    fd = os.open(log.dir / "LOCK", os.O_RDWR | os.O_CREAT, 0o640)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        # The daemon's seal lands while verify is reading (here: a moment after it starts).
        timer = threading.Timer(0.3, (log.dir / "seal").write_text, (covering,))
        timer.start()
        try:
            p = audit("verify", log.dir, "--pubkey", log.pub)
        finally:
            timer.join()
    finally:
        os.close(fd)
    assert p.returncode == 0, p.stdout
    assert "the daemon is writing this log" in p.stdout


def test_the_daemon_refuses_a_fifo_segment_at_start_with_exit_2(make_site: Any) -> None:
    """``iortd run`` on a log directory with a FIFO under a segment's name: one error line
    naming the file, exit 2, at once (it used to hang in recovery, reading the FIFO)."""
    site = make_site()
    site.log_dir.mkdir()
    fifo = site.log_dir / "log-0000000000000000-20260101.jsonl"
    os.mkfifo(fifo)
    try:
        p = subprocess.run(
            [str(Path(sys.executable).parent / "iortd"), "run", "--config", str(site.config)],
            capture_output=True,
            text=True,
            timeout=TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired:
        with contextlib.suppress(OSError):  # let the stuck daemon read EOF and go
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        pytest.fail(f"iortd run hung for {TIMEOUT_S} s on a FIFO segment")
    assert p.returncode == 2, p.stderr
    assert "Traceback" not in p.stderr, p.stderr
    [line] = p.stderr.strip().splitlines()[-1:]
    assert str(fifo) in line
    assert "FIFO" in line
