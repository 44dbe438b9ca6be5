"""packaging/copy-locked.py: the package's dependencies are copied from the development venv
only when they are exactly the lock's and unchanged since pip installed them (issue 17)."""

from __future__ import annotations

import base64
import hashlib
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "packaging" / "copy-locked.py"


def _record_line(site: Path, rel: str) -> str:
    digest = hashlib.sha256((site / rel).read_bytes()).digest()
    return f"{rel},sha256={base64.urlsafe_b64encode(digest).rstrip(b'=').decode()},1"


def _site(tmp_path: Path) -> Path:
    """An installed 'demo' 1.0 needing 'dep' (1.0, and 'extra' only for its extra 'x')."""
    site = tmp_path / "site"
    for name, requires in (("demo", ["dep", 'extra; extra == "x"']), ("dep", []), ("extra", [])):
        (site / name).mkdir(parents=True)
        (site / name / "__init__.py").write_text(f"NAME = {name!r}\n")
        info = site / f"{name}-1.0.dist-info"
        info.mkdir()
        meta = [f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0"]
        meta += [f"Requires-Dist: {r}" for r in requires]
        (info / "METADATA").write_text("\n".join(meta) + "\n")
        lines = [
            _record_line(site, f"{name}/__init__.py"),
            _record_line(site, f"{info.name}/METADATA"),
        ]
        lines += [f"{name}/__pycache__/__init__.cpython-311.pyc,,", f"{info.name}/RECORD,,"]
        lines += [f"../../../bin/{name},sha256=x,1"]
        (info / "RECORD").write_text("\n".join(lines) + "\n")
    return site


def _run(tmp_path: Path, site: Path, lock: str) -> subprocess.CompletedProcess[str]:
    (tmp_path / "lock.txt").write_text(lock)
    (tmp_path / "pyproject.toml").write_text('[project]\ndependencies = ["demo"]\n')
    target = tmp_path / "target"
    target.mkdir(exist_ok=True)
    args = [str(site), str(target), str(tmp_path / "lock.txt"), str(tmp_path / "pyproject.toml")]
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_copies_the_locked_closure_file_by_file(tmp_path: Path) -> None:
    site = _site(tmp_path)
    done = _run(tmp_path, site, "demo==1.0\ndep==1.0\nextra==1.0\n")
    assert done.returncode == 0, done.stderr
    target = tmp_path / "target"
    assert (target / "demo" / "__init__.py").read_text() == "NAME = 'demo'\n"
    assert (target / "dep-1.0.dist-info" / "RECORD").is_file()
    assert not (target / "extra").exists()  # only for an extra nobody asked for
    assert "2 distributions" in done.stderr


def test_a_changed_file_or_a_version_off_the_lock_is_refused(tmp_path: Path) -> None:
    site = _site(tmp_path)
    off = _run(tmp_path, site, "demo==1.0\ndep==1.1\n")
    assert off.returncode == 1
    assert "dep 1.0 is installed, the lock says 1.1" in off.stderr
    (site / "dep" / "__init__.py").write_text("NAME = 'patched'\n")
    changed = _run(tmp_path, site, "demo==1.0\ndep==1.0\n")
    assert changed.returncode == 1
    assert "changed since pip installed it" in changed.stderr
