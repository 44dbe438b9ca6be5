"""Helpers for the dashboard's tests: `iort-dashboard` and `iort-sim serve` as processes
of the test's own (stopped by PID), and headless Debian Chromium driven by Playwright.

Chromium is the system's (/usr/bin/chromium, apt package ``chromium``, which `make test`
installs): Playwright's pip package brings its driver, never a browser download.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import signal
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from playwright.async_api import Browser, ConsoleMessage, Page, Request, async_playwright

BIN = Path(sys.executable).parent
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "dashboard"
# Without these Chromium reaches for Google's hosts at start (machine notes).
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def chromium_path() -> str:
    exe = shutil.which("chromium") or (
        "/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None
    )
    assert exe is not None, (
        "Debian's chromium is not installed: `make test` installs it as root "
        "(or: sudo apt-get install -y chromium)"
    )
    return exe


@dataclass
class Dashboard:
    """`iort-dashboard` as a process; ``url`` from its ready line."""

    proc: asyncio.subprocess.Process
    url: str
    log: Path

    @classmethod
    async def start(
        cls, broker_url: str, log: Path, *extra: str, port: int = 0, within_s: float = 15
    ) -> Dashboard:
        with log.open("ab") as err:  # the child keeps its own copy of the descriptor
            proc = await asyncio.create_subprocess_exec(
                str(BIN / "iort-dashboard"),
                *("--broker", broker_url, "--port", str(port), *extra),
                stdout=asyncio.subprocess.PIPE,
                stderr=err,
            )
        assert proc.stdout is not None
        try:
            async with asyncio.timeout(within_s):
                line = (await proc.stdout.readline()).decode()
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise AssertionError(f"iort-dashboard not serving within {within_s} s") from None
        if not line.startswith("iort-dashboard: serving "):
            await proc.wait()
            raise AssertionError(f"iort-dashboard did not start: {line!r}; see {log}")
        return cls(proc, line.split()[-1], log)

    @property
    def netloc(self) -> str:
        return urlsplit(self.url).netloc

    @property
    def port(self) -> int:
        port = urlsplit(self.url).port
        assert port is not None
        return port

    async def stop(self, within_s: float = 10) -> int:
        """SIGTERM; its exit status (0 for a clean stop)."""
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(within_s):
            return await self.proc.wait()

    async def kill(self) -> None:
        if self.proc.returncode is None:
            self.proc.kill()
        await self.proc.wait()

    def log_records(self) -> list[dict[str, Any]]:
        return [json.loads(x) for x in self.log.read_text("utf-8").splitlines() if x.strip()]


@asynccontextmanager
async def chromium() -> AsyncIterator[Browser]:
    """Headless Debian Chromium with a fresh profile (Playwright makes a temporary one)."""
    async with async_playwright() as p:
        browser = await p.chromium.launch(
            executable_path=chromium_path(), headless=True, args=CHROMIUM_ARGS
        )
        try:
            yield browser
        finally:
            await browser.close()


@dataclass
class Recorder:
    """Every request the page makes, and every error it reports."""

    requests: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def attach(self, page: Page) -> None:
        def on_request(req: Request) -> None:
            self.requests.append(req.url)

        def on_console(msg: ConsoleMessage) -> None:
            # A request the Content-Security-Policy blocked never becomes a request
            # event, but the browser reports it here ("Refused to connect to ...").
            if msg.type == "error":
                self.errors.append(f"{msg.text} [{msg.location.get('url', '')}]")

        page.on("request", on_request)
        page.on("console", on_console)
        page.on("pageerror", lambda exc: self.errors.append(str(exc)))

    def errors_but_link_loss(self, netloc: str) -> list[str]:
        """Errors, less the failed loads of our own stream while the test had stopped
        the dashboard on purpose."""
        own = re.compile(
            r"^Failed to load resource: net::ERR_\w+ \[http://" + re.escape(netloc) + "/"
        )
        return [e for e in self.errors if not own.match(e)]

    def foreign(self, netloc: str) -> list[str]:
        """Requests to any host other than the dashboard's own."""
        return [u for u in self.requests if urlsplit(u).netloc != netloc]


async def shot(page: Page, name: str) -> Path:
    """A screenshot under test-artifacts/dashboard/, named by the moment it shows."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    await page.screenshot(path=str(path), full_page=True)
    return path


async def wait_number(
    page: Page, selector: str, above: float, what: str, within_s: float = 15
) -> float:
    """Poll the figure shown in ``selector`` (every 100 ms, bounded) until it is above
    ``above``; the page's Content-Security-Policy forbids evaluating script strings, so
    this reads the text rather than waiting inside the page."""
    last = float("nan")
    try:
        async with asyncio.timeout(within_s):
            while True:
                last = await number(page, selector)
                if last > above:
                    return last
                await page.wait_for_timeout(100)
    except TimeoutError:
        raise AssertionError(f"{what}: {selector} showed {last}, not above {above}") from None


async def number(page: Page, selector: str) -> float:
    text = await page.locator(selector).inner_text()
    try:
        return float(text)
    except ValueError:
        return float("nan")


# ---- accounts for the login's tests ------------------------------------------------------
PW_ADMIN = "violet harbour lantern 42"
PW_PHYS = "seven quiet birches by the lake"
PW_VIEWER = "a viewer who watches the screens"
PW_OPER = "the operator at the console of room seven"
_PW_TEMP = "temporary-but-long-enough-1"


def make_accounts(directory: Path) -> Path:
    """An account store with an admin, a physicist (``phys-anna``), an operator
    (``op-otto``) and a viewer (``viewer-vic``), each with their own password and key, at
    the test-only low argon2 cost (users/kdf.py's TEST_COST): a login costs milliseconds,
    not a second. Blocking
    (iort-users runs its own event loop): call it from a thread in an async test."""
    from iortd.users.changes import open_session  # noqa: PLC0415 - only these tests need it
    from iortd.users.kdf import TEST_COST  # noqa: PLC0415

    s = open_session(directory, cost=TEST_COST, create=True)
    try:
        s.init("admin-eva", "E. Admin", set(), PW_ADMIN)
        admin = s.admin("admin-eva", PW_ADMIN)
        s.add(admin, "phys-anna", "A. Example, MPE", {"physicist"}, None, _PW_TEMP)
        s.add(admin, "viewer-vic", "V. Viewer", {"viewer"}, None, _PW_TEMP)
        s.add(admin, "op-otto", "O. Operator, RTT", {"operator"}, None, _PW_TEMP)
    finally:
        s.close()
    for holder, pw in (("phys-anna", PW_PHYS), ("viewer-vic", PW_VIEWER), ("op-otto", PW_OPER)):
        s = open_session(directory, cost=TEST_COST)
        try:
            s.passwd(holder, _PW_TEMP, pw)
        finally:
            s.close()
    return directory
