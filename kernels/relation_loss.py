"""relation_loss: TEC's relation loss (docs/tec.md §3), flash-style, forward and backward.

Student q, k [B, H, N, d]; rows (0, topk_idx+1) of q against the patch keys k[:, :, 1:]:
    R[b, i, h, l] = scale * q[b,h,row_i] . k[b,h,1+l]                 [B, 1+k, H, L]
    P = softmax(target / tau) over l;  loss_row = logsumexp_l(R) - sum_l P R
    loss = mean over (b, i, h) of loss_row        (= -sum_l P log_softmax(R), since sum P = 1)

One program per (image, head) holds its 1+k query rows and streams the keys in blocks: online
logsumexp of R and an online softmax of target/tau weighting R, so the [B, 1+k, H, L] logits are
never stored. It keeps two logsumexps per row. Backward recomputes R block by block:
dR = g (softmax(R) - P), dk[1+l] = scale dR^T q_rows (written once, each program owns its keys),
dq_rows = scale dR k accumulated in registers, then every row of dq written once by the same
program (zero for the tokens that are not query rows). Logits and softmaxes in fp32; tl.dot
operands in the input dtype (bf16 on tensor cores, fp32 exact "ieee"). A topk index outside
[0, L) gives a query row that reads and writes nothing; the forward kernel flags it and the
launch is followed by the op's error (``_common.check_index_flag``).
Reference: ``tec_fast.ops.reference.relation_loss``.
"""
from __future__ import annotations

import functools
from typing import List, Optional, Tuple

import torch
import triton
import triton.language as tl

from tec_fast.kernels._common import (check_index_flag, check_index_without_kernel, direct_launch, eager_apply,
                                      first_order, index_flag, launch, relation_block_sizes, relation_reasons,
                                      unit_last_stride)


@triton.jit
def _query_rows(idx_ptr, b, TOPK, L, BLOCK_R: tl.constexpr):
    """(row numbers, rows in use, their tokens, rows whose topk index is outside [0, L)): row 0 is
    the CLS token, row i >= 1 token idx[i-1] + 1; a bad row's token is -1 (no token's)."""
    rs = tl.arange(0, BLOCK_R)
    r_ok = rs <= TOPK
    top = tl.load(idx_ptr + b * TOPK + rs - 1, mask=(rs >= 1) & r_ok, other=0).to(tl.int64)
    bad = r_ok & (rs >= 1) & ((top < 0) | (top >= L))
    return rs, r_ok, tl.where(rs == 0, 0, tl.where(bad, -1, top + 1)), bad


@triton.jit
def _load_query_rows(q_ptr, idx_ptr, b, h, TOPK, L, D, stride_qb, stride_qh, stride_qn,
                     BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """(q rows [BLOCK_R, BLOCK_D], row numbers, rows in use, their tokens): a bad row reads
    nothing (zeros)."""
    rs, r_ok, tok, bad = _query_rows(idx_ptr, b, TOPK, L, BLOCK_R)
    ds = tl.arange(0, BLOCK_D)
    q = tl.load(q_ptr + b * stride_qb + h * stride_qh + tok[:, None] * stride_qn + ds[None, :],
                mask=(r_ok & ~bad)[:, None] & (ds < D)[None, :], other=0.0)
    return q, rs, r_ok, tok


@triton.jit
def _relation_loss_fwd_kernel(q_ptr, k_ptr, idx_ptr, t_ptr, row_loss_ptr, lse_r_ptr, lse_t_ptr, ok_ptr,
                              H, L, D, TOPK, scale, inv_tau,
                              stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
                              stride_tb, stride_tr, stride_th,
                              BLOCK_R: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
                              DOT_PRECISION: tl.constexpr):
    pid = tl.program_id(0)
    b = (pid // H).to(tl.int64)
    h = pid % H
    q, rs, r_ok, _ = _load_query_rows(q_ptr, idx_ptr, b, h, TOPK, L, D, stride_qb, stride_qh, stride_qn,
                                      BLOCK_R, BLOCK_D)
    ds = tl.arange(0, BLOCK_D)
    d_ok = ds < D
    k_base = k_ptr + b * stride_kb + h * stride_kh + ds[None, :]
    t_base = t_ptr + b * stride_tb + rs[:, None] * stride_tr + h * stride_th
    m_r = tl.full((BLOCK_R,), float("-inf"), tl.float32)  # running max / sum of exp of R
    z_r = tl.zeros((BLOCK_R,), tl.float32)
    m_t = tl.full((BLOCK_R,), float("-inf"), tl.float32)  # same for target / tau ...
    z_t = tl.zeros((BLOCK_R,), tl.float32)
    w_t = tl.zeros((BLOCK_R,), tl.float32)  # ... and sum of exp(target / tau) * R
    for l0 in range(0, L, BLOCK_L):
        ls = l0 + tl.arange(0, BLOCK_L)
        l_ok = ls < L
        kt = tl.load(k_base + (1 + ls[:, None]) * stride_kn, mask=l_ok[:, None] & d_ok[None, :], other=0.0)
        s = tl.dot(q, tl.trans(kt), input_precision=DOT_PRECISION) * scale  # [BLOCK_R, BLOCK_L]
        t = tl.load(t_base + ls[None, :], mask=r_ok[:, None] & l_ok[None, :], other=0.0).to(tl.float32)
        s = tl.where(l_ok[None, :], s, float("-inf"))
        t = tl.where(l_ok[None, :], t * inv_tau, float("-inf"))
        m_new = tl.maximum(m_r, tl.max(s, axis=1))
        z_r = z_r * tl.exp(m_r - m_new) + tl.sum(tl.exp(s - m_new[:, None]), axis=1)
        m_r = m_new
        m_new = tl.maximum(m_t, tl.max(t, axis=1))
        alpha = tl.exp(m_t - m_new)
        e = tl.exp(t - m_new[:, None])
        z_t = z_t * alpha + tl.sum(e, axis=1)
        w_t = w_t * alpha + tl.sum(e * tl.where(l_ok[None, :], s, 0.0), axis=1)
        m_t = m_new
    lse_r = m_r + tl.log(z_r)
    out = (b * H + h) * (TOPK + 1) + rs
    tl.store(row_loss_ptr + out, lse_r - w_t / z_t, mask=r_ok)
    tl.store(lse_r_ptr + out, lse_r, mask=r_ok)
    tl.store(lse_t_ptr + out, m_t + tl.log(z_t), mask=r_ok)
    if h == 0:  # an index out of range: flagged (``check_index_flag``); the indices read again
        # here, where few registers are live (kept from the start, they cost a spill at ViT-B fp32)
        bad = _query_rows(idx_ptr, b, TOPK, L, BLOCK_R)[3]
        n_bad = tl.sum(bad.to(tl.int32), axis=0)
        tl.store(ok_ptr, n_bad * 0, mask=n_bad > 0)


@triton.jit
def _relation_loss_bwd_kernel(q_ptr, k_ptr, idx_ptr, t_ptr, grad_row_ptr, lse_r_ptr, lse_t_ptr,
                              dq_ptr, dk_ptr,
                              H, L, D, TOPK, scale, inv_tau,
                              stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
                              stride_tb, stride_tr, stride_th,
                              BLOCK_R: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
                              DOT_PRECISION: tl.constexpr):
    pid = tl.program_id(0)
    b = (pid // H).to(tl.int64)
    h = pid % H
    q, rs, r_ok, tok = _load_query_rows(q_ptr, idx_ptr, b, h, TOPK, L, D, stride_qb, stride_qh, stride_qn,
                                        BLOCK_R, BLOCK_D)
    ds = tl.arange(0, BLOCK_D)
    d_ok = ds < D
    row = (b * H + h) * (TOPK + 1) + rs
    g = tl.load(grad_row_ptr + row, mask=r_ok, other=0.0)
    lse_r = tl.load(lse_r_ptr + row, mask=r_ok, other=0.0)
    lse_t = tl.load(lse_t_ptr + row, mask=r_ok, other=0.0)
    k_base = k_ptr + b * stride_kb + h * stride_kh + ds[None, :]
    dk_base = dk_ptr + (b * H + h) * (L + 1) * D + ds[None, :]
    t_base = t_ptr + b * stride_tb + rs[:, None] * stride_tr + h * stride_th
    # the CLS key is not among the relation's keys: its gradient row is zero
    tl.store(dk_base, tl.zeros((1, BLOCK_D), tl.float32).to(dk_ptr.dtype.element_ty), mask=d_ok[None, :])
    dq = tl.zeros((BLOCK_R, BLOCK_D), tl.float32)
    for l0 in range(0, L, BLOCK_L):
        ls = l0 + tl.arange(0, BLOCK_L)
        l_ok = ls < L
        tile_ok = r_ok[:, None] & l_ok[None, :]
        kt = tl.load(k_base + (1 + ls[:, None]) * stride_kn, mask=l_ok[:, None] & d_ok[None, :], other=0.0)
        s = tl.dot(q, tl.trans(kt), input_precision=DOT_PRECISION) * scale
        t = tl.load(t_base + ls[None, :], mask=tile_ok, other=0.0).to(tl.float32)
        p_r = tl.exp(s - lse_r[:, None])
        p_t = tl.exp(t * inv_tau - lse_t[:, None])
        ds_ = tl.where(tile_ok, (p_r - p_t) * (g * scale)[:, None], 0.0)  # dLoss/dS * scale
        dq += tl.dot(ds_.to(kt.dtype), kt, input_precision=DOT_PRECISION)
        dk = tl.dot(tl.trans(ds_).to(q.dtype), q, input_precision=DOT_PRECISION)  # [BLOCK_L, BLOCK_D]
        tl.store(dk_base + (1 + ls[:, None]) * D, dk.to(dk_ptr.dtype.element_ty),
                 mask=l_ok[:, None] & d_ok[None, :])
    # dq of all N tokens, each row written once: row n is the sum of the query rows taken from
    # token n (a 0/1 selection matrix times dq: zero for tokens not queried, sums for repeats)
    dq_base = dq_ptr + (b * H + h) * (L + 1) * D + ds[None, :]
    for n0 in range(0, L + 1, BLOCK_L):
        ns = n0 + tl.arange(0, BLOCK_L)
        sel = tl.where((ns[:, None] == tok[None, :]) & r_ok[None, :], 1.0, 0.0)  # [BLOCK_L, BLOCK_R]
        dq_n = tl.dot(sel, dq, input_precision="ieee")
        tl.store(dq_base + ns[:, None] * D, dq_n.to(dq_ptr.dtype.element_ty),
                 mask=(ns < L + 1)[:, None] & d_ok[None, :])


def _common_args(q, k, target, topk_idx):
    B, H, N, D = q.shape
    return dict(H=H, L=N - 1, D=D, TOPK=topk_idx.shape[1],
                stride_qb=q.stride(0), stride_qh=q.stride(1), stride_qn=q.stride(2),
                stride_kb=k.stride(0), stride_kh=k.stride(1), stride_kn=k.stride(2),
                stride_tb=target.stride(0), stride_tr=target.stride(1), stride_th=target.stride(2))


def _prepare(q, k, topk_idx, target):
    q, k, target = unit_last_stride(q), unit_last_stride(k), unit_last_stride(target)
    if k.dtype != q.dtype:
        k = k.to(q.dtype)
    return q, k, topk_idx.contiguous(), target


def _meta(q, topk):
    return _meta_config(topk, q.shape[-1], q.dtype)


@functools.lru_cache(maxsize=None)
def _meta_config(topk: int, D: int, dtype: torch.dtype) -> dict:
    block_r, block_l, block_d = relation_block_sizes(topk, D, dtype)
    # 8 warps for fp32 tiles 128 wide: at 4 the backward spilled 524 B at ViT-H under Triton 3.6
    # (benchmarks/compile_report.py; 3.9 fitted it in 255 registers)
    wide_fp32 = dtype == torch.float32 and block_d >= 128
    return dict(BLOCK_R=block_r, BLOCK_L=block_l, BLOCK_D=block_d,
                DOT_PRECISION="ieee" if dtype == torch.float32 else "tf32", num_warps=8 if wide_fp32 else 4)


def _relation_loss_fwd(q, k, topk_idx, target, tau, scale):
    q, k, topk_idx, target = _prepare(q, k, topk_idx, target)
    B, H = q.shape[:2]
    R = 1 + topk_idx.shape[1]
    row_loss, lse_r, lse_t = (torch.empty((B, H, R), dtype=torch.float32, device=q.device) for _ in range(3))
    L = q.shape[2] - 1
    if B * H == 0:
        check_index_without_kernel(topk_idx, "topk_idx", L)
        return row_loss, lse_r, lse_t
    ok = index_flag(q.device)
    launch(_relation_loss_fwd_kernel, (B * H,),
        q, k, topk_idx, target, row_loss, lse_r, lse_t, ok, scale=scale, inv_tau=1.0 / tau,
        **_common_args(q, k, target, topk_idx), **_meta(q, topk_idx.shape[1]))
    check_index_flag(ok, topk_idx, "topk_idx", L)
    return row_loss, lse_r, lse_t


def _relation_loss_bwd(grad_rows, q, k, topk_idx, target, lse_r, lse_t, tau, scale):
    q_dtype, k_dtype = q.dtype, k.dtype
    q, k, topk_idx, target = _prepare(q, k, topk_idx, target)
    B, H, N, D = q.shape
    dq = torch.empty((B, H, N, D), dtype=q_dtype, device=q.device)  # every row written by the kernel
    dk = torch.empty((B, H, N, D), dtype=k_dtype, device=q.device)
    launch(_relation_loss_bwd_kernel, (B * H,),
        q, k, topk_idx, target, grad_rows.contiguous(), lse_r, lse_t, dq, dk,
        scale=scale, inv_tau=1.0 / tau,
        **_common_args(q, k, target, topk_idx), **_meta(q, topk_idx.shape[1]))
    return dq, dk


# ---- torch.library registration: what torch.compile and dispatch modes see -------------------

@torch.library.custom_op("tec_fast::relation_loss", mutates_args=())
def _relation_loss_op(q: torch.Tensor, k: torch.Tensor, topk_idx: torch.Tensor, target: torch.Tensor,
                      tau: float, scale: float) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _relation_loss_fwd(q, k, topk_idx, target, tau, scale)


@_relation_loss_op.register_fake
def _(q, k, topk_idx, target, tau, scale):
    shape = (q.shape[0], q.shape[1], 1 + topk_idx.shape[1])
    return tuple(q.new_empty(shape, dtype=torch.float32) for _ in range(3))


@torch.library.custom_op("tec_fast::relation_loss_backward", mutates_args=())
def _relation_loss_backward_op(grad_rows: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                               topk_idx: torch.Tensor, target: torch.Tensor, lse_r: torch.Tensor,
                               lse_t: torch.Tensor, tau: float, scale: float) -> Tuple[torch.Tensor, torch.Tensor]:
    return _relation_loss_bwd(grad_rows, q, k, topk_idx, target, lse_r, lse_t, tau, scale)


@_relation_loss_backward_op.register_fake
def _(grad_rows, q, k, topk_idx, target, lse_r, lse_t, tau, scale):
    return (q.new_empty(q.shape), k.new_empty(k.shape))


# ---- autograd ---------------------------------------------------------------------------------

class _RelationLoss(torch.autograd.Function):
    """Per-(image, head, row) losses [B, H, 1+k]; saves q, k, the indices, the target and the two
    log-sum-exps per row; the backward recomputes the logits block by block."""

    @staticmethod
    def forward(ctx, q, k, topk_idx, target, tau, scale):
        fwd = _relation_loss_fwd if direct_launch() else _relation_loss_op
        row_loss, lse_r, lse_t = fwd(q, k, topk_idx, target, tau, scale)
        ctx.save_for_backward(q, k, topk_idx, target, lse_r, lse_t)
        ctx.tau, ctx.scale = tau, scale
        return row_loss

    @staticmethod
    @first_order("relation_loss")
    def backward(ctx, grad_rows):
        need_q, need_k = ctx.needs_input_grad[:2]
        if not (need_q or need_k):
            return None, None, None, None, None, None
        q, k, topk_idx, target, lse_r, lse_t = ctx.saved_tensors
        bwd = _relation_loss_bwd if direct_launch() else _relation_loss_backward_op
        dq, dk = bwd(grad_rows, q, k, topk_idx, target, lse_r, lse_t, ctx.tau, ctx.scale)
        return dq if need_q else None, dk if need_k else None, None, None, None, None


_apply = eager_apply(_RelationLoss)


def relation_loss(q: torch.Tensor, k: torch.Tensor, topk_idx: torch.Tensor, target: torch.Tensor,
                  tau: float, scale: float) -> torch.Tensor:
    """Triton path of ``tec_fast.ops.relation_loss`` (inputs already validated there).
    Returns the 0-dim fp32 loss; differentiable w.r.t. q and k."""
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad):
        row_loss = _apply(q, k, topk_idx, target.detach(), float(tau), float(scale))
    else:
        fwd = _relation_loss_fwd if direct_launch() else _relation_loss_op
        row_loss = fwd(q, k, topk_idx, target, float(tau), float(scale))[0]
    return row_loss.mean()  # [B, H, 1+k] -> mean over (b, row, head)


def not_supported_reasons(dtype: torch.dtype, shape: Tuple[int, ...], topk: Optional[int] = None,
                          **_info) -> List[str]:
    """Why this kernel cannot take q [B, H, N, d] of ``dtype`` / ``shape`` (empty: it can)."""
    return relation_reasons(dtype, shape, topk)
