"""Optimizer and learning-rate schedule of the TEC / MAE recipe (SPEC.md §4)."""
from __future__ import annotations

import math
import warnings
from typing import List, Tuple

import torch
import torch.nn as nn


def param_groups(model: nn.Module, weight_decay: float) -> List[dict]:
    """Two AdamW groups: decayed (matrices, conv kernels, tokens) and not decayed (biases, norm
    weights and every other 1-D parameter), as SPEC.md §4. Like the reference, the CLS and mask
    tokens ([1, 1, C]) are decayed."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, lr: float, weight_decay: float = 0.05,
                    betas: Tuple[float, float] = (0.9, 0.95), kind: str = "torch"):
    """(optimizer, description). ``kind='apex'`` uses apex's FusedAdam (AdamW mode) when it
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
    for group in optimizer.param_groups:
        group["lr"] = lr
