"""Login sessions, CSRF tokens and the back-off after failed logins: pure, on an injected clock.

Nothing here does I/O or reads a clock: every method takes ``now`` (monotonic seconds), so
expiry, idle time and back-off are tested by moving a number, never by sleeping.

**Sessions** (:class:`SessionBook`) live in this process's memory only: a restart of the
dashboard logs everyone out. A session id is ``secrets.token_urlsafe(32)`` (256 bits), made
at login and never before, so an id planted in a browser before login is never the one the
login makes (no fixation); a login from a browser that held a session ends that session
first. Each session has its own CSRF token (another 256 random bits), an absolute end
(``max_s`` after login) and an idle end (``idle_s`` after the last request it made); a
session past either is gone the moment it is looked up or swept, with the reason.
A session may hold the user's unlocked :class:`~iortd.auditlog.note.Signer` (for the
signed commands of issue 19 items 3-4): in memory only, never written, never in a cookie
or a response, and dropped with the session (the book forgets it at logout, expiry and
when the account is disabled). The book is bounded (``max_sessions``): a login beyond it
ends the session idle longest.

**The login's CSRF token** (before there is a session) is a signed double-submit token
(OWASP CSRF cheat sheet, "Signed Double-Submit Cookie"): a random nonce in an HttpOnly
cookie and ``nonce.HMAC-SHA256(server key, nonce)`` in the page; a login must send the
token whose nonce is the cookie's and whose MAC this process made. No server memory per
visitor, and a key per process, so a restart invalidates the tokens with the sessions.

**Back-off, never lockout** (:class:`Backoff`): each failed login for a key (the client's
address, the holder id typed) doubles the wait before the next attempt with that key is
judged, from ``first_s`` to at most ``cap_s``; an attempt during the wait is answered 429
with the time left and not judged; a success clears the key. Nothing ever locks an account:
the longest anyone waits is ``cap_s``. The table is bounded (``max_keys``, oldest dropped),
so a flood of invented holder ids costs memory once, not forever. A browser that logged in
as the holder before (:class:`DeviceCookies`) is judged by its own back-off instead of the
holder's, so failures elsewhere cannot keep it out.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from iortd.users import Signer

__all__ = [
    "Backoff",
    "DeviceCookies",
    "Expired",
    "LoginTokens",
    "Session",
    "SessionBook",
]

# NIST SP 800-63B (rev. 3, sections 4.2.3 and 4.3.3): reauthenticate at least every 12 h; after
# 30 min of inactivity at AAL2, 15 min at AAL3. The session holds a signing key (items 3-4), so
# the stricter pair: a workstation left in an operating room keeps nobody's rights for long.
DEFAULT_MAX_S = 12 * 3600.0
DEFAULT_IDLE_S = 15 * 60.0
MAX_SESSIONS = 1000


@dataclass(slots=True)
class Session:
    sid: str
    csrf: str
    holder: str
    name: str
    roles: frozenset[str]
    created: float
    last_seen: float
    signer: Signer | None = field(default=None, repr=False)  # never shown, never written

    def view(self, now: float, *, idle_s: float, max_s: float) -> dict[str, object]:
        """What the page may know (no id, no key)."""
        return {
            "holder": self.holder,
            "name": self.name,
            "roles": sorted(self.roles),
            "csrf": self.csrf,
            "expires_in_s": round(
                max(0.0, min(self.created + max_s, self.last_seen + idle_s) - now)
            ),
            "idle_s": idle_s,
        }


@dataclass(frozen=True, slots=True)
class Expired:
    holder: str
    reason: str  # "idle" | "absolute" | "evicted"
    age_s: float


class SessionBook:
    """The live sessions of this process (module doc)."""

    def __init__(
        self, *, idle_s: float = DEFAULT_IDLE_S, max_s: float = DEFAULT_MAX_S,
        max_sessions: int = MAX_SESSIONS,
    ) -> None:  # fmt: skip
        if not 0 < idle_s <= max_s:
            raise ValueError("idle_s must be > 0 and at most max_s")
        self.idle_s, self.max_s, self.max_sessions = idle_s, max_s, max_sessions
        self._by_id: dict[str, Session] = {}

    def __len__(self) -> int:
        return len(self._by_id)

    def _why_ended(self, s: Session, now: float) -> str | None:
        if now >= s.created + self.max_s:
            return "absolute"
        if now >= s.last_seen + self.idle_s:
            return "idle"
        return None

    def create(
        self, holder: str, name: str, roles: frozenset[str], now: float, *,
        signer: Signer | None = None, replacing: str | None = None,
    ) -> tuple[Session, list[Expired]]:  # fmt: skip
        """A new session (a new id: the one ``replacing`` names is ended first); the
        sessions ended to make room."""
        ended: list[Expired] = []
        if replacing is not None:
            self.drop(replacing)
        while len(self._by_id) >= self.max_sessions:
            oldest = min(self._by_id.values(), key=lambda s: s.last_seen)
            del self._by_id[oldest.sid]
            ended.append(Expired(oldest.holder, "evicted", now - oldest.created))
        s = Session(
            secrets.token_urlsafe(32), secrets.token_urlsafe(32), holder, name, roles,
            now, now, signer,
        )  # fmt: skip
        self._by_id[s.sid] = s
        return s, ended

    def lookup(
        self, sid: str | None, now: float, *, touch: bool = True
    ) -> tuple[Session | None, Expired | None]:
        """The live session ``sid`` names, its idle clock restarted (unless ``touch`` is
        false: a look that is not the user's doing); or None and, when it had just ended,
        why."""
        s = self._by_id.get(sid) if sid else None
        if s is None:
            return None, None
        why = self._why_ended(s, now)
        if why is not None:
            del self._by_id[s.sid]
            return None, Expired(s.holder, why, now - s.created)
        if touch:
            s.last_seen = now
        return s, None

    def drop(self, sid: str) -> Session | None:
        return self._by_id.pop(sid, None)

    def drop_holder(self, holder: str) -> list[Session]:
        gone = [s for s in self._by_id.values() if s.holder == holder]
        for s in gone:
            del self._by_id[s.sid]
        return gone

    def __contains__(self, sid: object) -> bool:
        return sid in self._by_id

    def of(self, holder: str) -> list[Session]:
        return [s for s in self._by_id.values() if s.holder == holder]

    def holders(self) -> set[str]:
        return {s.holder for s in self._by_id.values()}

    def sweep(self, now: float) -> list[Expired]:
        """End every session past its idle or absolute end (the dashboard does it once a
        second, so that an expiry is recorded when it happens, not at the next visit)."""
        out = []
        for s in list(self._by_id.values()):
            why = self._why_ended(s, now)
            if why is not None:
                del self._by_id[s.sid]
                out.append(Expired(s.holder, why, now - s.created))
        return out


def csrf_ok(session: Session, token: str | None) -> bool:
    return token is not None and hmac.compare_digest(session.csrf.encode(), token.encode())


class LoginTokens:
    """The pre-session CSRF token of the login form (module doc)."""

    def __init__(self, key: bytes | None = None) -> None:
        self._key = key or secrets.token_bytes(32)

    def _mac(self, nonce: str) -> str:
        return hmac.new(self._key, b"login:" + nonce.encode(), hashlib.sha256).hexdigest()

    def issue(self) -> tuple[str, str]:
        """(cookie value, token for the page)."""
        nonce = secrets.token_urlsafe(24)
        return nonce, f"{nonce}.{self._mac(nonce)}"

    def token_for(self, nonce: str) -> str:
        return f"{nonce}.{self._mac(nonce)}"

    def check(self, cookie: str | None, token: str | None) -> bool:
        if not cookie or not token or len(token) > 200:
            return False
        nonce, _, mac = token.partition(".")
        return hmac.compare_digest(nonce.encode(), cookie.encode()) and hmac.compare_digest(
            mac.encode(), self._mac(nonce).encode()
        )


class DeviceCookies:
    """A browser that has logged in as a holder before (OWASP's "device cookie" against
    lockout by someone else's failures): ``holder.nonce.HMAC(key, holder.nonce)``. With a
    valid one, that browser's failures for that holder count against the cookie, not
    against the holder, and the holder's back-off does not hold it: someone guessing a
    physicist's password elsewhere cannot keep her own workstation out."""

    def __init__(self, key: bytes | None = None) -> None:
        self._key = key or secrets.token_bytes(32)

    def _mac(self, body: str) -> str:
        return hmac.new(self._key, b"device:" + body.encode(), hashlib.sha256).hexdigest()

    def issue(self, holder: str) -> str:
        body = f"{holder}.{secrets.token_urlsafe(18)}"
        return f"{body}.{self._mac(body)}"

    def check(self, cookie: str | None, holder: str) -> str | None:
        """The cookie's id (for its own back-off key) when it is valid for ``holder``."""
        if not cookie or len(cookie) > 200 or cookie.count(".") < 2:
            return None
        body, _, mac = cookie.rpartition(".")
        who, _, nonce = body.rpartition(".")
        if who != holder or not hmac.compare_digest(mac.encode(), self._mac(body).encode()):
            return None
        return nonce


class Backoff:
    """Failures per key and the wait they impose (module doc)."""

    def __init__(
        self, *, first_s: float = 1.0, cap_s: float = 60.0, max_keys: int = 10_000
    ) -> None:
        self.first_s, self.cap_s, self.max_keys = first_s, cap_s, max_keys
        self._keys: OrderedDict[str, tuple[int, float]] = OrderedDict()  # failures, not before

    def wait_s(self, key: str, now: float) -> float:
        entry = self._keys.get(key)
        return 0.0 if entry is None else max(0.0, entry[1] - now)

    def failures(self, key: str) -> int:
        entry = self._keys.get(key)
        return 0 if entry is None else entry[0]

    def failure(self, key: str, now: float) -> float:
        """Count one failure; the wait it imposes."""
        n = self.failures(key) + 1
        delay = min(self.cap_s, self.first_s * 2.0 ** min(n - 1, 32))
        self._keys[key] = (n, now + delay)
        self._keys.move_to_end(key)
        while len(self._keys) > self.max_keys:
            self._keys.popitem(last=False)
        return delay

    def success(self, key: str) -> None:
        self._keys.pop(key, None)
