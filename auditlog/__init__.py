"""The audit-log core: canonical form, the writer and its crash recovery, signed notes, verify.

It stands on the kernel only. The daemon writes through it; the auditors' tools
(:mod:`iortd.audit`) read through it. Nothing here knows about deliveries, MQTT or reports.
"""
