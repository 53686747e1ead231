"""relation_targets: the base model's patch-relation targets (docs/tec.md §1) without an N x N matrix.

From the last block's q, k [B, H, N, d] (token 0 = CLS):
    r[b, l]        = mean_h  scale * q[b,h,0] . k[b,h,1+l]              ranking, [B, L]
    idx            = topk(r, k)                                          [B, k]
    relation[b, i] = scale * q[b,h,row_i] . k[b,h,1+l]  for rows (0, idx+1)   [B, 1+k, H, L]

Two kernels and a torch.topk between them (ties broken exactly as torch.topk does):
the ranking kernel reads q's CLS rows and all of k once; the rows kernel computes the 1+k
logit rows per (image, head) with one tl.dot per block of keys. Memory O(B H (1+k) L) instead
of the O(B H N^2) of materialising the attention logits. No gradient (targets are constants).
Reference: ``tec_fast.ops.reference.relation_targets``.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import triton
import triton.language as tl

from tec_fast.kernels._common import (cdiv, direct_launch, launch, relation_block_sizes, relation_reasons,
                                      unit_last_stride)


@triton.jit
def _relation_rank_kernel(q_ptr, k_ptr, rank_ptr, H, L, D, scale,
                          stride_qb, stride_qh, stride_kb, stride_kh, stride_kn,
                          BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    ls = tl.program_id(1) * BLOCK_L + tl.arange(0, BLOCK_L)
    ds = tl.arange(0, BLOCK_D)
    l_ok = ls < L
    d_ok = ds < D
    acc = tl.zeros((BLOCK_L,), dtype=tl.float32)
    for h in range(H):
        q0 = tl.load(q_ptr + b * stride_qb + h * stride_qh + ds, mask=d_ok, other=0.0).to(tl.float32)
        kt = tl.load(k_ptr + b * stride_kb + h * stride_kh + (1 + ls[:, None]) * stride_kn + ds[None, :],
                     mask=l_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
        acc += tl.sum(kt * q0[None, :], axis=1)
    tl.store(rank_ptr + b * L + ls, acc * (scale / H), mask=l_ok)


@triton.jit
def _relation_rows_kernel(q_ptr, k_ptr, idx_ptr, rel_ptr, H, L, D, TOPK, scale,
                          stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
                          stride_rb, stride_rr, stride_rh,
                          BLOCK_R: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
                          DOT_PRECISION: tl.constexpr):
    pid_bh = tl.program_id(0)
    b = (pid_bh // H).to(tl.int64)
    h = pid_bh % H
    rs = tl.arange(0, BLOCK_R)  # output row: 0 = CLS, i >= 1 = i-th top patch
    r_ok = rs <= TOPK
    top = tl.load(idx_ptr + b * TOPK + rs - 1, mask=(rs >= 1) & r_ok, other=-1).to(tl.int64)
    tok = tl.where(rs == 0, 0, top + 1)
    ds = tl.arange(0, BLOCK_D)
    d_ok = ds < D
    q = tl.load(q_ptr + b * stride_qb + h * stride_qh + tok[:, None] * stride_qn + ds[None, :],
                mask=r_ok[:, None] & d_ok[None, :], other=0.0)
    ls = tl.program_id(1) * BLOCK_L + tl.arange(0, BLOCK_L)
    l_ok = ls < L
    kt = tl.load(k_ptr + b * stride_kb + h * stride_kh + (1 + ls[:, None]) * stride_kn + ds[None, :],
                 mask=l_ok[:, None] & d_ok[None, :], other=0.0)
    s = tl.dot(q, tl.trans(kt), input_precision=DOT_PRECISION) * scale  # [BLOCK_R, BLOCK_L] fp32
    tl.store(rel_ptr + b * stride_rb + rs[:, None] * stride_rr + h * stride_rh + ls[None, :], s,
             mask=r_ok[:, None] & l_ok[None, :])


def _relation_targets_fwd(q: torch.Tensor, k: torch.Tensor, topk: int,
                          scale: float) -> Tuple[torch.Tensor, torch.Tensor]:
    q, k = unit_last_stride(q), unit_last_stride(k)
    B, H, N, D = q.shape
    L = N - 1
    block_r, block_l, block_d = relation_block_sizes(topk, D, q.dtype)
    rank = torch.empty((B, L), dtype=torch.float32, device=q.device)
    launch(_relation_rank_kernel, (B, cdiv(L, block_l)),
        q, k, rank, H, L, D, scale, q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2),
        BLOCK_L=block_l, BLOCK_D=block_d, num_warps=4)
    topk_idx = torch.topk(rank, topk, dim=1, largest=True).indices  # [B, k]
    relation = torch.empty((B, 1 + topk, H, L), dtype=torch.float32, device=q.device)
    if k.dtype != q.dtype:
        k = k.to(q.dtype)
    launch(_relation_rows_kernel, (B * H, cdiv(L, block_l)),
        q, k, topk_idx, relation, H, L, D, topk, scale,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        relation.stride(0), relation.stride(1), relation.stride(2),
        BLOCK_R=block_r, BLOCK_L=block_l, BLOCK_D=block_d,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32", num_warps=4)
    return relation, topk_idx


# ---- torch.library registration: what torch.compile and dispatch modes see -------------------

@torch.library.custom_op("tec_fast::relation_targets", mutates_args=())
def _relation_targets_op(q: torch.Tensor, k: torch.Tensor, topk: int,
                         scale: float) -> Tuple[torch.Tensor, torch.Tensor]:
    return _relation_targets_fwd(q, k, topk, scale)


@_relation_targets_op.register_fake
def _(q, k, topk, scale):
    B, H, N, _ = q.shape
    return (q.new_empty((B, 1 + topk, H, N - 1), dtype=torch.float32),
            q.new_empty((B, topk), dtype=torch.int64))


def relation_targets(q: torch.Tensor, k: torch.Tensor, topk: int,
                     scale: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """Triton path of ``tec_fast.ops.relation_targets`` (inputs already validated there).
    Returns (relation [B, 1+topk, H, L] fp32, topk_idx [B, topk] int64); no gradient."""
    fwd = _relation_targets_fwd if direct_launch() else _relation_targets_op  # no gradient: no Function
    return fwd(q.detach(), k.detach(), int(topk), float(scale))


def not_supported_reasons(dtype: torch.dtype, shape: Tuple[int, ...], topk: Optional[int] = None,
                          **_info) -> List[str]:
    """Why this kernel cannot take q [B, H, N, d] of ``dtype`` / ``shape`` (empty: it can)."""
    return relation_reasons(dtype, shape, topk)
