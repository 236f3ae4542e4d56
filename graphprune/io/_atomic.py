"""Atomic writes (models, reports, plans): a temporary file in the same folder, then a rename.

The temporary file is created the way ``open(path, "w")`` creates a file, mode ``0o666``
less the process umask (``tempfile.mkstemp`` would make it ``0o600``, and the rename would
carry that to the final file); a file that already exists at the target keeps its mode.
"""

from __future__ import annotations

import os
import secrets
import stat
from pathlib import Path

from graphprune.errors import UsageError

#: bytes a temporary's name adds to its target's (``.NAME.<8 hex digits>.tmp``)
TEMPORARY_NAME_EXTRA = len("..") + 8 + len(".tmp")


def create_temporary(target: Path) -> tuple[int, str]:
    """Create an empty temporary file next to ``target``; return its descriptor and path.
    A ``target`` that exists and is no regular file (a device such as ``/dev/null``, a FIFO,
    a socket) is refused: the rename would replace it with a file (root's ``-o /dev/null``
    replaced the system's ``/dev/null``)."""
    target = Path(target)
    try:
        kind = os.stat(target).st_mode
    except OSError:
        kind = None
    if kind is not None and not stat.S_ISREG(kind) and not stat.S_ISDIR(kind):
        raise UsageError(f"cannot write '{target}': it is not a regular file (a device, a FIFO or a socket), "
                         "which writing would replace with a file")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    for _ in range(100):
        path = target.parent / f".{target.name}.{secrets.token_hex(4)}.tmp"
        try:
            handle = os.open(path, flags, 0o666)
        except FileExistsError:
            continue
        try:
            mode = stat.S_IMODE(os.stat(target).st_mode)
        except OSError:
            return handle, str(path)  # a new file: the umask decided its mode
        try:
            os.chmod(path, mode)
        except OSError:
            os.close(handle)
            os.unlink(path)
            raise
        return handle, str(path)
    raise FileExistsError(f"no free temporary name next to {target}")


def try_writing(target: Path) -> None:
    """Create and remove a temporary file next to ``target`` (``OSError`` where the folder takes
    none: a read-only or virtual file system, which ``os.access`` calls writable for root)."""
    handle, path = create_temporary(target)
    os.close(handle)
    os.unlink(path)


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically; UsageError (one line) when it cannot be written."""
    path = Path(path)
    tmp = None
    try:
        handle, tmp = create_temporary(path)
        with os.fdopen(handle, "w", encoding="utf-8") as stream:
            stream.write(text)
        os.replace(tmp, path)
        tmp = None
    except OSError as exc:
        reason = exc.strerror or str(exc).strip().splitlines()[0]
        raise UsageError(f"cannot write '{path}': {reason}") from exc
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
