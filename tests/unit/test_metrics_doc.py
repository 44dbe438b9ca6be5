"""The metric names are a contract: docs/operations.md lists exactly the names the daemon's
and the dashboard's collectors define (a counter is listed with the ``_total`` that its
exposition adds)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "operations.md"


def in_code(path: str, prefix: str) -> set[str]:
    text = (ROOT / path).read_text("utf-8")
    return set(re.findall(rf'"({prefix}_[a-z_]+)"', text))


def in_doc(prefix: str) -> set[str]:
    rows = re.findall(rf"^\| `({prefix}_[a-z_]+)` \|", DOC.read_text("utf-8"), re.MULTILINE)
    return {name.removesuffix("_total") for name in rows}


@pytest.mark.parametrize(
    ("path", "prefix"), [("daemon/metrics.py", "iortd"), ("dashboard/metrics.py", "iort_dashboard")]
)
def test_the_documented_metrics_are_the_defined_ones(path: str, prefix: str) -> None:
    code, doc = in_code(path, prefix), in_doc(prefix)
    assert code, f"no {prefix}_ names found in {path}"
    assert code == doc, (
        f"defined in {path} but not in docs/operations.md: {sorted(code - doc)}; "
        f"documented but not defined: {sorted(doc - code)}"
    )
