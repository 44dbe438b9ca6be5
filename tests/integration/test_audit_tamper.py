"""Tampering with a real audit log, detected by the real ``iort-audit``.

A log is made once per module by running the real daemon (``iortd demo``) with a private
XDG_DATA_HOME, so that its demo signing key never touches the real home; each test works
on its own copy. The copy of the daemon's ``checkpoint`` file stands for the checkpoint
held elsewhere (the one published over MQTT). Each tampering is then checked through the
``iort-audit verify`` console script: exit status 1, and the location it prints (file,
line, seq) is where the tampering is.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import fcntl
import hashlib
import io
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from iortd.audit import cli as audit_cli
from iortd.auditlog.note import Checkpoint, generate_keypair, write_keypair
from iortd.auditlog.writer import AuditLog

pytestmark = pytest.mark.integration

BIN = Path(sys.executable).parent
IORTD = str(BIN / "iortd")
IORT_AUDIT = str(BIN / "iort-audit")
TIMEOUT_S = 60

NOT_INTACT = re.compile(
    r"^NOT INTACT: (?P<file>[^:\n]+?)(?::(?P<line>\d+))?(?: \(seq (?P<seq>\d+)\))?: "
    r"(?P<what>.*)$",
    re.MULTILINE,
)


# ---- the real log ------------------------------------------------------------------------


@dataclass(frozen=True)
class DemoRun:
    log_dir: Path
    pub: Path
    checkpoint: Path  # a copy of the log's checkpoint, as if kept off the host


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        list(args), capture_output=True, text=True, timeout=TIMEOUT_S, check=False, env=env
    )


def run_demo(base: Path, name: str) -> DemoRun:
    data_home = base / "data-home"
    env = {**os.environ, "XDG_DATA_HOME": str(data_home)}
    log_dir = base / name
    p = run(IORTD, "demo", "--speed", "1200", "--log-dir", str(log_dir), env=env)
    assert p.returncode == 0, p.stdout + p.stderr
    pub = data_home / "iortd" / "demo-key" / "iortd-demo.pub"
    assert pub.is_file(), "the demo key goes under XDG_DATA_HOME"
    held = base / f"{name}-checkpoint-held-elsewhere"
    shutil.copyfile(log_dir / "checkpoint", held)
    return DemoRun(log_dir, pub, held)


@pytest.fixture(scope="module")
def demo_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("audit-demo")


@pytest.fixture(scope="module")
def demo(demo_base: Path) -> DemoRun:
    return run_demo(demo_base, "run-1")


@pytest.fixture(scope="module")
def demo2(demo_base: Path, demo: DemoRun) -> DemoRun:
    """A second, independent run (same key): a valid log that is not the first one."""
    return run_demo(demo_base, "run-2")


class Log:
    """A test's own copy of the demo log, edited line by line."""

    def __init__(self, src: DemoRun, directory: Path) -> None:
        shutil.copytree(src.log_dir, directory)
        self.dir = directory
        self.pub = src.pub
        self.checkpoint = src.checkpoint
        [self.seg] = [p for p in directory.iterdir() if p.name.startswith("log-")]
        self.lines = self.seg.read_bytes().splitlines(keepends=True)
        self.entries = [orjson.loads(x) for x in self.lines]

    def index(self, pred: Callable[[dict[str, Any]], bool]) -> list[int]:
        return [i for i, e in enumerate(self.entries) if pred(e)]

    def last_checkpoint(self) -> int:
        return self.index(lambda e: e["type"] == "checkpoint")[-1]

    def first_checkpoint(self) -> int:
        """The demo signs at start, at the delivery end and again at shutdown; this is the
        first after the start (the delivery end's)."""
        return self.index(
            lambda e: e["type"] == "checkpoint" and "\nreason start\n" not in e["data"]["note"]
        )[0]

    def target(self) -> int:
        """A delivery sample in the middle of the delivery, covered by a checkpoint, with
        another entry after it that the checkpoint also covers."""
        cp = self.first_checkpoint()
        samples = self.index(
            lambda e: e["type"] == "sample" and "delivery_id" in e and e["seq"] < cp - 1
        )
        assert len(samples) >= 3, "the demo delivery has samples"
        return samples[len(samples) // 2]

    def drop_anchors(self) -> None:
        """What a forger can do to the seal and checkpoint files: delete them."""
        (self.dir / "seal").unlink()
        (self.dir / "checkpoint").unlink()

    def write(self, lines: list[bytes]) -> None:
        self.seg.write_bytes(b"".join(lines))

    def write_bytes(self, data: bytes) -> None:
        self.seg.write_bytes(data)

    def verify(self, *extra: str, pubkey: bool = True) -> subprocess.CompletedProcess[str]:
        args = [IORT_AUDIT, "verify", str(self.dir)]
        if pubkey:
            args += ["--pubkey", str(self.pub)]
        return run(*args, *extra)

    def delivery_id(self) -> str:
        [i] = self.index(lambda e: e["type"] == "delivery_started")
        return str(self.entries[i]["delivery_id"])


@pytest.fixture
def log(demo: DemoRun, tmp_path: Path) -> Log:
    return Log(demo, tmp_path / "log")


def not_intact(p: subprocess.CompletedProcess[str]) -> dict[str, str | None]:
    assert p.returncode == 1, f"exit {p.returncode}\n{p.stdout}{p.stderr}"
    assert "Traceback" not in p.stderr, p.stderr
    m = NOT_INTACT.search(p.stdout)
    assert m is not None, p.stdout
    return m.groupdict()


def assert_location(
    p: subprocess.CompletedProcess[str], file: Path, line: int | None, seq: int | None
) -> str:
    where = not_intact(p)
    assert where["file"] == str(file), p.stdout
    assert where["line"] == (None if line is None else str(line)), p.stdout
    assert where["seq"] == (None if seq is None else str(seq)), p.stdout
    return str(where["what"])


def intact(p: subprocess.CompletedProcess[str]) -> str:
    assert p.returncode == 0, f"exit {p.returncode}\n{p.stdout}{p.stderr}"
    assert p.stdout.startswith("INTACT: "), p.stdout
    return p.stdout


def rehash(entry: dict[str, Any], prev: str) -> bytes:
    """What a forger without the key can do: re-chain by the published canonical rules."""
    entry = {k: v for k, v in entry.items() if k != "hash"}
    entry["prev"] = prev
    digest = hashlib.sha256(orjson.dumps(entry, option=orjson.OPT_SORT_KEYS)).hexdigest()
    return orjson.dumps({**entry, "hash": digest}, option=orjson.OPT_SORT_KEYS) + b"\n"


def rechain(entries: list[dict[str, Any]]) -> list[bytes]:
    out: list[bytes] = []
    prev = "0" * 64
    for e in entries:
        line = rehash(e, prev)
        prev = orjson.loads(line)["hash"]
        out.append(line)
    return out


# ---- untampered --------------------------------------------------------------------------


def test_the_untampered_log_verifies_with_and_without_the_held_checkpoint(log: Log) -> None:
    out = intact(log.verify())
    assert f"INTACT: {len(log.lines)} entries in 1 file(s)" in out
    assert "signed by iortd-demo" in out
    assert "without --checkpoint, removal of the entries after the last seal" in out
    out = intact(log.verify("--checkpoint", str(log.checkpoint)))
    cp, _ = Checkpoint.parse_verified(log.checkpoint.read_text(encoding="utf-8"), None)
    assert f"checkpoint held elsewhere: covers entries 0..{cp.count - 1}: consistent" in out


def test_a_forger_rechaining_unchanged_entries_reproduces_the_file(log: Log) -> None:
    """The canonical rules are reproducible from the parsed entries: the premise of (e)."""
    assert rechain(log.entries) == log.lines


def test_checkpoint_without_pubkey_is_a_usage_error(log: Log) -> None:
    p = log.verify("--checkpoint", str(log.checkpoint), pubkey=False)
    assert p.returncode == 2, p.stdout + p.stderr
    assert "--checkpoint needs --pubkey" in p.stderr


def test_a_held_checkpoint_signed_by_another_key_is_refused(log: Log, tmp_path: Path) -> None:
    cp, _ = Checkpoint.parse_verified(log.checkpoint.read_text(encoding="utf-8"), None)
    for name in ("iortd-demo", "someone-else"):
        forged = tmp_path / f"checkpoint-{name}"
        forged.write_text(cp.signed(generate_keypair(name)), encoding="utf-8")
        # A held checkpoint that this key did not sign is the wrong evidence: a usage
        # error naming --checkpoint, before the log is read.
        p = log.verify("--checkpoint", str(forged))
        assert p.returncode == 2, p.stdout + p.stderr
        assert f"--checkpoint {forged}: not signed by --pubkey" in p.stderr


def test_a_log_checked_against_another_public_key_is_not_intact(log: Log, tmp_path: Path) -> None:
    _, other_pub = write_keypair(generate_keypair("iortd-demo"), tmp_path / "other")
    p = run(IORT_AUDIT, "verify", str(log.dir), "--pubkey", str(other_pub))
    # verification stops at the first bad signature: the one made at start
    cp = log.index(lambda e: e["type"] == "checkpoint")[0]
    what = assert_location(p, log.seg, cp + 1, cp)
    assert "checkpoint is not signed by --pubkey" in what


def test_a_malformed_pubkey_file_is_a_usage_error_naming_it(log: Log, tmp_path: Path) -> None:
    bad = tmp_path / "bad.pub"
    text = log.pub.read_text(encoding="ascii")
    bad.write_text(text.replace("iortd-demo+", "iortd demo+", 1), encoding="ascii")
    p = run(IORT_AUDIT, "verify", str(log.dir), "--pubkey", str(bad))
    assert p.returncode == 2, p.stdout + p.stderr
    assert str(bad) in p.stderr
    assert "Traceback" not in p.stderr


# ---- (a) one byte changed ----------------------------------------------------------------


def _digit_after(line: bytes, key: bytes) -> int:
    at = line.index(key) + len(key)
    while not line[at : at + 1].isdigit():
        at += 1
    return at


def _hex_in(line: bytes, key: bytes) -> int:
    return line.index(key) + len(key) + 17


POSITIONS: dict[str, Callable[[bytes], int]] = {
    "sample dose": lambda ln: _digit_after(ln, b'"dose_primary_gy":'),
    "sample state": lambda ln: ln.index(b'"state":"') + len(b'"state":"') + 2,
    "seq digit": lambda ln: _digit_after(ln, b',"seq":'),
    "ts digit": lambda ln: ln.index(b',"ts":"') + len(b',"ts":"') + 24,
    "mono_ns digit": lambda ln: _digit_after(ln, b',"mono_ns":') + 5,
    "hash hex": lambda ln: _hex_in(ln, b',"hash":"'),
    "prev hex": lambda ln: _hex_in(ln, b',"prev":"'),
    "type letter": lambda ln: ln.index(b',"type":"') + len(b',"type":"') + 1,
    "hash key": lambda ln: ln.index(b',"hash":"') + 3,
}


def _other_byte(b: int) -> int:
    c = bytes([b])
    if c.isdigit():
        return ord(str((int(c) + 3) % 10))
    if c in b"abcdef":
        return ord("0")
    return b ^ 0x20


@pytest.mark.parametrize("where", list(POSITIONS))
def test_a_changed_byte_is_found_at_its_entry(log: Log, where: str) -> None:
    t = log.target()
    line = bytearray(log.lines[t])
    at = POSITIONS[where](bytes(line))
    old = line[at]
    line[at] = _other_byte(old)
    log.write([*log.lines[:t], bytes(line), *log.lines[t + 1 :]])
    p = log.verify()
    found = not_intact(p)
    assert found["file"] == str(log.seg)
    assert found["line"] == str(t + 1), p.stdout
    seq = log.entries[t]["seq"]
    if where == "seq digit":
        # The entry is untrusted once altered: the verifier prints the seq it now claims.
        claimed = int(orjson.loads(bytes(line))["seq"])
        assert found["seq"] in (str(seq), str(claimed)), p.stdout
    elif where == "hash key":
        assert found["seq"] is None  # no hash field: not a log entry at all
        assert "not a log entry" in str(found["what"])
    else:
        assert found["seq"] == str(seq), p.stdout
        assert "altered" in str(found["what"])
    # also with the checkpoint held elsewhere: the first problem is the same
    assert not_intact(log.verify("--checkpoint", str(log.checkpoint))) == found


def test_a_removed_newline_is_found_at_its_entry(log: Log) -> None:
    t = log.target()
    log.write([*log.lines[:t], log.lines[t][:-1], *log.lines[t + 1 :]])
    p = log.verify()
    where = not_intact(p)
    assert where["file"] == str(log.seg)
    assert where["line"] == str(t + 1)
    # the merged line ends with the next entry's envelope, so its seq is the one printed
    assert where["seq"] in (str(t), str(t + 1))
    assert "altered" in str(where["what"])


def test_the_last_newline_removed_is_an_incomplete_line(log: Log) -> None:
    n = len(log.lines)
    log.write([*log.lines[:-1], log.lines[-1][:-1]])
    what = assert_location(log.verify(), log.seg, n, None)
    assert "incomplete last line" in what


def _run_cli(argv: list[str]) -> tuple[int, str]:
    """The console script's main() in this process: the same code, without the 0.2 s start
    of a new interpreter, so that hundreds of cases fit in a few seconds."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = audit_cli.main(argv)
    return rc, out.getvalue() + err.getvalue()


def test_random_single_byte_edits_are_all_detected(demo: DemoRun, tmp_path: Path) -> None:
    scratch = Log(demo, tmp_path / "log")
    base = b"".join(scratch.lines)
    argv = ["verify", str(scratch.dir), "--pubkey", str(scratch.pub)]
    assert _run_cli(argv)[0] == 0
    assert len(base) + 1 < 1_000_003, "the permutation below needs a prime above the size"

    @settings(max_examples=200, deadline=None, database=None)
    @given(
        op=st.sampled_from(["replace", "replace", "delete", "insert"]),
        # Hypothesis favours small integers: with a larger config_loaded near the top,
        # plain draws piled up on a few lines. A fixed permutation of the positions (by a
        # prime larger than the log) spreads them; shrinking still goes towards 0.
        pos=st.integers(0, len(base)).map(lambda p: p * 1_000_003 % (len(base) + 1)),
        value=st.integers(0, 255),
    )
    def edit_is_detected(op: str, pos: int, value: int) -> None:
        if op == "replace":
            assume(pos < len(base) and base[pos] != value)
            data = base[:pos] + bytes([value]) + base[pos + 1 :]
        elif op == "delete":
            assume(pos < len(base))
            data = base[:pos] + base[pos + 1 :]
        else:
            data = base[:pos] + bytes([value]) + base[pos:]
        tried.append(pos)
        scratch.write_bytes(data)
        rc, out = _run_cli(argv)
        assert rc == 1, out
        line = base.count(b"\n", 0, pos) + 1
        assert f"NOT INTACT: {scratch.seg}:{line}" in out, (op, pos, value, out)

    tried: list[int] = []
    edit_is_detected()
    assert len(tried) >= 200
    lines_hit = {base.count(b"\n", 0, pos) for pos in tried}
    assert len(lines_hit) >= len(scratch.lines) // 2, "edits spread over the file"


# ---- (b) an entry deleted, (c) two entries swapped --------------------------------------


@pytest.mark.parametrize("which", ["target", "first", "delivery_started"])
def test_a_deleted_entry_is_found(log: Log, which: str) -> None:
    t = {
        "target": log.target(),
        "first": 0,
        "delivery_started": log.index(lambda e: e["type"] == "delivery_started")[0],
    }[which]
    log.write([*log.lines[:t], *log.lines[t + 1 :]])
    what = assert_location(log.verify(), log.seg, t + 1, t + 1)
    if t == 0:  # the first entry gone: the log no longer starts at 0
        assert "the log starts at seq 1, not 0" in what
    else:
        assert f"seq {t + 1} where {t} was expected" in what


def test_swapped_entries_are_found(log: Log) -> None:
    t = log.target()
    lines = list(log.lines)
    lines[t], lines[t + 1] = lines[t + 1], lines[t]
    log.write(lines)
    what = assert_location(log.verify(), log.seg, t + 1, t + 1)
    assert f"where {t} was expected" in what


def test_an_inserted_copy_of_an_entry_is_found(log: Log) -> None:
    t = log.target()
    log.write([*log.lines[: t + 1], log.lines[t], *log.lines[t + 1 :]])
    what = assert_location(log.verify(), log.seg, t + 2, t)
    assert f"where {t + 1} was expected" in what


# ---- (d) truncation ----------------------------------------------------------------------


def test_truncation_mid_line_is_found(log: Log) -> None:
    t = log.target()
    half = log.lines[t][: len(log.lines[t]) // 2]
    log.write([*log.lines[:t], half])
    what = assert_location(log.verify(), log.seg, t + 1, None)
    assert "incomplete last line" in what
    p = log.verify("--checkpoint", str(log.checkpoint))
    assert "incomplete last line" in assert_location(p, log.seg, t + 1, None)


def test_truncation_at_a_line_boundary_is_found_by_the_seal_or_the_held_checkpoint(
    log: Log,
) -> None:
    t = log.target()
    log.write(log.lines[:t])
    what = assert_location(log.verify(), log.dir / "seal", None, t)
    assert f"entries from seq {t} on were removed" in what
    # A forger deletes the seal and the checkpoint file as well: the held checkpoint
    # still finds the cut, and without it the entries past the last signature are
    # reported as unvouched (exit 1), never as vouched for.
    log.drop_anchors()
    what = assert_location(log.verify("--checkpoint", str(log.checkpoint)), log.seg, None, t)
    assert f"entries from seq {t} on were removed" in what
    p = log.verify()
    assert p.returncode == 1, p.stdout
    assert p.stdout.startswith("INTACT: "), p.stdout
    assert "UNVOUCHED: seq " in p.stdout


def test_dropping_only_the_final_checkpoint_entry_is_not_a_removal(log: Log) -> None:
    """The held checkpoint covers the entries before the checkpoint entry, not itself."""
    cp = log.last_checkpoint()
    assert cp == len(log.lines) - 1
    log.write(log.lines[:cp])
    # The seal covered the checkpoint entry too: its removal is found by it,
    what = assert_location(log.verify(), log.dir / "seal", None, cp)
    assert "removed" in what
    # and without the seal, the checkpoint file and the held one vouch for all the rest.
    (log.dir / "seal").unlink()
    intact(log.verify("--checkpoint", str(log.checkpoint)))


# ---- (e) re-chained edits ----------------------------------------------------------------


def _edit_dose(entry: dict[str, Any]) -> dict[str, Any]:
    data = dict(entry["data"])
    data["dose_primary_gy"] = data["dose_primary_gy"] + 1.0
    data["delivered_primary_gy"] = data["delivered_primary_gy"] + 1.0
    return {**entry, "data": data}


def test_rechained_edits_are_found_by_the_checkpoint_entry(log: Log) -> None:
    t = log.target()
    entries = list(log.entries)
    entries[t] = _edit_dose(entries[t])
    log.write(rechain(entries))
    cp = next(i for i in range(t, len(entries)) if entries[i]["type"] == "checkpoint")
    for extra in ((), ("--checkpoint", str(log.checkpoint))):
        what = assert_location(log.verify(*extra), log.seg, cp + 1, cp)
        assert "rewritten" in what


def test_rechained_edits_with_the_checkpoints_cut_off_need_the_held_checkpoint(
    log: Log,
) -> None:
    t = log.target()
    entries = list(log.entries)
    entries[t] = _edit_dose(entries[t])
    cp = log.first_checkpoint()
    log.write(rechain(entries[:cp]))
    what = assert_location(log.verify(), log.dir / "seal", None, cp)  # shorter than its seal
    assert f"entries from seq {cp} on were removed" in what
    log.drop_anchors()
    cut = log.verify()  # the signatures after the edit are gone with the cut: found even so
    assert cut.returncode == 1, cut.stdout
    assert "UNVOUCHED: seq " in cut.stdout, cut.stdout
    held, _ = Checkpoint.parse_verified(log.checkpoint.read_text(encoding="utf-8"), None)
    assert held.count > cp, "the held (shutdown) checkpoint covers past the cut"
    p = log.verify("--checkpoint", str(log.checkpoint))
    # Cutting the signed checkpoints off shortens the log below what the held one covers.
    what = assert_location(p, log.seg, None, cp)
    assert f"entries from seq {cp} on were removed" in what


# ---- (f) the whole log replaced ----------------------------------------------------------


def test_a_replaced_log_is_found_with_the_held_checkpoint(
    log: Log, demo2: DemoRun, tmp_path: Path
) -> None:
    for f in log.dir.iterdir():
        if f.is_file():
            f.unlink()
    for f in demo2.log_dir.iterdir():
        if f.is_file():  # not mqtt-outbox/: the MQTT sink's, not part of the log
            shutil.copy2(f, log.dir / f.name)
    intact(log.verify())  # a valid log in itself, signed by the same key
    p = log.verify("--checkpoint", str(log.checkpoint))  # the first run's checkpoint
    [seg] = [x for x in log.dir.iterdir() if x.name.startswith("log-")]
    what = assert_location(p, seg, None, None)
    assert "replaced" in what


# ---- keygen ------------------------------------------------------------------------------


def test_keygen_makes_a_private_key_and_never_overwrites_it(tmp_path: Path) -> None:
    p = run(IORT_AUDIT, "keygen", "--name", "iortd-or-3", "--out", str(tmp_path))
    assert p.returncode == 0, p.stdout + p.stderr
    key, pub = tmp_path / "iortd-or-3.key", tmp_path / "iortd-or-3.pub"
    assert key.stat().st_mode & 0o777 == 0o600
    text = key.read_text(encoding="ascii")
    assert pub.read_text(encoding="ascii").strip() in p.stdout
    again = run(IORT_AUDIT, "keygen", "--name", "iortd-or-3", "--out", str(tmp_path))
    assert again.returncode == 2
    assert "not overwriting" in again.stderr
    assert key.read_text(encoding="ascii") == text
    bad = run(IORT_AUDIT, "keygen", "--name", "a+b", "--out", str(tmp_path))
    assert bad.returncode == 2
    assert "key name" in bad.stderr


# ---- show and deliveries -----------------------------------------------------------------


def test_show_delivery_prints_the_summary(log: Log) -> None:
    did = log.delivery_id()
    [started] = [e for e in log.entries if e["type"] == "delivery_started"]
    [ended] = [e for e in log.entries if e["type"] == "delivery_terminated"]
    p = run(IORT_AUDIT, "show", str(log.dir), "--delivery", did)
    assert p.returncode == 0, p.stdout + p.stderr
    out = p.stdout
    assert f"delivery {did}" in out
    assert f"prescribed      {started['data']['preset_gy']:.3f} Gy" in out
    summary = ended["data"]["summary"]
    assert (
        f"delivered       primary {summary['delivered_primary_gy']:.3f} Gy   "
        f"secondary {summary['delivered_secondary_gy']:.3f} Gy"
    ) in out
    status, reason = ended["data"]["status"], ended["data"]["reason"]
    assert status == "NORMAL"
    assert f"termination     {status} ({reason})" in out
    assert "covered by the checkpoint at seq" in out


def test_deliveries_lists_one_line_normal(log: Log) -> None:
    p = run(IORT_AUDIT, "deliveries", str(log.dir))
    assert p.returncode == 0, p.stdout + p.stderr
    lines = p.stdout.splitlines()
    assert len(lines) == 1, p.stdout
    assert lines[0].startswith(log.delivery_id())
    assert " NORMAL " in lines[0]


def test_show_on_a_tampered_log_warns_and_exits_1(log: Log) -> None:
    t = log.target()
    line = log.lines[t]
    at = POSITIONS["sample dose"](line)
    bad = line[:at] + bytes([_other_byte(line[at])]) + line[at + 1 :]
    log.write([*log.lines[:t], bad, *log.lines[t + 1 :]])
    for args in (["show", str(log.dir)], ["show", str(log.dir), "--delivery", log.delivery_id()]):
        p = run(IORT_AUDIT, *args)
        assert p.returncode == 1, p.stdout + p.stderr
        assert "warning: the log is NOT INTACT" in p.stderr
        assert f"{log.seg}:{t + 1}" in p.stderr
        assert p.stdout, "it still prints what it read"
    p = run(IORT_AUDIT, "deliveries", str(log.dir))
    assert p.returncode == 1
    assert "warning: the log is NOT INTACT" in p.stderr


def test_show_an_unknown_delivery_is_a_usage_error(log: Log) -> None:
    p = run(IORT_AUDIT, "show", str(log.dir), "--delivery", "no-such-delivery")
    assert p.returncode == 2
    assert "no delivery 'no-such-delivery'" in p.stderr


def test_show_since_with_a_utc_offset_means_the_same_instant(log: Log) -> None:
    t = log.target()
    ts = str(log.entries[t]["ts"])
    dt = datetime.fromisoformat(ts.replace("Z", "+00:00"))
    plus2 = (dt + timedelta(hours=2)).replace(tzinfo=None).isoformat() + "+02:00"
    zulu = run(IORT_AUDIT, "show", str(log.dir), "--since", ts)
    offset = run(IORT_AUDIT, "show", str(log.dir), "--since", plus2)
    assert zulu.returncode == offset.returncode == 0
    assert ts in zulu.stdout
    assert offset.stdout == zulu.stdout


def test_the_held_checkpoint_file_is_the_one_the_daemon_wrote(log: Log) -> None:
    note = log.checkpoint.read_text(encoding="utf-8")
    cp = log.entries[log.last_checkpoint()]
    assert cp["data"]["note"] == note
    held, _ = Checkpoint.parse_verified(note, None)
    assert held.count == cp["seq"]
    # A tree checkpoint (issue 20): line 3 the root (its entry says so), line 4 the head.
    assert base64.b64decode(note.split("\n")[2]).hex() == cp["data"]["root"]
    assert cp["data"]["tree"] == "rfc6962"
    assert note.split("\n")[3] == "head " + log.entries[cp["seq"] - 1]["hash"]


def test_entries_after_the_last_checkpoint_are_said_to_be_unsigned(log: Log) -> None:
    cp = log.first_checkpoint()
    assert log.entries[cp + 1]["type"] != "checkpoint"
    log.write(log.lines[: cp + 2])  # the delivery-end checkpoint and one entry after it
    log.drop_anchors()
    # A lock on LOCK alone is no running daemon (anyone who can write the directory can
    # hold one): with no seal coming to cover it within the commit window, unvouched. (A
    # running daemon's seal does: test_audit_hostile.py.)
    fd = os.open(log.dir / "LOCK", os.O_RDWR | os.O_CREAT, 0o640)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        p = log.verify()
    finally:
        os.close(fd)
    assert p.returncode == 1, p.stdout
    assert f"signed through seq {cp}; 1 later entry is not covered by a signature" in p.stdout
    assert "holds the log directory's LOCK, but no seal covered them" in p.stdout
    # With no daemon writing it, nothing vouches for it either: unvouched, exit 1.
    p = log.verify()
    assert p.returncode == 1, p.stdout
    assert f"UNVOUCHED: seq {cp + 1}..{cp + 1} (1 entry)" in p.stdout


def test_odd_inputs_get_clear_answers(log: Log, tmp_path: Path) -> None:
    # A shell glob over the directory: LOCK and checkpoint are not segments.
    files = sorted(str(p) for p in log.dir.iterdir())
    assert run(IORT_AUDIT, "verify", *files, "--pubkey", str(log.pub)).returncode == 0
    # An empty file is not an intact log.
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    p = run(IORT_AUDIT, "verify", str(empty))
    assert p.returncode == 1
    assert "no entries" in p.stdout
    # Times out of range, or years before 1000, are handled as times.
    bad = run(IORT_AUDIT, "show", str(log.dir), "--since", "9999-12-31T23:59:59-01:00")
    assert bad.returncode == 2
    assert "out of range" in bad.stderr
    early = run(IORT_AUDIT, "show", str(log.dir), "--until", "0999-01-01T00:00:00Z")
    assert early.returncode == 0
    assert early.stdout == ""
    # keygen into something that is not a directory, or with a path in the name.
    assert run(IORT_AUDIT, "keygen", "--name", "k", "--out", str(empty)).returncode == 2
    assert run(IORT_AUDIT, "keygen", "--name", "../evil", "--out", str(tmp_path)).returncode == 2
    assert not (tmp_path.parent / "evil.key").exists()


async def _big_log(directory: Path, n: int) -> None:
    log, _ = await AuditLog.open(directory, origin="test/or-1/pipe")
    task = asyncio.create_task(log.run())
    for i in range(n):
        log.append("sample", {"i": i, "state": "IRRADIATING"})
    await log.close()
    await task


def test_show_into_a_closed_pipe_is_quiet(tmp_path: Path) -> None:
    """`iort-audit show LOG | head -1`: the reader leaves early; no traceback."""
    asyncio.run(_big_log(tmp_path / "log", 3000))  # far more than a pipe buffer holds
    show = subprocess.Popen(
        [IORT_AUDIT, "show", str(tmp_path / "log")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert show.stdout is not None
    first = show.stdout.readline()
    show.stdout.close()  # what head does after one line
    _, err = show.communicate(timeout=60)
    assert first
    assert b"Traceback" not in err
    assert show.returncode == 0
