"""patch_norm_mse: TEC's feature loss (docs/tec.md §3) with the patch-dimension normalisation fused in.

    t~[b, :, c] = (t[b, :, c] - mean_L) / sqrt(var_L + eps)        (unbiased variance over L)
    loss = sum_{b,j} mask[b,j] * mean_c (pred[b,j,c] - t~[b,j,c])^2 / sum mask

Forward: one program per (image, block of channels) walks the L patches twice: once for the
per-channel statistics (sums shifted by the first patch, so the one-pass variance does not
cancel), once for the masked squared error; it writes its partial sum and the statistics
(mean, rstd [B, C], kept for backward). Backward: the same walk once,
grad_pred = 2 g mask (pred - t~) / (C sum mask); no gradient to the target.
All arithmetic in fp32 whatever the input dtype; the loss is a 0-dim fp32 tensor.
Reference: ``tec_fast.ops.reference.patch_norm_mse``.
"""
from __future__ import annotations

import functools
from typing import List, Tuple

import torch
import triton
import triton.language as tl

from tec_fast.kernels._common import (cdiv, direct_launch, dtype_reasons, eager_apply, first_order, launch, next_pow2,
                                      unit_last_stride)


@triton.jit
def _patch_norm_mse_fwd_kernel(pred_ptr, target_ptr, mask_ptr, partial_ptr, mean_ptr, rstd_ptr,
                               L, C, eps,
                               stride_pb, stride_pl, stride_tb, stride_tl,
                               BLOCK_L: tl.constexpr, BLOCK_C: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < C
    t_base = target_ptr + b * stride_tb + cols[None, :]
    shift = tl.load(target_ptr + b * stride_tb + cols, mask=col_ok, other=0.0).to(tl.float32)
    s1 = tl.zeros((BLOCK_L, BLOCK_C), dtype=tl.float32)
    s2 = tl.zeros((BLOCK_L, BLOCK_C), dtype=tl.float32)
    for l0 in range(0, L, BLOCK_L):
        ls = l0 + tl.arange(0, BLOCK_L)
        m = (ls < L)[:, None] & col_ok[None, :]
        t = tl.load(t_base + ls[:, None] * stride_tl, mask=m, other=0.0).to(tl.float32)
        t = tl.where(m, t - shift[None, :], 0.0)
        s1 += t
        s2 += t * t
    d1 = tl.sum(s1, axis=0)
    mean_shifted = d1 / L
    var = (tl.sum(s2, axis=0) - d1 * mean_shifted) / (L - 1)
    mean = shift + mean_shifted
    rstd = 1.0 / tl.sqrt(tl.maximum(var, 0.0) + eps)
    tl.store(mean_ptr + b * C + cols, mean, mask=col_ok)
    tl.store(rstd_ptr + b * C + cols, rstd, mask=col_ok)

    acc = tl.zeros((BLOCK_L, BLOCK_C), dtype=tl.float32)
    for l0 in range(0, L, BLOCK_L):
        ls = l0 + tl.arange(0, BLOCK_L)
        l_ok = ls < L
        m = l_ok[:, None] & col_ok[None, :]
        t = tl.load(t_base + ls[:, None] * stride_tl, mask=m, other=0.0).to(tl.float32)
        p = tl.load(pred_ptr + b * stride_pb + ls[:, None] * stride_pl + cols[None, :],
                    mask=m, other=0.0).to(tl.float32)
        w = tl.load(mask_ptr + b * L + ls, mask=l_ok, other=0.0)
        diff = tl.where(m, p - (t - mean[None, :]) * rstd[None, :], 0.0)
        acc += w[:, None] * diff * diff
    tl.store(partial_ptr + b * tl.num_programs(1) + tl.program_id(1), tl.sum(tl.sum(acc, axis=1), axis=0))


@triton.jit
def _patch_norm_mse_bwd_kernel(pred_ptr, target_ptr, mask_ptr, mean_ptr, rstd_ptr, coef_ptr, grad_ptr,
                               L, C, stride_pb, stride_pl, stride_tb, stride_tl,
                               BLOCK_L: tl.constexpr, BLOCK_C: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < C
    mean = tl.load(mean_ptr + b * C + cols, mask=col_ok, other=0.0)
    rstd = tl.load(rstd_ptr + b * C + cols, mask=col_ok, other=0.0)
    coef = tl.load(coef_ptr)  # 2 * grad_loss / (C * sum mask), computed on the device
    for l0 in range(0, L, BLOCK_L):
        ls = l0 + tl.arange(0, BLOCK_L)
        l_ok = ls < L
        m = l_ok[:, None] & col_ok[None, :]
        t = tl.load(target_ptr + b * stride_tb + ls[:, None] * stride_tl + cols[None, :],
                    mask=m, other=0.0).to(tl.float32)
        p = tl.load(pred_ptr + b * stride_pb + ls[:, None] * stride_pl + cols[None, :],
                    mask=m, other=0.0).to(tl.float32)
        w = tl.load(mask_ptr + b * L + ls, mask=l_ok, other=0.0)
        g = (coef * w)[:, None] * (p - (t - mean[None, :]) * rstd[None, :])
        tl.store(grad_ptr + (b * L + ls[:, None]) * C + cols[None, :], g.to(grad_ptr.dtype.element_ty), mask=m)


@functools.lru_cache(maxsize=None)
def _launch_config(L: int, C: int) -> Tuple[int, int]:
    block_c = min(next_pow2(C), 64)
    block_l = min(next_pow2(L), max(1, 2048 // block_c))
    return block_l, block_c


def _patch_norm_mse_fwd(pred, target, mask, eps):
    pred, target = unit_last_stride(pred), unit_last_stride(target)
    B, L, C = pred.shape
    maskf = mask.to(torch.float32).contiguous()
    block_l, block_c = _launch_config(L, C)
    n_c = cdiv(C, block_c)
    partial = torch.empty((B, n_c), dtype=torch.float32, device=pred.device)
    mean = torch.empty((B, C), dtype=torch.float32, device=pred.device)
    rstd = torch.empty((B, C), dtype=torch.float32, device=pred.device)
    if pred.numel():
        launch(_patch_norm_mse_fwd_kernel, (B, n_c),
            pred, target, maskf, partial, mean, rstd, L, C, eps,
            pred.stride(0), pred.stride(1), target.stride(0), target.stride(1),
            BLOCK_L=block_l, BLOCK_C=block_c, num_warps=4)
    loss = partial.sum() / (C * maskf.sum())
    return loss, mean, rstd


def _patch_norm_mse_bwd(grad_loss, pred, target, mask, mean, rstd):
    pred, target = unit_last_stride(pred), unit_last_stride(target)
    B, L, C = pred.shape
    maskf = mask.to(torch.float32).contiguous()
    coef = (2.0 * grad_loss.to(torch.float32) / (C * maskf.sum())).reshape(1)
    grad = torch.empty((B, L, C), dtype=pred.dtype, device=pred.device)
    if pred.numel():
        block_l, block_c = _launch_config(L, C)
        launch(_patch_norm_mse_bwd_kernel, (B, cdiv(C, block_c)),
            pred, target, maskf, mean, rstd, coef, grad, L, C,
            pred.stride(0), pred.stride(1), target.stride(0), target.stride(1),
            BLOCK_L=block_l, BLOCK_C=block_c, num_warps=4)
    return grad


# ---- torch.library registration: what torch.compile and dispatch modes see -------------------

@torch.library.custom_op("tec_fast::patch_norm_mse", mutates_args=())
def _patch_norm_mse_op(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor,
                       eps: float) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _patch_norm_mse_fwd(pred, target, mask, eps)


@_patch_norm_mse_op.register_fake
def _(pred, target, mask, eps):
    B, _, C = pred.shape
    f32 = dict(dtype=torch.float32)
    return pred.new_empty((), **f32), pred.new_empty((B, C), **f32), pred.new_empty((B, C), **f32)


@torch.library.custom_op("tec_fast::patch_norm_mse_backward", mutates_args=())
def _patch_norm_mse_backward_op(grad_loss: torch.Tensor, pred: torch.Tensor, target: torch.Tensor,
                                mask: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor) -> torch.Tensor:
    return _patch_norm_mse_bwd(grad_loss, pred, target, mask, mean, rstd)


@_patch_norm_mse_backward_op.register_fake
def _(grad_loss, pred, target, mask, mean, rstd):
    return torch.empty_like(pred, memory_format=torch.contiguous_format)


# ---- autograd ---------------------------------------------------------------------------------

class _PatchNormMse(torch.autograd.Function):
    """Saves pred, target, mask and the per-(image, channel) statistics; gradient to pred only."""

    @staticmethod
    def forward(ctx, pred, target, mask, eps):
        fwd = _patch_norm_mse_fwd if direct_launch() else _patch_norm_mse_op
        loss, mean, rstd = fwd(pred, target, mask, eps)
        ctx.save_for_backward(pred, target, mask, mean, rstd)
        return loss

    @staticmethod
    @first_order("patch_norm_mse")
    def backward(ctx, grad_loss):
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        pred, target, mask, mean, rstd = ctx.saved_tensors
        bwd = _patch_norm_mse_bwd if direct_launch() else _patch_norm_mse_backward_op
        return bwd(grad_loss, pred, target, mask, mean, rstd), None, None, None


_apply = eager_apply(_PatchNormMse)


def patch_norm_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor,
                   eps: float = 1e-6) -> torch.Tensor:
    """Triton path of ``tec_fast.ops.patch_norm_mse`` (inputs already validated there)."""
    if not mask.is_floating_point():
        mask = mask.to(torch.float32)
    if torch.is_grad_enabled() and pred.requires_grad:
        return _apply(pred, target.detach(), mask.detach(), float(eps))
    return (_patch_norm_mse_fwd if direct_launch() else _patch_norm_mse_op)(pred, target, mask, float(eps))[0]


def not_supported_reasons(dtype: torch.dtype, shape: Tuple[int, ...], **_info) -> List[str]:
    """Why this kernel cannot take an input of ``dtype`` / ``shape`` (empty: it can)."""
    return dtype_reasons(dtype)
