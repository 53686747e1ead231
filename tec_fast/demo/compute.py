"""Equal compute for the MAE-continued row: counted FLOPs, not wall-clock time, so the step counts
are the same on every machine. A TEC step and an MAE step (forward + backward, one batch) are
counted once with ``torch.utils.flop_counter``; the TEC stage is also charged the base model's
forward over the training set that computes its (cached) targets."""
from __future__ import annotations

from typing import Dict

import torch
from torch.utils.flop_counter import FlopCounterMode


def _count(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def step_flops(model, objective, batch, noise) -> int:
    """FLOPs of one training step's forward and backward (optimizer excluded: both stages run
    AdamW over models of nearly the same size)."""
    def step():
        objective(model, batch, noise)["loss"].backward()
    flops = _count(step)
    model.zero_grad(set_to_none=True)
    return flops


def forward_flops(base, images: torch.Tensor) -> int:
    with torch.no_grad():
        return _count(lambda: base(images))


def matched_mae_steps(tec_steps: int, tec_step: int, mae_step: int, base_forward_per_image: int,
                      n_images: int) -> Dict[str, int]:
    """MAE steps that spend what ``tec_steps`` TEC steps plus one base forward per training image
    spend (rounded to the nearest step)."""
    tec_total = tec_steps * tec_step + base_forward_per_image * n_images
    return {"mae_steps": max(1, round(tec_total / mae_step)), "tec_flops": tec_total,
            "tec_step_flops": tec_step, "mae_step_flops": mae_step,
            "target_flops": base_forward_per_image * n_images}
