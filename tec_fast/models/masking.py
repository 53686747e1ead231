"""MAE's random masking (SPEC.md §2), reproducible from a given noise tensor."""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

__all__ = ["Masking", "num_visible", "random_masking", "variable_masking", "block_masking"]


class Masking(NamedTuple):
    ids_keep: torch.Tensor     # [B, K] patch indices of the visible tokens, in keep order
    ids_restore: torch.Tensor  # [B, L] position of each patch in the shuffled order
    mask: torch.Tensor         # [B, L] 1.0 = removed, 0.0 = kept, original patch order


def num_visible(num_patches: int, mask_ratio: float) -> int:
    return int(num_patches * (1 - mask_ratio))


def random_masking(batch: int, num_patches: int, mask_ratio: float,
                   noise: Optional[torch.Tensor] = None, device=None,
                   generator: Optional[torch.Generator] = None) -> Masking:
    """ids_shuffle = argsort(noise); keep the first K = int(L * (1 - mask_ratio)) of it."""
    if not 0.0 <= float(mask_ratio) < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio!r}")
    K = num_visible(num_patches, mask_ratio)
    if K < 1:
        raise ValueError(f"mask_ratio={mask_ratio} leaves no visible patch out of L={num_patches}")
    if noise is None:
        noise = torch.rand(batch, num_patches, device=device, generator=generator)
    else:
        if not isinstance(noise, torch.Tensor) or tuple(noise.shape) != (batch, num_patches):
            raise ValueError(f"noise must be a tensor of shape [B, L] = {(batch, num_patches)}, got "
                             f"{tuple(getattr(noise, 'shape', ())) or type(noise).__name__}")
        if device is not None and noise.device != torch.device(device):
            noise = noise.to(device)
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    mask = torch.ones(batch, num_patches, device=noise.device)
    mask[:, :K] = 0
    mask = torch.gather(mask, 1, ids_restore)
    return Masking(ids_shuffle[:, :K], ids_restore, mask)


def variable_masking(batch: int, num_patches: int, mask_ratios: torch.Tensor,
                     noise: Optional[torch.Tensor] = None, device=None,
                     generator: Optional[torch.Generator] = None):
    """Per-image mask ratios: image b keeps the K_b = int(L * (1 - r_b)) patches of lowest noise
    (the same patches ``random_masking`` keeps for a uniform ratio). Returns (keep [B, L] bool,
    mask [B, L] float, 1 = removed)."""
    ratios = torch.as_tensor(mask_ratios, dtype=torch.float64).reshape(-1)
    if ratios.numel() != batch:
        raise ValueError(f"mask_ratio must hold one ratio per image (B={batch}), got {ratios.numel()}")
    if not bool(((ratios >= 0) & (ratios < 1)).all()):
        raise ValueError(f"mask_ratio values must be in [0, 1), got {ratios.tolist()}")
    K = torch.tensor([num_visible(num_patches, float(r)) for r in ratios])
    if int(K.min()) < 1:
        raise ValueError(f"a mask ratio of {float(ratios.max())} leaves no visible patch out of L={num_patches}")
    if noise is None:
        noise = torch.rand(batch, num_patches, device=device, generator=generator)
    elif not isinstance(noise, torch.Tensor) or tuple(noise.shape) != (batch, num_patches):
        raise ValueError(f"noise must be a tensor of shape [B, L] = {(batch, num_patches)}, got "
                         f"{tuple(getattr(noise, 'shape', ())) or type(noise).__name__}")
    rank = torch.argsort(torch.argsort(noise, dim=1), dim=1)  # position of each patch in noise order
    keep = rank < K.to(rank.device)[:, None]
    return keep, (~keep).float()


def block_masking(batch: int, grid: int, mask_ratio: float, min_block: int = 4,
                  aspect: float = 0.3, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """BEiT / iBOT-style block-wise masks: rectangles of at least ``min_block`` patches with aspect
    ratio log-uniform in [aspect, 1/aspect] are masked until about ``mask_ratio`` of the grid is
    covered (never more). Returns keep [B, grid*grid] bool (True = visible), at least one
    patch visible per image."""
    import math
    import random

    L = grid * grid
    target = int(round(L * mask_ratio))
    if not 0 < target < L:
        raise ValueError(f"mask_ratio={mask_ratio} masks {target} of L={L} patches; need 0 < that < L")
    seed = int(torch.randint(0, 2 ** 31 - 1, (1,), generator=generator))
    rng = random.Random(seed)
    keep = torch.ones(batch, grid, grid, dtype=torch.bool)
    for b in range(batch):
        masked = 0
        for _ in range(10 * L):  # attempts; a block that adds nothing is retried
            if masked >= target:
                break
            area = rng.uniform(min_block, max(min_block, target - masked))
            ar = math.exp(rng.uniform(math.log(aspect), -math.log(aspect)))
            h = min(grid, max(1, int(round(math.sqrt(area * ar)))))
            w = min(grid, max(1, int(round(math.sqrt(area / ar)))))
            top, left = rng.randint(0, grid - h), rng.randint(0, grid - w)
            region = keep[b, top:top + h, left:left + w]
            new = int(region.sum())
            if 0 < new <= target - masked:
                region.fill_(False)
                masked += new
    return keep.reshape(batch, L)
