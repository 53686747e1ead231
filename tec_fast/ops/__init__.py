"""Public kernel ops. Each validates its inputs, then dispatches (see ``dispatch.py``).

The reference path (plain torch, ``reference.py``) is the definition; the fast paths live in the
top-level ``kernels/`` directory (installed as ``tec_fast.kernels``).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from . import reference
from .dispatch import use_fast_path

__all__ = ["masked_gather", "scatter_masked", "patch_norm_mse", "relation_targets",
           "relation_loss", "reference"]


def _check_tensor(t, name: str, ndim: int, float_: bool = True) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    if float_ and not t.is_floating_point():
        raise ValueError(f"{name} must be floating point, got dtype {t.dtype}")


def _check_index(idx, name: str, shape: Tuple[int, ...], bound: int, device) -> None:
    if not isinstance(idx, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(idx).__name__}")
    if idx.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"{name} must be int64 or int32, got dtype {idx.dtype}")
    if tuple(idx.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(idx.shape)}")
    if idx.device != device:
        raise ValueError(f"{name} is on {idx.device} but the data is on {device}")
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= bound):
        raise ValueError(
            f"{name} holds indices in [{int(idx.min())}, {int(idx.max())}], outside [0, {bound})")


def _check_same_device(ref: torch.Tensor, **others) -> None:
    for name, t in others.items():
        if t is not None and t.device != ref.device:
            raise ValueError(f"{name} is on {t.device} but the first input is on {ref.device}")


def masked_gather(x: torch.Tensor, ids_keep: torch.Tensor,
                  pos: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Visible-token gather fused with the position add.

    out[b, i] = x[b, ids_keep[b, i]] + pos[ids_keep[b, i]];  x [B, L, C], ids_keep [B, K],
    pos [L, C] or None. Differentiable w.r.t. x and pos.
    """
    _check_tensor(x, "x", 3)
    B, L, C = x.shape
    if not isinstance(ids_keep, torch.Tensor) or ids_keep.dim() != 2:
        raise ValueError(f"ids_keep must be a 2-D [B, K] index tensor, got "
                         f"{getattr(ids_keep, 'shape', type(ids_keep).__name__)}")
    _check_index(ids_keep, "ids_keep", (B, ids_keep.shape[1]), L, x.device)
    if pos is not None:
        _check_tensor(pos, "pos", 2)
        if tuple(pos.shape) != (L, C):
            raise ValueError(f"pos must have shape {(L, C)} to match x {tuple(x.shape)}, "
                             f"got {tuple(pos.shape)}")
        _check_same_device(x, pos=pos)
    if use_fast_path("masked_gather", x):
        from tec_fast.kernels.masked_gather import masked_gather as fast
        return fast(x, ids_keep, pos)
    return reference.masked_gather(x, ids_keep, pos)


def scatter_masked(vis: torch.Tensor, ids_restore: torch.Tensor, mask_token: torch.Tensor,
                   pos: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Decoder input assembly: mask-token fill + unshuffle + position add in one pass.

    out[b, j] = (vis[b, r] if r < K else mask_token) + pos[j], r = ids_restore[b, j];
    vis [B, K, C], ids_restore [B, L] (a permutation of 0..L-1 per row), mask_token [C],
    pos [L, C] or None. Differentiable w.r.t. vis, mask_token and pos.
    """
    _check_tensor(vis, "vis", 3)
    B, K, C = vis.shape
    if not isinstance(ids_restore, torch.Tensor) or ids_restore.dim() != 2:
        raise ValueError(f"ids_restore must be a 2-D [B, L] index tensor, got "
                         f"{getattr(ids_restore, 'shape', type(ids_restore).__name__)}")
    L = ids_restore.shape[1]
    if L < K:
        raise ValueError(f"ids_restore has L={L} columns, fewer than the K={K} visible tokens of vis")
    _check_index(ids_restore, "ids_restore", (B, L), L, vis.device)
    if not isinstance(mask_token, torch.Tensor) or mask_token.numel() != C:
        raise ValueError(f"mask_token must hold C={C} values, got "
                         f"{getattr(mask_token, 'shape', type(mask_token).__name__)}")
    _check_same_device(vis, mask_token=mask_token)
    mask_token = mask_token.reshape(C)
    if pos is not None:
        _check_tensor(pos, "pos", 2)
        if tuple(pos.shape) != (L, C):
            raise ValueError(f"pos must have shape {(L, C)}, got {tuple(pos.shape)}")
        _check_same_device(vis, pos=pos)
    if use_fast_path("scatter_masked", vis):
        from tec_fast.kernels.scatter_masked import scatter_masked as fast
        return fast(vis, ids_restore, mask_token, pos)
    return reference.scatter_masked(vis, ids_restore, mask_token, pos)


def patch_norm_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor,
                   eps: float = 1e-6) -> torch.Tensor:
    """Feature loss of SPEC.md §3 (patch-dimension normalised target, unbiased variance).

    pred, target [B, L, C]; mask [B, L] (1 = removed patch, counted). Returns a 0-dim fp32
    tensor; differentiable w.r.t. pred.
    """
    _check_tensor(pred, "pred", 3)
    _check_tensor(target, "target", 3)
    if pred.shape != target.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} must match")
    if pred.shape[1] < 2:
        raise ValueError(f"pred/target need L >= 2 patches for an unbiased variance, got L={pred.shape[1]}")
    if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != tuple(pred.shape[:2]):
        raise ValueError(f"mask must have shape {tuple(pred.shape[:2])}, got "
                         f"{getattr(mask, 'shape', type(mask).__name__)}")
    _check_same_device(pred, target=target, mask=mask)
    if use_fast_path("patch_norm_mse", pred):
        from tec_fast.kernels.patch_norm_mse import patch_norm_mse as fast
        return fast(pred, target, mask, eps)
    return reference.patch_norm_mse(pred, target, mask, eps)


def relation_targets(q: torch.Tensor, k: torch.Tensor, topk: int,
                     scale: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """Base-model relation targets (SPEC.md §1) from its last block's q, k [B, H, N, d].

    Returns (relation [B, 1+topk, H, N-1] fp32, topk_idx [B, topk] int64). No gradient.
    """
    _check_tensor(q, "q", 4)
    _check_tensor(k, "k", 4)
    if q.shape != k.shape:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must have the same shape")
    _check_same_device(q, k=k)
    L = q.shape[2] - 1
    if isinstance(topk, bool) or not isinstance(topk, int) or not 1 <= topk <= L:
        raise ValueError(f"topk must be an int in [1, {L}] (the number of patches), got {topk!r}")
    if use_fast_path("relation_targets", q):
        from tec_fast.kernels.relation_targets import relation_targets as fast
        return fast(q, k, topk, float(scale))
    with torch.no_grad():
        return reference.relation_targets(q, k, topk, float(scale))


def relation_loss(q: torch.Tensor, k: torch.Tensor, topk_idx: torch.Tensor, target: torch.Tensor,
                  tau: float, scale: float) -> torch.Tensor:
    """Relation loss of SPEC.md §3 from the student's q, k [B, H, N, d].

    topk_idx [B, k] (patch indices, from the base model), target [B, 1+k, H, N-1] (the base's
    logits). Returns a 0-dim fp32 tensor; differentiable w.r.t. q and k.
    """
    _check_tensor(q, "q", 4)
    _check_tensor(k, "k", 4)
    if q.shape != k.shape:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must have the same shape")
    B, H, N, d = q.shape
    L = N - 1
    if not isinstance(topk_idx, torch.Tensor) or topk_idx.dim() != 2 or topk_idx.shape[0] != B:
        raise ValueError(f"topk_idx must be a [B={B}, k] index tensor, got "
                         f"{getattr(topk_idx, 'shape', type(topk_idx).__name__)}")
    kk = topk_idx.shape[1]
    _check_index(topk_idx, "topk_idx", (B, kk), L, q.device)
    _check_tensor(target, "target", 4)
    if tuple(target.shape) != (B, 1 + kk, H, L):
        raise ValueError(f"target must have shape {(B, 1 + kk, H, L)}, got {tuple(target.shape)}")
    _check_same_device(q, k=k, target=target)
    if not float(tau) > 0:
        raise ValueError(f"tau must be > 0, got {tau!r}")
    if use_fast_path("relation_loss", q):
        from tec_fast.kernels.relation_loss import relation_loss as fast
        return fast(q, k, topk_idx, target, float(tau), float(scale))
    return reference.relation_loss(q, k, topk_idx, target, float(tau), float(scale))
