#!/usr/bin/env python3
"""Rewrite references to the project's packages into the one ``iortd`` namespace.

The source folders stay where they are (``daemon/``, ``drivers/``, ``simulators/``,
``dashboard/``, ``config/``, ``docs/schemas/``) but install as ``iortd.daemon``,
``iortd.drivers``, ... (see ``[tool.setuptools]`` in pyproject.toml). This script rewrites
what still names the old top-level packages:

- Python ``import X...`` / ``from X... import`` statements;
- string literals that name a module of the project (``"daemon.cli"`` for ``python -m``,
  ``"drivers.sim:SimDriverFactory"`` entry points, ``monkeypatch`` targets), but only when the
  dotted name resolves to a module in the tree, so ``"dashboard.log"`` (a file name) or
  ``daemon.run(...)`` (a variable) are left alone;
- Sphinx cross-references (``:class:`~drivers.errors.X```) and inline code
  (```dashboard.state```) in docstrings and Markdown, with the same resolution check;
- ``python -m X.mod`` in Markdown and shell snippets;
- the former data packages ``iort_config`` / ``iort_schemas`` (now ``iortd.config`` /
  ``iortd.schemas``).

It is idempotent (an ``iortd.``-prefixed name is never rewritten again), so it can be
re-applied to files merged from branches that predate the namespace:

    python3 scripts/namespace-imports.py            # every tracked file
    python3 scripts/namespace-imports.py FILE ...   # only these
    python3 scripts/namespace-imports.py --check    # exit 1 if anything would change
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("daemon", "drivers", "simulators", "dashboard")
DATA = {"iort_config": "iortd.config", "iort_schemas": "iortd.schemas"}
SUFFIXES = {".py", ".md", ".toml", ".cfg", ".ini", ".txt", ".sh", ""}
SKIP_PREFIXES = (
    "scripts/namespace-imports.py",
    # These two name the old packages on purpose (samples; what must not import).
    "tests/unit/test_namespace.py",
    "tests/integration/test_install_wheel_venv.py",
    "iortd/",
    ".venv/",
    "requirements/",
)

_PKG = "|".join(PACKAGES)
# Not preceded by a word character, a dot, a slash or a dash: "iortd.daemon" and
# "docs/daemon.x" and "iort-daemon.x" stay as they are.
_LEAD = r"(?<![\w./-])"
_DOTTED = rf"{_LEAD}(?P<name>(?:{_PKG})(?:\.[A-Za-z_]\w*)*)"

_IMPORT = re.compile(rf"^(?P<indent>[ \t]*)(?P<kw>from|import)[ \t]+{_DOTTED}(?=[\s,;]|$)", re.M)
_QUOTED = re.compile(
    rf"(?P<q>[\"'`]){_LEAD}(?P<name>(?:{_PKG})(?:\.[A-Za-z_]\w*)+)(?P<attr>:[A-Za-z_]\w*)?(?P=q)"
)
_ROLE = re.compile(rf"(?P<role>:(?:class|func|meth|mod|attr|data|exc|obj):`~?){_DOTTED}")
_DASH_M = re.compile(rf"(?P<m>python3? -m |\.venv/bin/python -m ){_DOTTED}")
_DATA = re.compile(rf"{_LEAD}(?P<name>{'|'.join(DATA)})\b")


def _is_module(dotted: str) -> bool:
    """True if ``dotted`` starts with a module or package of the tree (``daemon.cli`` yes,
    ``daemon.cli.main`` yes (an attribute of a module), ``dashboard.log`` no)."""
    parts = dotted.split(".")
    if len(parts) == 1:
        return (ROOT / parts[0] / "__init__.py").is_file()
    base = ROOT / parts[0]
    for i in range(1, len(parts)):
        path = base.joinpath(*parts[1:i])
        if (path / parts[i] / "__init__.py").is_file() or (path / f"{parts[i]}.py").is_file():
            return True
        if not (path / parts[i]).is_dir():
            return False
    return False


def rewrite(text: str, suffix: str) -> str:
    def imp(m: re.Match[str]) -> str:
        return f"{m['indent']}{m['kw']} iortd.{m['name']}"

    def quoted(m: re.Match[str]) -> str:
        if not _is_module(m["name"]):
            return m[0]
        return f"{m['q']}iortd.{m['name']}{m['attr'] or ''}{m['q']}"

    def role(m: re.Match[str]) -> str:
        return f"{m['role']}iortd.{m['name']}" if _is_module(m["name"]) else m[0]

    def dash_m(m: re.Match[str]) -> str:
        return f"{m['m']}iortd.{m['name']}" if _is_module(m["name"]) else m[0]

    if suffix == ".py":
        text = _IMPORT.sub(imp, text)
    elif suffix == ".md":
        # Only inside fenced code blocks: prose like "import daemon" is not code.
        parts = re.split(r"(^```.*?^```)", text, flags=re.M | re.S)
        text = "".join(_IMPORT.sub(imp, p) if p.startswith("```") else p for p in parts)
    text = _QUOTED.sub(quoted, text)
    text = _ROLE.sub(role, text)
    text = _DASH_M.sub(dash_m, text)
    return _DATA.sub(lambda m: DATA[m["name"]], text)


def tracked() -> list[Path]:
    git = shutil.which("git")
    if git is None:
        raise SystemExit("namespace-imports: git not found on PATH; name the files to rewrite")
    out = subprocess.run(  # noqa: S603 (fixed argv: git ls-files, no input)
        [git, "ls-files"], cwd=ROOT, check=True, capture_output=True, text=True
    ).stdout
    return [ROOT / line for line in out.splitlines()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="*", type=Path)
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if needed")
    args = parser.parse_args(argv)
    files = [f.resolve() for f in args.files] or tracked()
    changed = []
    for path in files:
        rel = path.relative_to(ROOT).as_posix()
        if path.suffix not in SUFFIXES or rel.startswith(SKIP_PREFIXES) or not path.is_file():
            continue
        if path.suffix == "" and path.name != "Makefile" and not rel.startswith(".ci/"):
            continue
        try:
            old = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError:  # a fixture in another encoding: not ours to rewrite
            continue
        new = rewrite(old, path.suffix)
        if new != old:
            changed.append(rel)
            if not args.check:
                path.write_bytes(new.encode("utf-8"))
    for rel in changed:
        sys.stdout.write(("would rewrite " if args.check else "rewrote ") + rel + "\n")
    return 1 if args.check and changed else 0


if __name__ == "__main__":
    sys.exit(main())
