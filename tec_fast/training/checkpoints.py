"""Checkpoint rotation in a run folder: ``checkpoint-last.pth`` plus kept epochs."""
from __future__ import annotations

import os
import re
from typing import List, Optional

from tec_fast.checkpoint import save_atomic

CHECKPOINT_FORMAT = "tec_fast.train/1"
LAST_CHECKPOINT = "checkpoint-last.pth"


# ------------------------------------------------------------------------------ checkpoints
def checkpoint_files(folder: str) -> List[str]:
    """The checkpoints a run wrote in ``folder`` (``checkpoint-last.pth`` and the epoch files
    ``CheckpointManager`` keeps), sorted; [] for a folder without any."""
    if not os.path.isdir(folder):
        return []
    return sorted(os.path.join(folder, f) for f in os.listdir(folder)
                  if f == LAST_CHECKPOINT or CheckpointManager._EPOCH_FILE.match(f))


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
            save_atomic(state, self.last)
            return self.last
        path = os.path.join(self.folder, f"checkpoint-{epoch_done:04d}.pth")
        save_atomic(state, path)
        tmp = os.path.join(self.folder, f".link-{os.getpid()}.pth")
        try:
            if os.path.exists(tmp):
                os.unlink(tmp)
            os.link(path, tmp)
            os.replace(tmp, self.last)
        except OSError:  # no hard links here (some network file systems): write it again
            save_atomic(state, self.last)
        self._prune()
        return path

    def later_epochs(self, epoch: int) -> List[str]:
        """The epoch checkpoints in the folder past ``epoch`` (sorted file names)."""
        if not os.path.isdir(self.folder):
            return []
        return sorted(f for f in os.listdir(self.folder)
                      for m in [self._EPOCH_FILE.match(f)] if m and int(m.group(1)) > epoch)

    def _prune(self) -> None:
        epochs = sorted(int(m.group(1)) for f in os.listdir(self.folder)
                        for m in [self._EPOCH_FILE.match(f)] if m)
        recent = set(epochs[-self.keep_last:])
        for e in epochs:
            if e not in recent and not (self.keep_every and e % self.keep_every == 0):
                os.unlink(os.path.join(self.folder, f"checkpoint-{e:04d}.pth"))
