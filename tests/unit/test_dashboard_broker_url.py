"""`iort-dashboard`'s command line: what it refuses and what its errors may say."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest
import structlog

from iortd.dashboard.cli import main
from iortd.dashboard.mqtt import UrlError, parse_broker_url


@pytest.fixture(autouse=True)
def _logging_restored() -> Iterator[None]:
    """``main`` configures logging onto the stderr pytest captures and then closes: put
    back what was there, or later tests log into a closed file."""
    saved = structlog.get_config()
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    structlog.configure(**saved)
    root.handlers[:] = handlers
    root.setLevel(level)


SECRET = "s3cret-Pw"  # noqa: S105 - a made-up password the errors must not repeat


@pytest.mark.parametrize(
    "url",
    [
        f"mqtt://user:{SECRET}@127.0.0.1:1883",
        f"mqtt://:{SECRET}@127.0.0.1:1883",  # no user name, only a password
        f"mqtts://user:{SECRET}@broker.example.org",
        f"mqtt://127.0.0.1:1883/?password={SECRET}",
        f"mqtt://127.0.0.1:1883/#{SECRET}",
        f"mqtt://user:{SECRET}@127.0.0.1:99999",
    ],
)
def test_a_broker_url_with_a_secret_is_refused_without_repeating_it(
    url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """The error goes to stderr, which a service manager keeps in its journal: it must
    not carry the password the URL held (a URL is no place for one in the first place)."""
    with pytest.raises(UrlError) as excinfo:
        parse_broker_url(url)
    assert SECRET not in str(excinfo.value)
    assert main(["--broker", url, "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("iort-dashboard: --broker: "), err
    assert len(err.splitlines()) == 1, err
    assert SECRET not in err


def test_credentials_in_the_url_are_named_as_such() -> None:
    with pytest.raises(UrlError, match=r"credentials.*--username.*--password-file"):
        parse_broker_url(f"mqtt://user:{SECRET}@127.0.0.1")
