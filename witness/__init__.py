"""iort-witness: a transparency-log witness (c2sp.org/tlog-witness) for iortd's audit logs.

Its own small service, run off the room host: it holds, per log origin, the last
checkpoint it cosigned (SQLite, witness/store.py), cosigns a new one only when a
consistency proof shows it extends that one (witness/core.py, pure), and serves
``POST /add-checkpoint`` over HTTP (witness/app.py). On the kernel and the log core only
(tests/unit/test_layers.py); the cosignature format and the client the daemon calls are
in the log core (auditlog/cosignature.py, auditlog/witness_client.py). docs/witness.md.
"""
