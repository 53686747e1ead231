"""A stored position embedding on another patch grid: what lets a base saved at 224 run at 192,
256 or 384, DINOv2's 37x37 table run at 224, and a base give targets for native-resolution images
on any (h, w) grid.

The engine's one convention, for every stored table (learned, or MAE's fixed sin-cos) and every
mode (a dense base loaded at another image size, the native-resolution base per image grid): the
numbers of timm's ``resample_abs_pos_embed``, the loader timm, DINOv2-in-timm and most
fine-tuning code use. Prefix rows (CLS, registers) are kept as stored; the grid rows are resized
as a [C, h, w] image by bicubic interpolation (align_corners=False) with antialias, in fp32, then
cast back to the stored dtype. Antialias only matters when a side of the grid shrinks.
``antialias=False`` gives DINO's ``interpolate_pos_encoding`` convention instead (resized to the
exact size, without DINO's +0.1 offset); nothing in the engine uses it.
"""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F

Grid = Tuple[int, int]


def resample_pos_embed(pos: torch.Tensor, new_grid: Grid, old_grid: Grid, num_prefix: int = 1,
                       antialias: bool = True) -> torch.Tensor:
    """[1, num_prefix + oh*ow, C] -> [1, num_prefix + nh*nw, C] (``pos`` itself when the grids match)."""
    if pos.dim() != 3 or pos.shape[0] != 1:
        raise ValueError(f"pos_embed must have shape [1, N, C], got {tuple(pos.shape)}")
    (oh, ow), (nh, nw) = old_grid, new_grid
    if min(oh, ow, nh, nw) <= 0:
        raise ValueError(f"grids must be positive, got old {old_grid}, new {new_grid}")
    if pos.shape[1] != num_prefix + oh * ow:
        raise ValueError(f"pos_embed has {pos.shape[1]} rows but {num_prefix} prefix rows + a {oh}x{ow} "
                         f"grid need {num_prefix + oh * ow}")
    if (oh, ow) == (nh, nw):
        return pos
    prefix, grid = pos[:, :num_prefix], pos[:, num_prefix:]
    C = pos.shape[-1]
    image = grid.float().reshape(1, oh, ow, C).permute(0, 3, 1, 2)  # [1, C, oh, ow]
    image = F.interpolate(image, size=(nh, nw), mode="bicubic", align_corners=False, antialias=antialias)
    grid = image.permute(0, 2, 3, 1).reshape(1, nh * nw, C).to(pos.dtype)
    return torch.cat([prefix, grid], dim=1)
