"""The loss and target ops on ragged batches: images with different numbers of patches, their
rows packed one image after another ([T, ...], image b owning ``lengths[b]`` consecutive rows).

No math of their own. Images are grouped by length and each group runs the dense op of
``tec_fast.ops`` on a [B_g, L, ...] batch, so these definitions are the dense ones and the fused
kernels serve native-resolution batches too. A batch whose images all have one length is one
group and costs only views; otherwise each group is one gather of its rows. (A segmented Triton
kernel walking ``cu_seqlens`` would save those gathers; none is written yet.)
"""
from __future__ import annotations

import operator
from typing import Dict, List, Sequence, Tuple

import torch

from tec_fast import ops

__all__ = ["length_groups", "patch_norm_mse_ragged", "relation_targets_ragged", "relation_loss_ragged"]


def length_groups(lengths: Sequence[int]) -> List[Tuple[int, List[int]]]:
    """[(length, [image ids in batch order])], one entry per distinct length, shortest first."""
    groups: Dict[int, List[int]] = {}
    for b, n in enumerate(lengths):
        groups.setdefault(int(n), []).append(b)
    return sorted(groups.items())


def _check_lengths(lengths: Sequence[int], rows: int, what: str, minimum: int) -> List[int]:
    try:
        lengths = [operator.index(n) for n in lengths]  # ints (NumPy's, 0-dim integer tensors): no float truncated
    except TypeError:
        raise ValueError(f"{what}: lengths must be a sequence of ints, got "
                         f"{type(lengths).__name__} {str(lengths)[:80]}") from None
    if not lengths or sum(lengths) != rows or min(lengths) < minimum:
        raise ValueError(f"{what}: lengths must be >= {minimum} each and add up to the {rows} rows, "
                         f"got {lengths[:8]}{'...' if len(lengths) > 8 else ''} (sum {sum(lengths)})")
    return lengths


class _Rows:
    """Gathers the rows of one length group as a [B_g, n, ...] batch (a view when they are
    consecutive in the packed tensor)."""

    def __init__(self, lengths: List[int], device: torch.device):
        self.starts = [0] * len(lengths)
        for b in range(1, len(lengths)):
            self.starts[b] = self.starts[b - 1] + lengths[b - 1]
        self.device = device

    def __call__(self, x: torch.Tensor, n: int, ids: List[int]) -> torch.Tensor:
        s0 = self.starts[ids[0]]
        if ids == list(range(ids[0], ids[0] + len(ids))):  # consecutive images: one slice
            return x[s0:s0 + len(ids) * n].reshape(len(ids), n, *x.shape[1:])
        idx = (torch.tensor([self.starts[b] for b in ids])[:, None] + torch.arange(n)).reshape(-1)
        if self.device.type == "cuda":  # queued behind the GPU's work, not waited for
            idx = idx.pin_memory()
        idx = idx.to(self.device, non_blocking=True)
        return x.index_select(0, idx).reshape(len(ids), n, *x.shape[1:])


def patch_norm_mse_ragged(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor,
                          lengths: Sequence[int], eps: float = 1e-6) -> torch.Tensor:
    """``ops.patch_norm_mse`` on a ragged batch: pred, target [T, C], mask [T] (1 = hidden),
    image b = ``lengths[b]`` rows; each image's target normalised over its own patches. Returns
    sum over images of the hidden patches' errors / all hidden patches (0-dim fp32). An image
    with no hidden patch adds nothing; NaN only when no patch at all is hidden (as the dense op)."""
    if pred.dim() != 2 or pred.shape != target.shape or tuple(mask.shape) != (pred.shape[0],):
        raise ValueError(f"patch_norm_mse_ragged: pred and target must be [T, C] and mask [T], got "
                         f"{tuple(pred.shape)}, {tuple(target.shape)}, {tuple(mask.shape)}")
    lengths = _check_lengths(lengths, pred.shape[0], "patch_norm_mse_ragged", 2)
    groups, rows = length_groups(lengths), _Rows(lengths, pred.device)
    if len(groups) == 1:
        B = len(lengths)
        return ops.patch_norm_mse(pred.reshape(B, -1, pred.shape[1]),
                                  target.reshape(B, -1, target.shape[1]), mask.reshape(B, -1), eps)
    total = 0.0
    for n, ids in groups:
        m = rows(mask, n, ids)  # [B_g, n]
        hidden = m.float().sum()
        # a group without hidden patches is weighted 0; a stand-in mask keeps its op finite
        safe = torch.where(hidden > 0, m, torch.ones_like(m))
        total = total + ops.patch_norm_mse(rows(pred, n, ids), rows(target, n, ids), safe, eps) * hidden
    return total / mask.float().sum()


def _as_heads(x: torch.Tensor) -> torch.Tensor:
    return x.permute(0, 2, 1, 3)  # [B_g, n, H, d] -> [B_g, H, n, d]


def relation_targets_ragged(q: torch.Tensor, k: torch.Tensor, lengths: Sequence[int], topk: int,
                            scale: float) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
    """``ops.relation_targets`` on a ragged batch: q, k [T, H, d], image b = ``lengths[b]`` tokens,
    its CLS first. Returns per image relation [1+topk, H, L_b] fp32 and topk_idx [topk] int64."""
    if q.dim() != 3 or q.shape != k.shape:
        raise ValueError(f"relation_targets_ragged: q and k must be [T, H, d] of one shape, got "
                         f"{tuple(q.shape)} and {tuple(k.shape)}")
    lengths = _check_lengths(lengths, q.shape[0], "relation_targets_ragged", 2)
    rows = _Rows(lengths, q.device)
    relation: List[torch.Tensor] = [None] * len(lengths)
    topk_idx: List[torch.Tensor] = [None] * len(lengths)
    for n, ids in length_groups(lengths):
        try:
            rel, idx = ops.relation_targets(_as_heads(rows(q, n, ids)), _as_heads(rows(k, n, ids)), topk, scale)
        except ValueError as exc:
            raise _in_group("relation_targets_ragged", n, ids, exc) from None
        for i, b in enumerate(ids):
            relation[b], topk_idx[b] = rel[i], idx[i]
    return relation, topk_idx


def relation_loss_ragged(q: torch.Tensor, k: torch.Tensor, lengths: Sequence[int],
                         topk_idx: Sequence[torch.Tensor], target: Sequence[torch.Tensor],
                         tau: float, scale: float) -> torch.Tensor:
    """``ops.relation_loss`` on a ragged batch: q, k [T, H, d], image b = ``lengths[b]`` tokens,
    CLS first; topk_idx[b] [k], target[b] [1+k, H, L_b]. Mean over (image, row, head), 0-dim fp32."""
    if q.dim() != 3 or q.shape != k.shape:
        raise ValueError(f"relation_loss_ragged: q and k must be [T, H, d] of one shape, got "
                         f"{tuple(q.shape)} and {tuple(k.shape)}")
    lengths = _check_lengths(lengths, q.shape[0], "relation_loss_ragged", 2)
    if len(topk_idx) != len(lengths) or len(target) != len(lengths):
        raise ValueError(f"relation_loss_ragged: topk_idx and target must hold {len(lengths)} images, "
                         f"got {len(topk_idx)} and {len(target)}")
    groups, rows = length_groups(lengths), _Rows(lengths, q.device)
    total = 0.0
    for n, ids in groups:
        idx, tgt = _stacked(topk_idx, ids, "topk_idx"), _stacked(target, ids, "target")
        try:
            loss = ops.relation_loss(_as_heads(rows(q, n, ids)), _as_heads(rows(k, n, ids)), idx.to(q.device),
                                     tgt.to(q.device), tau, scale)
        except ValueError as exc:
            raise _in_group("relation_loss_ragged", n, ids, exc) from None
        if len(groups) == 1:
            return loss
        total = total + loss * len(ids)
    return total / len(lengths)


def _in_group(what: str, n: int, ids: List[int], exc: ValueError) -> ValueError:
    """The dense op's error on one length group, said of the caller's images: which ones, their
    size, and that the shapes quoted are the group's stacked batch."""
    who = f"image {ids[0]}" if len(ids) == 1 else f"images {ids[:8]}{'...' if len(ids) > 8 else ''}"
    return ValueError(f"{what}: {who} ({n} tokens: L = {n - 1} patches; checked stacked as one "
                      f"[{len(ids)}, ...] batch): {exc}")


def _stacked(per_image: Sequence[torch.Tensor], ids: List[int], name: str) -> torch.Tensor:
    """``per_image``'s entries of images ``ids`` (one token count) stacked; a ``ValueError``
    naming the argument and the first image that does not stack with the first (checked only
    when the stack fails: nothing is spent on the common case)."""
    try:
        return torch.stack([per_image[b] for b in ids])
    except (RuntimeError, TypeError):
        for b in ids:
            t = per_image[b]
            if not isinstance(t, torch.Tensor):
                raise ValueError(f"relation_loss_ragged: {name}[{b}] must be a tensor, got {type(t).__name__}") from None
            if t.shape != per_image[ids[0]].shape:
                raise ValueError(f"relation_loss_ragged: {name}[{b}] must be shaped like {name}[{ids[0]}] (images "
                                 f"of one token count share k), got {tuple(t.shape)} against "
                                 f"{tuple(per_image[ids[0]].shape)}") from None
        raise
