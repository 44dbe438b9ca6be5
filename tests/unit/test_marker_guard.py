"""The writer's ``hash_at`` for an entry retention moved to the archive (auditlog/marker.py
``hash_at_anywhere``), which the fork guard (daemon/service.py) compares with the broker's
signed checkpoint, trusts nothing a person with write access to the log directory or the
share can change without breaking the chain:

* the archive is the configured one (``[log.retention] archive_dir``), never the one the
  ``retention`` marker names: a marker edited to point at a directory of forged segments
  changes nothing;
* what is read from the archive must hash-chain, entry by entry, from the entry asked for
  to the first entry still in the log directory (its ``prev``): a self-consistent forged
  segment put in the archive in place of the real one gives no hash at all.

Real writer, real retention round, tiny segments (helpers of test_retention.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from test_retention import ORIGIN, entries, fill, running, settings

from iortd.auditlog import marker
from iortd.auditlog.archive import archive_dir_for
from iortd.auditlog.canonical import canonical, seal
from iortd.auditlog.marker import MARKER_FILE, read_marker
from iortd.auditlog.note import Signer, generate_keypair
from iortd.auditlog.retention import RetentionManager
from iortd.auditlog.writer import AuditLog, segment_paths

SEQ = 5


@pytest.fixture
def signer() -> Signer:
    return generate_keypair("or-9")


@contextlib.asynccontextmanager
async def retained(tmp_path: Path, signer: Signer) -> AsyncIterator[tuple[AuditLog, Path, str]]:
    """A running log whose first segments retention archived and deleted: the log, its
    archive directory, the genuine hash of entry SEQ."""
    share = tmp_path / "share"
    share.mkdir()
    async with running(tmp_path / "log", signer) as log:
        await fill(log, 120)
        genuine = str(entries(log.directory)[SEQ]["hash"])
        res = await RetentionManager(log, settings(share, 1024)).run_once()
        assert res is not None
        assert res.deleted
        assert int(segment_paths(log.directory)[0].name[4:20]) > SEQ
        yield log, archive_dir_for(share, ORIGIN), genuine


def forge(segment: Path, dest: Path) -> str:
    """``segment`` with entry SEQ's data changed and every hash after it recomputed (a
    self-consistent chain of its own), written to ``dest``; the forged hash of SEQ."""
    out, prev, forged = [], None, ""
    for raw in segment.read_bytes().splitlines():
        obj: dict[str, Any] = orjson.loads(raw)
        if obj["seq"] == SEQ:
            obj["data"] = {**obj["data"], "i": 999}
        if prev is not None:
            obj["prev"] = prev
        del obj["hash"]
        line, prev = seal(canonical(obj))
        out.append(line)
        if obj["seq"] == SEQ:
            forged = prev
    dest.write_bytes(b"".join(out))
    return forged


def holding(directory: Path, seq: int) -> Path:
    return [p for p in segment_paths(directory) if int(p.name[4:20]) <= seq][-1]


async def test_a_marker_naming_another_archive_is_not_followed(
    tmp_path: Path, signer: Signer
) -> None:
    async with retained(tmp_path, signer) as (log, archived, genuine):
        # Someone with write access to the log directory: forged segments elsewhere, and
        # the marker edited to name them.
        evil = tmp_path / "evil"
        shutil.copytree(archived, evil)
        target = holding(evil, SEQ)
        forged = forge(target, target)
        marker = read_marker(log.directory)
        assert marker is not None
        (log.directory / MARKER_FILE).write_bytes(
            orjson.dumps({**marker, "archive": str(evil)}, option=orjson.OPT_SORT_KEYS)
        )
        got = await log.hash_at(SEQ)
        assert got != forged, "the marker's archive was followed"
        assert got == genuine


async def test_a_forged_segment_in_the_archive_does_not_chain_to_the_log(
    tmp_path: Path, signer: Signer
) -> None:
    async with retained(tmp_path, signer) as (log, archived, genuine):
        target = holding(archived, SEQ)
        forged = forge(target, target)
        assert forged != genuine
        got = await log.hash_at(SEQ)
        assert got != forged, "a forged archive segment was trusted"
        assert got is None


async def test_without_a_configured_archive_nothing_archived_is_vouched_for(
    tmp_path: Path, signer: Signer
) -> None:
    """The marker names a genuine archive, but the daemon has none configured (the
    marker could name anything): no hash."""
    async with retained(tmp_path, signer) as (log, _, _):
        log.archive_root = None
        assert await log.hash_at(SEQ) is None


async def test_a_hung_share_gives_no_hash_within_the_bound(
    tmp_path: Path, signer: Signer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The archive read hangs (a stalled NFS mount): the guard's question is answered
    with None (not vouched for) within HASH_AT_TIMEOUT_S, and the reading thread, a
    daemon thread, is abandoned rather than joined."""
    never = threading.Event()

    def hung(*args: object) -> str | None:
        never.wait()
        return None

    async with retained(tmp_path, signer) as (log, _, _):
        monkeypatch.setattr(marker, "hash_at_anywhere", hung)
        monkeypatch.setattr(marker, "HASH_AT_TIMEOUT_S", 0.2)
        try:
            async with asyncio.timeout(5):
                assert await log.hash_at(SEQ) is None
        finally:
            never.set()
