"""docs/alarms.md and the tracker's rule table say the same thing, in both directions.

Every rule has a row and every row is a rule; each row's severities, hold, clearing and
tolerance keys are the rule's; and each documented default is the one the config and the
tracker use (the config's ``[tolerances]`` defaults come from ``TrackerSettings``).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from iortd.daemon.config import Tolerances
from iortd.daemon.tracker.alarms import RULES, Clears, Rule

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "alarms.md"

# What the "cleared" column starts with, for each way a rule clears.
CLEARS = {
    Clears.WHEN_FALSE: "**when false**",
    Clears.WHEN_FALSE_WHILE_OPEN: "**when false, until the end**",
    Clears.NEXT_READING: "**next reading**",
    Clears.NEXT_SELECTION: "**next selection**",
    Clears.END_OF_DELIVERY: "**end of delivery**",
}
# The config key for a tracker setting, where the config states it otherwise.
CONFIG_KEY = {"stale_after_s": "stale_after_polls"}


def rows(text: str) -> dict[str, list[str]]:
    """The alarms table: code -> its cells."""
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        m = re.fullmatch(r"\| `([a-z_]+)` \|(.*)\|", line.strip())
        if m is None:
            continue
        code, rest = m.group(1), [c.strip() for c in m.group(2).split(" | ")]
        assert code not in out, f"docs/alarms.md lists {code} twice"
        assert len(rest) == 5, f"docs/alarms.md: row {code} has {len(rest) + 1} cells, not 6"
        out[code] = rest
    return out


DOCUMENTED = rows(DOC.read_text("utf-8"))


def test_every_rule_is_documented_and_every_documented_alarm_is_a_rule() -> None:
    rules = [f"{r.code}" for r in RULES]
    assert len(rules) == len(set(rules)), "one row per code in the rule table"
    missing = sorted(set(rules) - set(DOCUMENTED))
    extra = sorted(set(DOCUMENTED) - set(rules))
    assert not missing, f"rules with no row in docs/alarms.md: {missing}"
    assert not extra, f"docs/alarms.md lists alarms that are no rule: {extra}"


def _hold(rule: Rule) -> str:
    return f"{rule.hold_s:g} s" if rule.hold_s else "none"


def _cleared(rule: Rule) -> str:
    label = CLEARS[rule.clears]
    if rule.clear_after_s:
        label = label.replace("**when false", f"**when false for {rule.clear_after_s:g} s")
    return label


def _tolerances(cell: str) -> dict[str, float | None]:
    """`key` = 0.05 pairs in a cell (a unit may follow the number), and `key` (required)
    for a tolerance with no default that a config must set (None)."""
    out: dict[str, float | None] = {
        k: float(v) for k, v in re.findall(r"`([a-z_]+)` = ([0-9.]+)", cell)
    }
    out.update(dict.fromkeys(re.findall(r"`([a-z_]+)` \(required", cell)))
    return out


@pytest.mark.parametrize("rule", RULES, ids=lambda r: f"{r.code}")
def test_each_row_says_what_its_rule_does(rule: Rule) -> None:
    severity, _raised, hold, cleared, tolerance = DOCUMENTED[f"{rule.code}"]
    assert severity == " / ".join(s.value for s in rule.severities)
    assert hold == _hold(rule)
    assert cleared.startswith(_cleared(rule)), (cleared, _cleared(rule))
    keys = [CONFIG_KEY.get(s, s) for s in rule.settings]
    documented = _tolerances(tolerance)
    assert sorted(documented) == sorted(keys), f"{rule.code}: tolerance keys"
    if not keys:
        assert tolerance == "none"
    defaults = Tolerances()
    for key in keys:
        assert documented[key] == getattr(defaults, key), f"{rule.code}: default of {key}"
