"""How a run stops early: a non-finite loss, a signal (SIGTERM / SIGINT)."""
from __future__ import annotations

import signal
import threading
from typing import Dict, Optional


# ----------------------------------------------------------------------------------- errors
class NonFiniteLoss(RuntimeError):
    """The loss became NaN or inf; raised before the optimizer step, nothing is saved."""

    def __init__(self, step: int, metrics: Dict[str, float]):
        super().__init__(f"non-finite loss at optimizer step {step} ({metrics}); stopped without "
                         f"saving a checkpoint (the last good one is still on disk)")
        self.step, self.metrics = step, metrics


class TrainingInterrupted(RuntimeError):
    """SIGTERM / SIGINT arrived; a checkpoint was saved (when there is an output folder)."""

    def __init__(self, signum: int, step: int, checkpoint: Optional[str]):
        name = signal.Signals(signum).name
        where = f"saved {checkpoint}; continue with --resume" if checkpoint else "no output folder, nothing saved"
        super().__init__(f"{name} received: stopped after optimizer step {step}; {where}")
        self.signum, self.step, self.checkpoint = signum, step, checkpoint


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
