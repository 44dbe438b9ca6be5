"""The installed distribution's version, for records, reports and ``--version``."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("iortd")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = ["__version__"]
