"""The audit log: durable, hash-chained JSON Lines with signed checkpoints.

Format and procedures for auditors: docs/audit-log.md.
"""
