"""Temporary folders that do not outlive a killed process.

Every folder graphprune works in (a model's weight store, the calibration cache, the
verifier's and the timer's copies) is made here, with a small ``owner`` file naming the
process that made it. A process that ends normally, on an error, on Ctrl-C or on SIGTERM
removes its folders itself; one that is killed outright (SIGKILL, a benchmark's or a
scheduler's time limit, the out-of-memory killer) cannot, and would leave a model's worth
of weights in the temporary directory for good. So the first folder a process makes in a
directory sweeps it: folders whose owner file names a process of this machine's current
boot and PID namespace that no longer runs are removed. A folder without an owner file, of
another boot's or namespace's process, or of a live one is never touched.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import weakref
from pathlib import Path

OWNER = ".graphprune-owner"
#: name prefixes of the folders made here (only these are swept)
PREFIXES = ("graphprune-", "gp-")

_swept: set[str] = set()


def _read(path: str) -> str:
    try:
        with open(path, encoding="ascii") as handle:
            return handle.read().strip()
    except (OSError, UnicodeDecodeError):
        return ""


def _start_time(pid: int) -> str:
    """The start time of process ``pid`` in clock ticks since boot ('' where unknown): with
    the PID it names one process, whereas a PID alone is reused."""
    stat = _read(f"/proc/{pid}/stat")
    tail = stat.rpartition(")")[2].split()  # after the command name, which may hold spaces
    return tail[19] if len(tail) > 19 else ""


def _namespace() -> str:
    """This machine's boot and this process' PID namespace: a PID names the same process
    only for an owner of the same ones."""
    try:
        pid_ns = str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        pid_ns = ""
    return f"{_read('/proc/sys/kernel/random/boot_id')}:{pid_ns}"


def _owner_line() -> str:
    return f"{_namespace()} {os.getpid()} {_start_time(os.getpid())}\n"


def _abandoned(folder: Path) -> bool:
    """``folder``'s owner file names a process of this boot and namespace that has ended."""
    fields = _read(str(folder / OWNER)).split()
    if len(fields) != 3 or fields[0] != _namespace() or fields[0].startswith(":"):
        return False
    try:
        pid = int(fields[1])
    except ValueError:
        return False
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # alive, another user's
        return False
    return bool(fields[2]) and _start_time(pid) not in ("", fields[2])  # the PID was reused


def sweep(parent: str | os.PathLike[str]) -> list[str]:
    """Remove the folders in ``parent`` that killed graphprune processes left (see the module
    docstring); the paths removed."""
    removed = []
    try:
        entries = list(os.scandir(parent))
    except OSError:
        return removed
    for entry in entries:
        try:
            if not entry.name.startswith(PREFIXES) or not entry.is_dir(follow_symlinks=False):
                continue
        except OSError:
            continue
        folder = Path(entry.path)
        if _abandoned(folder):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(str(folder))
    return removed


def make(prefix: str, parent: str | os.PathLike[str] | None = None) -> Path:
    """A new private folder (as :func:`tempfile.mkdtemp`) with its owner file; the first in a
    directory sweeps the directory first."""
    where = os.fspath(parent) if parent is not None else tempfile.gettempdir()
    if os.name == "posix" and where not in _swept:
        _swept.add(where)
        sweep(where)
    folder = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    if os.name == "posix":
        try:
            (folder / OWNER).write_text(_owner_line(), encoding="ascii")
        except OSError:
            pass  # the folder is still removed as usual; only a sweep would not know it
    return folder


class Folder:
    """A folder from :func:`make`, removed by :meth:`cleanup`, on leaving a ``with`` block
    or with the object (as :class:`tempfile.TemporaryDirectory`)."""

    def __init__(self, prefix: str, parent: str | os.PathLike[str] | None = None) -> None:
        self.name = str(make(prefix, parent))
        self._finalizer = weakref.finalize(self, shutil.rmtree, self.name, ignore_errors=True)

    def cleanup(self) -> None:
        self._finalizer()

    def __enter__(self) -> str:
        return self.name

    def __exit__(self, *exc: object) -> None:
        self.cleanup()
