"""The dashboard's login: who may see, who may act, and the record of both (issue 19, item 2).

Built only when the dashboard is given an account store (``iort-dashboard --users-dir``);
without one the dashboard is what it was: a view for whoever can reach it, and nothing that
changes state.

* ``GET /api/session``: the page's first question. Whether a login exists here, whether
  this client may see without one, the session's holder, printed name, roles, its CSRF token
  and how long it has left (never its id, never a key); and a fresh login CSRF token
  (sessions.py, ``LoginTokens``) with its HttpOnly cookie.
* ``POST /api/login`` (``holder``, ``password``, form-encoded; the login CSRF token in
  ``X-CSRF-Token``): the back-off first (an attempt while backing off is answered 429 with
  ``Retry-After`` and not judged, as is a second attempt for an address or a holder while
  one is being judged), then :func:`iortd.users.unlock` in a worker thread, at
  most ``UNLOCK_SLOTS`` at once (each is two argon2id hashes of 64 MiB: a flood must not
  take the host's memory or the event loop), then the access record (users/access.py)
  *before* the answer: a login that cannot be recorded is refused (503). On success a new
  session id in the cookie ``iort_session`` (``HttpOnly; SameSite=Strict; Path=/``, and
  ``Secure`` over TLS), the old session of that browser ended first, and a device cookie
  ``iort_device`` (sessions.py, ``DeviceCookies``; 30 days, this process's key). On failure
  one answer for every cause (401, users/api.py's message) and the back-off grows for the
  client's address and the holder typed (for a browser with the holder's device cookie:
  for that cookie instead of the holder).
* ``POST /api/logout``: ends the session; recorded.

**Every state-changing request** goes through :meth:`Auth.action` with a name from
:data:`ACTIONS`, the role table: a same-origin check (``Origin``, else ``Referer``, must be
this dashboard's own scheme and host; neither: refused), the session's CSRF token in
``X-CSRF-Token`` (compared in constant time), a live session, one of the roles the table
names. A refusal is 403 (401 without a session), counted in :attr:`Auth.refused` by reason
and logged: ``ack`` (an alarm acknowledgement, ack.py: operator or physicist) and
``signoff`` (a delivery's sign-off, signoff.py: physicist). GET never changes state.

**The store is re-read when it changes** (its ``users.json``'s size, inode and mtime, looked
at no more than once a second): a disabled account, or one past its end, loses its
sessions at its next request or the next sweep, whichever comes first; a role taken away
is taken from its sessions too; a store that no longer checks (users/api.py,
``load_checked_store``) ends every session and refuses logins until it checks again.

**Activity** is what the user does: a page load, a login, a state-changing request. The
page's periodic check (``/api/session?peek=1``) and an open stream are not: the idle end
comes 15 minutes (``--session-idle``) after the user's last act however long the page
stays open, and the open stream ends with the session (the sweep ends it within a second).

**Seeing without a login** (``--anonymous-view CIDR``): a client whose address is in one of
the listed networks (the room's own display) sees rooms and alarms without a login, and
can still log in to act. Every other client needs a session for the data (``/events``,
``/api/snapshot``); the page and its scripts hold no data and are served to anyone.
"""

from __future__ import annotations

import asyncio
import ipaddress
import math
import os
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import structlog
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from iortd.dashboard.sessions import (
    Backoff,
    DeviceCookies,
    Expired,
    LoginTokens,
    Session,
    SessionBook,
    csrf_ok,
)
from iortd.users import AuthError, PasswordChangeRequired, Store, StoreError, load_checked_store
from iortd.users import unlock as users_unlock
from iortd.users.access import AccessRecord, AccessRecordError
from iortd.users.api import AUTH_FAILED, active
from iortd.users.store import STORE_FILE

__all__ = ["ACTIONS", "SIGNING_ROLES", "Auth", "AuthSettings", "Network"]

log = structlog.get_logger("iort_dashboard.login")

SESSION_COOKIE = "iort_session"
LOGIN_COOKIE = "iort_login"
DEVICE_COOKIE = "iort_device"
DEVICE_MAX_AGE_S = 30 * 86400
CSRF_HEADER = "x-csrf-token"
MAX_FORM_BYTES = 4096
BODY_TIMEOUT_S = 10.0
UNLOCK_SLOTS = 2
UNLOCK_WAIT_S = 30.0
STORE_CHECK_S = 1.0
# The role table of state-changing actions: the roles of which a session needs one (empty:
# any logged-in user).
ACTIONS: dict[str, frozenset[str]] = {
    "logout": frozenset(),
    "ack": frozenset({"operator", "physicist"}),  # an alarm acknowledgement (ack.py)
    "signoff": frozenset({"physicist"}),  # a delivery's electronic sign-off (signoff.py)
}
# Roles whose sessions keep the unlocked key (the signed commands of items 3-4); a viewer's
# session holds none.
SIGNING_ROLES = frozenset({"operator", "physicist"})

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Endpoint = Callable[[Request, Session], Awaitable[Response]]
Unlock = Callable[[Store, str, str], Any]


@dataclass(frozen=True, slots=True)
class AuthSettings:
    users_dir: Path
    idle_s: float
    max_s: float
    anonymous_view: tuple[Network, ...] = ()
    secure: bool = False  # served over TLS: cookies get Secure


def _json(status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> Response:
    return JSONResponse(body, status_code=status, headers=headers)


def _client(request: Request) -> str:
    return request.client.host if request.client else "unknown"


class Auth:
    """The login's state: sessions, back-off, the store and the access record."""

    def __init__(
        self,
        settings: AuthSettings,
        store: Store,
        record: AccessRecord,
        *,
        clock: Callable[[], float] = time.monotonic,
        unlock: Unlock = users_unlock,
    ) -> None:
        self.settings = settings
        self.store: Store | None = store
        self.record = record
        self.clock = clock
        self.unlock = unlock
        self.book = SessionBook(idle_s=settings.idle_s, max_s=settings.max_s)
        self.backoff = Backoff()
        self.tokens = LoginTokens()
        self.devices = DeviceCookies()
        self.refused: Counter[str] = (
            Counter()
        )  # by reason: cross_origin, csrf, no_session, role, backoff
        self.logins: Counter[str] = Counter()  # judged, by outcome: ok, failed, refused
        self._slots = asyncio.Semaphore(UNLOCK_SLOTS)
        self._judging: set[str] = set()  # back-off keys with an attempt being judged now
        self._stat = self._store_stat()
        self._checked_at = clock()

    # ---- the store ---------------------------------------------------------------------

    def _store_stat(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.settings.users_dir / STORE_FILE)
        except OSError:
            return None
        return (st.st_ino, st.st_size, st.st_mtime_ns)

    async def refresh_store(self, *, force: bool = False) -> None:
        """Re-read the store when its file changed; end the sessions it no longer allows."""
        now = self.clock()
        if not force and now - self._checked_at < STORE_CHECK_S:
            return
        self._checked_at = now
        stat = self._store_stat()
        if stat != self._stat or self.store is None or force:
            self._stat = stat
            try:
                self.store = await asyncio.to_thread(load_checked_store, self.settings.users_dir)
            except StoreError as exc:
                if self.store is not None:
                    log.error("account_store_unusable", error=str(exc))  # noqa: TRY400 - the message says it all
                self.store = None
        await self._end_disallowed()

    async def _end_disallowed(self) -> None:
        wall = datetime.now(UTC)
        for holder in self.book.holders():
            user = self.store.users.get(holder) if self.store is not None else None
            if user is None or not active(user, wall):
                reason = "store_unusable" if self.store is None else "account_inactive"
                for s in self.book.drop_holder(holder):
                    await self._ended(Expired(holder, reason, self.clock() - s.created))
                continue
            for s in self.book.of(holder):
                s.roles = frozenset(user.roles)
                if not s.roles & SIGNING_ROLES:
                    s.signer = None

    # ---- sessions ----------------------------------------------------------------------

    async def _ended(self, e: Expired) -> None:
        log.info("session_ended", holder=e.holder, reason=e.reason, age_s=round(e.age_s))
        data = {"holder": e.holder, "reason": e.reason, "age_s": round(e.age_s, 3)}
        try:
            await self.record.append("session_ended", data)
        except AccessRecordError as exc:
            log.error("access_record_failed", error=str(exc))  # noqa: TRY400 - named, no traceback

    async def end_all(self, reason: str) -> None:
        """End every session (the dashboard is stopping: the record says so for each)."""
        now = self.clock()
        for holder in sorted(self.book.holders()):
            for s in self.book.drop_holder(holder):
                s.signer = None
                await self._ended(Expired(holder, reason, now - s.created))

    async def sweep(self) -> None:
        """End expired sessions (and, with the store's re-check, disallowed ones)."""
        for e in self.book.sweep(self.clock()):
            await self._ended(e)
        await self.refresh_store()

    async def session(self, request: Request, *, touch: bool = True) -> Session | None:
        """The request's live session; ``touch`` false: the look does not count as the
        user's activity (the page's periodic check, module doc)."""
        s, ended = self.book.lookup(request.cookies.get(SESSION_COOKIE), self.clock(), touch=touch)
        if ended is not None:
            await self._ended(ended)
        if s is not None:
            await self.refresh_store()
            if s.sid not in self.book:  # ended by the re-check
                return None
        return s

    def anonymous_view(self, request: Request) -> bool:
        try:
            ip = ipaddress.ip_address(_client(request))
        except ValueError:
            return False
        return any(ip in net for net in self.settings.anonymous_view)

    async def may_view(self, request: Request) -> bool:
        # Seeing is not activity (a stream's reconnect must not keep a session alive).
        return self.anonymous_view(request) or (
            await self.session(request, touch=False) is not None
        )

    def _cookie(self, name: str, value: str, *, clear: bool = False) -> str:
        parts = [f"{name}={value}", "HttpOnly", "SameSite=Strict", "Path=/"]
        if self.settings.secure:
            parts.append("Secure")
        if clear:
            parts.append("Max-Age=0")
        return "; ".join(parts)

    # ---- refusals ----------------------------------------------------------------------

    def _refuse(self, request: Request, status: int, reason: str, message: str) -> Response:
        self.refused[reason] += 1
        log.warning(
            "request_refused", reason=reason, path=request.url.path, client=_client(request)
        )
        return _json(status, {"error": message, "reason": reason})

    def _same_origin(self, request: Request) -> bool:
        host = request.headers.get("host", "").lower()
        expected = f"{request.url.scheme}://{host}"
        origin = request.headers.get("origin")
        if origin is not None:
            return origin.lower() == expected
        referer = request.headers.get("referer")
        if referer:
            parts = urlsplit(referer)
            return f"{parts.scheme}://{parts.netloc}".lower() == expected
        return False

    def action(self, name: str, endpoint: Endpoint) -> Callable[[Request], Awaitable[Response]]:
        """``endpoint`` behind the checks every state-changing request passes (module doc)."""
        roles = ACTIONS[name]  # an action missing from the table fails at start

        async def guarded(request: Request) -> Response:
            if not self._same_origin(request):
                return self._refuse(
                    request, 403, "cross_origin", "refused: not from this dashboard's own page"
                )
            s = await self.session(request)
            if s is None:
                return self._refuse(request, 401, "no_session", "log in first")
            if not csrf_ok(s, request.headers.get(CSRF_HEADER)):
                return self._refuse(
                    request, 403, "csrf", "refused: missing or wrong CSRF token; reload the page"
                )
            if roles and not roles & s.roles:
                return self._refuse(
                    request,
                    403,
                    "role",
                    f"refused: this needs the role {' or '.join(sorted(roles))}",
                )
            return await endpoint(request, s)

        return guarded

    # ---- the endpoints -----------------------------------------------------------------

    def streaming_session(self, request: Request) -> str | None:
        """The session id a data stream must end with (None: this client may see without
        one). An open stream is not activity: it never restarts the idle clock."""
        if self.anonymous_view(request):
            return None
        return request.cookies.get(SESSION_COOKIE)

    def alive(self, sid: str) -> bool:
        return sid in self.book

    async def session_info(self, request: Request) -> Response:
        s = await self.session(request, touch=request.query_params.get("peek") != "1")
        nonce = request.cookies.get(LOGIN_COOKIE)
        if not nonce or len(nonce) > 64:
            nonce, token = self.tokens.issue()
        else:
            token = self.tokens.token_for(nonce)
        body = {
            "auth": True,
            "anonymous_view": self.anonymous_view(request),
            "session": s.view(self.clock(), idle_s=self.book.idle_s, max_s=self.book.max_s)
            if s
            else None,
            "login_csrf": token,
        }
        resp = _json(200, body)
        resp.headers.append("set-cookie", self._cookie(LOGIN_COOKIE, nonce))
        return resp

    async def _form(self, request: Request) -> dict[str, str] | None:
        if request.headers.get("content-type", "").split(";")[0].strip() != (
            "application/x-www-form-urlencoded"
        ):
            return None
        body = b""
        async with asyncio.timeout(BODY_TIMEOUT_S):
            async for chunk in request.stream():
                body += chunk
                if len(body) > MAX_FORM_BYTES:
                    return None
        try:
            fields = parse_qs(body.decode("utf-8"), keep_blank_values=True, strict_parsing=False)
        except UnicodeDecodeError:
            return None
        if set(fields) != {"holder", "password"} or any(len(v) != 1 for v in fields.values()):
            return None
        return {k: v[0] for k, v in fields.items()}

    async def login(self, request: Request) -> Response:
        if not self._same_origin(request):
            return self._refuse(
                request, 403, "cross_origin", "refused: not from this dashboard's own page"
            )
        if not self.tokens.check(
            request.cookies.get(LOGIN_COOKIE), request.headers.get(CSRF_HEADER)
        ):
            return self._refuse(
                request, 403, "csrf", "refused: missing or wrong CSRF token; reload the page"
            )
        try:
            form = await self._form(request)
        except TimeoutError:
            form = None
        if form is None:
            return _json(400, {"error": "expected a form with holder and password"})
        client = _client(request)
        holder = form["holder"].strip().lower()[:64]
        device = self.devices.check(request.cookies.get(DEVICE_COOKIE), holder)
        # a browser this holder logged in from before: judged by its own back-off, not the
        # holder's (someone else's failures cannot keep it out: sessions.py)
        keys = (f"ip:{client}", f"device:{device}" if device else f"holder:{holder}")
        now = self.clock()
        wait = max(self.backoff.wait_s(k, now) for k in keys)
        if any(k in self._judging for k in keys):
            # one attempt per address and per holder at a time: parallel requests would
            # otherwise all be judged before the first failure counted
            wait = max(wait, self.backoff.first_s)
        if wait > 0:
            self.refused["backoff"] += 1
            secs = math.ceil(wait)
            return _json(
                429,
                {"error": f"too many failed logins: wait {secs} s", "retry_after_s": secs},
                {"retry-after": str(secs)},
            )
        await self.refresh_store()
        store = self.store
        if store is None:
            return _json(
                503, {"error": "the account store does not check; see the dashboard's log"}
            )
        self._judging.update(keys)
        try:
            return await self._judge(request, store, holder, form["password"], keys, device)
        finally:
            self._judging.difference_update(keys)

    async def _judge(
        self, request: Request, store: Store, holder: str, password: str,
        keys: tuple[str, str], device: str | None,
    ) -> Response:  # fmt: skip
        client = _client(request)
        try:
            async with asyncio.timeout(UNLOCK_WAIT_S), self._slots:
                signer = await asyncio.to_thread(self.unlock, store, holder, password)
        except TimeoutError:
            return _json(503, {"error": "busy: try again in a moment"}, {"retry-after": "5"})
        except AuthError:
            self.logins["failed"] += 1
            return await self._failed(request, holder, store, keys)
        except PasswordChangeRequired:
            self.logins["refused"] += 1
            await self._record(
                "login_refused",
                {"holder": holder, "reason": "password_change_required", "client": client},
            )
            return _json(
                403, {"error": f"choose your own password first: iort-users passwd {holder}"}
            )
        user = store.users[holder]
        roles = frozenset(user.roles)
        try:
            await self.record.append(
                "login", {"holder": holder, "roles": sorted(roles), "client": client}, signer
            )
        except AccessRecordError as exc:
            log.error("access_record_failed", error=str(exc))  # noqa: TRY400 - named, no traceback
            return _json(503, {"error": "the login cannot be recorded; see the dashboard's log"})
        self.logins["ok"] += 1
        for k in keys:
            self.backoff.success(k)
        s, evicted = self.book.create(
            holder, user.name, roles, self.clock(),
            signer=signer if roles & SIGNING_ROLES else None,
            replacing=request.cookies.get(SESSION_COOKIE),
        )  # fmt: skip
        for e in evicted:
            await self._ended(e)
        log.info("login", holder=holder, client=client, roles=sorted(roles))
        resp = _json(
            200, {"session": s.view(self.clock(), idle_s=self.book.idle_s, max_s=self.book.max_s)}
        )
        resp.headers.append("set-cookie", self._cookie(SESSION_COOKIE, s.sid))
        resp.headers.append("set-cookie", self._cookie(LOGIN_COOKIE, "", clear=True))
        if device is None:
            value = self.devices.issue(holder)
            resp.headers.append(
                "set-cookie",
                self._cookie(DEVICE_COOKIE, value) + f"; Max-Age={DEVICE_MAX_AGE_S}",
            )
        return resp

    async def _failed(
        self, request: Request, holder: str, store: Store, keys: Sequence[str]
    ) -> Response:
        client = _client(request)
        now = self.clock()
        wait = max(self.backoff.failure(k, now) for k in keys)
        known = holder in store.users
        log.info("login_failed", holder=holder if known else None, client=client, wait_s=wait)
        await self._record(
            "login_failed",
            {
                "holder": holder if known else None,
                "account": "known" if known else "unknown",
                "client": client,
            },
        )
        secs = math.ceil(wait)
        return _json(401, {"error": AUTH_FAILED, "retry_after_s": secs}, {"retry-after": str(secs)})

    async def _record(self, type: str, data: dict[str, Any]) -> None:
        try:
            await self.record.append(type, data)
        except AccessRecordError as exc:
            log.error("access_record_failed", error=str(exc))  # noqa: TRY400 - named, no traceback

    async def logout(self, request: Request, s: Session) -> Response:
        self.book.drop(s.sid)
        s.signer = None
        log.info("logout", holder=s.holder, client=_client(request))
        await self._record("logout", {"holder": s.holder, "client": _client(request)})
        resp = _json(200, {"session": None})
        resp.headers.append("set-cookie", self._cookie(SESSION_COOKIE, "", clear=True))
        return resp
