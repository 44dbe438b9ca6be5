"""The auditors' tools: ``iort-audit`` and the delivery record, review, reports and exports.

They stand on the audit-log core (:mod:`iortd.auditlog`) and the kernel, never on the daemon.
The report and export libraries (reportlab, matplotlib, pydicom) are the optional extra
``reports``; the daemon never imports them.
"""
