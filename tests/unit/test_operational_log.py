"""The operational log (kernel/logs.py) never prints a frame's local variables with a
traceback: structlog's default dict traceback shows every frame's locals, and a frame of
the hospital hand-off holds the real Patient ID (docs/operations.md: no patient data in the
operational log)."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator

import pytest
import structlog

from iortd.kernel.logs import configure_logging

MARK = "PAT-0012345-SECRET"


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    config = structlog.get_config()
    yield
    root.handlers[:], root.level = handlers, level
    structlog.configure(**config)


@pytest.mark.parametrize("as_json", [True, False])
def test_a_logged_exception_shows_no_local_variable(as_json: bool) -> None:
    out = io.StringIO()
    configure_logging("info", json=as_json, stream=out)

    def build(patient_id: str) -> None:
        dataset = {"PatientID": patient_id}
        raise ValueError(f"cannot build {len(dataset)} element")

    try:
        build(MARK)
    except ValueError:
        structlog.get_logger("test").exception("dicom_build_failed")
    text = out.getvalue()
    assert "dicom_build_failed" in text
    assert "cannot build 1 element" in text  # the traceback itself is kept
    assert MARK not in text, text
