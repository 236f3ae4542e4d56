"""The command line's guard against a crash in native code.

ONNX Runtime (or another native library) can crash the process outright on some models: a
segmentation fault in ``QLinearMul`` on an empty tensor that ORT's own ``quantize_static``
wrote. Python cannot catch that; the command died with no message and exit 139. So the
``graphprune`` command runs its work in a forked child and waits for it: the child says what
it is about to run (:func:`note`: the stage, the model ONNX Runtime runs) through a pipe, and
where it dies by a signal the parent prints one line saying what crashed and on what, and
exits 2 where that was the input model (it does not run in ONNX Runtime), 3 where it was the
pruned model, 1 otherwise. A child ended by a signal the command was not sent (the
out-of-memory killer's SIGKILL) gets one line too, with exit ``128 + signal``. Nothing is written then (outputs are written atomically), and the
parent removes the child's temporary folders (:func:`graphprune.io.scratch.sweep`).

The guard is the console entry's only (:func:`guarded`); :func:`graphprune.cli.main` called
from Python runs in the caller's process as before. ``GRAPHPRUNE_GUARD=0`` turns it off.
"""

from __future__ import annotations

import os
import select
import signal
import sys
from collections.abc import Callable

#: signals that mean a crash (not a request to stop)
CRASHES = {getattr(signal, name) for name in ("SIGSEGV", "SIGBUS", "SIGILL", "SIGFPE", "SIGABRT") if hasattr(signal, name)}
#: signals the parent passes on to the child (Ctrl-C reaches both; the child acts on the first
#: SIGINT only, so one sent to the command's process alone stops it too)
FORWARDED = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP", "SIGQUIT")
                  if hasattr(signal, name))

_channel: int | None = None  # the child's end of the pipe


def note(what: str) -> None:
    """Say what the process is about to do (read only where it crashes): ``"running <model>"``
    before ONNX Runtime runs a model (:func:`crash_line` reads which), else a stage."""
    if _channel is None:
        return
    try:
        os.write(_channel, (" ".join(what.split())[:300] + "\n").encode("utf-8", "replace"))
    except OSError:
        pass


def crash_line(signum: int, last: str) -> tuple[str, int]:
    """The one-line message and exit code for a child killed by ``signum`` after ``last``."""
    try:
        name = signal.Signals(signum).name
    except ValueError:
        name = f"signal {signum}"
    what = f" while {last}" if last else ""
    lowered = last.lower()
    if not lowered.startswith("running "):  # (a stage: no model run said)
        return f"the process crashed ({name}){what}; nothing was written", 1
    if any(w in lowered for w in ("as loaded", "original", "the input")):
        return (f"ONNX Runtime crashed ({name}){what}: the input model does not run in ONNX Runtime "
                "(run it there alone to see); nothing was written", 2)
    if "pruned" in lowered or "candidate" in lowered:
        return f"ONNX Runtime crashed ({name}){what}: the pruned model does not run; nothing was written", 3
    return f"ONNX Runtime crashed ({name}){what}; nothing was written", 1


def killed_line(signum: int, last: str) -> str:
    """The one-line message for a child ended by a signal the command was not sent (the
    system's out-of-memory killer sends SIGKILL: the command had ended with no word)."""
    try:
        name = signal.Signals(signum).name
    except ValueError:
        name = f"signal {signum}"
    what = f" while {last}" if last else ""
    hint = " (the system sends it when memory runs out)" if signum == getattr(signal, "SIGKILL", None) else ""
    return f"the process was killed by {name}{what}{hint}; nothing was written"


#: whether the command has written its files (:func:`commit`)
_committed = False


def commit(done: bool = True) -> None:
    """Say that the command's files are written (``done``), or that a new command starts: a
    Ctrl-C after it no longer stops the child (it exited 130, "nothing written", with every file
    in place), and :func:`graphprune.cli.main` answers one that lands there with success."""
    global _committed
    _committed = done


def committed() -> bool:
    return _committed


def _interrupt_once(signum: int, frame: object) -> None:
    """The child's SIGINT: a KeyboardInterrupt the first time; a second one (Ctrl-C reaches the
    child from the terminal and again from the parent) does not break the clean-up; none once
    the files are written (:func:`commit`)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if not _committed:
        raise KeyboardInterrupt


def _die_with(parent: int) -> None:
    """Linux: the child is killed with its parent (a SIGKILL to the command, which cannot be
    passed on, would leave it running to the end and writing its output)."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # (it ended before the call)
        os._exit(128 + signal.SIGKILL)


def _sweep() -> None:
    """Remove the temporary folders of graphprune processes that have ended (the child that
    crashed or was killed: :func:`graphprune.io.scratch.sweep`)."""
    import tempfile

    from graphprune.io import scratch

    scratch.sweep(tempfile.gettempdir())


def _last_line(last: str, data: bytes) -> tuple[str, bytes]:
    """The last complete line in ``data`` (else ``last``), and what follows it."""
    lines = data.split(b"\n")
    pending = lines.pop()
    complete = [line for line in lines if line]
    return (complete[-1].decode("utf-8", "replace") if complete else last), pending


def crashes_alone(probe: Callable[[], object]) -> int | None:
    """The crash signal ``probe()`` dies of in a forked child of its own (an exception is no
    crash); ``None`` where it ends otherwise."""
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        pid = os.fork()
    except OSError:
        return None
    if pid == 0:
        try:
            probe()
        except BaseException:  # noqa: BLE001, S110 - an error is an answer too: no crash
            pass
        os._exit(0)
    status = os.waitpid(pid, 0)[1]
    return os.WTERMSIG(status) if os.WIFSIGNALED(status) and os.WTERMSIG(status) in CRASHES else None


def guarded(work: Callable[[], int], report: Callable[[str, int], int],
            blame: Callable[[], str | None] | None = None) -> int:
    """``work()`` in a forked child (see the module docstring); its exit code, or where it
    crashed, what ``report(message, exit_code)`` returns (it prints the line). ``blame``: after a
    crash whose line names no model, the message that puts it on the input (exit 2), or ``None``
    (the model given crashes ONNX Runtime alone: an fp16 converter's LSTMs crashed it "in the
    verify stage", exit 1)."""
    global _channel
    if os.name != "posix" or os.environ.get("GRAPHPRUNE_GUARD") == "0" or not hasattr(os, "fork"):
        return work()
    if hasattr(signal, "SIGCHLD"):  # (inherited as ignored, the child would be reaped unseen: no status)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    read, write, parent = *os.pipe(), os.getpid()
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        pid = os.fork()
    except OSError:  # (no process to spare: the work in this one)
        os.close(read)
        os.close(write)
        return work()
    if pid == 0:  # the child: the command itself, then a normal exit (its clean-up runs)
        os.close(read)
        _channel = write
        _die_with(parent)
        if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            signal.signal(signal.SIGINT, _interrupt_once)
        return work()
    os.close(write)
    # (a signal the command was started ignoring stays ignored: a background job of a script)
    previous = {s: signal.getsignal(s) for s in FORWARDED if signal.getsignal(s) is not signal.SIG_IGN}
    sent: set[int] = set()

    def forward(signum: int, _frame: object) -> None:
        sent.add(signum)
        try:
            os.kill(pid, signum)
        except OSError:  # (it has ended)
            pass

    for s in previous:
        signal.signal(s, forward)
    last, pending, status, open_ = "", b"", None, True
    try:  # (a process the child forks may hold the pipe open past the child's end: wait on both)
        while status is None:
            if open_ and select.select([read], [], [], 0.5)[0]:
                chunk = os.read(read, 65536)
                open_ = bool(chunk)
                last, pending = _last_line(last, pending + chunk)
            elif not open_:
                status = os.waitpid(pid, 0)[1]
                break
            done, code = os.waitpid(pid, os.WNOHANG)
            status = code if done else None
        while open_ and select.select([read], [], [], 0)[0]:  # what the child said last
            chunk = os.read(read, 65536)
            open_ = bool(chunk)
            last, pending = _last_line(last, pending + chunk)
    finally:
        os.close(read)
        for s, handler in previous.items():
            signal.signal(s, handler)
    if os.WIFEXITED(status):
        return os.WEXITSTATUS(status)
    signum = os.WTERMSIG(status)
    _sweep()  # (what the child had in the temporary directory: it could not remove it)
    if signum in CRASHES:
        message, code = crash_line(signum, last)
        found = blame() if blame is not None and code == 1 else None
        return report(*((found, 2) if found else (message, code)))
    if signum in sent or signum == getattr(signal, "SIGPIPE", None):  # (what the command was asked to do)
        return 128 + signum
    return report(killed_line(signum, last), 128 + signum)
