"""Checkpoint rotation in a run folder (``checkpoint-last.pth`` plus kept epochs), and writes
that say why they failed."""
from __future__ import annotations

import os
import re
import shutil
from typing import Optional

from tec_fast.checkpoint import save_atomic

CHECKPOINT_FORMAT = "tec_fast.train/1"
LAST_CHECKPOINT = "checkpoint-last.pth"


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (disk full, file-size limit, I/O error); the previous
    file of that name, if any, is untouched."""


def write_checkpoint(obj, path: str) -> None:
    """``save_atomic``, with a failed write reported as what it is. torch's writer reports a
    short write as "unexpected pos N vs M", which hides a full disk."""
    try:
        save_atomic(obj, path)
    except RuntimeError as exc:
        folder = os.path.dirname(os.path.abspath(path))
        try:
            free = f"{shutil.disk_usage(folder).free / 2 ** 20:.0f} MiB free there"
        except OSError:
            free = "free space unknown"
        raise CheckpointWriteError(f"could not write {path} (the disk may be full or a file-size "
                                   f"limit reached; {free}): {str(exc).strip()}") from exc


# ------------------------------------------------------------------------------ checkpoints
class CheckpointManager:
    """``checkpoint-EEEE.pth`` after epochs (keeping the last ``keep_last`` and every
    ``keep_every``-th), ``checkpoint-last.pth`` always the newest state (a hard link to the
    epoch file when possible, written atomically)."""

    _EPOCH_FILE = re.compile(r"^checkpoint-(\d+)\.pth$")

    def __init__(self, folder: str, keep_last: int = 2, keep_every: int = 0):
        self.folder, self.keep_last, self.keep_every = folder, max(1, keep_last), keep_every

    @property
    def last(self) -> str:
        return os.path.join(self.folder, LAST_CHECKPOINT)

    def save(self, state: dict, epoch_done: Optional[int] = None) -> str:
        os.makedirs(self.folder, exist_ok=True)
        if epoch_done is None:
            write_checkpoint(state, self.last)
            return self.last
        path = os.path.join(self.folder, f"checkpoint-{epoch_done:04d}.pth")
        write_checkpoint(state, path)
        tmp = os.path.join(self.folder, f".link-{os.getpid()}.pth")
        try:
            if os.path.exists(tmp):
                os.unlink(tmp)
            os.link(path, tmp)
            os.replace(tmp, self.last)
        except OSError:  # no hard links here (some network file systems): write it again
            write_checkpoint(state, self.last)
        self._prune()
        return path

    def _prune(self) -> None:
        epochs = sorted(int(m.group(1)) for f in os.listdir(self.folder)
                        for m in [self._EPOCH_FILE.match(f)] if m)
        recent = set(epochs[-self.keep_last:])
        for e in epochs:
            if e not in recent and not (self.keep_every and e % self.keep_every == 0):
                os.unlink(os.path.join(self.folder, f"checkpoint-{e:04d}.pth"))
