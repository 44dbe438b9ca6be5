"""What every benchmark prints about where it ran: the figures mean nothing without it."""

from __future__ import annotations

import os
import platform
import shutil
import sys
import tempfile
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

__all__ = ["cpu_model", "filesystem", "git_head", "print_header"]

REPO = Path(__file__).resolve().parent.parent


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def filesystem(path: Path, *, free: bool = False) -> str:
    """Mount point, fs type and device of ``path`` from /proc/self/mounts (the innermost
    mount holding it), and with ``free`` the free and total space."""
    real = str(path.resolve())
    found = ("?", "", "?")
    try:
        for line in Path("/proc/self/mounts").read_text().splitlines():
            dev, mnt, fstype, *_ = line.split()
            mnt = mnt.replace("\\040", " ")
            inside = real == mnt or real.startswith(mnt.rstrip("/") + "/")
            if inside and len(mnt) >= len(found[1]):
                found = (dev, mnt, fstype)
    except OSError:
        pass
    where = f"{found[2]} on {found[0]} at {found[1]}"
    if not free:
        return where
    st = os.statvfs(path)
    gib = st.f_frsize / 2**30
    return f"{where} ({st.f_bavail * gib:.0f} of {st.f_blocks * gib:.0f} GiB free)"


def git_head() -> str:
    """The commit measured (read from .git, no git binary needed)."""
    git = REPO / ".git"
    try:
        if git.is_file():  # a worktree: "gitdir: <main>/.git/worktrees/<name>"
            git = Path(git.read_text().strip().removeprefix("gitdir: "))
        head = (git / "HEAD").read_text().strip()
        if not head.startswith("ref: "):
            return head[:12]
        ref = head[5:]
        if (git / ref).exists():
            return (git / ref).read_text().strip()[:12]
        common = git / "commondir"  # a worktree's branches live in the main .git
        if common.exists():
            git = (git / common.read_text().strip()).resolve()
            if (git / ref).exists():
                return (git / ref).read_text().strip()[:12]
        for line in (git / "packed-refs").read_text().splitlines():
            if line.endswith(" " + ref):
                return line[:12]
    except OSError:
        pass
    return "unknown"


def print_header(title: str) -> None:
    """Title, date and commit, machine, CPU and Python: the first lines of every report."""
    u = platform.uname()
    print(title)
    print(f"  date       {datetime.now(UTC):%Y-%m-%d %H:%M:%S} UTC   repo {git_head()}")
    print(f"  machine    {u.system} {u.release} {u.machine} ({u.node})")
    print(f"  cpu        {cpu_model()}, {os.cpu_count()} cores")
    print(f"  python     {platform.python_implementation()} {platform.python_version()}")


def work_dir(given: Path | None, prefix: str) -> tuple[Path, Callable[[], None]]:
    """The directory a benchmark works in and how to clean it up: ``given`` (which must be
    empty), or a fresh temporary one on the repo's disk (the system's if it is on the same
    filesystem, else the git-ignored test-artifacts/), since what is measured fsyncs."""
    if given is not None:
        given.mkdir(parents=True, exist_ok=True)
        if any(given.iterdir()):
            sys.exit(f"--dir {given}: not empty; give an empty or new directory")
        return given, lambda: None
    parent = Path(tempfile.gettempdir())
    if os.stat(parent).st_dev != os.stat(REPO).st_dev:
        parent = REPO / "test-artifacts"
        parent.mkdir(exist_ok=True)
    d = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    return d, lambda: shutil.rmtree(d, ignore_errors=True)
