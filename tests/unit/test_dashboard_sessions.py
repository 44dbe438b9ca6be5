"""The login's pure parts (dashboard/sessions.py) on a clock the test moves: a session ends
at its absolute end and after its idle time, a login makes a new id and ends the one it
replaces, the book is bounded; the back-off doubles to its cap, answers with the time left,
clears on success and never locks; the login CSRF token binds to its cookie and this
process's key."""

from __future__ import annotations

import pytest

from iortd.auditlog.note import generate_keypair
from iortd.dashboard.sessions import Backoff, LoginTokens, SessionBook, csrf_ok

ROLES = frozenset({"physicist"})


def test_a_session_ends_after_its_idle_time_and_a_request_restarts_it() -> None:
    book = SessionBook(idle_s=900, max_s=43200)
    s, _ = book.create("phys-anna", "A. Example", ROLES, now=0.0)
    assert book.lookup(s.sid, 899.0)[0] is s  # seen: the idle clock restarts at 899
    assert book.lookup(s.sid, 899.0 + 899.0)[0] is s
    gone, why = book.lookup(s.sid, 1798.0 + 900.0)
    assert gone is None
    assert why is not None
    assert why.reason == "idle"
    assert why.holder == "phys-anna"
    assert book.lookup(s.sid, 1798.0 + 901.0) == (None, None)  # once only


def test_a_session_ends_at_its_absolute_end_however_busy() -> None:
    book = SessionBook(idle_s=900, max_s=3600)
    s, _ = book.create("phys-anna", "A", ROLES, now=0.0)
    t = 0.0
    while t < 3600 - 600:
        t += 600
        assert book.lookup(s.sid, t)[0] is s
    gone, why = book.lookup(s.sid, 3600.0)
    assert gone is None
    assert why is not None
    assert why.reason == "absolute"


def test_the_sweep_ends_sessions_nobody_looks_at_and_drops_their_key() -> None:
    book = SessionBook(idle_s=10, max_s=100)
    signer = generate_keypair("phys-anna")
    s, _ = book.create("phys-anna", "A", ROLES, now=0.0, signer=signer)
    assert "signer" not in repr(s)
    assert str(signer.key_hash) not in repr(s)
    assert book.sweep(9.9) == []
    ended = book.sweep(10.0)
    assert [(e.holder, e.reason) for e in ended] == [("phys-anna", "idle")]
    assert s.sid not in book
    assert len(book) == 0


def test_login_makes_a_new_id_and_ends_the_one_it_replaces() -> None:
    book = SessionBook(idle_s=10, max_s=100)
    old, _ = book.create("viewer-vic", "V", frozenset({"viewer"}), now=0.0)
    new, _ = book.create("phys-anna", "A", ROLES, now=1.0, replacing=old.sid)
    assert new.sid != old.sid
    assert new.csrf != old.csrf
    assert len(new.sid) >= 43  # token_urlsafe(32): 256 bits
    assert book.lookup(old.sid, 2.0) == (None, None)
    assert book.lookup(new.sid, 2.0)[0] is new
    # an id the browser made up (fixation) is simply not a session
    assert book.lookup("planted-by-someone", 2.0) == (None, None)


def test_the_book_is_bounded_and_says_whom_it_ended() -> None:
    book = SessionBook(idle_s=10, max_s=100, max_sessions=2)
    a, _ = book.create("a", "A", ROLES, now=0.0)
    book.create("b", "B", ROLES, now=1.0)
    _, ended = book.create("c", "C", ROLES, now=2.0)
    assert [(e.holder, e.reason) for e in ended] == [("a", "evicted")]
    assert a.sid not in book


def test_idle_longer_than_absolute_is_refused() -> None:
    with pytest.raises(ValueError, match="idle_s"):
        SessionBook(idle_s=200, max_s=100)


def test_session_csrf_is_compared_exactly() -> None:
    s, _ = SessionBook(idle_s=10, max_s=100).create("a", "A", ROLES, now=0.0)
    assert csrf_ok(s, s.csrf)
    assert not csrf_ok(s, None)
    assert not csrf_ok(s, s.csrf[:-1])
    assert not csrf_ok(s, "")


def test_backoff_doubles_from_one_second_to_a_minute_and_never_locks() -> None:
    b = Backoff()
    waits = [b.failure("ip:10.0.0.9", now=0.0) for _ in range(9)]
    assert waits == [1, 2, 4, 8, 16, 32, 60, 60, 60]
    assert b.wait_s("ip:10.0.0.9", 0.0) == 60
    assert b.wait_s("ip:10.0.0.9", 59.5) == pytest.approx(0.5)
    assert b.wait_s("ip:10.0.0.9", 60.0) == 0  # the next attempt is judged: no lockout
    for _ in range(1000):
        b.failure("ip:10.0.0.9", now=0.0)
    assert b.wait_s("ip:10.0.0.9", 60.0) == 0
    assert b.wait_s("ip:10.0.0.8", 0.0) == 0  # another key is not affected
    b.success("ip:10.0.0.9")
    assert b.failures("ip:10.0.0.9") == 0
    assert b.failure("ip:10.0.0.9", now=100.0) == 1  # from the start again


def test_backoff_table_is_bounded() -> None:
    b = Backoff(max_keys=3)
    for i in range(5):
        b.failure(f"holder:x{i}", now=0.0)
    assert [b.failures(f"holder:x{i}") for i in range(5)] == [0, 0, 1, 1, 1]


def test_login_token_binds_to_its_cookie_and_this_process() -> None:
    tokens = LoginTokens()
    cookie, token = tokens.issue()
    assert tokens.check(cookie, token)
    assert tokens.token_for(cookie) == token
    _other_cookie, other_token = tokens.issue()
    assert not tokens.check(cookie, other_token)  # another browser's token
    assert not tokens.check(None, token)
    assert not tokens.check(cookie, None)
    assert not tokens.check(cookie, f"{cookie}.{'0' * 64}")  # a MAC made up
    assert not LoginTokens().check(cookie, token)  # another process (a restart)
