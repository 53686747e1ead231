"""Native-resolution TEC (NaViT-style): images of different sizes, aspect ratio kept up to a patch
budget, the base model and the new model both run on one packed token sequence, no padding.

The data side (resizing to a budget, ``NativeBatch``, token-budget batching) lives in
``native_batch.py``; this module holds the base targets and the loss entry points. The model itself is the one ``TECModel.forward_layout`` runs for every
mode, on the batch's ``TokenLayout`` (``tec_fast.models.layout``). For B images, image b on an
(h_b, w_b) patch grid, L_b = h_b * w_b:

- patch layout [T_p = sum L_b]: every image's patches, row-major, images in batch order;
- token layout [B + T_p]: image b is CLS then its L_b patches (cu_seqlens over 1 + L_b).
A batch whose images share one grid is batched [B, 1 + L] instead (no packing needed).

The new model's position embedding is computed for each image's own grid (docs/tec.md §2 sin-cos, MAE layout:
first half of the channels encodes the column, last half the row; ``sincos_pos_embed(C, h, w)``
lays tokens out row-major with h rows and w columns). An image on the model's own square grid
takes the stored table itself, so the native path reproduces the dense one exactly there.

The base model's position embedding on another grid (``base_pos_embed``, ``BaseModel.pos_table``):
its stored table (learned, or MAE's sin-cos) resampled as timm does (``checkpoint.resample``:
bicubic with antialias, CLS row kept as stored), so a base gives the same positions at a grid
whether it runs natively there or was loaded at that image size for a dense run.

API: ``resize_to_budget``, ``budget_grid``, ``NativeBatch``, ``native_base_targets`` ->
``NativeTargets``, ``native_tec_loss``, ``collate_native``, and for a DataLoader
``NativeBatchSampler`` (token-budget bins of dataset indices) with ``NativeCollate``.
The new model's modules (patch_embed, blocks, adapters, decoders) are used as they are, so one
checkpoint trains in both the dense and the native mode.
"""
from __future__ import annotations

from typing import Dict, List, NamedTuple, Optional, Sequence

import torch

from tec_fast.models.base import BaseModel
from tec_fast.models.masking import ragged_keep, visible_counts
from tec_fast.models.native_batch import (NativeBatch, NativeBatchSampler, NativeCollate, budget_grid,
                                          check_batch, collate_native, resize_to_budget)
from tec_fast.models.tec import TECModel

__all__ = ["budget_grid", "resize_to_budget", "NativeBatch", "NativeTargets", "base_pos_embed",
           "native_base_targets", "native_tec_loss", "collate_native", "NativeCollate", "NativeBatchSampler",
           "NativeTECModel"]


# --------------------------------------------------------------------------------------------
# Base model targets
# --------------------------------------------------------------------------------------------
class NativeTargets(NamedTuple):
    features: List[torch.Tensor]            # per image [L_b, Cb] fp32
    relation: Optional[List[torch.Tensor]]  # per image [1+k, Hb, L_b] fp32
    topk_idx: Optional[List[torch.Tensor]]  # per image [k] int64, most attended first


def _check_base(base: BaseModel) -> None:
    cfg = base.config
    if not cfg.class_token or cfg.reg_tokens:
        raise ValueError(f"native_base_targets: token layouts hold one CLS token per image; this base "
                         f"has ViTConfig.class_token={cfg.class_token}, reg_tokens={cfg.reg_tokens}")


def base_pos_embed(base: BaseModel, batch: NativeBatch) -> torch.Tensor:
    """The base model's position embedding for every image's own grid, token layout [B + T_p, Cb]
    (``BaseModel.pos_table``: the stored table on its grid, resampled as timm does on others)."""
    table = base.pos_table(batch.layout)
    return table.repeat(len(batch), 1) if batch.layout.uniform else table


@torch.no_grad()
def native_base_targets(base: BaseModel, batch: NativeBatch) -> NativeTargets:
    """docs/tec.md §1 per image, all images in one run of the frozen base model over the batch's
    token layout (block-diagonal attention when the grids differ), through the same
    ``BaseModel.last_layers_mean`` as the batched targets; ``TokenLayout.relation_targets``
    forms only the CLS and top-k rows (``ops.relation_targets``, by groups of equal length)."""
    cfg, layout = base.config, batch.layout
    check_batch(batch, cfg.patch_size, cfg.in_chans, "native_base_targets")
    _check_base(base)
    if base.topk is not None and min(batch.lengths) < base.topk:
        b = min(range(len(batch)), key=lambda i: batch.lengths[i])
        raise ValueError(f"native_base_targets: image {b} has {batch.lengths[b]} patches, fewer than "
                         f"the base model's topk={base.topk}")
    x = base.embed(batch.patches, layout)  # [B + T_p, Cb] (uniform: [B, 1 + L, Cb])
    feats, qk = base.last_layers_mean(x, layout.patch_rows, **layout.encoder_attention())
    features = layout.per_image(feats)  # per image [L_b, Cb]
    if base.topk is None:
        return NativeTargets(features, None, None)
    scale = (cfg.embed_dim // cfg.num_heads) ** -0.5
    relation, topk_idx = layout.relation_targets(*qk, base.topk, scale)
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
    check_batch(batch, enc.patch_size, enc.in_chans, "native_tec_loss")
    counts = visible_counts(batch.lengths, mask_ratio)
    # the keep mask is made where the noise is: the trainer's host noise gives the layout host
    # counts and host-built indices, so nothing is read back from the GPU
    where = noise[0].device if noise is not None and len(noise) and isinstance(noise[0], torch.Tensor) \
        else batch.patches.device
    keep = ragged_keep(batch.lengths, counts, noise, device=where, generator=generator)
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
