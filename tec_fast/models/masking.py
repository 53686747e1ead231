"""MAE's random masking (docs/tec.md §2), reproducible from a given noise tensor."""
from __future__ import annotations

import math
import numbers
from typing import List, NamedTuple, Optional, Sequence

import numpy as np
import torch

__all__ = ["Masking", "num_visible", "check_mask_ratio", "random_masking", "visible_counts", "keep_lowest_noise",
           "variable_masking", "ragged_keep", "block_masking"]


class Masking(NamedTuple):
    ids_keep: torch.Tensor     # [B, K] patch indices of the visible tokens, in keep order
    ids_restore: torch.Tensor  # [B, L] position of each patch in the shuffled order
    mask: torch.Tensor         # [B, L] 1.0 = removed, 0.0 = kept, original patch order


def num_visible(num_patches: int, mask_ratio: float) -> int:
    return int(num_patches * (1 - mask_ratio))


_RATIO_FORMS = "a number in [0, 1), or one per image (a [B] tensor or a list / tuple of numbers)"


def _real_dtype(dtype) -> bool:
    """A torch or NumPy dtype of real numbers (not bool, not complex)."""
    if isinstance(dtype, torch.dtype):
        return dtype != torch.bool and not dtype.is_complex
    return getattr(dtype, "kind", None) in ("f", "i", "u")


def _scalar_ratio(r) -> bool:
    """One ratio: a real number (not a bool), or a one-value tensor / NumPy array of a real dtype.
    Looks at types and shapes only (no value is read: no GPU sync)."""
    if isinstance(r, numbers.Real):
        return not isinstance(r, (bool, np.bool_))
    if isinstance(r, (torch.Tensor, np.ndarray)):
        return _real_dtype(r.dtype) and math.prod(r.shape) == 1
    return False


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def check_mask_ratio(mask_ratio, per_image: bool = True) -> None:
    """A ValueError naming ``mask_ratio`` unless it has a form the masking takes: a real number
    (a Python or NumPy number, a 0-dim tensor), or, with ``per_image``, one per image (a tensor or
    NumPy array of a real dtype, a list / tuple of numbers). Types only: the values' range is
    checked where they are used, and nothing is read from a device."""
    if _scalar_ratio(mask_ratio) and (per_image or getattr(mask_ratio, "ndim", 0) == 0):
        return
    if per_image:
        if isinstance(mask_ratio, (torch.Tensor, np.ndarray)):
            if _real_dtype(mask_ratio.dtype):
                return
            raise ValueError(f"mask_ratio must be {_RATIO_FORMS}, got a tensor of dtype {mask_ratio.dtype}")
        if isinstance(mask_ratio, (list, tuple)):
            for b, r in enumerate(mask_ratio):
                if not _scalar_ratio(r):
                    raise ValueError(f"mask_ratio must be {_RATIO_FORMS}; mask_ratio[{b}] is "
                                     f"{type(r).__name__} {_short(r)}")
            return
    what = _RATIO_FORMS if per_image else "a number in [0, 1)"
    raise ValueError(f"mask_ratio must be {what}, got {type(mask_ratio).__name__} {_short(mask_ratio)}")


def random_masking(batch: int, num_patches: int, mask_ratio: float,
                   noise: Optional[torch.Tensor] = None, device=None,
                   generator: Optional[torch.Generator] = None) -> Masking:
    """ids_shuffle = argsort(noise); keep the first K = int(L * (1 - mask_ratio)) of it."""
    check_mask_ratio(mask_ratio, per_image=False)
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
        _check_noise_values(noise, "noise")
        if device is not None and noise.device != torch.device(device):
            noise = noise.to(device)
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    mask = torch.ones(batch, num_patches, device=noise.device)
    mask[:, :K] = 0
    mask = torch.gather(mask, 1, ids_restore)
    return Masking(ids_shuffle[:, :K], ids_restore, mask)


def visible_counts(lengths: Sequence[int], mask_ratio) -> List[int]:
    """K_b = int(L_b * (1 - r_b)) visible patches per image; ``mask_ratio`` one float for all
    images or one per image, each in [0, 1). A ratio of 0 keeps every patch of its image (that
    image then has nothing to predict: see ``TokenLayout``); a ratio that leaves no visible patch
    is refused."""
    check_mask_ratio(mask_ratio)
    if isinstance(mask_ratio, (int, float)) and not isinstance(mask_ratio, bool):
        ratios = [float(mask_ratio)] * len(lengths)
    else:
        ratios = [float(r) for r in torch.as_tensor(mask_ratio, dtype=torch.float64).reshape(-1)]
    if len(ratios) != len(lengths):
        raise ValueError(f"mask_ratio must be a float or hold one ratio per image (B={len(lengths)}), "
                         f"got {len(ratios)}")
    counts = []
    for b, (r, L) in enumerate(zip(ratios, lengths)):
        if not 0.0 <= r < 1.0:
            raise ValueError(f"mask_ratio values must be in [0, 1), got {r!r} for image {b}")
        K = num_visible(L, r)
        if K < 1:
            raise ValueError(f"a mask ratio of {r} leaves image {b} ({L} patches) no visible patch")
        counts.append(K)
    return counts


def _check_noise_values(noise: torch.Tensor, name: str) -> None:
    """Masking noise: floating point, and (on the CPU, where reading it costs no GPU sync) finite:
    a NaN has no place in the sort that picks the kept patches."""
    if not noise.is_floating_point():
        raise ValueError(f"{name} must be floating point (values in [0, 1)), got dtype {noise.dtype}")
    if noise.device.type == "cpu" and not bool(torch.isfinite(noise).all()):
        raise ValueError(f"{name} holds NaN or infinite values (it must lie in [0, 1))")


def keep_lowest_noise(noise: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """keep [B, L] bool: in row b the counts[b] entries of lowest noise (the patches
    ``random_masking`` keeps). Pad the rows of short images with +inf noise."""
    rank = torch.argsort(torch.argsort(noise, dim=1), dim=1)  # position of each patch in noise order
    return rank < counts.to(rank.device)[:, None]


def variable_masking(batch: int, num_patches: int, mask_ratios: torch.Tensor,
                     noise: Optional[torch.Tensor] = None, device=None,
                     generator: Optional[torch.Generator] = None):
    """Per-image mask ratios: image b keeps the K_b = int(L * (1 - r_b)) patches of lowest noise
    (the same patches ``random_masking`` keeps for a uniform ratio). Returns (keep [B, L] bool,
    mask [B, L] float, 1 = removed)."""
    counts = visible_counts([num_patches] * batch, mask_ratios)
    if noise is None:
        noise = torch.rand(batch, num_patches, device=device, generator=generator)
    elif not isinstance(noise, torch.Tensor) or tuple(noise.shape) != (batch, num_patches):
        raise ValueError(f"noise must be a tensor of shape [B, L] = {(batch, num_patches)}, got "
                         f"{tuple(getattr(noise, 'shape', ())) or type(noise).__name__}")
    else:
        _check_noise_values(noise, "noise")
    keep = keep_lowest_noise(noise, torch.tensor(counts))
    return keep, (~keep).float()


def ragged_keep(lengths: Sequence[int], counts: Sequence[int],
                noise: Optional[Sequence[torch.Tensor]] = None, device=None,
                generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Images of different lengths, patches packed image by image: keep [sum L_b] bool, image b
    keeping its counts[b] patches of lowest ``noise[b]`` [L_b] (fresh uniform noise from
    ``generator`` when None) - ``variable_masking`` per image, all images in one sort."""
    B, Lm = len(lengths), max(lengths)
    if noise is None:
        where = generator.device if generator is not None else device
        flat = torch.rand(sum(lengths), generator=generator, device=where).to(device)
    else:
        if len(noise) != B:
            raise ValueError(f"noise must be a list of {B} tensors [L_b], got {len(noise)}")
        for b, (n, L) in enumerate(zip(noise, lengths)):
            if not isinstance(n, torch.Tensor) or tuple(n.shape) != (L,):
                raise ValueError(f"noise[{b}] must be a tensor [L_b] = [{L}], got "
                                 f"{tuple(getattr(n, 'shape', ())) or type(n).__name__}")
            _check_noise_values(n, f"noise[{b}]")
        flat = torch.cat([n.to(device) for n in noise])
    lens = torch.tensor(list(lengths), device=flat.device)
    valid = torch.arange(Lm, device=flat.device)[None, :] < lens[:, None]  # [B, Lm]
    padded = torch.full((B, Lm), float("inf"), dtype=flat.dtype, device=flat.device)  # ranks last
    padded[valid] = flat
    return keep_lowest_noise(padded, torch.tensor(list(counts)))[valid]


def block_masking(batch: int, grid: int, mask_ratio: float, min_block: int = 4,
                  aspect: float = 0.3, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """BEiT / iBOT-style block-wise masks: rectangles of at least ``min_block`` patches with aspect
    ratio log-uniform in [aspect, 1/aspect] are masked until about ``mask_ratio`` of the grid is
    covered (never more). Returns keep [B, grid*grid] bool (True = visible), at least one
    patch visible per image."""
    import random

    check_mask_ratio(mask_ratio, per_image=False)
    L = grid * grid
    target = int(round(L * float(mask_ratio)))
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
