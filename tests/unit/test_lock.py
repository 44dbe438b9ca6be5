"""requirements/lock.txt is what `make venv` installs, as it is: with ``--no-deps``, so that
pip's resolver (most of a fresh clone's install time) does not run. Two things make that
safe: ``pip check`` after the install fails on a locked package whose own dependencies
the lock misses or pins incompatibly, and this test fails on a pin of pyproject.toml
(the runtime dependencies and every extra) that the lock does not hold at the same
version: a dependency added to pyproject.toml but not to the lock would otherwise be
missing from the venv."""

from __future__ import annotations

import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]


def locked() -> dict[str, str]:
    out: dict[str, str] = {}
    for n, raw in enumerate((ROOT / "requirements" / "lock.txt").read_text().splitlines(), 1):
        line = raw.partition("#")[0].strip()
        if not line:
            continue
        name, sep, version = line.partition("==")
        assert sep, f"requirements/lock.txt:{n}: {line!r} is not NAME==VERSION"
        out[canonicalize_name(name)] = version.strip()
    return out


def pinned() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        reqs += extra
    return [Requirement(r) for r in reqs]


def test_every_pin_of_pyproject_is_in_the_lock_at_the_same_version() -> None:
    lock = locked()
    wrong = []
    for req in pinned():
        have = lock.get(canonicalize_name(req.name))
        if have is None or not req.specifier.contains(have, prereleases=True):
            wrong.append(f"{req} (lock: {have or 'missing'})")
    assert not wrong, (
        "pyproject.toml pins what requirements/lock.txt does not hold; add it there with "
        f"its dependencies: {wrong}"
    )


def test_the_lock_names_each_package_once() -> None:
    lines = [
        canonicalize_name(line.partition("==")[0])
        for line in (ROOT / "requirements" / "lock.txt").read_text().splitlines()
        if line.partition("#")[0].strip()
    ]
    assert len(lines) == len(set(lines)), "a package is locked twice"
