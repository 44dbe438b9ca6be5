"""The sink plug-in surface: the base answers every callback the daemon makes with a
no-op, and the test plug-in imports only the public sink module (docs/engineers.md)."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

from iortd.daemon.sink_queue import SinkLike
from iortd.daemon.sinks import Sink

ROOT = Path(__file__).resolve().parents[2]
PLUGIN = ROOT / "tests" / "plugins" / "iortd_sink_recorder.py"
PUBLIC_FOR_SINKS = {"iortd.daemon.sinks", "iortd.kernel.types"}


def test_the_base_has_an_async_default_for_every_callback_the_daemon_makes() -> None:
    called = {n for n, _ in inspect.getmembers(SinkLike, inspect.isfunction) if n[0] != "_"}
    assert called >= {"run", "started", "sample", "events", "checkpoint", "notice", "aclose"}
    for name in [*called, "start"]:
        assert inspect.iscoroutinefunction(getattr(Sink, name)), name


async def test_a_bare_sink_accepts_every_callback() -> None:
    s = Sink()
    await s.start()
    await s.run()
    await s.started("d", None)  # type: ignore[arg-type]
    await s.sample(None)  # type: ignore[arg-type]
    await s.events([], None)
    await s.checkpoint("origin\n1\nhead\n")
    await s.notice("info", "m")
    await s.aclose()


def test_the_test_plugin_imports_only_the_public_sink_api() -> None:
    tree = ast.parse(PLUGIN.read_text("utf-8"))
    used = {
        n.module
        for n in ast.walk(tree)
        if isinstance(n, ast.ImportFrom) and n.module and n.module.startswith("iortd")
    }
    used |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names} & {
        "iortd"
    }
    assert used
    assert used <= PUBLIC_FOR_SINKS, used - PUBLIC_FOR_SINKS
