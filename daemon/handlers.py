"""The handlers of the signed command kinds, installed on the intake at start and resumed
once the writer runs.

Each kind's handler is its own module, in one shape (judge the body, append its outcome
durably, say it on ``events``, rebuild its state from the log at start, and judge at the
next start a command a crash left accepted but unhandled): ``prescription``
(daemon/prescriptions.py), ``output_factor`` (daemon/output_factor.py), ``override``
with the check before beam-on (daemon/verifier.py), ``signoff`` (daemon/signoff.py,
whose record-watching sink the composition root opens with the sinks) and ``ack``
(daemon/alarm_acks.py, whose ledger the composition root builds earlier: it is also a
sink) and ``replay`` (daemon/replay.py, served by the MQTT sink; nothing to resume: the
consumer asks again). This module only
wires them, in the order their dependencies need: the verifier uses the pending
prescription and the day's output factor, so it is installed after both. A handler
whose log cannot be read back is not installed (said loudly by its own module), and its
kind stays ``no_handler``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

from iortd.auditlog.recovery import RecoveryReport
from iortd.auditlog.writer import AuditLog
from iortd.daemon import alarm_acks, replay, signoff
from iortd.daemon.commands import CommandIntake
from iortd.daemon.config import Config
from iortd.daemon.output_factor import OutputFactors
from iortd.daemon.output_factor import install as install_output_factors
from iortd.daemon.prescriptions import Prescriptions
from iortd.daemon.prescriptions import install as install_prescriptions
from iortd.daemon.service import Service
from iortd.daemon.verifier import Verifier
from iortd.daemon.verifier import install as install_verifier
from iortd.plan.doserate import DoseRateError

__all__ = ["Handlers", "VerificationTableError"]


class VerificationTableError(Exception):
    """``[verification] doserate_table`` cannot be read: the start fails (exit 2)."""


class Handlers:
    """The installed handlers (None: not installed) and what to resume."""

    def __init__(self) -> None:
        self.prescriptions: Prescriptions | None = None
        # The day's output factors, for the verifier.
        self.output_factors: OutputFactors | None = None
        self.acks: alarm_acks.AlarmAcks | None = None
        self.signoffs: signoff.Signoffs | None = None  # physicists' sign-offs
        self.verifier: Verifier | None = None  # the check before beam-on, the override
        self.replays: replay.Replays | None = None  # gap repair, served by the MQTT sink

    async def install(
        self,
        c: Config,
        intake: CommandIntake,
        audit: AuditLog,
        service: Service,
        recovery: RecoveryReport,
        acks: alarm_acks.AlarmAcks,
    ) -> None:
        """Install every handler on ``intake``; raises VerificationTableError."""
        rx = self.prescriptions = await install_prescriptions(
            intake, audit, c.log.directory, service.tracker, service.notice,
            recovery.vouched_count,
        )  # fmt: skip
        factors = self.output_factors = await install_output_factors(
            intake, audit, c.log.directory, service.notice, recovery.vouched_count
        )
        self.signoffs = await signoff.install(intake, audit, c.log.directory, service.notice)
        if rx is not None and c.verification.on(c.commands.keyring):
            # The day's output factor from its handler; none when that handler is off
            # (its log could not be read back): the time is then time_unchecked.
            try:
                self.verifier = await install_verifier(
                    c.verification, intake, audit, c.log.directory, service, rx,
                    service.notice,
                    factor_for=(lambda _day: None) if factors is None else factors.for_day,
                    vouched_count=recovery.vouched_count,
                    on_factor_change=None if factors is None else factors.on_change,
                )  # fmt: skip
            except (DoseRateError, OSError) as exc:
                raise VerificationTableError(str(exc)) from None
        alarm_acks.install(intake, acks)
        self.acks = acks
        self.replays = replay.install(intake, audit, intake.command_sinks, service.notice)

    def resume(self, tg: asyncio.TaskGroup) -> None:
        """Judge now the commands a crash left accepted but unhandled, each kind in its own
        task (the writer must be running)."""
        todo: list[tuple[str, Callable[[], Coroutine[Any, Any, None]]]] = []
        if self.prescriptions is not None:
            todo.append(("prescriptions-resume", self.prescriptions.resume))
        if self.output_factors is not None:
            todo.append(("output-factors-resume", self.output_factors.resume))
        if self.signoffs is not None:  # an unjudged sign-off: refused (daemon/signoff.py)
            todo.append(("signoffs-resume", self.signoffs.resume))
        if self.verifier is not None and self.verifier.resume is not None:
            # An unjudged override: refused (daemon/verifier.py).
            todo.append(("overrides-resume", self.verifier.resume))
        if self.acks is not None and self.acks.handled:
            todo.append(("acks-resume", self.acks.resume))
        for name, resume in todo:
            tg.create_task(resume(), name=name)
