"""A command handler whose log cannot be read back at start is not installed, and says so
(daemon.commands.rebuild_or_off, used by every handler's install)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import structlog

from iortd.auditlog.logdir import LogDamaged
from iortd.daemon.commands import rebuild_or_off


def run(rebuild: object) -> tuple[int | None, list[tuple[str, str]], list[Any]]:
    said: list[tuple[str, str]] = []
    with structlog.testing.capture_logs() as logs:
        got = asyncio.run(
            rebuild_or_off(
                "things",
                "things are",
                rebuild,  # type: ignore[arg-type]
                lambda sev, text: said.append((sev, text)),
            )
        )
    return got, said, logs


def test_what_the_rebuild_returns() -> None:
    assert run(lambda: 7) == (7, [], [])


@pytest.mark.parametrize("exc", [OSError("EIO"), LogDamaged("segment 3 torn in the middle")])
def test_a_log_that_cannot_be_read_back_turns_the_handler_off_loudly(exc: Exception) -> None:
    def rebuild() -> int:
        raise exc

    got, said, logs = run(rebuild)
    assert got is None
    assert said == [("critical", "things are OFF this run: the log could not be read")]
    assert [e["event"] for e in logs] == ["things_off"]
    assert str(exc) in str(logs[0]["reason"])
