"""One run per output folder.

A run takes an exclusive ``flock`` on ``DIR/.tec_fast.lock`` for its lifetime. The kernel
releases it when the process ends, however it ends (SIGKILL, OOM, a lost node), so a dead
run never leaves a folder locked (forked children, the loader workers, close their copy of the
descriptor, so an orphaned worker does not hold it); a second live run on the folder is refused with the
holder's pid instead of writing ``checkpoint-last.pth`` and ``metrics.jsonl`` in turn with it.

Only rank 0 takes the lock (the other ranks write nothing there). When torchrun restarts a
worker group (``TORCHELASTIC_RESTART_COUNT`` > 0), the previous rank 0 may still be exiting:
the lock is then waited for, briefly, instead of refused at once.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
import time
import warnings
from typing import Iterator, Optional, Union

LOCK_FILE = ".tec_fast.lock"
RESTART_WAIT_S = 60.0


_HELD_FDS = set()  # lock descriptors this process holds: closed in every forked child


def _close_held_in_child() -> None:
    # A forked child (a loader worker) shares the lock's open file description, and a flock
    # lasts until every descriptor of it is closed: after a SIGKILL of the run its orphaned
    # workers kept the folder locked for seconds. Closing the child's copy leaves the parent's.
    for fd in _HELD_FDS:
        try:
            os.close(fd)
        except OSError:
            pass
    _HELD_FDS.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_held_in_child)


class OutputFolderInUse(ValueError):
    """Another live process holds the output folder's lock."""


def _holder(fd: int) -> str:
    try:
        text = os.pread(fd, 256, 0).decode("utf-8", "replace").split()
    except OSError:
        text = []
    info = dict(part.split("=", 1) for part in text if "=" in part)
    pid, host = info.get("pid"), info.get("host")
    if not pid:
        return "another process"
    return f"pid {pid}" + (f" on {host}" if host and host != socket.gethostname() else "")


def _try_lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return False
        raise


@contextlib.contextmanager
def hold_output_lock(folder: Union[str, os.PathLike], wait_s: Optional[float] = None,
                     flag: str = "--output") -> Iterator[str]:
    """Hold ``folder``'s run lock inside the ``with`` block (the folder is created).

    Raises ``OutputFolderInUse`` (a ``ValueError``, so commands print one ``error:`` line) naming
    the folder and the holder's pid if another live process holds it after ``wait_s`` seconds
    (default: 0, or ``RESTART_WAIT_S`` inside a restarted torchrun worker group). A file system
    without locks (some network mounts) gets a warning and no lock."""
    folder = os.fspath(folder)
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, LOCK_FILE)
    if wait_s is None:
        wait_s = RESTART_WAIT_S if int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0) > 0 else 0.0
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
    try:
        deadline = time.monotonic() + wait_s
        try:
            while not _try_lock(fd):
                if time.monotonic() >= deadline:
                    raise OutputFolderInUse(
                        f"{flag} {folder} is in use by another run ({_holder(fd)}, lock {path}); wait for it "
                        f"to finish or stop it, or choose another {flag}")
                time.sleep(0.2)
        except OutputFolderInUse:
            raise
        except OSError as exc:
            warnings.warn(f"cannot lock {path} ({exc}); two runs on {folder} would not be stopped", stacklevel=3)
            yield path
            return
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid={os.getpid()} host={socket.gethostname()}\n".encode(), 0)
        _HELD_FDS.add(fd)
        try:
            yield path
        finally:
            _HELD_FDS.discard(fd)
            os.ftruncate(fd, 0)  # the kernel drops the lock itself at close or at death
    finally:
        os.close(fd)
