"""The repository stands alone: nothing in it points at a document a user cannot open.

A user gets the repository and nothing else. So no tracked file may refer to the
development machine's shared notes (a parent directory called ``shared``, or the absolute
path to them), no tracked file may name a Markdown file that the repository does not hold,
and every relative link in the Markdown docs must lead to a tracked file (and to a heading
that exists, when the link names one). The facts those notes held live in docs/domain.md,
docs/dependencies.md and docs/architecture.md, with their public sources.

Tracked files are what ``git ls-files`` lists: local clutter (``.venv``, build output) is
not part of the repository and is not checked.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import unicodedata
from functools import cache
from pathlib import Path, PurePosixPath

import pytest

ROOT = Path(__file__).resolve().parents[2]

# Built from pieces so that this file does not trip its own check.
_SHARED = "shared"
FORBIDDEN = (f"../{_SHARED}", f"/work/{_SHARED}")

# (file, exact text, why it is not a reference to a document)
ALLOWED = {
    (
        "tests/unit/test_config.py",
        f"../{_SHARED}/mqtt.password",
    ): "a secret file's path in a test of relative-path resolution, not a document",
}

_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s)\]>\"'`]+")
_MD_NAME = re.compile(r"(?<![\w./-])((?:/|(?:\.{1,2}/)*)[\w-][\w./-]*\.md)(?![\w-])")
_INLINE_LINK = re.compile(r"!?\[(?:[^\]\\]|\\.)*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_REF_LINK = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+\"[^\"]*\")?\s*$", re.MULTILINE)
_FENCE = re.compile(r"^(```|~~~).*?^\1\s*$", re.MULTILINE | re.DOTALL)
_HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.MULTILINE)


@cache
def tracked_files() -> tuple[str, ...]:
    git = shutil.which("git")
    if git is None:
        pytest.fail("git is not on PATH: this test lists the repository's files with git ls-files")
    done = subprocess.run(
        [git, "-C", str(ROOT), "ls-files", "-z"], capture_output=True, check=False, timeout=30
    )
    if done.returncode != 0:
        pytest.fail(
            f"git ls-files in {ROOT} failed ({done.stderr.decode(errors='replace').strip()}): "
            "this test checks a git checkout of the repository"
        )
    out = done.stdout
    return tuple(sorted(name for name in out.decode("utf-8").split("\0") if name))


@cache
def tracked_set() -> frozenset[str]:
    """Every tracked file and every directory that holds one."""
    names = set(tracked_files())
    for name in tracked_files():
        names.update(str(parent) for parent in PurePosixPath(name).parents)
    return frozenset(names)


def _text(rel: str) -> str | None:
    """The file's text, or None for binary files (fonts, images)."""
    data = (ROOT / rel).read_bytes()
    if b"\0" in data:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


THIS_FILE = Path(__file__).resolve().relative_to(ROOT).as_posix()


def _text_files() -> list[tuple[str, str]]:
    files = []
    for rel in tracked_files():
        # This file's own test data names missing files on purpose; a file deleted in the
        # work tree but not yet committed has nothing to check.
        if rel == THIS_FILE or not (ROOT / rel).is_file():
            continue
        text = _text(rel)
        if text is not None:
            files.append((rel, text))
    return files


def _lineno(text: str, index: int) -> int:
    return text.count("\n", 0, index) + 1


def _inside_repo(rel: str) -> str | None:
    """A path relative to the repository root, normalised; None when it climbs out."""
    parts: list[str] = []
    for part in PurePosixPath(rel).parts:
        if part in ("", "."):
            continue
        if part == "..":
            if not parts:
                return None
            parts.pop()
        else:
            parts.append(part)
    return "/".join(parts)


def _exists(rel: str | None) -> bool:
    if rel is None:
        return False
    return (rel or ".") in tracked_set()


def find_outside_references(files: list[tuple[str, str]]) -> list[str]:
    problems = []
    for rel, text in files:
        for needle in FORBIDDEN:
            start = text.find(needle)
            while start != -1:
                end = start + len(needle)
                while end < len(text) and not text[end].isspace() and text[end] not in "\"'`)":
                    end += 1
                while end > start + len(needle) and text[end - 1] in ".,:;":
                    end -= 1
                if (rel, text[start:end]) not in ALLOWED:
                    problems.append(
                        f"{rel}:{_lineno(text, start)}: refers to {text[start:end]!r}, which is "
                        "outside the repository: cite docs/domain.md, docs/dependencies.md or "
                        "docs/architecture.md instead"
                    )
                start = text.find(needle, end)
    return problems


def find_missing_markdown_names(files: list[tuple[str, str]]) -> list[str]:
    """Every ``something.md`` a tracked file names must be a tracked file: relative to the
    naming file, or to the repository root; a bare name may be any tracked file's name."""
    basenames = {PurePosixPath(name).name for name in tracked_files()}
    problems = []
    for rel, text in files:
        here = PurePosixPath(rel).parent
        scrubbed = _URL.sub(lambda m: " " * len(m.group(0)), text)
        for match in _MD_NAME.finditer(scrubbed):
            name = match.group(1)
            if name.startswith("/"):  # an absolute path is never the repository's
                candidates: tuple[str | None, ...] = ()
            else:
                candidates = (_inside_repo(str(here / name)), _inside_repo(name))
            if any(c is not None and c in tracked_set() for c in candidates):
                continue
            if candidates and "/" not in name and name in basenames:
                continue
            problems.append(
                f"{rel}:{_lineno(text, match.start(1))}: names {name!r}, which is not a file "
                "in this repository: point it at the repository's own docs"
            )
    return problems


def github_anchor(heading: str) -> str:
    """The id GitHub gives a heading: lower case, markup and punctuation dropped (except
    '-' and '_'), spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link keeps its text
    text = text.replace("`", "").replace("*", "").lower()
    text = "".join(
        ch for ch in text if ch in "-_ " or unicodedata.category(ch)[0] in ("L", "N", "M")
    )
    return text.replace(" ", "-")


@cache
def anchors(rel: str) -> frozenset[str]:
    text = _FENCE.sub("", (ROOT / rel).read_text(encoding="utf-8"))
    seen: dict[str, int] = {}
    ids = set()
    for match in _HEADING.finditer(text):
        base = github_anchor(match.group(1))
        count = seen.get(base, 0)
        seen[base] = count + 1
        ids.add(base if count == 0 else f"{base}-{count}")
    ids.update(re.findall(r"<a\s+(?:name|id)=\"([^\"]+)\"", text))
    return frozenset(ids)


def find_broken_links(files: list[tuple[str, str]]) -> list[str]:
    problems = []
    for rel, text in files:
        if not rel.endswith(".md"):
            continue
        here = PurePosixPath(rel).parent
        body = _FENCE.sub(lambda m: "\n" * m.group(0).count("\n"), text)
        targets = [m for pattern in (_INLINE_LINK, _REF_LINK) for m in pattern.finditer(body)]
        for match in targets:
            target = match.group(1)
            if re.match(r"[A-Za-z][A-Za-z0-9+.-]*:", target):  # https:, mailto:
                continue
            path, _, fragment = target.partition("#")
            where = f"{rel}:{_lineno(body, match.start(1))}"
            resolved = _inside_repo(str(here / path)) if path else rel
            if not _exists(resolved):
                problems.append(f"{where}: link {target!r} leads to no file in the repository")
                continue
            if (
                fragment
                and resolved is not None
                and resolved.endswith(".md")
                and fragment not in anchors(resolved)
            ):
                problems.append(f"{where}: link {target!r}: {resolved} has no such heading")
    return problems


def test_no_tracked_file_refers_outside_the_repository() -> None:
    assert find_outside_references(_text_files()) == []


def test_every_markdown_file_named_is_in_the_repository() -> None:
    assert find_missing_markdown_names(_text_files()) == []


def test_every_relative_link_in_the_docs_resolves() -> None:
    assert find_broken_links(_text_files()) == []


def test_the_changelog_is_linked_from_the_readme_and_has_an_unreleased_section() -> None:
    assert "CHANGELOG.md" in tracked_files(), "CHANGELOG.md is missing from the repository"
    changelog = (ROOT / "CHANGELOG.md").read_text(encoding="utf-8")
    assert re.search(r"^## \[?Unreleased\]?", changelog, re.MULTILINE), (
        "CHANGELOG.md: no '## [Unreleased]' section (Keep a Changelog)"
    )
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "(CHANGELOG.md)" in readme, "README.md does not link CHANGELOG.md"


USER_DOCS = ("docs/physicists.md", "docs/engineers.md", "docs/auditors.md", "docs/development.md")
README_MAX_LINES = 160


def test_the_readme_is_a_front_door_with_one_link_per_user() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    lines = readme.count("\n") + (0 if readme.endswith("\n") else 1)
    assert lines <= README_MAX_LINES, (
        f"README.md has {lines} lines (at most {README_MAX_LINES}): move the detail into "
        "the user docs it links"
    )
    links = {m.group(1).partition("#")[0] for m in _INLINE_LINK.finditer(readme)}
    missing = [doc for doc in USER_DOCS if doc not in links]
    assert missing == [], f"README.md does not link {missing}"
    for doc in USER_DOCS:
        assert doc in tracked_files(), f"{doc} is not in the repository"


# --- the checks themselves catch what they claim to -------------------------------------


def test_the_checks_catch_outside_references_missing_names_and_broken_links() -> None:
    page = (
        f"See ../{_SHARED}/DOMAIN.md and /work/{_SHARED}/LIBRARIES.md.\n"
        "Also STYLE.md, [the log](audit-log.md), [gone](nowhere.md), "
        "[bad anchor](audit-log.md#no-such-heading), [up](../../outside.md), "
        "[web](https://example.org/x.md) and [ok](../README.md).\n"
    )
    files = [("docs/example.md", page)]
    outside = find_outside_references(files)
    assert len(outside) == 2
    assert all("outside the repository" in line for line in outside)
    missing = "\n".join(find_missing_markdown_names(files))
    for name in ("DOMAIN.md", "LIBRARIES.md", "STYLE.md", "nowhere.md", "outside.md"):
        assert name in missing
    assert "audit-log.md'" not in missing
    assert "example.org" not in missing
    broken = "\n".join(find_broken_links(files))
    assert "'nowhere.md'" in broken
    assert "no-such-heading" in broken
    assert "outside.md" in broken
    assert "'audit-log.md'" not in broken
    assert "'../README.md'" not in broken


def test_github_anchors() -> None:
    assert github_anchor("Signed checkpoints") == "signed-checkpoints"
    assert github_anchor("`status`") == "status"
    durability = 'Durability: what "in the log" means'
    assert github_anchor(durability) == "durability-what-in-the-log-means"
    assert github_anchor("XRS-ASCII/1: serial line protocol") == "xrs-ascii1-serial-line-protocol"


def test_no_merge_conflict_markers_anywhere() -> None:
    """A merge resolved in a hurry must not leave its markers in a doc, a config or code."""
    tracked = subprocess.run(
        ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True
    ).stdout.split(b"\0")
    marker = re.compile(rb"^(<{7} |>{7} |={7}$)", re.M)
    found = []
    for name in filter(None, tracked):
        path = ROOT / name.decode()
        if (
            path.is_file()
            and not path.is_symlink()
            and path.suffix not in {".png", ".pdf", ".dcm", ".woff2"}
        ):
            data = path.read_bytes()
            m = marker.search(data)
            if m:
                line = data.count(b"\n", 0, m.start()) + 1
                found.append(f"{name.decode()}:{line}")
    assert not found, f"merge conflict markers left in: {found}"
