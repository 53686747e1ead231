"""bias_gelu: the bias add and exact GELU after a ViT MLP's first Linear, forward and backward.

    y = gelu(x + bias) = 0.5 z (1 + erf(z / sqrt 2)),  z = x + bias        x [..., N], bias [N]

Run after a bias-free GEMM (``x @ W^T``) this replaces the GEMM's bias epilogue plus the GELU's
read and write of the [rows, 4C] hidden activation; backward recomputes z from x (nothing else
is saved) and produces dx = dy gelu'(z) and dbias = sum over rows of dx in one pass.
Forward: one program per [ROWS, BLOCK_N] tile. Backward: programs own a block of columns and a
slice of the rows, write dx once and their partial column sums for dbias (added up by torch).
Arithmetic in fp32; y and dx in x's dtype.
Reference: ``torch.nn.functional.gelu(x + bias)`` (approximate='none', nn.GELU's default).
"""
from __future__ import annotations

from typing import Tuple

import torch
import triton
import triton.language as tl

_SQRT1_2 = tl.constexpr(0.7071067811865476)
_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)


@triton.jit
def _bias_gelu_fwd_kernel(x_ptr, b_ptr, y_ptr, rows, N, stride_x,
                          ROWS: tl.constexpr, BLOCK_N: tl.constexpr):
    rs = tl.program_id(0) * ROWS + tl.arange(0, ROWS).to(tl.int64)
    ns = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = ns < N
    ok = (rs < rows)[:, None] & n_ok[None, :]
    z = tl.load(x_ptr + rs[:, None] * stride_x + ns[None, :], mask=ok, other=0.0).to(tl.float32)
    z += tl.load(b_ptr + ns, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    y = 0.5 * z * (1.0 + tl.math.erf(z * _SQRT1_2))
    tl.store(y_ptr + rs[:, None] * N + ns[None, :], y.to(y_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _bias_gelu_bwd_kernel(dy_ptr, x_ptr, b_ptr, dx_ptr, db_part_ptr, rows, N, rows_per_prog, stride_x,
                          ROWS: tl.constexpr, BLOCK_N: tl.constexpr):
    ns = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = ns < N
    bias = tl.load(b_ptr + ns, mask=n_ok, other=0.0).to(tl.float32)
    db = tl.zeros((ROWS, BLOCK_N), tl.float32)
    first = tl.program_id(1) * rows_per_prog
    last = tl.minimum(first + rows_per_prog, rows)
    for r0 in range(first, last, ROWS):
        rs = r0 + tl.arange(0, ROWS).to(tl.int64)
        ok = (rs < last)[:, None] & n_ok[None, :]
        z = tl.load(x_ptr + rs[:, None] * stride_x + ns[None, :], mask=ok, other=0.0).to(tl.float32)
        z += bias[None, :]
        dy = tl.load(dy_ptr + rs[:, None] * N + ns[None, :], mask=ok, other=0.0).to(tl.float32)
        cdf = 0.5 * (1.0 + tl.math.erf(z * _SQRT1_2))
        pdf = tl.exp(-0.5 * z * z) * _INV_SQRT_2PI
        dx = tl.where(ok, dy * (cdf + z * pdf), 0.0)
        db += dx
        tl.store(dx_ptr + rs[:, None] * N + ns[None, :], dx.to(dx_ptr.dtype.element_ty), mask=ok)
    tl.store(db_part_ptr + tl.program_id(1).to(tl.int64) * N + ns, tl.sum(db, axis=0), mask=n_ok)


_TILE = 2048  # elements per tile: 16 fp32 values per thread and tensor at 4 warps
_TARGET_PROGRAMS = 1024  # backward: split the rows until about this many programs run


def _tile(N: int) -> Tuple[int, int]:
    block_n = min(triton.next_power_of_2(N), 256)
    return max(1, _TILE // block_n), block_n


def _bias_gelu_fwd(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """x [rows, N] (unit column stride), bias [N] -> gelu(x + bias) [rows, N] in x's dtype."""
    rows, N = x.shape
    y = torch.empty((rows, N), dtype=x.dtype, device=x.device)
    if y.numel():
        r, block_n = _tile(N)
        _bias_gelu_fwd_kernel[(triton.cdiv(rows, r), triton.cdiv(N, block_n))](
            x, bias, y, rows, N, x.stride(0), ROWS=r, BLOCK_N=block_n, num_warps=4)
    return y


def _bias_gelu_bwd(dy: torch.Tensor, x: torch.Tensor, bias: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """dy [rows, N] contiguous, x [rows, N] -> (dx [rows, N] in x's dtype, dbias [N] fp32)."""
    rows, N = x.shape
    dx = torch.empty((rows, N), dtype=x.dtype, device=x.device)
    r, block_n = _tile(N)
    n_cols = triton.cdiv(N, block_n)
    n_slices = max(1, min(triton.cdiv(max(rows, 1), r), triton.cdiv(_TARGET_PROGRAMS, n_cols)))
    rows_per_prog = triton.cdiv(triton.cdiv(max(rows, 1), n_slices), r) * r
    n_slices = triton.cdiv(max(rows, 1), rows_per_prog)
    db_part = torch.empty((n_slices, N), dtype=torch.float32, device=x.device)
    if dx.numel():
        _bias_gelu_bwd_kernel[(n_cols, n_slices)](
            dy, x, bias, dx, db_part, rows, N, rows_per_prog, x.stride(0), ROWS=r, BLOCK_N=block_n, num_warps=4)
    else:
        db_part.zero_()
    return dx, db_part.sum(0)


# ---- torch.library registration (so torch.compile traces the op) ---------------------------

@torch.library.custom_op("tec_fast::bias_gelu", mutates_args=())
def _bias_gelu_op(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return _bias_gelu_fwd(x, bias)


@_bias_gelu_op.register_fake
def _(x, bias):
    return x.new_empty(x.shape)


@torch.library.custom_op("tec_fast::bias_gelu_backward", mutates_args=())
def _bias_gelu_backward_op(dy: torch.Tensor, x: torch.Tensor, bias: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    return _bias_gelu_bwd(dy, x, bias)


@_bias_gelu_backward_op.register_fake
def _(dy, x, bias):
    return x.new_empty(x.shape), x.new_empty((x.shape[1],), dtype=torch.float32)


def _setup_context(ctx, inputs, output):
    x, bias = inputs
    ctx.save_for_backward(x, bias)


def _backward(ctx, dy):
    x, bias = ctx.saved_tensors
    dx, db = _bias_gelu_backward_op(dy.contiguous(), x, bias)
    return (dx if ctx.needs_input_grad[0] else None, db.to(bias.dtype) if ctx.needs_input_grad[1] else None)


_bias_gelu_op.register_autograd(_backward, setup_context=_setup_context)


def bias_gelu(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """gelu(x + bias) (exact erf GELU) over the last dimension of x; bias [N]. Output in x's dtype.
    Differentiable in x and bias."""
    N = x.shape[-1]
    if bias.shape != (N,):
        raise ValueError(f"bias_gelu: bias must have shape ({N},), got {tuple(bias.shape)}")
    x2 = x.reshape(-1, N)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    return _bias_gelu_op(x2, bias.contiguous()).view(x.shape)
