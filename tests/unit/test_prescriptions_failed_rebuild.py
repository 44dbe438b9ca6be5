"""Prescriptions.rebuild (daemon/prescriptions.py) at the next start: a prescription
command whose handling failed (``command_failed`` after its ``command_accepted``: the
handler raised or ran past its time, daemon/commands.py) was handled, and is not taken
for an orphan that a crash left unhandled, so it is not judged a second time (fcdbc0a).
The sender saw the failure and sends again, with a new nonce, if it still means it."""

from __future__ import annotations

from pathlib import Path

from structlog.testing import capture_logs
from test_daemon_prescriptions import close_room, cmd, open_room, rx


async def test_a_failed_prescription_command_is_not_resumed_at_the_next_start(
    tmp_path: Path,
) -> None:
    room = await open_room(tmp_path, handle_orphans=False)
    verdict = room.intake.submit(cmd(rx()), source="mqtt", topic_kind="prescription")
    assert verdict.command is not None
    assert verdict.recorded is not None
    await verdict.recorded
    # What the intake records when the handler fails (daemon/commands.py, _handle).
    failed = {"kind": "prescription", "nonce": verdict.command.nonce, "error": "TimeoutError"}
    await room.audit.append("command_failed", failed, durable=True).committed
    await close_room(room)

    room = await open_room(tmp_path, handle_orphans=False)
    try:
        with capture_logs() as logs:
            await room.rx.resume()
        assert not [e for e in logs if e["event"] == "prescription_resumed"]
        assert room.entries("prescription_received") == []
        assert room.entries("prescription_refused") == []
    finally:
        await close_room(room)
