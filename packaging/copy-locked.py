"""Copy iortd's locked runtime dependencies from an installed venv into the package's venv.

    python packaging/copy-locked.py SOURCE_SITE_PACKAGES TARGET_SITE_PACKAGES LOCK PYPROJECT

Run by packaging/build-deb with the development venv's Python (``make venv`` installed it
from requirements/lock.txt). The dependencies of the package's venv are the distributions
iortd needs at run time (pyproject's ``dependencies`` and theirs, markers and extras
evaluated, no dev or ``reports`` extras), and each is copied only if

- its version is the lock's, and
- every file its ``RECORD`` lists inside site-packages still has the SHA-256 written there
  when pip installed it from the locked wheel,

so the copy is byte for byte what ``pip install`` of the locked wheels makes, without a
download or a resolver run (the slow part of a cold build). Anything else (a version off
the lock, a changed or missing file) exits 1 naming it: build-deb then falls back to
installing from downloaded wheels. Compiled ``.pyc`` files are not copied (build-deb
compiles for the package's paths); console scripts of dependencies are not needed and not
copied.
"""

from __future__ import annotations

import base64
import hashlib
import shutil
import sys
import tomllib
from importlib.metadata import Distribution, distributions
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name


class NotLocked(Exception):
    pass


def _lock(path: Path) -> dict[str, str]:
    pins = {}
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            pins[canonicalize_name(name)] = version.strip()
    return pins


def _closure(site: Path, roots: list[str], pins: dict[str, str]) -> list[Distribution]:
    installed = {canonicalize_name(d.metadata["Name"]): d for d in distributions(path=[str(site)])}
    env = default_environment()
    todo = [(Requirement(r), "") for r in roots]
    seen: dict[str, Distribution] = {}
    visited: set[tuple[str, str]] = set()
    while todo:
        req, extra = todo.pop()
        if req.marker is not None and not req.marker.evaluate({**env, "extra": extra}):
            continue
        name = canonicalize_name(req.name)
        dist = installed.get(name)
        if dist is None:
            raise NotLocked(f"{req.name} is not installed in {site}")
        if pins.get(name) != dist.version:
            locked = pins.get(name)
            raise NotLocked(f"{req.name} {dist.version} is installed, the lock says {locked}")
        if not req.specifier.contains(dist.version, prereleases=True):
            raise NotLocked(f"{req.name} {dist.version} does not satisfy {req}")
        for wanted in ["", *sorted(req.extras)]:
            if (name, wanted) not in visited:
                visited.add((name, wanted))
                todo += [(Requirement(r), wanted) for r in dist.requires or []]
        seen[name] = dist
    return sorted(seen.values(), key=lambda d: canonicalize_name(d.metadata["Name"]))


def _copy(dist: Distribution, site: Path, target: Path) -> int:
    copied = 0
    for entry in dist.files or []:
        rel = Path(entry)
        if rel.parts[0] == ".." or "__pycache__" in rel.parts:
            continue  # scripts in bin/, compiled files
        source = site / rel
        if entry.hash is None:
            if not rel.name.endswith(("RECORD", "INSTALLER", "REQUESTED")):
                raise NotLocked(f"{source}: RECORD gives no hash")
        else:
            digest = hashlib.new(entry.hash.mode, source.read_bytes()).digest()
            if base64.urlsafe_b64encode(digest).rstrip(b"=").decode() != entry.hash.value:
                raise NotLocked(f"{source}: changed since pip installed it")
        dest = target / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, dest)
        copied += 1
    return copied


def main(argv: list[str]) -> int:
    if len(argv) != 4:
        print(__doc__.split("\n\n")[1], file=sys.stderr)  # noqa: T201 - CLI usage
        return 2
    site, target, lock, pyproject = (Path(a) for a in argv)
    roots = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]["dependencies"]
    try:
        dists = _closure(site, roots, _lock(lock))
        files = sum(_copy(d, site, target) for d in dists)
    except (NotLocked, OSError) as exc:
        print(f"copy-locked: {exc}", file=sys.stderr)  # noqa: T201 - CLI output
        return 1
    names = ", ".join(f"{d.metadata['Name']} {d.version}" for d in dists)
    print(f"copy-locked: {len(dists)} distributions, {files} files: {names}", file=sys.stderr)  # noqa: T201
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
