"""MAE's random masking (SPEC.md §2), reproducible from a given noise tensor."""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch


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
