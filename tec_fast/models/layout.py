"""Token layouts: which tokens of which images one step of the model runs on.

Every input mode is the same model on a different layout; ``TECModel.forward_layout`` (and the
native base forward) run one encoder, one decoder and one loss path, asking the layout only how
to gather, scatter, attend and reduce. A layout holds, for B images:

- ``grids`` [(h_b, w_b)] and ``lengths`` [L_b = h_b * w_b]: image b's patches, row-major;
- the *full* token layout: image b = its CLS token then its L_b patches, images one after
  another (rows ``cu_tokens[b]:cu_tokens[b+1]`` of a T_d = B + sum L_b sequence; ``cls_index``,
  ``patch_index`` the rows of the CLS tokens and of the patches, ``positions`` each patch's
  (row, column)). When every image has the same grid (``uniform``) that is a [B, N] batch;
- the *visible* tokens, one of: ``ids_keep`` [B, K] / ``ids_restore`` [B, L] (``dense``: every
  image keeps K patches, batched encoder, the fused ``masked_gather`` / ``scatter_masked``
  ops), or ``enc_index`` [T_e] (the full-layout row of each encoder token, CLS always kept;
  packed encoder over ``cu_enc``), or nothing masked (``enc_index`` None: the base model);
- ``mask`` (1 = hidden) [B, L] when uniform, else [sum L_b]; ``hidden`` per image, on the host.

The modes: fixed ratio = uniform + dense; per-image ratios or block masks = uniform + packed
encoder (decoder and losses batched over [B, N]); native resolution = grids differ, packed
encoder and decoder, the losses through ``ops.*_ragged``.
"""
from __future__ import annotations

import copy
import functools
from typing import List, Optional, Sequence, Tuple

import torch

from tec_fast import ops, packing
from tec_fast.models.layers import sincos_pos_embed
from tec_fast.models.masking import Masking


@functools.lru_cache(maxsize=1024)
def sincos_table(dim: int, h: int, w: int) -> torch.Tensor:
    return sincos_pos_embed(dim, h, w)  # [1 + h*w, dim], CPU fp32


@functools.lru_cache(maxsize=1024)
def _pinned_sincos_table(dim: int, h: int, w: int) -> torch.Tensor:
    return sincos_table(dim, h, w).pin_memory()


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on ``device`` without the host waiting for the GPU: a copy from pageable
    memory synchronises the stream, one from pinned memory queues behind the GPU's work."""
    if device.type == "cuda" and not t.is_pinned():
        t = t.pin_memory()
    return t.to(device, non_blocking=device.type != "cpu")


def host_tensor(values, device: torch.device, dtype=torch.int64) -> torch.Tensor:
    """``torch.tensor(values)`` built on the host and queued to ``device`` (see ``to_device``)."""
    return to_device(torch.tensor(values, dtype=dtype), device)


class TokenLayout:
    """See the module docstring. ``TokenLayout(grids, device)`` has every token visible;
    ``with_masking`` / ``with_keep`` return the layout of one masked step.

    What the host knows it keeps on the host (lengths, visible counts, the longest sequence) and
    index tensors are built there and queued to the device, so a step on a layout reads nothing
    back from the GPU when its keep mask comes from the host (``with_keep``)."""

    def __init__(self, grids: Sequence[Tuple[int, int]], device=None):
        if len(grids) == 0:
            raise ValueError("TokenLayout: needs at least one image")
        self.grids: List[Tuple[int, int]] = [(int(h), int(w)) for h, w in grids]
        self.lengths: List[int] = [h * w for h, w in self.grids]
        self.B, self.uniform = len(self.grids), len(set(self.grids)) == 1
        self.num_tokens, self.max_tokens = self.B + sum(self.lengths), 1 + max(self.lengths)
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.ids_keep = self.ids_restore = self.enc_index = self.cu_enc = self.mask = None
        self.max_enc, self.hidden = self.max_tokens, [0] * self.B
        self.enc_lengths: Optional[List[int]] = None  # tokens per image in the packed encoder

    # Index tensors of the full layout, built on first use (the dense path needs none of them).
    @functools.cached_property
    def cu_tokens(self) -> torch.Tensor:  # [B+1] int32
        return host_tensor(_cumulative([L + 1 for L in self.lengths]), self.device, torch.int32)

    @functools.cached_property
    def cls_index(self) -> torch.Tensor:  # [B]
        return self.cu_tokens[:-1].long()

    @functools.cached_property
    def image_id(self) -> torch.Tensor:  # [T_p] owner of each patch
        return torch.repeat_interleave(torch.arange(self.B, device=self.device),
                                       host_tensor(self.lengths, self.device),
                                       output_size=self.num_tokens - self.B)

    @functools.cached_property
    def patch_index(self) -> torch.Tensor:  # [T_p] rows of the patches in the full layout
        return torch.arange(self.num_tokens - self.B, device=self.device) + self.image_id + 1

    @property
    def dense(self) -> bool:
        return self.ids_keep is not None

    def to(self, device, non_blocking: bool = False) -> "TokenLayout":
        out = copy.copy(self)
        out.device = torch.device(device)
        out.__dict__.update({k: v.to(device, non_blocking=non_blocking) for k, v in self.__dict__.items()
                             if isinstance(v, torch.Tensor)})
        return out

    # ----------------------------------------------------------------------------------------
    # Masking
    # ----------------------------------------------------------------------------------------
    def with_masking(self, m: Masking) -> "TokenLayout":
        """Dense: every image keeps the same K patches count (``random_masking``'s output)."""
        if not self.uniform:
            raise ValueError("with_masking: a dense layout needs every image on one grid")
        K, L = m.ids_keep.shape[1], self.lengths[0]
        out = copy.copy(self)
        out.ids_keep, out.ids_restore, out.mask = m.ids_keep, m.ids_restore, m.mask
        out.hidden = [L - K] * self.B
        return out

    def with_keep(self, keep: torch.Tensor) -> "TokenLayout":
        """Packed encoder: ``keep`` bool, True = visible, [B, L] (uniform) or [sum L_b]. A
        ``keep`` on the host (the trainer's masks are drawn there) gives the visible counts for
        free and its index tensors are built there and queued to the device; one on the device
        costs one read back of the counts."""
        T_p = self.num_tokens - self.B
        shapes = [(self.B, self.lengths[0])] if self.uniform else []
        if not isinstance(keep, torch.Tensor) or keep.dtype != torch.bool \
                or tuple(keep.shape) not in shapes + [(T_p,)]:
            raise ValueError(f"keep must be a bool tensor of shape {' or '.join(map(str, shapes + [(T_p,)]))}, "
                             f"got {getattr(keep, 'dtype', type(keep).__name__)} "
                             f"{tuple(getattr(keep, 'shape', ()))}")
        on_host = keep.device.type == "cpu"
        keep = keep.reshape(-1) if on_host else keep.reshape(-1).to(self.device)
        # the index tensors of the full layout where keep lives
        where = self if on_host == (self.device.type == "cpu") else TokenLayout(self.grids)
        counts = torch.zeros(self.B, dtype=torch.long, device=keep.device) \
            .index_add_(0, where.image_id, keep.long()).tolist()  # free on the host
        if min(counts) < 1:
            raise ValueError(f"keep leaves image {counts.index(min(counts))} no visible patch")
        out = copy.copy(self)
        keep_tokens = torch.ones(self.num_tokens, dtype=torch.bool, device=keep.device)  # CLS kept
        keep_tokens[where.patch_index] = keep
        # [T_e], image by image, patch order; its size is known, so no read back on a GPU either
        enc_index = torch.nonzero_static(keep_tokens, size=self.B + sum(counts)).reshape(-1)
        mask = (~keep).float()
        out.enc_index, mask = (to_device(enc_index, self.device), to_device(mask, self.device)) if on_host \
            else (enc_index, mask)
        out.enc_lengths = [c + 1 for c in counts]
        out.cu_enc = host_tensor(_cumulative(out.enc_lengths), self.device, torch.int32)
        out.max_enc = max(out.enc_lengths)
        out.mask = mask.reshape(self.B, -1) if self.uniform else mask
        out.hidden = [L - K for L, K in zip(self.lengths, counts)]
        return out

    def check_hidden(self) -> None:
        """Refuses a step in which no patch of any image is hidden."""
        # An image with no hidden patch is defined (it adds nothing to the feature loss); a batch
        # without any would make the feature loss 0/0.
        if sum(self.hidden) == 0:
            raise ValueError("the masking hides no patch of any image (mask ratio 0, or keep all True): "
                             "the feature loss has nothing to predict; use a mask ratio in (0, 1)")

    # ----------------------------------------------------------------------------------------
    # Geometry
    # ----------------------------------------------------------------------------------------
    @property
    def positions(self) -> torch.Tensor:
        """(patch row, patch column) [sum L_b, 2] int64 of every patch."""
        Lm, device = max(self.lengths), self.device
        within = self.patch_index - self.cls_index[self.image_id] - 1
        widths = host_tensor([w for _, w in self.grids], device)
        return packing.position_ids(self.image_id * Lm + within, Lm, widths)

    def pos_table(self, dim: int, stored: Optional[torch.Tensor] = None,
                  stored_grid: Optional[Tuple[int, int]] = None, resample=None) -> torch.Tensor:
        """The position embedding of every image, fp32: [1 + L, dim] shared by all images when
        uniform, else the full token layout [T_d, dim]. ``stored`` [1, 1 + gh*gw, dim] (a model's
        table) serves images on ``stored_grid``; ``resample(h, w)`` -> [1 + h*w, dim] the others
        (default: sin-cos, docs/tec.md §2)."""
        device, cache = self.device, {}
        for h, w in dict.fromkeys(self.grids):
            if stored is not None and (h, w) == tuple(stored_grid):
                cache[h, w] = stored[0].float()
            elif resample is not None:
                cache[h, w] = resample(h, w).float()
            else:
                cache[h, w] = to_device(_pinned_sincos_table(dim, h, w) if device.type == "cuda"
                                        else sincos_table(dim, h, w), device)
        if self.uniform:
            return cache[self.grids[0]]
        return torch.cat([cache[g] for g in self.grids])

    # ----------------------------------------------------------------------------------------
    # Encoder
    # ----------------------------------------------------------------------------------------
    def encoder_input(self, patches: torch.Tensor, cls: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Visible tokens plus their position embedding, CLS in front of each image's:
        [B, 1+K, C] (dense), [B, N, C] (uniform, nothing masked) or [T_e, C] (packed).
        ``patches`` [B, L, C] or [sum L_b, C] patch embeddings; ``cls`` the CLS embedding (C
        values); ``pos`` from ``pos_table``."""
        C = patches.shape[-1]
        if self.dense:
            patches = patches.reshape(self.B, -1, C)
            x = ops.masked_gather(patches, self.ids_keep, pos[1:].to(patches.dtype))  # [B, K, C]
            c = (cls.reshape(1, 1, C) + pos[:1].reshape(1, 1, C)).to(x.dtype)
            return torch.cat([c.expand(self.B, -1, -1), x], dim=1)
        full = self._full_tokens(patches, cls, pos)
        if self.enc_index is None:
            return full
        return full.reshape(-1, C).index_select(0, self.enc_index)

    def _full_tokens(self, patches: torch.Tensor, cls: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        C, dt = patches.shape[-1], patches.dtype
        if self.uniform:
            x = patches.reshape(self.B, -1, C) + pos[1:].to(dt)
            c = (cls.reshape(1, 1, C) + pos[:1].reshape(1, 1, C)).to(dt)
            return torch.cat([c.expand(self.B, -1, -1), x], dim=1)  # [B, N, C]
        x = patches + pos.index_select(0, self.patch_index).to(dt)
        c = (cls.reshape(1, C) + pos.index_select(0, self.cls_index)).to(dt)  # [B, C]
        return x.new_zeros(self.num_tokens, C).index_copy(0, self.cls_index, c) \
            .index_copy(0, self.patch_index, x)  # [T_d, C]

    def encoder_attention(self) -> dict:
        """Keyword arguments of ``Block`` for the encoder tokens: none when batched."""
        if self.dense or (self.enc_index is None and self.uniform):
            return {}
        if self.enc_index is None:
            return {"cu_seqlens": self.cu_tokens, "max_len": self.max_tokens,
                    "lengths": [L + 1 for L in self.lengths]}
        return {"cu_seqlens": self.cu_enc, "max_len": self.max_enc, "lengths": self.enc_lengths}

    # ----------------------------------------------------------------------------------------
    # Decoder
    # ----------------------------------------------------------------------------------------
    def decoder_input(self, y: torch.Tensor, mask_token: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Encoder tokens y (after the decoder embedding) back on the full layout, ``mask_token``
        at every hidden patch, plus ``pos``: [B, N, Cd] when uniform, else [T_d, Cd]."""
        if self.dense:
            pos = pos.to(y.dtype)
            patches = ops.scatter_masked(y[:, 1:], self.ids_restore, mask_token.reshape(-1), pos[1:])
            return torch.cat([y[:, :1] + pos[:1], patches], dim=1)
        # every row the mask token, the encoder's rows copied in (an index built here: unchecked,
        # so no read back of its values)
        full = mask_token.reshape(1, -1).to(y.dtype).expand(self.num_tokens, -1).index_copy(0, self.enc_index, y)
        if self.uniform:
            full = full.reshape(self.B, -1, full.shape[-1])
        return full + pos.to(full.dtype)

    def decoder_attention(self, streams: int) -> dict:
        """``Block`` keywords for ``streams`` decoder inputs concatenated along dim 0."""
        if self.uniform:
            return {}
        cu = torch.cat([self.cu_tokens] + [self.cu_tokens[1:] + s * self.num_tokens for s in range(1, streams)])
        return {"cu_seqlens": cu, "max_len": self.max_tokens, "lengths": [L + 1 for L in self.lengths] * streams}

    def split_streams(self, x: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        return x.split(self.B if self.uniform else self.num_tokens)

    def patch_rows(self, x: torch.Tensor) -> torch.Tensor:
        """The patch tokens of a full-layout tensor: [B, L, ...] or [sum L_b, ...]."""
        return x[:, 1:] if self.uniform else x.index_select(0, self.patch_index)

    def per_image(self, x: torch.Tensor) -> List[torch.Tensor]:
        """A patch-row tensor ([B, L, ...] or [sum L_b, ...]) as one [L_b, ...] per image."""
        return list(x.unbind(0)) if self.uniform else list(x.split(self.lengths))

    # ----------------------------------------------------------------------------------------
    # Targets and losses (docs/tec.md §1, §3)
    # ----------------------------------------------------------------------------------------
    def relation_targets(self, q: torch.Tensor, k: torch.Tensor, topk: int, scale: float):
        """The base model's relation targets from its last block's q, k ([B, H, N, d] batched,
        [T, H, d] packed: ``Block(return_qk=True)``): per image relation [1+k, H, L_b] and
        topk_idx [k]."""
        if self.uniform:
            rel, idx = ops.relation_targets(q, k, topk, scale)
            return list(rel.unbind(0)), list(idx.unbind(0))
        return ops.relation_targets_ragged(q, k, [L + 1 for L in self.lengths], topk, scale)

    def feature_loss(self, pred: torch.Tensor, features) -> torch.Tensor:
        """``pred`` from ``patch_rows``; ``features`` as ``targets`` returns them."""
        if self.uniform:
            return ops.patch_norm_mse(pred, features, self.mask)
        return ops.patch_norm_mse_ragged(pred, features, self.mask, self.lengths)

    def relation_loss(self, qk: torch.Tensor, heads: int, topk_idx, relation, tau: float,
                      scale: float) -> torch.Tensor:
        """From the relation head's q/k output on the full layout ([B, N, 2C] or [T_d, 2C])."""
        d = qk.shape[-1] // (2 * heads)
        if self.uniform:
            # [B, H, N, d] views; unbound before the transpose so the backward stacks the
            # gradients into qk's own layout in one copy (as the blocks' attention does)
            q, k = (t.transpose(1, 2) for t in qk.reshape(self.B, -1, 2, heads, d).unbind(2))
            return ops.relation_loss(q, k, topk_idx, relation, tau, scale)
        q, k = qk.reshape(-1, 2, heads, d).unbind(1)
        return ops.relation_loss_ragged(q, k, [L + 1 for L in self.lengths], topk_idx, relation, tau, scale)

    def targets(self, targets, pred_dim: int, pred_heads: int, relation: bool):
        """Checks ``targets`` (``BaseTargets`` tensors when uniform, or per-image lists as
        ``NativeTargets``) and returns (features, relation, topk_idx) in this layout's form."""
        if not hasattr(targets, "features"):
            raise ValueError(f"targets must be the BaseModel's output (a BaseTargets: features, relation, "
                             f"topk_idx) or a NativeTargets, got {type(targets).__name__}")
        feats = getattr(targets, "features", None)
        rel, idx = getattr(targets, "relation", None), getattr(targets, "topk_idx", None)
        if isinstance(feats, torch.Tensor):
            _check_batched(feats, rel, idx, self, pred_dim, pred_heads, relation)
            return feats, rel, idx
        _check_lists(feats, rel, idx, self, pred_dim, pred_heads, relation)
        if self.uniform:
            return torch.stack(list(feats)), rel and torch.stack(list(rel)), idx and torch.stack(list(idx))
        return torch.cat(list(feats)), rel, idx


def _cumulative(lengths: Sequence[int]) -> List[int]:
    """[0, l0, l0 + l1, ...]: the cu_seqlens of ``lengths``."""
    out = [0]
    for n in lengths:
        out.append(out[-1] + n)
    return out


_NO_RELATION = ("targets.relation / targets.topk_idx are None but TECConfig.relation=True: "
                "build the BaseModel with topk set, or set relation=False")


def _kind(x) -> str:
    """What a target holds, for an error message: its type, and its shape where it has one."""
    shape = getattr(x, "shape", None)
    return type(x).__name__ + (f" {tuple(shape)}" if isinstance(shape, tuple) else "")


def _check_batched(feats, rel, idx, layout: TokenLayout, C: int, H: int, relation: bool) -> None:
    B, L = layout.B, layout.lengths[0]
    if not layout.uniform or tuple(feats.shape) != (B, L, C):
        raise ValueError(f"targets.features must be [B, L, pred_dim] = {(B, L, C)}, got {tuple(feats.shape)}")
    if not relation:
        return
    if rel is None or idx is None:
        raise ValueError(_NO_RELATION)
    for name, value in (("relation", rel), ("topk_idx", idx)):
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"targets.{name} must be a tensor like targets.features (a BaseTargets of "
                             f"tensors), got {_kind(value)}")
    if idx.dim() != 2 or idx.shape[0] != B:
        raise ValueError(f"targets.topk_idx must be [B={B}, k], got {tuple(idx.shape)}")
    if tuple(rel.shape) != (B, 1 + idx.shape[1], H, L):
        raise ValueError(f"targets.relation must be [B, 1+k, pred_heads, L] = "
                         f"{(B, 1 + idx.shape[1], H, L)}, got {tuple(rel.shape)}")


def _check_lists(feats, rel, idx, layout: TokenLayout, C: int, H: int, relation: bool) -> None:
    B = layout.B
    if not isinstance(feats, (list, tuple)) or len(feats) != B:
        tensor = f"a [B, L, pred_dim] = {(B, layout.lengths[0], C)} tensor or " if layout.uniform else ""
        raise ValueError(f"targets.features must be {tensor}a list of {B} [L_b, pred_dim] tensors, got "
                         f"{type(feats).__name__}" + (f" of {len(feats)}" if isinstance(feats, (list, tuple)) else ""))
    for b, (f, L) in enumerate(zip(feats, layout.lengths)):
        if not isinstance(f, torch.Tensor) or tuple(f.shape) != (L, C):
            raise ValueError(f"targets.features[{b}] must be a tensor [L_b, pred_dim] = {(L, C)}, got {_kind(f)}")
    if not relation:
        return
    if rel is None or idx is None:
        raise ValueError(_NO_RELATION)
    for name, value in (("relation", rel), ("topk_idx", idx)):
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"targets.{name} must be a list of {B} tensors like targets.features, got {_kind(value)}")
    if len(rel) != B or len(idx) != B:
        raise ValueError(f"targets.relation / topk_idx must hold {B} images, got {len(rel)} / {len(idx)}")
    for name, values in (("relation", rel), ("topk_idx", idx)):
        for b, value in enumerate(values):
            if not isinstance(value, torch.Tensor) or (name == "topk_idx" and value.dim() != 1):
                raise ValueError(f"targets.{name}[{b}] must be a tensor{' [k]' if name == 'topk_idx' else ''}, "
                                 f"got {_kind(value)}")
    k = idx[0].shape[0]
    for b, (r, i, L) in enumerate(zip(rel, idx, layout.lengths)):
        if tuple(i.shape) != (k,) or tuple(r.shape) != (1 + k, H, L):
            raise ValueError(f"targets.relation[{b}] must be [1+k, pred_heads, L_b] = {(1 + k, H, L)} "
                             f"with topk_idx[{b}] [k={k}], got {tuple(r.shape)} and {tuple(i.shape)}")
