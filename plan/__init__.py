"""Prescriptions: what the physicist intended for one delivery (issue 18, items 1 and 2).

- ``model.py``: the :class:`~iortd.plan.model.Prescription`, its bounds, strict parsing and
  canonical JSON (docs/schemas/v1/prescription.schema.json publishes the same shape);
- ``doserate.py``: the independent time check: the site's commissioned dose-rate tables
  (``config/doserate/*.toml``), the day's output factor, the expected treatment time and
  the comparison with the planned time;
- ``store.py``: the protected store, where the identifiers the hospital hand-off needs
  (Patient ID, the plan's SOP Instance UID) are kept apart from everything else;
- ``dicom_import.py``: a DICOM RT Plan to a prescription (the only module that imports
  pydicom; the optional extra ``plan``);
- ``send.py``: ``iort-plan send``: a prescription or the day's output factor signed as a
  command (auditlog/command.py) and published to the room's ``cmd/{kind}`` topic or written into
  the daemon's inbox (the daemon's side: daemon/prescriptions.py, daemon/output_factor.py);
  the one sending path every ``iort-plan`` command uses;
- ``override.py``: ``iort-plan override``: a physicist's signed override of named
  verification mismatches, its body checked before it is signed;
- ``cli.py``: ``iort-plan new``, ``import``, ``check``, ``factor``, ``send`` and
  ``override``.

Layer: on the kernel and the audit-log core only (tests/unit/test_layers.py). Sending
uses the command envelope (auditlog/command.py) and aiomqtt (imported only by ``send``);
the daemon's check before beam-on is item 3 of the issue. Nothing here logs: the CLI
writes what it was asked to and one line on stderr per error. docs/prescriptions.md is
the user's page.
"""
