"""Blocking work in a thread that never holds up the process's exit.

``asyncio.to_thread`` runs in the loop's default executor, and both ``asyncio.run`` (at its
end: ``shutdown_default_executor``) and the interpreter (at exit: ``concurrent.futures``
joins every executor's threads) wait for those threads. One call that never returns — a
read or an fsync on a stalled NFS share, which no signal interrupts — then keeps the
process alive for good, past any shutdown bound and the service manager's stop timeout.

:func:`in_daemon_thread` runs one call in a thread of its own, a daemon thread, which
neither waits for. The caller bounds its wait (a timeout, a stop) and, if it gives up,
abandons the thread: whatever it finishes later is dropped, and at exit it is stopped with
the process. Only for work that is safe to cut anywhere (each step of it crash-safe, as
retention's are: auditlog/archive.py), since a SIGKILL at that point does the same.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import threading
from collections.abc import Callable
from typing import TypeVar

__all__ = ["in_daemon_thread"]

T = TypeVar("T")


async def in_daemon_thread(fn: Callable[..., T], *args: object, name: str) -> T:
    """``fn(*args)`` in a new daemon thread named ``name``, with the caller's context
    variables; its result or its exception. Cancelling the wait abandons the thread."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[T] = loop.create_future()
    ctx = contextvars.copy_context()

    def settle(result: T | None, exc: BaseException | None) -> None:
        if done.done():  # the waiter gave up (cancelled): nothing to hand over
            return
        if exc is not None:
            done.set_exception(exc)
        else:
            done.set_result(result)  # type: ignore[arg-type]  # T when exc is None

    def work() -> None:
        result: T | None = None
        error: BaseException | None = None
        try:
            result = ctx.run(fn, *args)
        except BaseException as exc:  # handed over to the waiter, re-raised there
            error = exc
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
            loop.call_soon_threadsafe(settle, result, error)

    threading.Thread(target=work, name=name, daemon=True).start()
    return await done
