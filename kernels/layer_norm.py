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
per-program partial sums, added up by a second launch in the parameters' dtypes. y and h have
x's dtype.
Reference: ``torch.nn.functional.layer_norm`` of ``x + residual``.
"""
from __future__ import annotations

import functools
from typing import List, Optional, Tuple, Union

import torch
import triton
import triton.language as tl

from tec_fast.kernels._common import (LaunchConfig, cdiv, direct_launch, dtype_reasons, eager_apply, first_order,
                                      launch_with, next_pow2, persistent_programs, unit_last_stride)

MAX_C = 4096  # one row in registers (16 fp32 values per thread and tensor at 8 warps)


@triton.jit
def _layer_norm_fwd_kernel(x_ptr, res_ptr, w_ptr, b_ptr, y_ptr, h_ptr, stats_ptr,
                           rows, C, eps, stride_x, stride_r,
                           HAS_RES: tl.constexpr, HAS_STATS: tl.constexpr, BLOCK_C: tl.constexpr):
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
    if HAS_STATS:  # for the backward; none without a gradient to compute
        tl.store(stats_ptr + row, mean)  # stats: [mean; rstd] [2, rows]
        tl.store(stats_ptr + rows + row, rstd)


@triton.jit
def _layer_norm_bwd_kernel(dy_ptr, dh_out_ptr, h_ptr, w_ptr, stats_ptr, dx_ptr, part_ptr,
                           rows, C, rows_per_prog,
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
        rstd = tl.load(stats_ptr + rows + r)
        xhat = tl.where(ok, (h - tl.load(stats_ptr + r)) * rstd, 0.0)
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
    # part: [2, programs, C], weight then bias partial sums
    tl.store(part_ptr + pid * C + cc, dw, mask=ok)
    tl.store(part_ptr + (tl.num_programs(0) + pid) * C + cc, db, mask=ok)


@triton.jit
def _layer_norm_dwdb_kernel(part_ptr, dw_ptr, db_ptr, n_parts, C, s_part, s_out,
                            BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """dweight, dbias [C] (in their parameters' dtypes) = the sums over the backward's
    per-program partials part [2, n_parts, C]: one launch and no fp32 [2, C] result to split
    and cast on the host. Axis 1 of the grid walks several LayerNorms' partials at once (a
    stack of blocks): LayerNorm r reads part + r s_part and writes dw + r s_out, db + r s_out."""
    r = tl.program_id(1).to(tl.int64)
    part_ptr += r * s_part
    dw_ptr += r * s_out
    db_ptr += r * s_out
    cc = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    ok = cc < C
    acc_w = tl.zeros((BLOCK_P, BLOCK_C), tl.float32)
    acc_b = tl.zeros((BLOCK_P, BLOCK_C), tl.float32)
    for p0 in range(0, n_parts, BLOCK_P):
        pp = p0 + tl.arange(0, BLOCK_P)
        offs = pp[:, None].to(tl.int64) * C + cc[None, :]
        m = (pp[:, None] < n_parts) & ok[None, :]
        acc_w += tl.load(part_ptr + offs, mask=m, other=0.0)
        acc_b += tl.load(part_ptr + n_parts * C + offs, mask=m, other=0.0)
    tl.store(dw_ptr + cc, tl.sum(acc_w, axis=0).to(dw_ptr.dtype.element_ty), mask=ok)
    tl.store(db_ptr + cc, tl.sum(acc_b, axis=0).to(db_ptr.dtype.element_ty), mask=ok)


@functools.lru_cache(maxsize=None)
def _fwd_config(C: int) -> Tuple[int, int]:
    """(BLOCK_C, num_warps): the whole row in one program."""
    block_c = next_pow2(C)
    return block_c, 4 if block_c <= 1024 else 8


@functools.lru_cache(maxsize=None)
def _fwd_launch(C: int, has_res: bool, keep_stats: bool) -> LaunchConfig:
    block_c, num_warps = _fwd_config(C)
    return LaunchConfig(HAS_RES=has_res, HAS_STATS=keep_stats, BLOCK_C=block_c, num_warps=num_warps)


@functools.lru_cache(maxsize=None)
def _bwd_rows_launch(C: int, has_dh: bool) -> LaunchConfig:
    block_c, num_warps = _fwd_config(C)
    return LaunchConfig(HAS_DH=has_dh, BLOCK_C=block_c, num_warps=num_warps)


@functools.lru_cache(maxsize=None)
def _dwdb_launch(block_p: int, block_c: int) -> LaunchConfig:
    return LaunchConfig(BLOCK_P=block_p, BLOCK_C=block_c, num_warps=4)


@functools.lru_cache(maxsize=None)
def _bwd_config(rows: int, C: int, device: torch.device) -> Tuple[int, int]:
    """(programs, rows per program) of the persistent backward."""
    n_prog = persistent_programs(rows, device)
    rows_per_prog = cdiv(max(rows, 1), n_prog)
    return cdiv(max(rows, 1), rows_per_prog), rows_per_prog


@functools.lru_cache(maxsize=None)
def _dwdb_config(n_parts: int, C: int) -> Tuple[int, int, int]:
    """(BLOCK_P, BLOCK_C, column blocks) of the partial-sum reduction: tiles of about 4K fp32
    values per tensor, 64 columns wide at most so a ViT-B row (768) spreads over 12 programs."""
    block_c = min(next_pow2(C), 64)
    block_p = max(1, min(next_pow2(n_parts), 4096 // block_c))
    return block_p, block_c, cdiv(C, block_c)


def _as_rows(t: torch.Tensor, C: int) -> Tuple[torch.Tensor, int]:
    """``t`` [..., C] and the stride between its rows: ``t`` itself when contiguous, else a
    [rows, C] view (or copy) with a unit channel stride."""
    if t.is_contiguous():
        return t, C
    t = t.reshape(-1, C)
    t = t if t.stride(-1) == 1 else t.contiguous()
    return t, t.stride(0)


def _layer_norm_fwd(x: torch.Tensor, residual: Optional[torch.Tensor], weight: torch.Tensor,
                    bias: torch.Tensor, eps: float, keep_stats: bool = True, y_dtype: Optional[torch.dtype] = None,
                    y: Optional[torch.Tensor] = None, h: Optional[torch.Tensor] = None,
                    stats: Optional[torch.Tensor] = None):
    """x, residual [..., C] -> (y shaped like x, in ``y_dtype`` (default x's: what the next GEMM
    reads, so no cast of y is made), h shaped like x or None without a residual, [mean; rstd]
    [2, rows] fp32 or None without ``keep_stats``). Nothing is allocated that the call does not
    return (each allocation is a dispatcher call on the host). ``y``, ``h``, ``stats``: where to
    write them (contiguous, of those shapes and dtypes; a stack of blocks hands out views of
    one allocation), else new tensors."""
    C = x.shape[-1]
    rows = x.numel() // C if C else 0
    has_res = residual is not None
    if x.is_contiguous():  # empty_like is the cheapest allocation (on the host)
        if y is None:
            y = torch.empty_like(x) if y_dtype is None else torch.empty_like(x, dtype=y_dtype)
        if has_res and h is None:
            h = torch.empty_like(x)
        stride_x = C
    else:
        if y is None:
            y = torch.empty(x.shape, dtype=y_dtype or x.dtype, device=x.device)
        if has_res and h is None:
            h = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        x, stride_x = _as_rows(x, C)
    if not has_res:
        h = None
    if not keep_stats:
        stats = None
    elif stats is None:
        stats = torch.empty(2, rows, dtype=torch.float32, device=y.device)
    if rows:
        weight, bias = unit_last_stride(weight), unit_last_stride(bias)  # the kernel reads them densely
        residual, stride_r = ((residual, C) if residual.is_contiguous() else _as_rows(residual, C)) \
            if has_res else (x, 0)
        launch_with(_layer_norm_fwd_kernel, (rows,), _fwd_launch(C, has_res, keep_stats),
                    x, residual, weight, bias, y, h if has_res else y, stats if keep_stats else y, rows, C, eps,
                    stride_x, stride_r)
    return y, h, stats


def _layer_norm_bwd(dy: torch.Tensor, dh_out: Optional[torch.Tensor], h: torch.Tensor, weight: torch.Tensor,
                    stats: torch.Tensor, b_dtype: torch.dtype):
    """dy, dh_out, h [..., C] (contiguous), stats [2, rows] -> (dh shaped like h, in h's dtype;
    dweight [C] in weight's dtype; dbias [C] in ``b_dtype``)."""
    C = h.shape[-1]
    rows = h.numel() // C if C else 0
    dev = h.device
    weight = unit_last_stride(weight)  # read densely (a strided [C] view: a copy)
    dx = torch.empty_like(h)
    dw = torch.empty_like(weight)
    db = torch.empty(C, dtype=b_dtype, device=dev)
    n_prog, _ = _bwd_config(rows, C, dev)
    if not rows:
        return dx, dw.zero_(), db.zero_()
    # weight and bias partial sums in one buffer: one reduction launch for both
    parts = torch.empty(2, n_prog, C, dtype=torch.float32, device=dev)
    _layer_norm_bwd_rows(dy, dh_out, h, weight, stats, parts, dx)
    block_p, block_c, n_col = _dwdb_config(n_prog, C)
    launch_with(_layer_norm_dwdb_kernel, (n_col, 1), _dwdb_launch(block_p, block_c), parts, dw, db, n_prog, C, 0, 0)
    return dx, dw, db


def _layer_norm_bwd_rows(dy: torch.Tensor, dh_out: Optional[torch.Tensor], h: torch.Tensor, weight: torch.Tensor,
                         stats: torch.Tensor, parts: torch.Tensor, dx: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The row pass of ``_layer_norm_bwd`` (rows > 0, ``weight`` with a unit stride): -> dh
    (``dx``, or a new tensor shaped like h), the weight and bias partial sums written into
    ``parts`` [2, programs, C] (``_bwd_config``'s programs), for ``layer_norm_dwdb`` to sum."""
    C = h.shape[-1]
    rows = h.numel() // C
    dx = torch.empty_like(h) if dx is None else dx
    launch_with(_layer_norm_bwd_kernel, (parts.shape[1],), _bwd_rows_launch(C, dh_out is not None),
                dy, dh_out if dh_out is not None else dy, h, weight, stats, dx, parts, rows, C,
                _bwd_config(rows, C, h.device)[1])
    return dx


def layer_norm_dwdb(parts: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The weight and bias gradients of R LayerNorms from their partial sums parts
    [R, 2, programs, C] (contiguous, each written by ``_layer_norm_bwd_rows``) in one launch:
    -> [R, 2, C] in ``dtype`` (weight, bias); each LayerNorm's the values ``_layer_norm_bwd``
    gives, bitwise (the same sums in the same order)."""
    R, _, n_prog, C = parts.shape
    out = torch.empty(R, 2, C, dtype=dtype, device=parts.device)
    block_p, block_c, n_col = _dwdb_config(n_prog, C)
    launch_with(_layer_norm_dwdb_kernel, (n_col, R), _dwdb_launch(block_p, block_c), parts, out, out[0, 1], n_prog, C,
                2 * n_prog * C, 2 * C)
    return out


# ---- torch.library registration: what torch.compile and dispatch modes see -------------------

@torch.library.custom_op("tec_fast::layer_norm", mutates_args=())
def _layer_norm_op(x: torch.Tensor, residual: Optional[torch.Tensor], weight: torch.Tensor, bias: torch.Tensor,
                   eps: float) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    y, h, stats = _layer_norm_fwd(x, residual, weight, bias, eps)
    return y, (h if h is not None else x.new_empty((0,))), stats  # a custom op returns tensors


@_layer_norm_op.register_fake
def _(x, residual, weight, bias, eps):
    C = x.shape[-1]
    return (x.new_empty(x.shape), x.new_empty(x.shape if residual is not None else (0,)),
            x.new_empty((2, x.numel() // C if C else 0), dtype=torch.float32))


@torch.library.custom_op("tec_fast::layer_norm_backward", mutates_args=())
def _layer_norm_backward_op(dy: torch.Tensor, dh_out: Optional[torch.Tensor], h: torch.Tensor,
                            weight: torch.Tensor, stats: torch.Tensor, b_dtype: torch.dtype
                            ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _layer_norm_bwd(dy, dh_out, h, weight, stats, b_dtype)


@_layer_norm_backward_op.register_fake
def _(dy, dh_out, h, weight, stats, b_dtype):
    return h.new_empty(h.shape), weight.new_empty(weight.shape), weight.new_empty(weight.shape, dtype=b_dtype)


def layer_norm_forward(x: torch.Tensor, residual: Optional[torch.Tensor], weight: torch.Tensor,
                       bias: torch.Tensor, eps: float, keep_stats: bool = True, y_dtype: Optional[torch.dtype] = None,
                       **out: Optional[torch.Tensor]):
    """``_layer_norm_fwd``'s (y, h, stats) through the route the caller's context asks for: the
    launcher directly in plain eager mode (``direct_launch``), else the custom op (which always
    returns the statistics, and y in x's dtype, cast here to ``y_dtype``: the same values as the
    launcher's where x is fp32, the autocast case, y being rounded once from fp32 either way; h
    is None without a residual either way). ``out`` (y, h, stats: where to write them) goes to
    the launcher; the custom op returns new tensors. Callers use what is returned."""
    if direct_launch():
        return _layer_norm_fwd(x, residual, weight, bias, eps, keep_stats, y_dtype, **out)
    y, h, stats = _layer_norm_op(x, residual, weight, bias, eps)
    if y_dtype is not None and y.dtype != y_dtype:
        y = y.to(y_dtype)
    return y, (h if residual is not None else None), stats


# ---- autograd ---------------------------------------------------------------------------------

class _LayerNorm(torch.autograd.Function):
    """x, residual [..., C] -> (y, h) shaped like x, or y alone without a residual (a None
    output would reach torch.compile's backward as a gradient to make contiguous). Saves h (or
    x) and the weight, and keeps the row statistics (an intermediate) on ctx; the backward
    writes dh once (it is both dx and dresidual) and the weight and bias gradients in their
    parameters' dtypes."""

    @staticmethod
    def forward(ctx, x, residual, weight, bias, eps):
        y, h, stats = layer_norm_forward(x, residual, weight, bias, eps)
        ctx.set_materialize_grads(False)  # no zero gradients (and launches) for an unused y or h
        ctx.save_for_backward(x if h is None else h, weight)
        ctx.stats, ctx.has_res, ctx.b_dtype = stats, h is not None, bias.dtype
        return y if h is None else (y, h)

    @staticmethod
    @first_order("layer_norm")
    def backward(ctx, dy, dh_out=None):
        h, weight = ctx.saved_tensors
        if dy is None:
            if dh_out is None:
                return None, None, None, None, None
            dy = h.new_zeros(h.shape)
        elif not dy.is_contiguous():
            dy = dy.contiguous()
        if dh_out is not None and not dh_out.is_contiguous():
            dh_out = dh_out.contiguous()
        if not h.is_contiguous():  # x (no residual) as given; h is contiguous already
            h = h.contiguous()
        bwd = _layer_norm_bwd if direct_launch() else _layer_norm_backward_op
        dx, dw, db = bwd(dy, dh_out, h, weight, ctx.stats, ctx.b_dtype)
        need = ctx.needs_input_grad
        return (dx if need[0] else None, dx if ctx.has_res and need[1] else None,
                dw if need[2] else None, db if need[3] else None, None)


_apply = eager_apply(_LayerNorm)


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
    eps = float(eps)
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad or bias.requires_grad
                                    or (residual is not None and residual.requires_grad)):
        out = _apply(x, residual, weight, bias, eps)
        y, h = (out, None) if residual is None else out
    else:  # no gradient asked for (the frozen base): no autograd node, no statistics
        y, h, _ = layer_norm_forward(x, residual, weight, bias, eps, keep_stats=False)
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
