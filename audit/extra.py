"""The optional extra ``reports``: the libraries only the reports and the DICOM export need.

reportlab (the PDF), matplotlib (the dose plot, and the fonts both use) and pydicom (the
RT Beams Treatment Record) are ``[project.optional-dependencies] reports`` in
pyproject.toml, so that the bedside daemon, and an auditor who only verifies, install none
of them. ``iort-audit`` imports them here, and only for ``report`` and ``export --format
dicom``, before it reads the log: without them those two commands exit 2 with one line
naming the missing package and the command that installs it; keygen, verify, show,
deliveries and the CSV and JSON exports work as they are.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TypeVar

from iortd.audit.inputs import UsageError
from iortd.audit.record import DeliveryRecord
from iortd.auditlog.keyring import Keyring

__all__ = ["INSTALL_REPORTS", "REPORTS_EXTRA", "dicom_exporter", "report_renderer", "with_extra"]

REPORTS_EXTRA = ("reportlab", "matplotlib", "pydicom", "pynetdicom")
INSTALL_REPORTS = "pip install 'iortd[reports]'"

_T = TypeVar("_T")


def with_extra(what: str, load: Callable[[], _T]) -> _T:
    """``load()``, which imports the extra's libraries. UsageError, in one line naming the
    package and the install command, when one of them is not installed; any other missing
    module is a broken install, and is raised as it is."""
    try:
        return load()
    except ModuleNotFoundError as exc:
        missing = (exc.name or "").partition(".")[0]
        if missing not in REPORTS_EXTRA:
            raise
        raise UsageError(
            f"{what} needs {missing}, which is not installed: it is in the optional extra "
            f"'reports' ({', '.join(REPORTS_EXTRA)}); install it with: {INSTALL_REPORTS}"
        ) from None


Names = Mapping[str, str]  # the protected store's hand-off entry (export --store)


def report_renderer(
    kind: str,
) -> Callable[[DeliveryRecord, str | None, Keyring | None], bytes]:
    """The renderer of a ``pdf`` or ``html`` report: (record, key name, keyring) -> bytes."""
    if kind == "pdf":
        from iortd.audit.report.pdf import pdf_report  # noqa: PLC0415 - the extra 'reports'

        return lambda rec, key, ring: pdf_report(rec, pubkey_name=key, keyring=ring)
    from iortd.audit.report.html_page import html_report  # noqa: PLC0415 - ditto

    return lambda rec, key, ring: html_report(rec, pubkey_name=key, keyring=ring)


def dicom_exporter() -> Callable[[DeliveryRecord, Names | None], bytes]:
    """The DICOM export (record, the protected store's hand-off entry or None); a delivery
    it cannot record (DicomExportError) is a UsageError."""
    from iortd.audit.dicom import DicomExportError, dicom_export  # noqa: PLC0415 - the extra

    def export(rec: DeliveryRecord, hand_off: Names | None) -> bytes:
        try:
            return dicom_export(rec, hand_off)
        except DicomExportError as exc:
            raise UsageError(f"--format dicom: {exc}") from None

    return export
