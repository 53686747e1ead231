"""Optimizer and learning-rate schedule of the TEC / MAE recipe: AdamW, linear warmup, half cosine."""
from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass
from typing import List, Tuple

import torch
import torch.nn as nn


def param_groups(model: nn.Module, weight_decay: float) -> List[dict]:
    """Two AdamW groups: decayed (matrices, conv kernels, tokens) and not decayed (biases, norm
    weights and every other 1-D parameter), as the MAE / TEC recipe. Like the reference, the CLS and mask
    tokens ([1, 1, C]) are decayed."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, lr: float, weight_decay: float, betas: Tuple[float, float],
                    kind: str = "torch"):
    """(optimizer, description): AdamW with ``param_groups``' decay split (the recipe's values come
    from ``FitConfig``, their one home). ``kind='apex'`` uses apex's FusedAdam (AdamW mode) when it
    imports and CUDA is there, else falls back with a warning; ``'torch'`` uses torch.optim.AdamW
    with ``fused=True`` where this torch supports it for the parameters' device, else foreach."""
    if kind not in ("torch", "apex"):
        raise ValueError(f"optimizer must be 'torch' or 'apex', got {kind!r}")
    groups = param_groups(model, weight_decay)
    params = [p for g in groups for p in g["params"]]
    device = params[0].device if params else torch.device("cpu")
    if kind == "apex":
        try:
            from apex.optimizers import FusedAdam
        except Exception as exc:  # not installed or built without its CUDA extension
            warnings.warn(f"--optimizer apex asked for but apex FusedAdam does not import ({exc}); "
                          f"using torch.optim.AdamW", RuntimeWarning)
        else:
            if device.type == "cuda":
                opt = FusedAdam(groups, lr=lr, betas=betas, weight_decay=weight_decay, adam_w_mode=True)
                return opt, "apex.optimizers.FusedAdam (adam_w_mode)"
            warnings.warn("apex FusedAdam needs CUDA parameters; using torch.optim.AdamW", RuntimeWarning)
    try:
        opt = torch.optim.AdamW(groups, lr=lr, betas=betas, weight_decay=weight_decay, fused=True)
        return opt, "torch.optim.AdamW (fused)"
    except (RuntimeError, ValueError, TypeError):  # fused unsupported for this device / dtype
        opt = torch.optim.AdamW(groups, lr=lr, betas=betas, weight_decay=weight_decay, foreach=True)
        return opt, "torch.optim.AdamW (foreach)"


def lr_at(step: int, total_steps: int, warmup_steps: int, peak_lr: float, min_lr: float = 0.0) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warmup over ``warmup_steps``
    (step s uses peak * (s+1)/warmup, so no step is spent at lr 0), then a half cosine from
    ``peak_lr`` to ``min_lr`` at ``total_steps``."""
    if step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_lr + (peak_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every group's learning rate (times the group's ``lr_scale`` where it has one: layer-wise
    decay); a tensor lr (a CUDA-graph run's) is overwritten in place, so the recorded optimizer step
    reads the new value."""
    for group in optimizer.param_groups:
        value = lr * group.get("lr_scale", 1.0)
        if torch.is_tensor(group["lr"]):
            group["lr"].fill_(value)
        else:
            group["lr"] = value


@dataclass
class Schedule:
    """The run's length and learning rate, fixed before the first step."""
    total_steps: int
    warmup_steps: int
    peak_lr: float
    min_lr: float
    global_batch: int       # images per optimizer step, all processes
    steps_per_epoch: int

    def lr(self, step: int) -> float:
        return lr_at(step, self.total_steps, self.warmup_steps, self.peak_lr, self.min_lr)

    def to_dict(self) -> dict:
        return asdict(self)


def plan_schedule(cfg, images_per_step: float, steps_per_epoch: int) -> Schedule:
    """``cfg``: a ``FitConfig``. The peak lr follows the linear scaling rule (blr x global batch
    / 256) unless ``cfg.lr`` is given. A warmup as long as the whole schedule would never reach
    the peak, so it is cut to the first 10% with a warning."""
    global_batch = max(1, int(round(images_per_step)))
    total = cfg.max_steps if cfg.max_steps is not None else cfg.epochs * steps_per_epoch
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else int(round(cfg.warmup_epochs * steps_per_epoch))
    if warmup >= total:
        warnings.warn(f"warmup ({warmup} steps) is not shorter than the schedule ({total} steps); "
                      f"warming up over the first 10% instead", RuntimeWarning)
        warmup = total // 10
    peak = cfg.lr if cfg.lr is not None else cfg.blr * global_batch / 256
    if cfg.min_lr > peak:
        how = "lr (--lr)" if cfg.lr is not None else f"blr (--blr) {cfg.blr:g} x global batch {global_batch} / 256"
        raise ValueError(f"min_lr (--min-lr) {cfg.min_lr:g} is above the peak learning rate {peak:g}, {how}")
    return Schedule(total, warmup, peak, cfg.min_lr, global_batch, steps_per_epoch)
