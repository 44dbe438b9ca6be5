"""A physicist's electronic sign-off of a delivery from the dashboard (issue 19, item 4).

``POST /api/signoff`` (form-encoded: ``room`` as ``site/room``, ``delivery_id``,
``meaning``, ``reason``, ``holder``, ``password``), behind :meth:`Auth.action` with the
``signoff`` row of the role table (physicist only; same origin, CSRF token, live session).
In this order, the first failure is the answer and nothing is sent:

1. the form is whole and bounded (dashboard/commanding.py, ``read_form``);
2. **two identification components at the first signing of a session** (21 CFR 11.200(a)):
   the user ID (``holder``, which must be the session's) and the password; at later
   signings of the same session the password alone (an ID given must still be the
   session's). The password is checked again, now, in a worker thread
   (:func:`iortd.users.verify_password`: the store's argon2id hash), bounded as the login
   is: one check per session at a time (another request of the session meanwhile is 429,
   not judged: parallel guesses would all be judged before the failures counted), within
   the login's ``UNLOCK_SLOTS`` (each check is a 64 MiB hash). A wrong one is 401 and
   nothing is signed; the third wrong one in a session ends the session, recorded as
   ``session_ended`` (``signoff_password_failed``) in the access record;
3. the room's retained ``delivery`` shows this delivery ended (``TERMINATED``) with its
   ``record`` (what the daemon publishes once a signed checkpoint covers it,
   daemon/signoff.py): the body signs exactly that record, the meaning and reason, the
   session's printed name (the account's, which the keyring carries too) and this host's
   UTC offset;
4. the command is signed with the key the session unlocked at login (valid
   ``SIGNOFF_TTL_S``) and published to the room's ``cmd/signoff`` at QoS 1 over the
   dashboard's MQTT connection (none: 503, not sent) by the :class:`Commander`
   (dashboard/commanding.py, shared with the alarm acknowledgement);
5. the answer is the room's daemon's own: its ``events`` notice whose ``command`` fields
   name the command's kind and nonce (``done``: recorded; else refused or failed, with
   the reason), or the intake's refusal naming the command's SHA-256, waited for up to
   ``ANSWER_WAIT_S`` (matched on those fields only, never on the notice's words). No
   answer in time is said as it is: the sign-off is **not recorded** (504). A daemon that
   is not running never gets it (its MQTT session is clean: the broker queues nothing for
   it); one that is only slow may still record it before it expires, and its notice then
   shows in the room's events.

The dashboard never says "recorded" unless the daemon said so. Nothing of the password,
the key or the signature is logged; the access record is the login's (users/access.py).
"""

from __future__ import annotations

import asyncio
from collections import Counter
from datetime import datetime
from typing import Any, Final

import structlog
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from iortd.dashboard.commanding import ROOM_KEY_RE, Commander, Outcome, read_form
from iortd.dashboard.hub import Hub
from iortd.dashboard.login import Auth
from iortd.dashboard.sessions import Expired, Session
from iortd.users import AuthError, verify_password

__all__ = ["ANSWER_WAIT_S", "SIGNOFF_TTL_S", "SignoffDesk"]

log = structlog.get_logger("iort_dashboard.signoff")

SIGNOFF_TTL_S: Final = 120.0  # a sign-off is for now: not for a daemon that starts tomorrow
ANSWER_WAIT_S: Final = 10.0
PASSWORD_WAIT_S: Final = 30.0
MAX_PASSWORD_FAILURES: Final = 3
MEANINGS: Final = ("reviewed", "approved", "approved_with_deviation")
_FIELDS: Final = frozenset({"room", "delivery_id", "meaning", "reason", "holder", "password"})


def _json(status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> Response:
    return JSONResponse(body, status_code=status, headers=headers)


def _utc_offset_min() -> int:
    offset = datetime.now().astimezone().utcoffset()
    return 0 if offset is None else int(offset.total_seconds() // 60)


class SignoffDesk:
    """The ``/api/signoff`` endpoint's state: which sessions signed once and the wrong
    passwords per session (the answers waited for are the :class:`Commander`'s)."""

    def __init__(
        self,
        hub: Hub,
        auth: Auth,
        commander: Commander | None = None,
        *,
        answer_wait_s: float | None = None,
    ) -> None:
        self._hub = hub
        self._auth = auth
        self._commander = commander if commander is not None else Commander(hub)
        self._wait_s = ANSWER_WAIT_S if answer_wait_s is None else answer_wait_s
        self._signed: set[str] = set()  # sessions that signed once (the ID was given)
        self._failures: Counter[str] = Counter()
        self._judging: set[str] = set()  # sessions whose password is being checked now

    def _forget_gone(self) -> None:
        """Sessions that ended are forgotten (bounded by the sessions alive)."""
        self._signed = {sid for sid in self._signed if self._auth.alive(sid)}
        for sid in [sid for sid in self._failures if not self._auth.alive(sid)]:
            del self._failures[sid]

    async def signoff(self, request: Request, s: Session) -> Response:
        self._forget_gone()
        form = await read_form(request, _FIELDS)
        if form is None or not {"room", "delivery_id", "meaning", "password"} <= set(form):
            return _json(400, {"error": "room, delivery_id, meaning and password are needed"})
        first = s.sid not in self._signed
        holder = form.get("holder", "").strip()
        if (first and not holder) or (holder and holder != s.holder):
            return _json(
                400,
                {
                    "error": "the first signing of a session needs your user ID and password",
                    "needs_id": True,
                },
            )
        problem = self._body_problem(form)
        if problem is not None:
            return _json(400, {"error": problem})
        if s.signer is None:
            return _json(403, {"error": "this session holds no signing key: log in again"})
        refused = await self._password(s, form["password"])
        if refused is not None:
            return refused
        key = form["room"]
        room = self._hub.rooms.rooms.get(key)
        held = None if room is None else room.retained.get("delivery")
        d = held.payload.get("delivery") if held is not None else None
        if not isinstance(d, dict) or d.get("delivery_id") != form["delivery_id"]:
            return _json(409, {"error": "this delivery is not the room's last one"})
        if d.get("phase") != "TERMINATED" or not isinstance(d.get("record"), dict):
            return _json(
                409,
                {
                    "error": "the delivery has not ended, or its record (covered by a signed "
                    "checkpoint) is not published yet: try again in a moment"
                },
            )
        body = {
            "delivery_id": form["delivery_id"],
            "meaning": form["meaning"],
            "reason": form.get("reason") or None,
            "name": s.name,
            "utc_offset_min": _utc_offset_min(),
            "record": d["record"],
        }
        return await self._send(s, key, body)

    def _body_problem(self, form: dict[str, str]) -> str | None:
        if not ROOM_KEY_RE.fullmatch(form["room"]):
            return "room: site/room"
        if form["meaning"] not in MEANINGS:
            return f"meaning: one of {', '.join(MEANINGS)}"
        reason = form.get("reason", "")
        if form["meaning"] == "approved_with_deviation":
            if not reason.strip() or len(reason) > 500 or not reason.isprintable():
                return "approved with deviation needs a reason (1 to 500 characters, one line)"
        elif reason:
            return "a reason goes with approved with deviation only"
        return None

    async def _password(self, s: Session, password: str) -> Response | None:
        store = self._auth.store
        if store is None:
            return _json(503, {"error": "the account store does not check; nothing was signed"})
        if s.sid in self._judging:
            return _json(
                429,
                {"error": "this session's password is being checked: wait for that answer"},
                {"retry-after": "1"},
            )
        self._judging.add(s.sid)
        try:
            async with asyncio.timeout(PASSWORD_WAIT_S), self._auth._slots:  # the login's slots
                await asyncio.to_thread(verify_password, store, s.holder, password)
        except TimeoutError:
            return _json(503, {"error": "busy: nothing was signed; try again in a moment"})
        except AuthError:
            self._failures[s.sid] += 1
            log.info("signoff_password_failed", holder=s.holder, count=self._failures[s.sid])
            if self._failures[s.sid] >= MAX_PASSWORD_FAILURES:
                s.signer = None
                if self._auth.book.drop(s.sid) is not None:
                    age_s = self._auth.clock() - s.created
                    await self._auth._ended(Expired(s.holder, "signoff_password_failed", age_s))
                return _json(
                    401,
                    {"error": "wrong password again: the session has ended; log in again"},
                )
            return _json(401, {"error": "wrong password: nothing was signed"})
        finally:
            self._judging.discard(s.sid)
        self._failures.pop(s.sid, None)
        return None

    async def _send(self, s: Session, key: str, body: dict[str, Any]) -> Response:
        said = await self._commander.send(
            "signoff", body, s, key, ttl_s=SIGNOFF_TTL_S, wait_s=self._wait_s,
            on_sent=lambda: self._signed.add(s.sid),
        )  # fmt: skip
        if said.outcome is Outcome.NOT_SIGNED:
            return _json(400, {"error": f"cannot be signed: {said.message}"})
        if said.outcome is Outcome.NOT_SENT:
            error = (
                "NOT sent to the broker, NOT recorded"
                if said.broker
                else "no broker connection: NOT sent, NOT recorded"
            )
            return _json(503, {"recorded": False, "error": error})
        if said.outcome is Outcome.NO_ANSWER:
            return _json(
                504,
                {
                    "recorded": False,
                    "nonce": said.nonce,
                    "error": f"NOT recorded: no answer from the room's daemon within "
                    f"{self._wait_s:.0f} s. A daemon that is not running never gets it "
                    "(commands are not queued for it): sign again once it runs. (A "
                    "daemon that stopped right after recording it could not answer: "
                    "signing again then answers 'duplicate', which means the first one "
                    "is in the record.)",
                },
            )
        recorded = said.done  # the notice's command fields, never its words
        return _json(
            200 if recorded else 422,
            {"recorded": recorded, "nonce": said.nonce, "message": said.message},
        )
