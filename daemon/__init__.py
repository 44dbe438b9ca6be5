"""iortd: the daemon (composition root, config, device loops, delivery tracker, sinks)."""

from iortd.kernel.version import __version__

__all__ = ["__version__"]
