"""Reading small input files (site configs, profiles, register maps, scenarios) safely.

A path in a config file is data a person typed: it may name a FIFO (``open`` blocks until a
writer comes, so ``check-config`` would hang), ``/dev/zero`` (``read()`` never ends and
fills memory), a directory, a name longer than the file system allows, or contain a NUL.
:func:`read_small_file` turns every one of those into a :class:`FileReadError` whose
``reason`` is one short sentence, so that each caller reports it on one line naming its own
file and key.

How: the file is opened with ``O_NONBLOCK`` (opening a FIFO for reading then returns at once
instead of waiting for a writer), checked with ``fstat`` on the open descriptor (so what is
checked is what is read: no race with a rename), and read only if it is a regular file, at
most ``max_bytes`` (a file that grows while read is caught by reading one byte more).
Symbolic links are followed: configuration is commonly linked into /etc, and a link to a
regular file reads that regular file, which is all the check is about.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import tomllib
from pathlib import Path
from typing import Final

__all__ = [
    "BOM_ERROR",
    "MAX_INPUT_FILE_BYTES",
    "UTF8_BOM",
    "FileReadError",
    "read_small_file",
    "toml_error",
]

# Far above any real site config, profile or map (the shipped ones are 1-20 KB), far below
# anything that would hurt the daemon's memory.
MAX_INPUT_FILE_BYTES: Final = 1024 * 1024


class FileReadError(Exception):
    """The file cannot be used; ``reason`` says why, without the path (callers add it)."""

    def __init__(self, reason: str, *, missing: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.missing = missing


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISCHR(mode):
        return "a character device"
    if stat.S_ISBLK(mode):
        return "a block device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def read_small_file(
    path: Path, max_bytes: int = MAX_INPUT_FILE_BYTES, *, expected: str = "a regular file"
) -> bytes:
    """The bytes of the regular file at ``path``, at most ``max_bytes``; else FileReadError.

    ``expected`` names what should be there, for the message ("a TOML file").
    """
    if "\0" in str(path):
        raise FileReadError("the path contains a NUL character; remove it")
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise FileReadError("file not found", missing=True) from None
    except OSError as exc:
        if exc.errno == errno.ENXIO:  # open() of a Unix socket: say what it is
            with contextlib.suppress(OSError):
                mode = os.stat(path).st_mode
                if not stat.S_ISREG(mode):
                    raise FileReadError(f"is {_kind(mode)}, expected {expected}") from None
        raise FileReadError(f"cannot read: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise FileReadError(f"is {_kind(st.st_mode)}, expected {expected}")
        if st.st_size > max_bytes:
            raise FileReadError(f"too large ({st.st_size} bytes; at most {max_bytes} are read)")
        chunks: list[bytes] = []
        left = max_bytes + 1
        while left > 0:
            chunk = os.read(fd, min(left, 65536))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
    except OSError as exc:
        raise FileReadError(f"cannot read: {exc.strerror}") from None
    finally:
        os.close(fd)
    data = b"".join(chunks)
    if len(data) > max_bytes:
        raise FileReadError(f"too large (more than {max_bytes} bytes; it grew while read)")
    return data


UTF8_BOM: Final = b"\xef\xbb\xbf"
BOM_ERROR: Final = (
    "starts with a byte-order mark (BOM), which TOML does not allow; some editors add one: "
    "save the file as UTF-8 without a BOM"
)


def toml_error(exc: Exception, data: bytes | str = b"") -> str:
    """What went wrong parsing TOML (``data``: what was parsed), in words: tomllib recurses
    once per nesting level, so a file nested thousands deep raises RecursionError rather
    than TOMLDecodeError; a byte-order mark at the start is only "invalid statement" to it.
    """
    if isinstance(exc, RecursionError):
        return "nested too deeply (tables or arrays thousands of levels deep)"
    bom = data[:1] == "\ufeff" or (isinstance(data, bytes) and data.startswith(UTF8_BOM))
    if bom and isinstance(exc, tomllib.TOMLDecodeError):
        return BOM_ERROR
    return str(exc)
