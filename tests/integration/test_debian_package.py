"""The Debian package of the room host, built by packaging/build-deb and installed by dpkg
into a throwaway root (issue 17 item 4).

How the throwaway root stands in for a room host, and what is real:

- ``dpkg --root=ROOT --force-script-chrootless`` unpacks the real .deb into ROOT and runs its
  real maintainer scripts on this host with ``DPKG_ROOT=ROOT`` (the scripts prefix every
  path with it). Nothing is written outside ROOT: the service user goes into ROOT/etc by
  ``systemd-sysusers --root``, the unit's state by ``deb-systemd-helper`` (DPKG_ROOT-aware).
- ROOT borrows this host's base system: its dpkg status lists the host's own entries for
  the package's dependencies (python3.11, adduser, systemd), so dpkg checks the Depends
  line against real versions; ROOT/etc/passwd and group start as the host's (dialout).
- No systemd runs here, so ``ROOT/run/systemd/system`` says "systemd is running" and two
  stubs on PATH stand in for it: ``systemctl`` (is-active from a state file,
  daemon-reload) and ``deb-systemd-invoke`` (start/stop/restart change that state). Each
  records its call: what the scripts did to the service is read from that record.
- The daemon's health endpoint is a real HTTP server on a free loopback port answering
  ``/status`` with the contract JSON; the maintainer scripts find it through
  ``IORTD_STATUS_URL`` and wait ``IORTD_UPGRADE_WAIT_S`` (0 here: ask once) with the real
  ``iortd wait-idle`` of the installed venv.
- The installed tree runs at its real path: ROOT/opt is bind-mounted on /opt in a private
  mount namespace (``unshare --mount``) for ``/opt/iortd/bin/iortd --version``;
  ``systemd-analyze verify --root=ROOT`` checks the installed unit (ExecStart included).

Root only (dpkg --root, unshare); `make test` runs as root on CI.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from iortd.auditlog.note import generate_keypair, write_keypair

ROOT_DIR = Path(__file__).resolve().parents[2]
BUILD = ROOT_DIR / "packaging" / "build-deb"
TOOLS = {
    "dpkg": "dpkg",
    "dpkg-deb": "dpkg",
    "dpkg-query": "dpkg",
    "deb-systemd-helper": "init-system-helpers",
    "systemd-sysusers": "systemd",
    "systemd-analyze": "systemd",
    "unshare": "util-linux",
    "python3.11": "python3.11",
}
MISSING = sorted({pkg for tool, pkg in TOOLS.items() if shutil.which(tool) is None})
# Build and install must stay well under a minute on CI (the bound).
BUILD_BOUND_S = 60

pytestmark = [
    pytest.mark.integration,
    pytest.mark.deb,
    pytest.mark.skipif(
        os.geteuid() != 0,
        reason="installs a .deb into a throwaway root with dpkg --root and bind-mounts it: "
        "needs root (CI runs `make test` as root)",
    ),
    pytest.mark.skipif(
        bool(MISSING), reason=f"missing Debian packages: {' '.join(MISSING)} (apt-get install)"
    ),
    pytest.mark.timeout(240),
]

SYSTEMCTL = """#!/bin/sh
echo "systemctl $*" >> "$IORTD_TEST_CALLS"
case "$1" in
    is-active) [ -e "$IORTD_TEST_STATE/active" ] || exit 3 ;;
esac
exit 0
"""
INVOKE = """#!/bin/sh
echo "deb-systemd-invoke $*" >> "$IORTD_TEST_CALLS"
case "$1" in
    start|restart) : > "$IORTD_TEST_STATE/active" ;;
    stop) rm -f "$IORTD_TEST_STATE/active" ;;
esac
exit 0
"""

SITE = """
[site]
id = "pkg-site"
room = "or-4"
[log]
directory = "/var/lib/iortd/log"
signing_key_file = "credential:signing-key"
[mqtt]
enabled = false
[[devices]]
name = "source-1"
driver = "sim"
[devices.options]
applicator = "SPH30"
"""


@dataclass
class Health:
    """The daemon's /status, as the test sets it."""

    delivery_active: bool = False
    requests: int = 0

    def body(self) -> bytes:
        self.requests += 1
        return json.dumps(
            {
                "ready": True,
                "phase": "IRRADIATING" if self.delivery_active else "IDLE",
                "delivery_active": self.delivery_active,
                "delivery_id": "or-4-20261206T071500Z" if self.delivery_active else None,
                "devices": {"source-1": "online"},
                "version": "0.1.0",
            }
        ).encode()


@pytest.fixture
def health() -> Iterator[tuple[Health, str]]:
    state = Health()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = state.body()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield state, f"http://127.0.0.1:{server.server_address[1]}/status"
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def deb(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, float]:
    out = tmp_path_factory.mktemp("deb")
    t0 = time.monotonic()
    built = subprocess.run(
        [str(BUILD), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=BUILD_BOUND_S * 3,
        check=False,
        env={**os.environ, "DEB_COMPRESS": "gzip 1", "BUILD_DEB_TIMES": "1"},
    )
    assert built.returncode == 0, built.stderr[-2000:]
    path = Path(built.stdout.strip().splitlines()[-1])
    print(built.stderr)  # noqa: T201 - the build's own timings, for -s
    return path, time.monotonic() - t0


@dataclass
class Host:
    root: Path
    env: dict[str, str]
    calls: Path
    state: Path

    def dpkg(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            # unsafe-io: no fsync of each unpacked file (a throwaway root; the slow part).
            [
                "dpkg",
                f"--root={self.root}",
                "--force-script-chrootless",
                "--force-unsafe-io",
                "--log=/dev/null",
                *args,
            ],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
            env=self.env,
            stdin=subprocess.DEVNULL,
        )

    def script(self, name: str, *args: str) -> subprocess.CompletedProcess[str]:
        """The installed maintainer script NAME, run as dpkg runs it (chrootless)."""
        return subprocess.run(
            [str(self.root / "var/lib/dpkg/info" / f"iortd.{name}"), *args],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            env={**self.env, "DPKG_ROOT": str(self.root), "DPKG_MAINTSCRIPT_NAME": name},
        )

    def took(self) -> list[str]:
        """The calls the maintainer scripts made to systemd since the last look."""
        lines = self.calls.read_text().splitlines() if self.calls.exists() else []
        self.calls.write_text("")
        return lines

    def set_active(self, active: bool) -> None:
        flag = self.state / "active"
        if active:
            flag.touch()
        else:
            flag.unlink(missing_ok=True)


@pytest.fixture
def make_host(tmp_path: Path, health: tuple[Health, str]) -> Callable[[str], Host]:
    """A throwaway root (and its stubs and state) under tmp_path/NAME."""
    return lambda name: _host(tmp_path / name, health[1])


def _host(tmp_path: Path, status_url: str) -> Host:
    root = tmp_path / "root"
    admin = root / "var" / "lib" / "dpkg"
    (admin / "info").mkdir(parents=True)
    (admin / "updates").mkdir()
    (admin / "available").touch()
    deps = ("python3.11", "adduser", "systemd")
    status = subprocess.run(
        ["dpkg-query", "-s", *deps], capture_output=True, text=True, timeout=30, check=True
    )
    (admin / "status").write_text(status.stdout)
    for dep in deps:
        (admin / "info" / f"{dep}.list").touch()
    (root / "etc").mkdir()
    for name in ("passwd", "group", "shadow", "gshadow"):
        shutil.copy2(Path("/etc") / name, root / "etc" / name)
    (root / "run" / "systemd" / "system").mkdir(parents=True)  # "systemd is running"
    stubs = tmp_path / "stubs"
    stubs.mkdir(parents=True)
    for name, text in (("systemctl", SYSTEMCTL), ("deb-systemd-invoke", INVOKE)):
        (stubs / name).write_text(text)
        (stubs / name).chmod(0o755)
    state = tmp_path / "state"
    state.mkdir()
    env = {
        **os.environ,
        "PATH": f"{stubs}:{os.environ['PATH']}",
        "IORTD_STATUS_URL": status_url,
        "IORTD_UPGRADE_WAIT_S": "0",  # ask once: the waiting itself is wait-idle's tests'
        "IORTD_TEST_CALLS": str(tmp_path / "calls"),
        "IORTD_TEST_STATE": str(state),
    }
    return Host(root, env, tmp_path / "calls", state)


def _installed(host: Host) -> bool:
    q = subprocess.run(
        ["dpkg-query", f"--root={host.root}", "-W", "-f=${Status}", "iortd"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    # "install ok installed", or "deinstall ok installed" after a refused removal: the
    # selection records the wish, the state what is on disk.
    return q.stdout.endswith(" ok installed")


def _configure_site(host: Host) -> None:
    """What the admin does after a fresh install: the site config and the signing key."""
    etc = host.root / "etc" / "iortd"
    etc.mkdir(parents=True, exist_ok=True)
    (etc / "iortd.toml").write_text(SITE)
    key, _ = write_keypair(generate_keypair("iortd-or-4"), host.root / "tmp-keygen")
    key.rename(etc / "signing.key")


def _check_installed_tree(host: Host) -> None:
    root = host.root
    iortd = root / "opt" / "iortd" / "bin" / "iortd"
    assert iortd.read_text().startswith("#!/opt/iortd/bin/python\n")
    assert (root / "opt/iortd/bin/python3.11").readlink() == Path("/usr/bin/python3.11")
    assert not list((root / "opt/iortd/bin").glob("pip*")), "the service venv carries no pip"
    assert (root / "etc/iortd/iortd.toml").read_text() == (
        ROOT_DIR / "deploy/iortd.toml"
    ).read_text()
    unit = root / "lib/systemd/system/iortd.service"
    assert unit.read_text() == (ROOT_DIR / "deploy/systemd/iortd.service").read_text()
    assert (root / "usr/lib/sysusers.d/iortd.conf").is_file()
    guide = root / "usr/share/doc/iortd/docs" / "operations.md"
    assert guide.read_text() == (ROOT_DIR / "docs" / "operations.md").read_text()
    assert (root / "usr/bin/iortd").readlink() == Path("/opt/iortd/bin/iortd")
    passwd = (root / "etc/passwd").read_text().splitlines()
    user = next(line for line in passwd if line.startswith("iortd:"))
    assert user.endswith(":/var/lib/iortd:/usr/sbin/nologin")
    dialout = next(
        g for g in (root / "etc/group").read_text().splitlines() if g.startswith("dialout:")
    )
    assert "iortd" in dialout.split(":")[3].split(",")
    # The installed tree at its own path, as the unit runs it.
    run = subprocess.run(
        [
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            f"mount --bind {root}/opt /opt && exec /opt/iortd/bin/iortd --version",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={"PATH": "/usr/bin:/bin:/usr/sbin:/sbin"},
    )
    assert (run.returncode, run.stdout.strip()) == (0, "iortd 0.1.0"), run.stderr
    # The installed unit, verified in that root (its ExecStart must exist there). The
    # targets it names come with systemd, which the root borrows from this host.
    system = root / "lib/systemd/system"
    for target in Path("/lib/systemd/system").glob("*.target"):
        if not (system / target.name).exists():
            shutil.copy2(target, system / target.name)
    verify = subprocess.run(
        ["systemd-analyze", "verify", f"--root={root}", "iortd.service"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert (verify.returncode, verify.stderr) == (0, "")


def test_package_installs_configures_and_upgrades_without_interrupting_a_delivery(
    deb: tuple[Path, float], make_host: Callable[[str], Host], health: tuple[Health, str]
) -> None:
    package, build_s = deb
    host = make_host("first")
    status, _ = health
    wants = host.root / "etc/systemd/system/multi-user.target.wants/iortd.service"

    # 1. A fresh install ships a template: nothing is enabled or started, and it says why.
    t0 = time.monotonic()
    first = host.dpkg("-i", str(package))
    install_s = time.monotonic() - t0
    assert first.returncode == 0, first.stderr
    assert build_s + install_s < BUILD_BOUND_S, (build_s, install_s)
    assert "does not pass `iortd check-config`" in first.stderr
    assert "disabled and stopped" in first.stderr
    assert "site.id" in first.stderr  # check-config's own words, naming the key
    assert not [c for c in host.took() if "start" in c or "enable" in c]
    assert not wants.exists()
    _check_installed_tree(host)

    # 2. Configured, running and delivering: an upgrade asks and leaves it be.
    _configure_site(host)
    host.set_active(True)
    status.delivery_active = True
    asked = status.requests
    busy = host.dpkg("-i", str(package))
    assert busy.returncode == 0, busy.stderr
    assert "NOT restarted: a delivery is in progress" in busy.stderr
    assert "delivery or-4-20261206T071500Z in progress (phase IRRADIATING)" in busy.stderr
    assert status.requests - asked >= 2  # prerm and postinst both asked
    calls = host.took()
    assert not [c for c in calls if c.startswith("deb-systemd-invoke")], calls
    assert (host.root / "etc/iortd/iortd.toml").read_text() == SITE  # the admin's, kept

    # 3. The same upgrade when idle: stopped before the files change, started after.
    status.delivery_active = False
    idle = host.dpkg("-i", str(package))
    assert idle.returncode == 0, idle.stderr
    invoked = [c for c in host.took() if c.startswith("deb-systemd-invoke")]
    assert invoked == [
        "deb-systemd-invoke stop iortd.service",
        "deb-systemd-invoke start iortd.service",
    ], idle.stderr
    assert not (host.root / "run/iortd.upgrade-stopped").exists()

    # 3b. An upgrade that fails after prerm stopped the idle daemon: dpkg calls the old
    #     postinst with abort-upgrade, which starts the old version again.
    host.set_active(False)
    (host.root / "run/iortd.upgrade-stopped").touch()
    abort = host.script("postinst", "abort-upgrade", "0.1.0-2")
    assert abort.returncode == 0, abort.stderr
    assert "deb-systemd-invoke start iortd.service" in host.took()
    assert not (host.root / "run/iortd.upgrade-stopped").exists()

    # 4. A removal during a delivery is refused; the package stays.
    status.delivery_active = True
    refused = host.dpkg("--remove", "iortd")
    assert refused.returncode != 0
    assert "refusing to remove iortd while a delivery may be in progress" in refused.stderr
    assert _installed(host)
    assert not [c for c in host.took() if c.startswith("deb-systemd-invoke")]

    # 5. Purge never deletes the audit log: the installed postrm, run as dpkg runs it (a
    #    real purge would first delete ~2000 files, seconds of the suite for nothing more).
    (host.root / "var/lib/iortd/log").mkdir(parents=True)
    purge = host.script("postrm", "purge")
    assert purge.returncode == 0, purge.stderr
    assert "kept /var/lib/iortd (the audit log)" in purge.stderr
    assert (host.root / "var/lib/iortd/log").is_dir()

    # 6. A fresh install onto a site config that passes check-config: enabled and started.
    second = make_host("second")
    _configure_site(second)
    ready = second.dpkg("--force-confold", "-i", str(package))
    assert ready.returncode == 0, ready.stderr
    assert (second.root / "etc/systemd/system/multi-user.target.wants/iortd.service").is_symlink()
    assert "deb-systemd-invoke start iortd.service" in second.took()
