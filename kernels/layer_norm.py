"""layer_norm: a ViT block's LayerNorm with the residual add before it fused in, forward and backward.

    h = x + residual          (when a residual is given; h is the block's residual stream)
    y = (h - mean_C(h)) / sqrt(var_C(h) + eps) * weight + bias          x, residual [..., C]

A pre-norm ViT block computes ``x = x + attn(norm1(x)); x = x + mlp(norm2(x))``: each add is
followed by the next LayerNorm, so fusing them reads x and the branch once and writes h and y once
instead of writing h, reading it back for the statistics and again for the normalisation.
Forward: one program per row (the whole row in registers: C <= 4096 is 16 fp32 values per
thread at 8 warps), fp32 statistics, mean and rstd kept for backward. Backward: persistent
programs walk their rows; dh = rstd (dy w - xhat mean(dy w xhat) - mean(dy w)) plus the gradient
arriving at h directly, written once (it is both dx and dresidual); weight and bias gradients as
per-program partial sums, added up by torch. y and h have x's dtype.
Reference: ``torch.nn.functional.layer_norm`` of ``x + residual``.
"""
from __future__ import annotations

import functools
from typing import List, Optional, Tuple, Union

import torch
import triton
import triton.language as tl

from tec_fast.kernels._common import cdiv, direct_launch, dtype_reasons, next_pow2, persistent_programs

MAX_C = 4096  # one row in registers (16 fp32 values per thread and tensor at 8 warps)


@triton.jit
def _layer_norm_fwd_kernel(x_ptr, res_ptr, w_ptr, b_ptr, y_ptr, h_ptr, mean_ptr, rstd_ptr,
                           C, eps, stride_x, stride_r,
                           HAS_RES: tl.constexpr, BLOCK_C: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cc = tl.arange(0, BLOCK_C)
    ok = cc < C
    h = tl.load(x_ptr + row * stride_x + cc, mask=ok, other=0.0).to(tl.float32)
    if HAS_RES:
        h += tl.load(res_ptr + row * stride_r + cc, mask=ok, other=0.0).to(tl.float32)
        h = h.to(h_ptr.dtype.element_ty).to(tl.float32)  # normalise the h that is stored, as eager does
        tl.store(h_ptr + row * C + cc, h.to(h_ptr.dtype.element_ty), mask=ok)
    mean = tl.sum(h, axis=0) / C
    hc = tl.where(ok, h - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(hc * hc, axis=0) / C + eps)
    w = tl.load(w_ptr + cc, mask=ok, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + cc, mask=ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * C + cc, (hc * rstd * w + b).to(y_ptr.dtype.element_ty), mask=ok)
    tl.store(mean_ptr + row, mean)
    tl.store(rstd_ptr + row, rstd)


@triton.jit
def _layer_norm_bwd_kernel(dy_ptr, dh_out_ptr, h_ptr, w_ptr, mean_ptr, rstd_ptr, dx_ptr,
                           dw_part_ptr, db_part_ptr, rows, C, rows_per_prog,
                           HAS_DH: tl.constexpr, BLOCK_C: tl.constexpr):
    pid = tl.program_id(0)
    cc = tl.arange(0, BLOCK_C)
    ok = cc < C
    w = tl.load(w_ptr + cc, mask=ok, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK_C,), tl.float32)
    db = tl.zeros((BLOCK_C,), tl.float32)
    first = pid * rows_per_prog
    start = first.to(tl.int64) * C + cc  # 64-bit row offsets, advanced row by row
    h_row, dy_row, dh_row, dx_row = h_ptr + start, dy_ptr + start, dh_out_ptr + start, dx_ptr + start
    for r in range(first, tl.minimum(first + rows_per_prog, rows)):
        h = tl.load(h_row, mask=ok, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + r)
        xhat = tl.where(ok, (h - tl.load(mean_ptr + r)) * rstd, 0.0)
        dy = tl.load(dy_row, mask=ok, other=0.0).to(tl.float32)
        dw += dy * xhat
        db += dy
        dxhat = dy * w
        c1 = tl.sum(dxhat * xhat, axis=0) / C
        c2 = tl.sum(dxhat, axis=0) / C
        dh = (dxhat - xhat * c1 - c2) * rstd
        if HAS_DH:
            dh += tl.load(dh_row, mask=ok, other=0.0).to(tl.float32)
        tl.store(dx_row, dh.to(dx_ptr.dtype.element_ty), mask=ok)
        h_row += C
        dy_row += C
        dh_row += C
        dx_row += C
    tl.store(dw_part_ptr + pid * C + cc, dw, mask=ok)
    tl.store(db_part_ptr + pid * C + cc, db, mask=ok)


@functools.lru_cache(maxsize=None)
def _fwd_config(C: int) -> Tuple[int, int]:
    """(BLOCK_C, num_warps): the whole row in one program."""
    block_c = next_pow2(C)
    return block_c, 4 if block_c <= 1024 else 8


@functools.lru_cache(maxsize=None)
def _bwd_config(rows: int, C: int, device: torch.device) -> Tuple[int, int]:
    """(programs, rows per program) of the persistent backward."""
    n_prog = persistent_programs(rows, device)
    rows_per_prog = cdiv(max(rows, 1), n_prog)
    return cdiv(max(rows, 1), rows_per_prog), rows_per_prog


def _layer_norm_fwd(x: torch.Tensor, residual: Optional[torch.Tensor], weight: torch.Tensor,
                    bias: torch.Tensor, eps: float):
    """x, residual [rows, C] (unit channel stride) -> (y [rows, C], h [rows, C] or an empty
    tensor without a residual, mean [rows], rstd [rows])."""
    rows, C = x.shape
    dev = x.device
    y = torch.empty((rows, C), dtype=x.dtype, device=dev)
    h = torch.empty((rows, C) if residual is not None else (0,), dtype=x.dtype, device=dev)
    mean = torch.empty((rows,), dtype=torch.float32, device=dev)
    rstd = torch.empty((rows,), dtype=torch.float32, device=dev)
    if rows:
        block_c, num_warps = _fwd_config(C)
        _layer_norm_fwd_kernel[(rows,)](
            x, residual if residual is not None else x, weight, bias, y, h, mean, rstd,
            C, eps, x.stride(0), residual.stride(0) if residual is not None else 0,
            HAS_RES=residual is not None, BLOCK_C=block_c, num_warps=num_warps)
    return y, h, mean, rstd


def _layer_norm_bwd(dy: torch.Tensor, dh_out: Optional[torch.Tensor], h: torch.Tensor, weight: torch.Tensor,
                    mean: torch.Tensor, rstd: torch.Tensor):
    """dy, dh_out, h [rows, C] (contiguous) -> (dh [rows, C] in h's dtype, [dweight; dbias] [2, C] fp32)."""
    rows, C = h.shape
    dev = h.device
    dx = torch.empty((rows, C), dtype=h.dtype, device=dev)
    n_prog, rows_per_prog = _bwd_config(rows, C, dev)
    # weight and bias partial sums in one buffer: one reduction launch for both
    parts = torch.empty((2, n_prog, C), dtype=torch.float32, device=dev)
    if rows:
        block_c, num_warps = _fwd_config(C)
        _layer_norm_bwd_kernel[(n_prog,)](
            dy, dh_out if dh_out is not None else dy, h, weight, mean, rstd, dx, parts[0], parts[1],
            rows, C, rows_per_prog, HAS_DH=dh_out is not None, BLOCK_C=block_c, num_warps=num_warps)
    else:
        parts.zero_()
    return dx, parts.sum(1)


# ---- torch.library registration: what torch.compile and dispatch modes see -------------------

@torch.library.custom_op("tec_fast::layer_norm", mutates_args=())
def _layer_norm_op(x: torch.Tensor, residual: Optional[torch.Tensor], weight: torch.Tensor, bias: torch.Tensor,
                   eps: float) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _layer_norm_fwd(x, residual, weight, bias, eps)


@_layer_norm_op.register_fake
def _(x, residual, weight, bias, eps):
    rows, C = x.shape
    f32 = dict(dtype=torch.float32)
    return (x.new_empty((rows, C)), x.new_empty((rows, C) if residual is not None else (0,)),
            x.new_empty((rows,), **f32), x.new_empty((rows,), **f32))


@torch.library.custom_op("tec_fast::layer_norm_backward", mutates_args=())
def _layer_norm_backward_op(dy: torch.Tensor, dh_out: Optional[torch.Tensor], h: torch.Tensor,
                            weight: torch.Tensor, mean: torch.Tensor,
                            rstd: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    return _layer_norm_bwd(dy, dh_out, h, weight, mean, rstd)


@_layer_norm_backward_op.register_fake
def _(dy, dh_out, h, weight, mean, rstd):
    C = h.shape[1]
    return h.new_empty(h.shape), h.new_empty((2, C), dtype=torch.float32)


# ---- autograd ---------------------------------------------------------------------------------

def _rows_2d(t: torch.Tensor, C: int) -> torch.Tensor:
    """[..., C] as [rows, C] with a unit channel stride (a view whenever the layout allows)."""
    t = t.reshape(-1, C)
    return t if t.stride(-1) == 1 else t.contiguous()


class _LayerNorm(torch.autograd.Function):
    """x, residual [..., C] -> (y, h) shaped like x (h empty without a residual). Saves h (or
    x), the weight and the row statistics; the backward writes dh once (it is both dx and
    dresidual) and the weight and bias gradients as one [2, C] sum."""

    @staticmethod
    def forward(ctx, x, residual, weight, bias, eps):
        C = x.shape[-1]
        fwd = _layer_norm_fwd if direct_launch() else _layer_norm_op
        y, h, mean, rstd = fwd(_rows_2d(x, C), None if residual is None else _rows_2d(residual, C),
                               weight.contiguous(), bias.contiguous(), eps)
        ctx.set_materialize_grads(False)  # no zero gradients (and launches) for an unused y or h
        ctx.has_res = residual is not None
        ctx.save_for_backward(h if ctx.has_res else _rows_2d(x, C), weight, mean, rstd)
        ctx.w_dtype, ctx.b_dtype, ctx.x_shape = weight.dtype, bias.dtype, x.shape
        return y.view(x.shape), (h.view(x.shape) if ctx.has_res else h)

    @staticmethod
    def backward(ctx, dy, dh_out):
        h, weight, mean, rstd = ctx.saved_tensors
        dh_out = dh_out if ctx.has_res else None
        if dy is None and dh_out is None:
            return None, None, None, None, None
        rows, C = h.shape
        dy = h.new_zeros(h.shape) if dy is None else dy.reshape(rows, C).contiguous()
        if dh_out is not None:
            dh_out = dh_out.reshape(rows, C).contiguous()
        bwd = _layer_norm_bwd if direct_launch() else _layer_norm_backward_op
        dx, dwb = bwd(dy, dh_out, h, weight, mean, rstd)
        need = ctx.needs_input_grad
        dx = dx.view(ctx.x_shape)
        return (dx if need[0] else None, dx if ctx.has_res and need[1] else None,
                dwb[0].to(ctx.w_dtype) if need[2] else None, dwb[1].to(ctx.b_dtype) if need[3] else None, None)


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-6,
               residual: Optional[torch.Tensor] = None) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """LayerNorm over the last dimension of ``x`` (or of ``h = x + residual``).

    Returns y (without a residual) or (y, h) (with one), both shaped like x and in x's dtype.
    ``residual`` must have x's shape and dtype; weight and bias are [C]. Differentiable in all
    tensors; the gradient of h is added to the LayerNorm's before it is handed to x and residual.
    """
    if x.shape[-1] > MAX_C:
        raise ValueError(f"layer_norm: C={x.shape[-1]} > {MAX_C} (one row is held in registers)")
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype):
        raise ValueError(f"layer_norm: residual must match x ({tuple(x.shape)}, {x.dtype}), got "
                         f"{tuple(residual.shape)}, {residual.dtype}")
    y, h = _LayerNorm.apply(x, residual, weight, bias, float(eps))
    return y if residual is None else (y, h)
def not_supported_reasons(dtype: torch.dtype, shape: Tuple[int, ...], residual_dtype=None,
                          **_info) -> List[str]:
    """Why this kernel cannot take x of ``dtype`` / ``shape`` (empty: it can)."""
    reasons = dtype_reasons(dtype)
    if shape and shape[-1] > MAX_C:
        reasons.append(f"width {shape[-1]} > {MAX_C} (one row is held in registers)")
    if residual_dtype is not None and residual_dtype != dtype:
        reasons.append(f"residual dtype {residual_dtype} differs from x's {dtype}")
    return reasons
