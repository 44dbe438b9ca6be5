"""kernel/scratch.py: a scratch directory names its owner and is locked while the owner
lives; a later start reclaims only what a dead owner left, never a live owner's, never
another user's, never through a symbolic link."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from iortd.kernel.scratch import LOCK_NAME, YOUNG_S, ScratchDir, process_start, reclaim

# A process that makes a scratch directory, says where, and waits to be killed.
OWNER = """
import sys
from pathlib import Path
from iortd.kernel.scratch import ScratchDir
d = ScratchDir("demo", base=Path(sys.argv[1]))
print(d.path, flush=True)
sys.stdin.read()
"""


def _owner(base: Path) -> tuple[subprocess.Popen[str], Path]:
    p = subprocess.Popen(
        [sys.executable, "-c", OWNER, str(base)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert p.stdout is not None
    return p, Path(p.stdout.readline().strip())


def test_the_name_says_kind_pid_and_start_and_the_directory_is_private(tmp_path: Path) -> None:
    with ScratchDir("demo", base=tmp_path) as d:
        kind, pid, start = d.path.name.split("-")[1:4]
        assert (kind, int(pid), int(start)) == ("demo", os.getpid(), process_start(os.getpid()))
        assert (d.path.stat().st_mode & 0o777) == 0o700
        assert (d.path / LOCK_NAME).exists()
        (d.path / "sub").mkdir()
    assert not d.path.exists(), "a normal exit removes it"
    d.close()  # idempotent


def test_a_live_owners_directory_is_kept_and_a_dead_ones_reclaimed(tmp_path: Path) -> None:
    live, live_dir = _owner(tmp_path)
    dead, dead_dir = _owner(tmp_path)
    try:
        (dead_dir / "mqtt").mkdir()
        (dead_dir / "mqtt" / "mosquitto.log").write_text("x")
        dead.kill()
        dead.communicate(timeout=5)
        assert reclaim("demo", base=tmp_path) == [dead_dir]
        assert live_dir.exists()
        assert not dead_dir.exists()
        assert reclaim("demo", base=tmp_path) == []
    finally:
        live.kill()
        live.communicate(timeout=5)
    assert reclaim("demo", base=tmp_path) == [live_dir]


def test_only_its_own_kind_and_real_directories_are_considered(tmp_path: Path) -> None:
    target = tmp_path / "precious"
    target.mkdir()
    (tmp_path / "iortd-demo-1-1-link").symlink_to(target)
    (tmp_path / "iortd-demo-1-1-file").write_text("not a directory")
    (tmp_path / "iortd-sim-1-1-other").mkdir()
    (tmp_path / "iortd-demo-x-1-badname").mkdir()
    (tmp_path / "unrelated").mkdir()
    assert reclaim("demo", base=tmp_path, now=time.time() + 2 * YOUNG_S) == []
    assert target.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "iortd-demo-1-1-file",
        "iortd-demo-1-1-link",
        "iortd-demo-x-1-badname",
        "iortd-sim-1-1-other",
        "precious",
        "unrelated",
    ]


def test_without_a_lock_file_age_pid_and_start_time_decide(tmp_path: Path) -> None:
    me, start = os.getpid(), process_start(os.getpid())
    assert start is not None
    mine = tmp_path / f"iortd-demo-{me}-{start}-abc"
    mine.mkdir()
    gone = tmp_path / "iortd-demo-999999999-1-abc"  # beyond pid_max: no such process
    gone.mkdir()
    reused = tmp_path / f"iortd-demo-{me}-{start + 1}-abc"  # same PID, another process
    reused.mkdir()
    assert reclaim("demo", base=tmp_path) == [], "young: its owner may be about to lock it"
    later = time.time() + 2 * YOUNG_S
    assert reclaim("demo", base=tmp_path, now=later) == sorted([gone, reused])
    assert mine.exists()


def test_a_lock_file_not_locked_yet_by_a_running_owner_is_kept(tmp_path: Path) -> None:
    """The owner made ``owner.lock`` and has not taken the lock yet: the lock can be had,
    but the PID and start time name a running process (this one), so it stays, old or
    not (d422d73)."""
    me, start = os.getpid(), process_start(os.getpid())
    assert start is not None
    mine = tmp_path / f"iortd-demo-{me}-{start}-abc"
    mine.mkdir()
    (mine / LOCK_NAME).touch()
    assert reclaim("demo", base=tmp_path, now=time.time() + 2 * YOUNG_S) == []
    assert (mine / LOCK_NAME).exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="making another user's directory needs root")
def test_another_users_directory_is_never_touched(tmp_path: Path) -> None:
    theirs = tmp_path / "iortd-demo-999999999-1-abc"
    theirs.mkdir()
    os.chown(theirs, 65534, 65534)
    assert reclaim("demo", base=tmp_path, now=time.time() + 2 * YOUNG_S) == []
    assert theirs.exists()


def test_a_bad_kind_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="kind"):
        ScratchDir("../x", base=tmp_path)
    with pytest.raises(ValueError, match="kind"):
        reclaim("demo-*", base=tmp_path)


def test_a_missing_base_reclaims_nothing(tmp_path: Path) -> None:
    assert reclaim("demo", base=tmp_path / "absent") == []
