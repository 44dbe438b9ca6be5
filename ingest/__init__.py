"""``iort-ingest``: the central consumer of a fabric of rooms (issue 22).

It subscribes to every room's streams on the central broker with a durable session,
checks each message against the published schemas, tracks (room, session, topic, seq),
asks the rooms to replay what is missing (signed ``cmd/replay``, with its replay-only
key), and stores everything in SQLite: ``service`` (the MQTT side), ``lines`` (the
bookkeeping, pure), ``store`` (SQLite, WAL), ``validate``, ``config``, ``report`` and
``cli``. Layer: on the kernel and the log core (commands are signed with
auditlog/command.py), never on the daemon. docs/ingest.md is its manual.
"""
