"""The data side of native-resolution TEC: images resized to a patch budget (aspect ratio kept),
``NativeBatch`` (their patches packed, no padding, and the ``TokenLayout`` of their grids), and
batching into token budgets with ``packing.plan_bins``. Public through ``tec_fast.native``."""
from __future__ import annotations

import math
from typing import Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from tec_fast import packing
from tec_fast.models.layout import TokenLayout

__all__ = ["budget_grid", "resize_to_budget", "NativeBatch", "collate_native", "NativeCollate",
           "NativeBatchSampler"]


# --------------------------------------------------------------------------------------------
# Resizing to a patch budget
# --------------------------------------------------------------------------------------------
def budget_grid(height: int, width: int, patch: int, max_patches: int,
                upscale: bool = False) -> Tuple[int, int]:
    """The (rows, cols) patch grid an image of ``height`` x ``width`` pixels gets: aspect ratio
    kept as closely as whole patches allow, rows * cols <= max_patches, at least 1 x 1.
    Without ``upscale`` an image that already fits keeps its size (rounded to whole patches)."""
    for name, v in (("height", height), ("width", width), ("patch", patch), ("max_patches", max_patches)):
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise ValueError(f"budget_grid: {name} must be a positive int, got {v!r}")
    gh, gw = height / patch, width / patch  # real-valued native grid
    scale = math.sqrt(max_patches / (gh * gw))
    if not upscale:
        scale = min(scale, 1.0)
    h, w = max(1, round(gh * scale)), max(1, round(gw * scale))
    aspect = height / width
    while h * w > max_patches:  # rounding up overshot: take a patch off the side that is too long
        if (h / w > aspect and h > 1) or w == 1:
            h -= 1
        else:
            w -= 1
    return h, w


def resize_to_budget(img: torch.Tensor, patch: int, max_patches: int,
                     upscale: bool = False) -> torch.Tensor:
    """Bicubic resize of ``img`` [C, H, W] so its patch grid (h, w) = ``budget_grid(H, W, ...)``:
    sides multiples of ``patch``, h * w <= max_patches, aspect ratio kept. Antialiased when
    shrinking (as PIL's bicubic). An image already of that size is returned as is."""
    if not isinstance(img, torch.Tensor) or img.dim() != 3 or not img.is_floating_point():
        raise ValueError(f"resize_to_budget: img must be a float [C, H, W] tensor, got "
                         f"{getattr(img, 'dtype', type(img).__name__)} {tuple(getattr(img, 'shape', ()))}")
    h, w = budget_grid(int(img.shape[1]), int(img.shape[2]), patch, max_patches, upscale)
    size = (h * patch, w * patch)
    if tuple(img.shape[1:]) == size:
        return img
    shrink = size[0] < img.shape[1] or size[1] < img.shape[2]
    return F.interpolate(img[None], size=size, mode="bicubic", align_corners=False,
                         antialias=shrink)[0]

# --------------------------------------------------------------------------------------------
# The packed batch
# --------------------------------------------------------------------------------------------
class NativeBatch:
    """Images of different sizes as one packed sequence of patches (no padding).

    ``NativeBatch(images, patch)``: images [C, H_b, W_b], H_b and W_b multiples of ``patch``.
    ``patches`` [T_p, C*p*p] (each patch flattened in the conv weight's (c, y, x) order) and
    ``layout``, the ``TokenLayout`` of the images' grids with every token visible. Its indices
    are attributes here too: ``grids`` [(h_b, w_b)], ``lengths`` [L_b], ``image_id`` [T_p],
    ``positions`` [T_p, 2] (patch row, column), ``cu_tokens`` [B+1] int32 over the 1 + L_b
    tokens of each image, ``cls_index`` [B] / ``patch_index`` [T_p] (rows of the token layout),
    ``max_tokens`` (max 1 + L_b), ``max_length`` (max L_b), ``lengths_t`` ([B] tensor of L_b),
    ``ids`` (dataset indices, when the collator knows them).
    """

    def __init__(self, images: Sequence[torch.Tensor], patch: int,
                 ids: Optional[Sequence[int]] = None):
        if isinstance(images, torch.Tensor) and images.dim() == 4:
            images = list(images)
        if len(images) == 0:
            raise ValueError("NativeBatch: needs at least one image")
        if isinstance(patch, bool) or not isinstance(patch, int) or patch <= 0:
            raise ValueError(f"NativeBatch: patch must be a positive int, got {patch!r}")
        first = images[0]
        rows, grids = [], []
        for b, img in enumerate(images):
            if not isinstance(img, torch.Tensor) or img.dim() != 3 or not img.is_floating_point():
                raise ValueError(f"NativeBatch: images[{b}] must be a float [C, H, W] tensor, got "
                                 f"{getattr(img, 'dtype', type(img).__name__)} "
                                 f"{tuple(getattr(img, 'shape', ()))}")
            C, H, W = img.shape
            if C != first.shape[0] or img.device != first.device or img.dtype != first.dtype:
                raise ValueError(f"NativeBatch: images[{b}] is {img.dtype} {tuple(img.shape)} on "
                                 f"{img.device}, images[0] is {first.dtype} {tuple(first.shape)} on "
                                 f"{first.device}: channels, dtype and device must agree")
            if H % patch or W % patch:
                raise ValueError(f"NativeBatch: images[{b}] is {H}x{W}, not a multiple of patch "
                                 f"{patch} (use resize_to_budget)")
            h, w = H // patch, W // patch
            grids.append((h, w))
            # [C, h, p, w, p] -> [h, w, C, p, p]: row-major patches, conv-weight order inside
            rows.append(img.reshape(C, h, patch, w, patch).permute(1, 3, 0, 2, 4).reshape(h * w, -1))
        self.patch, self.in_chans = patch, int(first.shape[0])
        self.ids = list(ids) if ids is not None else None
        self.patches = torch.cat(rows)  # [T_p, C*p*p]
        self.layout = TokenLayout(grids, first.device)

    def __getattr__(self, name):  # the layout's indices, e.g. batch.cu_tokens
        if name in _LAYOUT_ATTRS:
            return getattr(self.__dict__["layout"], name)
        raise AttributeError(f"NativeBatch has no attribute {name!r}")

    def __len__(self) -> int:
        return self.layout.B

    @property
    def max_length(self) -> int:
        return max(self.lengths)

    @property
    def lengths_t(self) -> torch.Tensor:
        return torch.tensor(self.lengths, device=self.patches.device)

    def _with(self, patches: torch.Tensor) -> "NativeBatch":
        out = object.__new__(NativeBatch)
        out.__dict__.update(self.__dict__, patches=patches, layout=TokenLayout(self.grids, patches.device))
        return out

    def to(self, device, non_blocking: bool = False) -> "NativeBatch":
        return self._with(self.patches.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> "NativeBatch":
        """For ``DataLoader(pin_memory=True)``."""
        return self._with(self.patches.pin_memory())

    def pos_embed(self, dim: int, stored: Optional[torch.Tensor] = None,
                  stored_grid: Optional[Tuple[int, int]] = None, resample=None) -> torch.Tensor:
        """Position embedding in the token layout, [B + T_p, dim] fp32: for each image its CLS
        row then its patch rows (``TokenLayout.pos_table``, one copy per image)."""
        table = self.layout.pos_table(dim, stored, stored_grid, resample)
        return table.repeat(len(self), 1) if self.layout.uniform else table


_LAYOUT_ATTRS = frozenset({"grids", "lengths", "image_id", "positions", "cu_tokens", "cls_index",
                           "patch_index", "max_tokens", "num_tokens"})


def check_batch(batch, patch: int, in_chans: int, who: str) -> None:
    if not isinstance(batch, NativeBatch):
        raise ValueError(f"{who}: batch must be a NativeBatch, got {type(batch).__name__}")
    if batch.patch != patch or batch.in_chans != in_chans:
        raise ValueError(f"{who}: batch has patch {batch.patch} and {batch.in_chans} channels, the "
                         f"model patch {patch} and {in_chans} channels")

# --------------------------------------------------------------------------------------------
# Batching into token budgets
# --------------------------------------------------------------------------------------------
def collate_native(images: Sequence[torch.Tensor], patch: int, max_patches: int,
                   tokens_per_batch: int, upscale: bool = False) -> List[NativeBatch]:
    """Resize every image to the patch budget and group them with ``packing.plan_bins`` into
    batches of at most ``tokens_per_batch`` tokens (1 + L_b per image, CLS included). Each
    returned batch's ``ids`` are the positions of its images in ``images``; every image is in
    exactly one batch."""
    resized = [resize_to_budget(img, patch, max_patches, upscale) for img in images]
    lengths = [1 + (r.shape[1] // patch) * (r.shape[2] // patch) for r in resized]
    return [NativeBatch([resized[i] for i in ids], patch, ids=ids)
            for ids in packing.plan_bins(lengths, tokens_per_batch)]


class NativeCollate:
    """``collate_fn`` for a DataLoader driven by ``NativeBatchSampler``: resizes each sample's
    image (a tensor, or the first item of a tuple, e.g. (image, label)) to the patch budget and
    packs them into one ``NativeBatch``. Labels are not kept: TEC pretraining has none."""

    def __init__(self, patch: int, max_patches: int, upscale: bool = False):
        self.patch, self.max_patches, self.upscale = patch, max_patches, upscale

    def __call__(self, samples) -> NativeBatch:
        images = [s[0] if isinstance(s, (tuple, list)) else s for s in samples]
        return NativeBatch([resize_to_budget(img, self.patch, self.max_patches, self.upscale)
                            for img in images], self.patch)


class NativeBatchSampler(torch.utils.data.Sampler):
    """Batch sampler for a ``DataLoader(batch_sampler=...)``: bins of dataset indices whose
    images, resized by ``budget_grid``, hold at most ``tokens_per_batch`` tokens together.

    ``sizes``: (height, width) in pixels of every dataset image (known up front, e.g. from the
    dataset's metadata). Each epoch (``set_epoch``) shuffles the images before planning the bins
    and then the order of the bins, so the grouping changes from epoch to epoch."""

    def __init__(self, sizes: Sequence[Tuple[int, int]], patch: int, max_patches: int,
                 tokens_per_batch: int, shuffle: bool = True, seed: int = 0, upscale: bool = False):
        self.lengths = [1 + math.prod(budget_grid(int(h), int(w), patch, max_patches, upscale))
                        for h, w in sizes]
        if self.lengths and max(self.lengths) > tokens_per_batch:
            raise ValueError(f"NativeBatchSampler: an image takes {max(self.lengths)} tokens, more "
                             f"than tokens_per_batch={tokens_per_batch}")
        self.tokens_per_batch, self.shuffle, self.seed, self.epoch = tokens_per_batch, shuffle, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _bins(self) -> List[List[int]]:
        n = len(self.lengths)
        if not self.shuffle:
            return packing.plan_bins(self.lengths, self.tokens_per_batch)
        gen = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(n, generator=gen).tolist()
        bins = packing.plan_bins([self.lengths[i] for i in order], self.tokens_per_batch)
        bins = [[order[i] for i in b] for b in bins]
        return [bins[i] for i in torch.randperm(len(bins), generator=gen).tolist()]

    def __iter__(self) -> Iterator[List[int]]:
        return iter(self._bins())

    def __len__(self) -> int:
        return len(self._bins())
