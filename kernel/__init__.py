"""The shared kernel: what every other part of iortd stands on, and nothing above it.

Domain types (:mod:`iortd.kernel.types`), the injectable clock (:mod:`iortd.kernel.clock`),
time formatting (:mod:`iortd.kernel.timefmt`), bounded file reads (:mod:`iortd.kernel.files`),
durable writes (:mod:`iortd.kernel.durable`), logging set-up (:mod:`iortd.kernel.logs`), the
TLS client context (:mod:`iortd.kernel.tls`), the broker settings every MQTT client shares
(:mod:`iortd.kernel.broker`), the entry-point registry of drivers and sinks
(:mod:`iortd.kernel.plugins`), children that die with their parent
(:mod:`iortd.kernel.reaper`), temporary directories a later start can reclaim
(:mod:`iortd.kernel.scratch`) and the package version (:mod:`iortd.kernel.version`). The
kernel imports no other part of iortd; the import contract (tests/unit/test_layers.py)
keeps it so.
"""
