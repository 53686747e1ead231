"""How a run stops early: a non-finite loss or weights, a signal (SIGTERM / SIGINT)."""
from __future__ import annotations

import signal
import threading
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn


# ----------------------------------------------------------------------------------- errors
def _on_disk(checkpoint: Optional[Tuple[str, int]]) -> str:
    if checkpoint is None:
        return "no checkpoint has been written by this run"
    path, step = checkpoint
    return f"the newest checkpoint, {path} (step {step}), was checked and holds finite weights"


class NonFiniteTraining(RuntimeError):
    """Training produced NaN or inf; nothing non-finite was saved. ``checkpoint``: (path, step)
    of the newest checkpoint of this run (or the one it resumed from), or None."""

    def __init__(self, message: str, step: int, checkpoint: Optional[Tuple[str, int]]):
        super().__init__(f"{message}; stopped without saving: {_on_disk(checkpoint)}")
        self.step, self.checkpoint = step, checkpoint


class NonFiniteLoss(NonFiniteTraining):
    """The loss became NaN or inf; raised before the optimizer step."""

    def __init__(self, step: int, metrics: Dict[str, float],
                 checkpoint: Optional[Tuple[str, int]] = None):
        super().__init__(f"non-finite loss at optimizer step {step} ({metrics})", step, checkpoint)
        self.metrics = metrics


class NonFiniteWeights(NonFiniteTraining):
    """A parameter became NaN or inf (the loss may still be finite: e.g. a huge learning rate);
    found when about to save, so the file is not written."""

    def __init__(self, step: int, names: List[str], checkpoint: Optional[Tuple[str, int]] = None):
        shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        super().__init__(f"non-finite weights after optimizer step {step} ({shown})", step, checkpoint)
        self.names = names


def nonfinite_parameters(model: nn.Module) -> List[str]:
    """Names of the parameters of ``model`` holding a NaN or inf (this process's shard of a
    sharded parameter)."""
    bad = []
    for name, p in model.named_parameters():
        local = p.to_local() if hasattr(p, "to_local") else p
        if not bool(torch.isfinite(local.detach()).all()):
            bad.append(name)
    return bad


class TrainingInterrupted(RuntimeError):
    """SIGTERM / SIGINT arrived; a checkpoint was saved (when there is an output folder)."""

    def __init__(self, signum: int, step: int, checkpoint: Optional[str]):
        name = signal.Signals(signum).name
        where = f"saved {checkpoint}; continue with --resume" if checkpoint else "no output folder, nothing saved"
        super().__init__(f"{name} received: stopped after optimizer step {step}; {where}")
        self.signum, self.step, self.checkpoint = signum, step, checkpoint


def loader_worker_init(worker_id: int) -> None:
    """``worker_init_fn`` of the training loaders: a worker ignores SIGTERM (torch's workers
    already ignore SIGINT). A cluster's stop (Slurm's scancel, ``kill -- -PGID``) signals every
    process of the job: a worker dying of it made the main process fail with torch's "DataLoader
    worker is killed by signal" before it could save. The main process saves and then shuts the
    workers down itself; a worker whose parent dies goes too (torch's watchdog)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


class _SignalFlag:
    """SIGTERM/SIGINT set a flag the loop checks after each optimizer step (a step is never cut
    in half). A second SIGINT interrupts at once."""

    def __init__(self):
        self.signum: Optional[int] = None
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signum == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False
