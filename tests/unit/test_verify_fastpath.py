"""verify_log at hashing speed (issue 21 item 2): the lines in the writer's exact form are
checked by byte comparison, every other line by a full parse that must give back the
line's own bytes; no check is lost on either path.

Each forgery here is chained properly (its hash recomputed, every later entry's prev and
hash too), as a forger with write access to the log directory would do: what catches it is
the check under test, not a broken chain.
"""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path

import pytest

from iortd.auditlog.note import Signer, generate_keypair
from iortd.auditlog.verify import verify_log
from iortd.auditlog.writer import AuditLog, segment_paths

ORIGIN = "iortd/test-site/or-9/00112233aabbccdd"
_HASH = b',"hash":"'
_PREV = b',"prev":"'


async def write_log(directory: Path, signer: Signer | None = None, n: int = 20) -> None:
    log, _ = await AuditLog.open(directory, origin=ORIGIN, signer=signer, group_commit_s=0.01)
    task = asyncio.create_task(log.run())
    try:
        if signer is not None:
            log.append("daemon_start", {"verifier_key": signer.verifier.text}, durable=True)
        for i in range(n):
            e = log.append("sample", {"dose_primary_gy": i * 0.5}, delivery_id="or9-x")
        e = log.append("café événement", {"note": "non-ASCII type: not the fast shape"})
        e = log.append("sample", {"dose_primary_gy": 99.0}, delivery_id="or9-x")
        await e.committed
    finally:
        await asyncio.wait_for(log.close(), 10)
        await asyncio.wait_for(task, 10)


def the_segment(directory: Path) -> Path:
    [seg] = segment_paths(directory)
    return seg


def rehash(line: bytes) -> bytes:
    at = line.rfind(_HASH)
    digest = hashlib.sha256(line[:at] + line[at + 74 :]).hexdigest().encode()
    return line[: at + 9] + digest + line[at + 73 :]


def forge(directory: Path, index: int, change: bytes, to: bytes) -> int:
    """Line ``index`` with ``change`` replaced by ``to`` (once), its hash recomputed and
    the chain after it rebuilt; returns the line's number (1-based)."""
    seg = the_segment(directory)
    lines = seg.read_bytes().splitlines()
    assert change in lines[index], lines[index]
    lines[index] = rehash(lines[index].replace(change, to, 1))
    for j in range(index + 1, len(lines)):
        h = lines[j - 1][lines[j - 1].rfind(_HASH) + 9 :][:64]
        p = lines[j].rfind(_PREV)
        lines[j] = rehash(lines[j][: p + 9] + h + lines[j][p + 73 :])
    seg.write_bytes(b"\n".join(lines) + b"\n")
    return index + 1


def envelope(directory: Path, index: int) -> bytes:
    line = the_segment(directory).read_bytes().splitlines()[index]
    return line[line.rfind(_HASH) + 73 :]


@pytest.fixture
def log_dir(tmp_path: Path) -> Path:
    asyncio.run(write_log(tmp_path))
    return tmp_path


def test_the_log_the_writer_writes_verifies_on_both_paths(log_dir: Path) -> None:
    rep = verify_log([log_dir])
    assert rep.problem is None, rep.problem
    assert rep.entries == 23


def test_a_space_in_the_envelope_is_not_the_writers_form(log_dir: Path) -> None:
    n = forge(log_dir, 5, b',"seq":5,', b',"seq": 5,')
    rep = verify_log([log_dir])
    assert rep.problem is not None
    assert (rep.problem.line, rep.problem.seq) == (n, 5), rep.problem
    assert "canonical form" in rep.problem.what, rep.problem


def test_a_duplicated_key_in_the_envelope_is_caught(log_dir: Path) -> None:
    # The first "seq" is what one JSON reader takes, the last what another (orjson) does.
    n = forge(log_dir, 7, b',"seq":7,', b',"seq":70,"seq":7,')
    rep = verify_log([log_dir])
    assert rep.problem is not None
    assert rep.problem.line == n, rep.problem
    assert "canonical form" in rep.problem.what, rep.problem


def test_a_duplicated_key_in_the_data_of_an_entry_verify_reads_is_caught(tmp_path: Path) -> None:
    signer = generate_keypair("fast")
    asyncio.run(write_log(tmp_path, signer))
    other = generate_keypair("forger").verifier.text.encode()
    n = forge(tmp_path, 1, b'{"verifier_key":', b'{"verifier_key":"' + other + b'","verifier_key":')
    rep = verify_log([tmp_path])
    assert rep.problem is not None
    assert rep.problem.line == n, rep.problem
    assert "canonical form" in rep.problem.what, rep.problem


def test_keys_out_of_order_are_caught(log_dir: Path) -> None:
    tail = envelope(log_dir, 4)
    ts_type = tail[tail.index(b',"ts":') : -1]
    ts, kind = ts_type.split(b',"type":')
    n = forge(log_dir, 4, ts_type, b',"type":' + kind + ts)
    rep = verify_log([log_dir])
    assert rep.problem is not None
    assert rep.problem.line == n, rep.problem
    assert "canonical form" in rep.problem.what, rep.problem


def test_an_escaped_character_the_writer_does_not_escape_is_caught(log_dir: Path) -> None:
    n = forge(log_dir, 6, b'"type":"sample"', b'"type":"s\\u0061mple"')
    rep = verify_log([log_dir])
    assert rep.problem is not None
    assert rep.problem.line == n, rep.problem
    assert "canonical form" in rep.problem.what, rep.problem


def test_a_hash_field_that_lies_is_caught(log_dir: Path) -> None:
    seg = the_segment(log_dir)
    lines = seg.read_bytes().splitlines()
    at = lines[9].rfind(_HASH) + 9
    lines[9] = lines[9][:at] + b"0" * 64 + lines[9][at + 64 :]
    seg.write_bytes(b"\n".join(lines) + b"\n")
    rep = verify_log([log_dir])
    assert rep.problem is not None
    assert (rep.problem.line, rep.problem.seq) == (10, 9), rep.problem
    assert "hash does not match" in rep.problem.what, rep.problem


def test_an_altered_sample_with_its_hash_recomputed_breaks_the_next_prev(log_dir: Path) -> None:
    seg = the_segment(log_dir)
    lines = seg.read_bytes().splitlines()
    lines[9] = rehash(lines[9].replace(b'"dose_primary_gy":', b'"dose_primary_gy":1', 1))
    seg.write_bytes(b"\n".join(lines) + b"\n")
    rep = verify_log([log_dir])
    assert rep.problem is not None
    assert (rep.problem.line, rep.problem.seq) == (11, 10), rep.problem
    assert "prev does not match" in rep.problem.what, rep.problem


def test_a_prev_that_lies_is_caught(log_dir: Path) -> None:
    tail = envelope(log_dir, 12)
    p = tail.index(b'"prev":"') + 8
    n = forge(log_dir, 12, tail[p : p + 64], b"a" * 64)
    rep = verify_log([log_dir])
    assert rep.problem is not None
    assert (rep.problem.line, rep.problem.seq) == (n, 12), rep.problem
    assert "prev does not match" in rep.problem.what, rep.problem


def test_an_uppercase_prev_is_not_the_previous_hash(log_dir: Path) -> None:
    tail = envelope(log_dir, 12)
    p = tail.index(b'"prev":"') + 8
    n = forge(log_dir, 12, tail[p : p + 64], tail[p : p + 64].upper())
    rep = verify_log([log_dir])
    assert rep.problem is not None
    assert rep.problem.line == n, rep.problem


def test_a_seq_that_skips_is_caught_with_its_seq(log_dir: Path) -> None:
    n = forge(log_dir, 8, b',"seq":8,', b',"seq":9,')
    rep = verify_log([log_dir])
    assert rep.problem is not None
    assert (rep.problem.line, rep.problem.seq) == (n, 9), rep.problem
    assert "seq 9 where 8 was expected" in rep.problem.what, rep.problem


def test_a_first_entry_that_is_not_log_created_is_caught(log_dir: Path) -> None:
    n = forge(log_dir, 0, b'"type":"log_created"', b'"type":"sample"')
    rep = verify_log([log_dir])
    assert rep.problem is not None
    assert (rep.problem.line, rep.problem.seq) == (n, 0), rep.problem
    assert "log_created" in rep.problem.what, rep.problem


def test_a_backward_ts_on_the_fast_path_is_a_warning(log_dir: Path) -> None:
    tail = envelope(log_dir, 10)
    ts = tail[tail.index(b'"ts":"') + 6 :][:27]
    n = forge(log_dir, 10, b'"ts":"' + ts, b'"ts":"2000' + ts[4:])
    rep = verify_log([log_dir])
    assert rep.problem is None, rep.problem
    assert rep.clock_steps_back == 1  # back at line n; forward again after it is no step
    assert any(f":{n} (seq 10): ts goes backwards" in w for w in rep.warnings), rep.warnings


def test_data_that_is_not_json_on_a_line_verify_parses_is_caught(log_dir: Path) -> None:
    n = forge(log_dir, 21, b'{"note":', b'{"note":,')
    rep = verify_log([log_dir])
    assert rep.problem is not None
    assert rep.problem.line == n, rep.problem
    assert "not a log entry" in rep.problem.what, rep.problem


def test_a_duplicated_delivery_id_is_caught(log_dir: Path) -> None:
    # Which delivery a sample belongs to: readers that take the first key would say "or9-y".
    n = forge(
        log_dir, 11, b',"delivery_id":"or9-x"', b',"delivery_id":"or9-y","delivery_id":"or9-x"'
    )
    rep = verify_log([log_dir])
    assert rep.problem is not None
    assert rep.problem.line == n, rep.problem
    assert "canonical form" in rep.problem.what, rep.problem


def test_a_second_hash_field_is_caught(log_dir: Path) -> None:
    n = forge(log_dir, 13, b',"hash":"', b',"hash":"' + b"1" * 64 + b'","hash":"')
    rep = verify_log([log_dir])
    assert rep.problem is not None
    assert rep.problem.line == n, rep.problem
    assert "canonical form" in rep.problem.what, rep.problem
