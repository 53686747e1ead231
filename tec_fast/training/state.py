"""Where a run is (``Position``), RNG state capture / restore, and finding the checkpoint to
resume from."""
from __future__ import annotations

import os
import random
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from tec_fast.training.checkpoints import LAST_CHECKPOINT


@dataclass
class Position:
    """Optimizer steps done, the epoch they are in, and how far into it."""
    step: int = 0
    epoch: int = 0
    step_in_epoch: int = 0

    def advance(self, steps_per_epoch: int) -> bool:
        """Count one optimizer step; True when it completed an epoch."""
        self.step, self.step_in_epoch = self.step + 1, self.step_in_epoch + 1
        if self.step_in_epoch == steps_per_epoch:
            self.epoch, self.step_in_epoch = self.epoch + 1, 0
            return True
        return False


# -------------------------------------------------------------------------------------- RNG
def rng_state() -> dict:
    """torch / CUDA / numpy / python RNG states as plain data (loadable with weights_only=True)."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": [version, list(internal), gauss],
             "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (1 << 32))
    torch.manual_seed(seed)


def resolve_resume(resume: Optional[str], output_dir: Optional[str]) -> Optional[str]:
    """A checkpoint path from ``--resume`` (``auto``: the output folder's last one, if any;
    ``nothing_to_resume`` says what happens when there is none)."""
    if resume is None:
        return None
    if resume == "auto":
        if output_dir and os.path.isfile(os.path.join(output_dir, LAST_CHECKPOINT)):
            return os.path.join(output_dir, LAST_CHECKPOINT)
        return None
    if os.path.isdir(resume):
        resume = os.path.join(resume, LAST_CHECKPOINT)
    if not os.path.isfile(resume):
        raise ValueError(f"--resume {resume!r}: no such checkpoint")
    return resume


def nothing_to_resume(output_dir: Optional[str]) -> str:
    """The notice for ``--resume`` (auto) when the output folder has no checkpoint yet."""
    where = f"{os.path.join(output_dir, LAST_CHECKPOINT)} does not exist" if output_dir else \
        "there is no output folder"
    return f"--resume: nothing to resume ({where}); starting from step 0"
