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

from typing import List, Optional, Tuple, Union

import torch
import triton
import triton.language as tl

from tec_fast.kernels._common import direct_launch, dtype_reasons, persistent_programs

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


def _num_warps(block_c: int) -> int:
    return 4 if block_c <= 1024 else 8


def _rows_2d(t: torch.Tensor) -> torch.Tensor:
    """[..., C] as [rows, C] with a unit channel stride (a view whenever the layout allows)."""
    t = t.reshape(-1, t.shape[-1])
    return t if t.stride(-1) == 1 else t.contiguous()


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
        block_c = triton.next_power_of_2(C)
        _layer_norm_fwd_kernel[(rows,)](
            x, residual if residual is not None else x, weight, bias, y, h, mean, rstd,
            C, eps, x.stride(0), residual.stride(0) if residual is not None else 0,
            HAS_RES=residual is not None, BLOCK_C=block_c, num_warps=_num_warps(block_c))
    return y, h, mean, rstd


def _layer_norm_bwd(dy: torch.Tensor, dh_out: Optional[torch.Tensor], h: torch.Tensor, weight: torch.Tensor,
                    mean: torch.Tensor, rstd: torch.Tensor):
    """dy, dh_out, h [rows, C] -> (dh [rows, C] in h's dtype, [dweight; dbias] [2, C] fp32)."""
    rows, C = h.shape
    dev = h.device
    dx = torch.empty((rows, C), dtype=h.dtype, device=dev)
    n_prog = persistent_programs(rows, dev)
    rows_per_prog = triton.cdiv(max(rows, 1), n_prog)
    n_prog = triton.cdiv(max(rows, 1), rows_per_prog)
    # weight and bias partial sums in one buffer: one reduction launch for both
    parts = torch.empty((2, n_prog, C), dtype=torch.float32, device=dev)
    dw_part, db_part = parts[0], parts[1]
    if rows:
        block_c = triton.next_power_of_2(C)
        _layer_norm_bwd_kernel[(n_prog,)](
            dy, dh_out if dh_out is not None else dy, h, weight, mean, rstd, dx, dw_part, db_part,
            rows, C, rows_per_prog, HAS_DH=dh_out is not None, BLOCK_C=block_c,
            num_warps=_num_warps(block_c))
    else:
        parts.zero_()
    return dx, parts.sum(1)


# ---- torch.library registration (so torch.compile traces the op) ---------------------------

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


def _setup_context(ctx, inputs, output):
    x, residual, weight, bias, _ = inputs
    _, h, mean, rstd = output
    ctx.mark_non_differentiable(mean, rstd)
    ctx.set_materialize_grads(False)  # no zero gradients (and launches) for mean, rstd and an unused h
    ctx.has_res = residual is not None
    ctx.save_for_backward(h if ctx.has_res else x, weight, mean, rstd)
    ctx.w_dtype, ctx.b_dtype = weight.dtype, bias.dtype


def _backward(ctx, dy, dh_out, _dmean=None, _drstd=None, bwd=_layer_norm_backward_op):
    h, weight, mean, rstd = ctx.saved_tensors
    dh_out = dh_out if ctx.has_res else None
    C = h.shape[1]
    if dy is None and dh_out is None:
        return None, None, None, None, None
    if dy is None:  # only h took part in the loss
        dy = h.new_zeros(h.shape)
    dx, (dw, db) = bwd(dy.reshape(-1, C).contiguous(),
                     None if dh_out is None else dh_out.reshape(-1, C).contiguous(), h, weight, mean, rstd)
    need = ctx.needs_input_grad
    return (dx if need[0] else None, dx if ctx.has_res and need[1] else None,
            dw.to(ctx.w_dtype) if need[2] else None, db.to(ctx.b_dtype) if need[3] else None, None)


_layer_norm_op.register_autograd(_backward, setup_context=_setup_context)


class _LayerNorm(torch.autograd.Function):
    """The eager route (``direct_launch``): the custom op's forward and backward without the
    custom-op machinery around them."""

    @staticmethod
    def forward(ctx, x, residual, weight, bias, eps):
        out = _layer_norm_fwd(x, residual, weight, bias, eps)
        _setup_context(ctx, (x, residual, weight, bias, eps), out)
        return out

    @staticmethod
    def backward(ctx, dy, dh_out, _dmean, _drstd):
        return _backward(ctx, dy, dh_out, bwd=_layer_norm_bwd)


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-6,
               residual: Optional[torch.Tensor] = None) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """LayerNorm over the last dimension of ``x`` (or of ``h = x + residual``).

    Returns y (without a residual) or (y, h) (with one), both shaped like x and in x's dtype.
    ``residual`` must have x's shape and dtype; weight and bias are [C]. Differentiable in all
    tensors; the gradient of h is added to the LayerNorm's before it is handed to x and residual.
    """
    C = x.shape[-1]
    if C > MAX_C:
        raise ValueError(f"layer_norm: C={C} > {MAX_C} (one row is held in registers)")
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype):
        raise ValueError(f"layer_norm: residual must match x ({tuple(x.shape)}, {x.dtype}), got "
                         f"{tuple(residual.shape)}, {residual.dtype}")
    op = _LayerNorm.apply if direct_launch() else _layer_norm_op
    y, h, _, _ = op(_rows_2d(x), None if residual is None else _rows_2d(residual),
                    weight.contiguous(), bias.contiguous(), float(eps))
    if residual is None:
        return y.view(x.shape)
    return y.view(x.shape), h.view(x.shape)


def not_supported_reasons(dtype: torch.dtype, shape: Tuple[int, ...], residual_dtype=None,
                          **_info) -> List[str]:
    """Why this kernel cannot take x of ``dtype`` / ``shape`` (empty: it can)."""
    reasons = dtype_reasons(dtype)
    if shape and shape[-1] > MAX_C:
        reasons.append(f"width {shape[-1]} > {MAX_C} (one row is held in registers)")
    if residual_dtype is not None and residual_dtype != dtype:
        reasons.append(f"residual dtype {residual_dtype} differs from x's {dtype}")
    return reasons
