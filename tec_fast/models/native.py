"""Native-resolution TEC (NaViT-style): images of different sizes, aspect ratio kept up to a patch
budget, the base model and the new model both run on one packed token sequence, no padding.

This module holds the data side (resizing to a budget, ``NativeBatch``, token-budget batching)
and thin entry points; the model itself is the one ``TECModel.forward_layout`` runs for every
mode, on the batch's ``TokenLayout`` (``tec_fast.models.layout``). For B images, image b on an
(h_b, w_b) patch grid, L_b = h_b * w_b:

- patch layout [T_p = sum L_b]: every image's patches, row-major, images in batch order;
- token layout [B + T_p]: image b is CLS then its L_b patches (cu_seqlens over 1 + L_b).
A batch whose images share one grid is batched [B, 1 + L] instead (no packing needed).

Every position embedding is computed for the image's own grid (SPEC.md §2 sin-cos, MAE layout:
first half of the channels encodes the column, last half the row; ``sincos_pos_embed(C, h, w)``
lays tokens out row-major with h rows and w columns). An image on the model's own square grid
takes the stored table itself, so the native path reproduces the dense one exactly there.

The base model's position embedding on another grid (``base_pos_embed``): a stored table that
equals the sin-cos one (MAE, TEC-released) is recomputed as sin-cos for the new grid; a learned
table (iBOT, DINO) is resampled bicubically (align_corners=False, no antialias: what DINO's
``interpolate_pos_encoding`` does), the CLS row kept as stored.

API: ``resize_to_budget``, ``budget_grid``, ``NativeBatch``, ``native_base_targets`` ->
``NativeTargets``, ``native_tec_loss``, ``collate_native``, and for a DataLoader
``NativeBatchSampler`` (token-budget bins of dataset indices) with ``NativeCollate``.
The new model's modules (patch_embed, blocks, adapters, decoders) are used as they are, so one
checkpoint trains in both the dense and the native mode.
"""
from __future__ import annotations

import math
from typing import Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from tec_fast import packing
from tec_fast.models.base import BaseModel
from tec_fast.models.layout import TokenLayout, sincos_table
from tec_fast.models.masking import ragged_keep, visible_counts
from tec_fast.models.tec import TECModel, embed_patches

__all__ = ["budget_grid", "resize_to_budget", "NativeBatch", "NativeTargets", "base_pos_embed",
           "native_base_targets", "native_tec_loss", "collate_native", "NativeCollate", "NativeBatchSampler",
           "NativeTECModel"]


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


def _check_batch(batch, patch: int, in_chans: int, who: str) -> None:
    if not isinstance(batch, NativeBatch):
        raise ValueError(f"{who}: batch must be a NativeBatch, got {type(batch).__name__}")
    if batch.patch != patch or batch.in_chans != in_chans:
        raise ValueError(f"{who}: batch has patch {batch.patch} and {batch.in_chans} channels, the "
                         f"model patch {patch} and {in_chans} channels")


# --------------------------------------------------------------------------------------------
# Base model targets
# --------------------------------------------------------------------------------------------
class NativeTargets(NamedTuple):
    features: List[torch.Tensor]            # per image [L_b, Cb] fp32
    relation: Optional[List[torch.Tensor]]  # per image [1+k, Hb, L_b] fp32
    topk_idx: Optional[List[torch.Tensor]]  # per image [k] int64, most attended first


def _stored_is_sincos(stored: torch.Tensor, grid: int) -> bool:
    ref = sincos_table(stored.shape[-1], grid, grid)[1:].to(stored.device) \
        if stored.shape[-1] % 4 == 0 else None
    return ref is not None and torch.allclose(stored[0, 1:].float(), ref, atol=1e-4, rtol=0)


def _stored_with_cls_row(base: BaseModel) -> torch.Tensor:
    """The base's stored table as [1, 1 + L, Cb]: a table over the patches only
    (``no_embed_class``) gets a zero CLS row, which adds no position to the CLS token."""
    stored = base.pos_embed.detach()
    if base.config.no_embed_class:
        stored = torch.cat([stored.new_zeros(1, 1, stored.shape[-1]), stored], dim=1)
    return stored


def _base_pos_table(base: BaseModel, layout: TokenLayout) -> torch.Tensor:
    """The base's position embedding for the layout's grids (``TokenLayout.pos_table`` form)."""
    stored, g = _stored_with_cls_row(base), base.config.grid_size
    if _stored_is_sincos(stored, g):
        cls_row = stored[0, :1].float()

        def resample(h, w):
            return torch.cat([cls_row, sincos_table(stored.shape[-1], h, w)[1:].to(stored.device)])
    else:
        grid_table = stored[0, 1:].float().reshape(1, g, g, -1).permute(0, 3, 1, 2)  # [1, C, g, g]

        def resample(h, w):
            t = F.interpolate(grid_table, size=(h, w), mode="bicubic", align_corners=False)
            return torch.cat([stored[0, :1].float(), t[0].flatten(1).t()])
    return layout.pos_table(stored.shape[-1], stored, (g, g), resample)


def _check_base(base: BaseModel) -> None:
    cfg = base.config
    if not cfg.class_token or cfg.reg_tokens:
        raise ValueError(f"native_base_targets: token layouts hold one CLS token per image; this base "
                         f"has ViTConfig.class_token={cfg.class_token}, reg_tokens={cfg.reg_tokens}")


def base_pos_embed(base: BaseModel, batch: NativeBatch) -> torch.Tensor:
    """The base model's position embedding for every image's own grid, token layout [B + T_p, Cb].
    Stored grid: the stored table. Other grids: sin-cos when the stored table is sin-cos (MAE),
    else bicubic resampling of the stored (learned) patch table, CLS row as stored (DINO/timm)."""
    table = _base_pos_table(base, batch.layout)
    return table.repeat(len(batch), 1) if batch.layout.uniform else table


@torch.no_grad()
def native_base_targets(base: BaseModel, batch: NativeBatch) -> NativeTargets:
    """SPEC.md §1 per image, all images in one run of the frozen base model over the batch's
    token layout (block-diagonal attention when the grids differ). The last block's q, k are its
    own qkv projection's output, read by a hook; ``TokenLayout.relation_targets`` forms only the
    CLS and top-k rows (``ops.relation_targets``, by groups of equal length)."""
    cfg, layout = base.config, batch.layout
    _check_batch(batch, cfg.patch_size, cfg.in_chans, "native_base_targets")
    _check_base(base)
    if base.topk is not None and min(batch.lengths) < base.topk:
        b = min(range(len(batch)), key=lambda i: batch.lengths[i])
        raise ValueError(f"native_base_targets: image {b} has {batch.lengths[b]} patches, fewer than "
                         f"the base model's topk={base.topk}")
    x = embed_patches(base.patch_embed, batch.patches)  # [T_p, Cb]
    x = base.norm_pre(layout.encoder_input(x, base.cls_token, _base_pos_table(base, layout)))
    attention, depth, qkv = layout.encoder_attention(), len(base.blocks), []
    hook = base.blocks[-1].attn.qkv.register_forward_hook(lambda m, i, out: qkv.append(out)) \
        if base.topk is not None else None
    feats = 0
    try:
        for i, blk in enumerate(base.blocks):
            x = blk(x, **attention)
            if i >= depth - base.last_layers:
                feats = feats + layout.patch_rows(x).float()
    finally:
        if hook is not None:
            hook.remove()
    features = layout.per_image(feats / base.last_layers)  # per image [L_b, Cb]
    if base.topk is None:
        return NativeTargets(features, None, None)
    scale = (cfg.embed_dim // cfg.num_heads) ** -0.5
    relation, topk_idx = layout.relation_targets(qkv[-1], cfg.num_heads, base.topk, scale)
    return NativeTargets(features, relation, topk_idx)


# --------------------------------------------------------------------------------------------
# The TEC loss on a native batch
# --------------------------------------------------------------------------------------------
def native_tec_loss(model: TECModel, batch: NativeBatch, targets: NativeTargets, mask_ratio=0.75,
                    generator: Optional[torch.Generator] = None,
                    noise: Optional[Sequence[torch.Tensor]] = None) -> Dict[str, torch.Tensor]:
    """One TEC loss evaluation on a native-resolution batch; same meaning as ``TECModel.forward``.

    Image b keeps K_b = int(L_b * (1 - mask_ratio)) patches (``mask_ratio`` a float or one per
    image), chosen by ``noise[b]`` [L_b] (or fresh uniform noise from ``generator``), and the
    model runs ``forward_layout`` on the batch's layout with that masking.
    feature = sum over images of masked per-patch errors / all masked patches (targets normalised
    per image; an image with no hidden patch adds nothing); relation = mean over (image, row, head)."""
    enc = model.config.encoder
    _check_batch(batch, enc.patch_size, enc.in_chans, "native_tec_loss")
    counts = visible_counts(batch.lengths, mask_ratio)
    keep = ragged_keep(batch.lengths, counts, noise, device=batch.patches.device, generator=generator)
    return model.forward_layout(batch.layout.with_keep(keep), batch.patches, targets)


class NativeTECModel(TECModel):
    """A ``TECModel`` whose ``forward`` also takes a ``NativeBatch``:
    ``model(batch, targets, mask_ratio, noise=[...])`` is ``native_tec_loss(model, ...)``.
    Same modules, parameters and state dict as ``TECModel`` (checkpoints load either way); it
    exists so the native loss runs *inside* ``forward``, where DDP / FSDP2 / compile wrappers
    hook in (calling ``native_tec_loss`` on a wrapper's inner module would skip gradient sync)."""

    def forward(self, images, targets, mask_ratio=0.75, noise=None, keep=None):
        if isinstance(images, NativeBatch):
            if keep is not None:
                raise ValueError("NativeTECModel: keep masks are not supported on a NativeBatch "
                                 "(pass per-image noise)")
            return native_tec_loss(self, images, targets, mask_ratio, noise=noise)
        return super().forward(images, targets, mask_ratio, noise, keep)


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
