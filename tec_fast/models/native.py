"""Native-resolution TEC (NaViT-style): images of different sizes, aspect ratio kept up to a patch
budget, the base model and the new model both run on one packed token sequence, no padding.

Layout of a ``NativeBatch`` of B images, image b on an (h_b, w_b) patch grid, L_b = h_b * w_b:

- patch layout [T_p = sum L_b]: every image's patches, row-major, images in batch order;
- token layout [B + T_p]: image b is CLS then its L_b patches (cu_seqlens over 1 + L_b).

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

import functools
import math
from typing import Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from tec_fast import packing
from tec_fast.ops.attention import packed_attention
from tec_fast.models.base import BaseModel
from tec_fast.models.layers import sincos_pos_embed
from tec_fast.models.masking import num_visible
from tec_fast.models.tec import TECModel

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
@functools.lru_cache(maxsize=1024)
def _sincos_table(dim: int, h: int, w: int) -> torch.Tensor:
    return sincos_pos_embed(dim, h, w)  # [1 + h*w, dim], CPU fp32


class NativeBatch:
    """Images of different sizes as one packed sequence of patches (no padding).

    ``NativeBatch(images, patch)``: images [C, H_b, W_b], H_b and W_b multiples of ``patch``.
    Attributes: ``patches`` [T_p, C*p*p] (each patch flattened in the conv weight's (c, y, x)
    order), ``grids`` [(h_b, w_b)], ``lengths`` [L_b], ``image_id`` [T_p] (owner of each patch),
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
        device = first.device
        self.patch, self.in_chans = patch, int(first.shape[0])
        self.grids: List[Tuple[int, int]] = grids
        self.lengths: List[int] = [h * w for h, w in grids]
        self.ids = list(ids) if ids is not None else None
        self.patches = torch.cat(rows)  # [T_p, C*p*p]
        B, lengths = len(grids), torch.tensor(self.lengths, device=device)
        self.lengths_t = lengths  # [B] int64
        self.cu_patches = F.pad(lengths.cumsum(0), (1, 0))  # [B+1] int64
        self.image_id = torch.repeat_interleave(torch.arange(B, device=device), lengths)  # [T_p]
        self.cu_tokens = F.pad((lengths + 1).cumsum(0), (1, 0)).to(torch.int32)  # [B+1]
        self.cls_index = self.cu_tokens[:-1].long()  # [B]
        self.patch_index = torch.arange(int(lengths.sum()), device=device) + self.image_id + 1  # [T_p]
        self.max_tokens = 1 + max(self.lengths)
        self.max_length = max(self.lengths)  # longest image, in patches
        within = torch.arange(int(lengths.sum()), device=device) - self.cu_patches[self.image_id]
        self.padded_index = self.image_id * self.max_length + within  # [T_p] into [B, max L]
        widths = torch.tensor([w for _, w in grids], device=device)
        self.positions = packing.position_ids(self.padded_index, self.max_length, widths)  # [T_p, 2]
        self._sincos: Dict[Tuple[int, torch.device], torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self.grids)

    @property
    def num_tokens(self) -> int:
        """Tokens of the full (unmasked) sequence, CLS included: sum of 1 + L_b."""
        return len(self.grids) + int(self.patches.shape[0])

    def _map(self, fn) -> "NativeBatch":
        out = object.__new__(NativeBatch)
        out.__dict__.update({k: (fn(v) if isinstance(v, torch.Tensor) else v)
                             for k, v in self.__dict__.items()})
        out._sincos = {}
        return out

    def to(self, device, non_blocking: bool = False) -> "NativeBatch":
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> "NativeBatch":
        """For ``DataLoader(pin_memory=True)``."""
        return self._map(lambda t: t.pin_memory())

    def pos_embed(self, dim: int, stored: Optional[torch.Tensor] = None,
                  stored_grid: Optional[Tuple[int, int]] = None, resample=None) -> torch.Tensor:
        """Position embedding in the token layout, [B + T_p, dim] fp32: for each image its CLS
        row then its patch rows. ``stored`` [1, 1 + gh*gw, dim] (a model's own table) is used
        as is for images on ``stored_grid``; ``resample(h, w)`` -> [1 + h*w, dim] gives the
        table for other grids (default: sin-cos, SPEC.md §2)."""
        device = self.patches.device
        if stored is None and resample is None:
            key = (dim, device)
            if key not in self._sincos:
                self._sincos[key] = torch.cat([_sincos_table(dim, h, w) for h, w in self.grids]).to(device)
            return self._sincos[key]
        tables, cache = [], {}
        for h, w in self.grids:
            if (h, w) not in cache:
                if stored is not None and (h, w) == tuple(stored_grid):
                    cache[h, w] = stored[0].float()
                elif resample is not None:
                    cache[h, w] = resample(h, w).float()
                else:
                    cache[h, w] = _sincos_table(dim, h, w).to(device)
            tables.append(cache[h, w])
        return torch.cat(tables).to(device)


def _embed_patches(patch_embed, patches: torch.Tensor) -> torch.Tensor:
    """The stride-p conv of ``PatchEmbed`` as a matmul on flattened patches: [T_p, C]."""
    w, b = patch_embed.proj.weight, patch_embed.proj.bias
    if not torch.is_autocast_enabled(patches.device.type):
        patches = patches.to(w.dtype)
    return F.linear(patches, w.reshape(w.shape[0], -1), b)


def _interleave_cls(cls: torch.Tensor, patches: torch.Tensor, counts: torch.Tensor):
    """CLS rows cls [B, C] and patch rows [n, C] (image by image) -> packed [B + n, C] with image
    b = CLS then its counts[b] patches; also cu_seqlens [B+1] int32 and the rows the CLS tokens
    [B] and the patches [n] landed on."""
    B = counts.shape[0]
    cu = F.pad((counts + 1).cumsum(0), (1, 0))
    cls_rows = cu[:-1]
    owner = torch.repeat_interleave(torch.arange(B, device=counts.device), counts)
    patch_rows = torch.arange(patches.shape[0], device=counts.device) + owner + 1
    out = patches.new_zeros(B + patches.shape[0], patches.shape[1])
    out = out.index_copy(0, cls_rows, cls.to(patches.dtype)).index_copy(0, patch_rows, patches)
    return out, cu.to(torch.int32), cls_rows, patch_rows


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
    ref = _sincos_table(stored.shape[-1], grid, grid)[1:].to(stored.device) \
        if stored.shape[-1] % 4 == 0 else None
    return ref is not None and torch.allclose(stored[0, 1:].float(), ref, atol=1e-4, rtol=0)


def base_pos_embed(base: BaseModel, batch: NativeBatch) -> torch.Tensor:
    """The base model's position embedding for every image's own grid, token layout [B + T_p, Cb].
    Stored grid: the stored table. Other grids: sin-cos when the stored table is sin-cos (MAE),
    else bicubic resampling of the stored (learned) patch table, CLS row as stored (DINO/timm)."""
    stored, g = base.pos_embed.detach(), base.config.grid_size
    if _stored_is_sincos(stored, g):
        cls_row = stored[0, :1].float()

        def resample(h, w):
            return torch.cat([cls_row, _sincos_table(stored.shape[-1], h, w)[1:].to(stored.device)])
    else:
        grid_table = stored[0, 1:].float().reshape(1, g, g, -1).permute(0, 3, 1, 2)  # [1, C, g, g]

        def resample(h, w):
            t = F.interpolate(grid_table, size=(h, w), mode="bicubic", align_corners=False)
            return torch.cat([stored[0, :1].float(), t[0].flatten(1).t()])
    return batch.pos_embed(stored.shape[-1], stored, (g, g), resample)


@torch.no_grad()
def native_base_targets(base: BaseModel, batch: NativeBatch) -> NativeTargets:
    """SPEC.md §1 per image, all images in one packed run of the frozen base model
    (block-diagonal attention). The last block's q, k come from its own qkv projection on the
    packed tokens; only the CLS row and the top-k rows of each image are formed (no N x N)."""
    cfg = base.config
    _check_batch(batch, cfg.patch_size, cfg.in_chans, "native_base_targets")
    if base.topk is not None and min(batch.lengths) < base.topk:
        b = min(range(len(batch)), key=lambda i: batch.lengths[i])
        raise ValueError(f"native_base_targets: image {b} has {batch.lengths[b]} patches, fewer than "
                         f"the base model's topk={base.topk}")
    x = _embed_patches(base.patch_embed, batch.patches)  # [T_p, Cb]
    counts = batch.lengths_t
    cls = base.cls_token.reshape(1, -1).expand(len(batch), -1)
    x, cu, _, _ = _interleave_cls(cls, x, counts)  # [B + T_p, Cb]
    x = x + base_pos_embed(base, batch).to(x.dtype)
    feats, qk = 0, None
    depth = len(base.blocks)
    for i, blk in enumerate(base.blocks):
        if i == depth - 1 and base.topk is not None:
            # the packed Block forward, written out to keep this block's q and k
            T, C = x.shape
            q, k, v = blk.attn.qkv(blk.norm1(x)).reshape(T, 3, cfg.num_heads, -1).unbind(1)  # [T, H, d]
            a = packed_attention(q, k, v, cu, batch.max_tokens).reshape(T, C)
            x = x + blk.attn.proj(a)
            x = x + blk.mlp(blk.norm2(x))
            qk = (q, k)
        else:
            x = blk(x, cu_seqlens=cu, max_len=batch.max_tokens)
        if i >= depth - base.last_layers:
            feats = feats + x[batch.patch_index].float()
    features = list((feats / base.last_layers).split(batch.lengths))  # per image [L_b, Cb]
    if qk is None:
        return NativeTargets(features, None, None)
    scale = (cfg.embed_dim // cfg.num_heads) ** -0.5
    relation, topk_idx = _relation_targets_packed(qk[0].float(), qk[1].float(), batch, base.topk, scale)
    return NativeTargets(features, relation, topk_idx)


def _padded_keys(k: torch.Tensor, batch: NativeBatch) -> torch.Tensor:
    """Patch keys of the token layout k [B + T_p, H, d] -> [B, max L, H, d], zeros past L_b."""
    B, Lm = len(batch), batch.max_length
    out = k.new_zeros(B * Lm, *k.shape[1:]).index_copy(0, batch.padded_index, k[batch.patch_index])
    return out.reshape(B, Lm, *k.shape[1:])


def _key_valid(batch: NativeBatch) -> torch.Tensor:
    Lm = batch.max_length
    lengths = batch.lengths_t
    return torch.arange(Lm, device=lengths.device)[None, :] < lengths[:, None]  # [B, max L]


def _relation_targets_packed(q: torch.Tensor, k: torch.Tensor, batch: NativeBatch, topk: int,
                             scale: float):
    k_pad = _padded_keys(k, batch)  # [B, Lm, H, d]
    valid = _key_valid(batch)  # [B, Lm]
    cls_row = torch.einsum("bhd,blhd->bhl", q[batch.cls_index], k_pad) * scale  # [B, H, Lm]
    ranking = cls_row.mean(dim=1).masked_fill(~valid, float("-inf"))
    idx = torch.topk(ranking, topk, dim=1, largest=True).indices  # [B, k]
    q_top = q[batch.cls_index[:, None] + 1 + idx]  # [B, k, H, d]
    top_rows = torch.einsum("bkhd,blhd->bkhl", q_top, k_pad) * scale  # [B, k, H, Lm]
    rel = torch.cat([cls_row.unsqueeze(1), top_rows], dim=1)  # [B, 1+k, H, Lm]
    relation = [rel[b, :, :, :L].contiguous() for b, L in enumerate(batch.lengths)]
    return relation, list(idx.unbind(0))


# --------------------------------------------------------------------------------------------
# The TEC loss on a native batch
# --------------------------------------------------------------------------------------------
def _check_targets(model: TECModel, batch: NativeBatch, targets: NativeTargets) -> None:
    cfg = model.config
    feats = getattr(targets, "features", None)
    if not isinstance(feats, (list, tuple)) or len(feats) != len(batch):
        raise ValueError(f"targets.features must be a list of {len(batch)} [L_b, pred_dim] tensors, "
                         f"got {type(feats).__name__} of {len(feats) if hasattr(feats, '__len__') else '?'}")
    for b, (f, L) in enumerate(zip(feats, batch.lengths)):
        if tuple(f.shape) != (L, cfg.pred_dim):
            raise ValueError(f"targets.features[{b}] must be [L_b, pred_dim] = {(L, cfg.pred_dim)}, "
                             f"got {tuple(f.shape)}")
    if not cfg.relation:
        return
    rel, idx = targets.relation, targets.topk_idx
    if rel is None or idx is None:
        raise ValueError("targets.relation / targets.topk_idx are None but TECConfig.relation=True: "
                         "build the BaseModel with topk set, or set relation=False")
    if len(rel) != len(batch) or len(idx) != len(batch):
        raise ValueError(f"targets.relation / topk_idx must hold {len(batch)} images, got "
                         f"{len(rel)} / {len(idx)}")
    k = idx[0].shape[0]
    for b, (r, i, L) in enumerate(zip(rel, idx, batch.lengths)):
        if tuple(i.shape) != (k,) or tuple(r.shape) != (1 + k, cfg.pred_heads, L):
            raise ValueError(f"targets.relation[{b}] must be [1+k, pred_heads, L_b] = "
                             f"{(1 + k, cfg.pred_heads, L)} with topk_idx[{b}] [k={k}], got "
                             f"{tuple(r.shape)} and {tuple(i.shape)}")


def _visible_counts(batch: NativeBatch, mask_ratio) -> List[int]:
    ratios = [float(mask_ratio)] * len(batch) if isinstance(mask_ratio, (int, float)) \
        else [float(r) for r in mask_ratio]
    if len(ratios) != len(batch):
        raise ValueError(f"mask_ratio must be a float or one ratio per image ({len(batch)}), "
                         f"got {len(ratios)}")
    counts = []
    for b, (r, L) in enumerate(zip(ratios, batch.lengths)):
        if not 0.0 <= r < 1.0:
            raise ValueError(f"mask_ratio[{b}] must be in [0, 1), got {r!r}")
        K = num_visible(L, r)
        if K < 1:
            raise ValueError(f"mask ratio {r} leaves image {b} ({L} patches) no visible patch")
        counts.append(K)
    if sum(counts) == batch.patches.shape[0]:
        raise ValueError("mask_ratio masks no patch of any image: the feature loss is undefined")
    return counts


def _random_keep(batch: NativeBatch, counts: List[int], noise, generator) -> torch.Tensor:
    """keep [T_p] bool: image b keeps its K_b patches of lowest noise (SPEC.md §2 per image),
    ranked for all images at once by a segmented sort (noise order within image order)."""
    device = batch.patches.device
    if noise is None:
        where = generator.device if generator is not None else device
        flat = torch.rand(batch.patches.shape[0], generator=generator, device=where).to(device)
    else:
        if len(noise) != len(batch):
            raise ValueError(f"noise must be a list of {len(batch)} tensors [L_b], got {len(noise)}")
        for b, (n, L) in enumerate(zip(noise, batch.lengths)):
            if not isinstance(n, torch.Tensor) or tuple(n.shape) != (L,):
                raise ValueError(f"noise[{b}] must be a tensor [L_b] = [{L}], got "
                                 f"{tuple(getattr(n, 'shape', ())) or type(n).__name__}")
        flat = torch.cat([n.to(device) for n in noise])  # [T_p]
    by_noise = torch.argsort(flat, stable=True)
    order = by_noise[torch.argsort(batch.image_id[by_noise], stable=True)]  # image, then noise
    owner = batch.image_id[order]
    rank = torch.arange(order.shape[0], device=device) - batch.cu_patches[owner]
    K = torch.tensor(counts, device=device)
    keep = torch.empty_like(flat, dtype=torch.bool)
    keep[order] = rank < K[owner]
    return keep


def _patch_norm_targets(target: torch.Tensor, batch: NativeBatch, eps: float = 1e-6) -> torch.Tensor:
    """SPEC.md §3 target normalisation per image over its own L_b patches (unbiased variance)."""
    B, seg = len(batch), batch.image_id
    n = batch.lengths_t.to(target.dtype)[:, None]  # [B, 1]
    mean = target.new_zeros(B, target.shape[1]).index_add_(0, seg, target) / n
    centred = target - mean[seg]
    var = target.new_zeros(B, target.shape[1]).index_add_(0, seg, centred * centred) / (n - 1)
    return centred / torch.sqrt(var[seg] + eps)


def native_tec_loss(model: TECModel, batch: NativeBatch, targets: NativeTargets, mask_ratio=0.75,
                    generator: Optional[torch.Generator] = None,
                    noise: Optional[Sequence[torch.Tensor]] = None) -> Dict[str, torch.Tensor]:
    """One TEC loss evaluation on a native-resolution batch; same meaning as ``TECModel.forward``.

    Image b keeps K_b = int(L_b * (1 - mask_ratio)) patches (``mask_ratio`` a float or one per
    image), chosen by ``noise[b]`` [L_b] (or fresh uniform noise from ``generator``). The encoder
    runs packed over CLS + kept patches, both decoder streams over every image's full 1 + L_b
    tokens, packed together through the shared decoder blocks.
    feature = sum over images of masked per-patch errors / all masked patches (targets normalised
    per image); relation = mean over (image, row, head)."""
    cfg, enc = model.config, model.config.encoder
    _check_batch(batch, enc.patch_size, enc.in_chans, "native_tec_loss")
    _check_targets(model, batch, targets)
    g = enc.grid_size
    counts = _visible_counts(batch, mask_ratio)
    keep = _random_keep(batch, counts, noise, generator)  # [T_p]
    mask = (~keep).float()

    # encoder: CLS (input adapter) + kept patches of every image, packed
    x = _embed_patches(model.patch_embed, batch.patches)  # [T_p, C]
    pos = batch.pos_embed(enc.embed_dim, model.pos_embed, (g, g)).to(x.dtype)  # token layout
    x = x + pos[batch.patch_index]
    kept = keep.nonzero().reshape(-1)  # [n_keep], image by image, patch order
    cls = (model.cls_embedding().reshape(1, -1) + pos[batch.cls_index]).to(x.dtype)  # [B, C]
    k_counts = torch.tensor(counts, device=x.device)
    x, cu_enc, cls_rows, kept_rows = _interleave_cls(cls, x[kept], k_counts)  # [T_e, C]
    max_enc = 1 + max(counts)
    outs = []
    for blk in model.blocks:
        x = blk(x, cu_seqlens=cu_enc, max_len=max_enc)
        outs.append(x)
    outs[-1] = model.norm(x)
    latent = model.encoder_adaptor(torch.stack(outs).unsqueeze(1))[0]  # [T_e, C]

    # decoders: each stream back to the full token layout, mask tokens where patches were removed
    to_full = torch.empty(latent.shape[0], dtype=torch.long, device=x.device)
    to_full[cls_rows] = batch.cls_index
    to_full[kept_rows] = batch.patch_index[kept]
    T_d = batch.num_tokens
    heads = [model.forward_fea_decoder] + ([model.forward_att_decoder] if cfg.relation else [])
    dpos = batch.pos_embed(cfg.decoder_dim, model.decoder_pos_embed, (g, g))  # [T_d, Cd]
    inputs = []
    for head in heads:
        y = head.decoder_embed(latent)  # [T_e, Cd]
        full = packing.unpack(y, to_full, head.mask_token.reshape(-1), (1, T_d))[0]  # [T_d, Cd]
        inputs.append(full + dpos.to(full.dtype))
    x = torch.cat(inputs)  # streams one after the other: 2 * B sequences
    cu_dec = torch.cat([batch.cu_tokens] + [batch.cu_tokens[1:] + s * T_d for s in range(1, len(heads))])
    for blk in model.decoder_blocks:
        x = blk(x, cu_seqlens=cu_dec, max_len=batch.max_tokens)
    streams = x.split(T_d)

    fea = model.forward_fea_decoder
    pred = fea.decoder_pred(fea.decoder_norm(streams[0][batch.patch_index]))  # [T_p, Cb]
    qk = None
    if cfg.relation:
        att = model.forward_att_decoder
        qk = att.decoder_qk(att.decoder_norm(streams[1]))  # [T_d, 2*Cb]
    with torch.autocast(x.device.type, enabled=False):  # the losses in fp32, like the ops
        loss_f, loss_r = _losses(model, batch, targets, pred, qk, mask)
    loss = cfg.feature_weight * loss_f + cfg.relation_weight * loss_r
    return {"loss": loss, "feature": loss_f, "relation": loss_r}


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


def _losses(model: TECModel, batch: NativeBatch, targets: NativeTargets, pred: torch.Tensor,
            qk: Optional[torch.Tensor], mask: torch.Tensor):
    """SPEC.md §3 per image: feature loss from pred [T_p, Cb], relation loss from the relation
    head's q/k [T_d, 2*Cb] (None without relation targets). fp32."""
    cfg = model.config
    T_d = batch.num_tokens
    target = _patch_norm_targets(torch.cat(targets.features).float(), batch)
    per_patch = ((pred.float() - target) ** 2).mean(dim=-1)  # [T_p]
    loss_f = (per_patch * mask).sum() / mask.sum()

    if qk is not None:
        Hb = cfg.pred_heads
        q, k = qk.float().reshape(T_d, 2, Hb, cfg.pred_dim // Hb).unbind(1)  # [T_d, Hb, dh]
        idx = torch.stack(list(targets.topk_idx)).to(q.device)  # [B, k]
        rows = batch.cls_index[:, None] + torch.cat([torch.zeros_like(idx[:, :1]), idx + 1], dim=1)
        logits = torch.einsum("brhd,blhd->brhl", q[rows], _padded_keys(k, batch)) * cfg.pred_dim ** -0.5
        pad = ~_key_valid(batch)[:, None, None, :]  # [B, 1, 1, Lm]
        Lm = batch.max_length
        target_r = torch.stack([F.pad(r.float(), (0, Lm - r.shape[-1])) for r in targets.relation])
        p = F.softmax((target_r / cfg.tau).masked_fill(pad, float("-inf")), dim=-1)
        logp = F.log_softmax(logits.masked_fill(pad, float("-inf")), dim=-1).masked_fill(pad, 0.0)
        loss_r = -(p * logp).sum(dim=-1).mean()  # over (image, row, head)
    else:
        loss_r = torch.zeros((), device=pred.device)
    return loss_f, loss_r


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
