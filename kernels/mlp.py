"""mlp: a transformer MLP, out = fc2(GELU(fc1(x))), that keeps only the pre-activation for backward.

    pre = x W1^T + b1         x [rows, C], W1 [Hd, C]       (torch F.linear: addmm)
    h   = GELU(pre)           exact GELU, pre * Phi(pre)    (``_mlp_gelu_fwd_kernel``; Phi
                              through erfc, ``_two_phi``)
    out = h W2^T + b2         W2 [Cout, Hd]                 (torch F.linear: addmm)

Autograd around the three ops separately keeps both pre (for GELU's backward) and h (for fc2's
weight gradient): 2 x Hd values per token, the largest activations a ViT block saves. Here the
MLP is one autograd node that saves x and pre only, and the backward recomputes h where it
needs it anyway:

    grad_h = grad_out W2                                            (torch mm)
    h, grad_pre = GELU(pre), grad_h * GELU'(pre);  grad_b1 = sum_rows grad_pre
                                                                    (``_mlp_gelu_bwd_kernel``)
    grad_W2 = grad_out^T h,  grad_b2 = sum_rows grad_out,  grad_x = grad_pre W1,
    grad_W1 = grad_pre^T x                                          (torch mm / sum)

The backward kernel reads pre and grad_h once and writes h and grad_pre once; eager GELU
backward reads the same and writes grad_pre only, so the recompute costs one write of h, and
the fused bias gradient saves the read of grad_pre that ``sum`` would make. The kernel tiles
[BLOCK_R rows, BLOCK_H hidden columns]: each program owns a column block and a slice of rows,
walks the slice tile by tile and keeps the column sums of grad_pre in fp32 (partial sums per
slice, added up by torch). Forward and backward evaluate GELU with the same code, so the h that
fc2's weight gradient sees is bitwise the h the forward used. Values are loaded and computed in
fp32 and stored in the tensors' dtype.
The GEMMs stay with torch (cuBLAS) and are visible as such to ``torch.compile`` and to
``benchmarks/traffic.py``; the two elementwise steps are the custom ops ``tec_fast::mlp_gelu`` and
``tec_fast::mlp_gelu_backward``. Under autocast every GEMM runs in the autocast dtype, as
``F.linear`` would, and the output has that dtype; bias gradients are summed in fp32 and
handed over in the biases' own dtype.
Reference: ``tec_fast.ops.reference.mlp``.
"""
from __future__ import annotations

import functools
import inspect
import math
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from tec_fast.kernels._common import (autocast_dtype, autocast_off, cdiv, direct_launch, dtype_reasons,
                                      eager_apply, first_order, launch, next_pow2, persistent_programs, row_slices)

ACTIVATIONS = ("gelu",)  # what the kernels compute: GELU with the exact erf (timm, MAE, HF "gelu")
BLOCK_FWD = 1024         # forward: elements per program
BLOCK_R = 16             # backward tile: rows ...
MAX_BLOCK_H = 128        # ... by hidden columns (16 fp32 values per thread and tensor at 4 warps)


if "approx" in inspect.signature(tl.fdiv).parameters:  # Triton >= 3.7: div.approx.f32, 2 ulp
    @triton.jit
    def _reciprocal(y):
        """1 / y for y in [1, 2**126]."""
        return tl.fdiv(1.0, y, approx=True)
else:  # div.full.f32: the same 2 ulp, plus range checks this argument never needs
    @triton.jit
    def _reciprocal(y):
        """1 / y for y in [1, 2**126]."""
        return tl.fdiv(1.0, y)


@triton.jit
def _two_phi(z):
    """(2 Phi(z), exp(-z^2 / 2)) of fp32 z: Phi is the standard normal CDF, so 2 Phi(z) is
    1 + erf(z / sqrt 2), the factor of the exact GELU, computed through erfc of x = |z| / sqrt 2:

        erfc(x) = exp(-x^2) R(t),  t = 1 / (1 + 0.39 x),  R(t) = sum_{k=1..6} r_k t^k

    R fitted by weighted minimax to erfcx on [0, 6] (|erf error| <= 8.3e-9 in exact arithmetic);
    2 Phi(z) = 2 - erfc(x) for z >= 0 and erfc(x) for z < 0, so the negative tail has no
    cancellation (``1 + erf`` there loses all but a few bits). The forward kernel, issue-bound
    with libdevice's erf, went from 39 to 27 instructions per element (30 with Triton 3.6's
    division; ``benchmarks/compile_report.py``, docs/performance.md). The Gaussian's exp is
    shared with GELU's derivative, Phi(z) + z phi(z)."""
    t = _reciprocal(1.0 + 0.27577164466275352 * tl.abs(z))  # 0.39 / sqrt 2
    r = t * (0.23532535 + t * (0.091387548 + t * (0.64956158 + t * (-0.63540298
                                                                    + t * (0.88666606 + t * -0.22753753)))))
    e = tl.exp2(z * z * -0.72134752044448170)  # exp(-z^2 / 2) = 2^(-z^2 log2(e) / 2)
    q = e * r  # erfc(|z| / sqrt 2)
    return tl.where(z >= 0, 2.0 - q, q), e


@triton.jit
def _gelu(z):
    """Exact GELU of fp32 z: z * Phi(z)."""
    two_phi, _ = _two_phi(z)
    return 0.5 * z * two_phi


@triton.jit
def _mlp_gelu_fwd_kernel(pre_ptr, h_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    z = tl.load(pre_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    tl.store(h_ptr + offs, _gelu(z).to(h_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _mlp_gelu_bwd_kernel(pre_ptr, gh_ptr, h_ptr, gpre_ptr, db_part_ptr, rows, H, rows_per_prog,
                         BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr):
    slice_id = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    col_ok = cols < H
    db = tl.zeros((BLOCK_H,), tl.float32)
    first = slice_id * rows_per_prog
    last = tl.minimum(first + rows_per_prog, rows)
    for r0 in range(first, last, BLOCK_R):
        rr = r0 + tl.arange(0, BLOCK_R)
        ok = (rr < last)[:, None] & col_ok[None, :]
        offs = rr.to(tl.int64)[:, None] * H + cols[None, :]
        z = tl.load(pre_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        g = tl.load(gh_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        # GELU'(z) = Phi(z) + z * phi(z); masked elements have g = 0 and add nothing to db
        two_phi, e = _two_phi(z)
        gp = g * (0.5 * two_phi + z * 0.3989422804014327 * e)
        tl.store(h_ptr + offs, (0.5 * z * two_phi).to(h_ptr.dtype.element_ty), mask=ok)
        tl.store(gpre_ptr + offs, gp.to(gpre_ptr.dtype.element_ty), mask=ok)
        db += tl.sum(gp, axis=0)
    tl.store(db_part_ptr + slice_id * H + cols, db, mask=col_ok)


def _mlp_gelu_fwd(pre: torch.Tensor) -> torch.Tensor:
    """pre [..., Hd] -> GELU(pre), same shape and dtype."""
    pre = pre.contiguous()
    h = torch.empty_like(pre)
    n = pre.numel()
    if n:
        launch(_mlp_gelu_fwd_kernel, (cdiv(n, BLOCK_FWD),), pre, h, n, BLOCK=BLOCK_FWD, num_warps=4)
    return h


@functools.lru_cache(maxsize=None)
def _bwd_config(rows: int, H: int, device: torch.device) -> Tuple[int, int, int, int]:
    """(BLOCK_H, column blocks, row slices, rows per slice) of the backward kernel."""
    block_h = min(MAX_BLOCK_H, max(16, next_pow2(H)))
    columns = cdiv(max(H, 1), block_h)
    tiles = cdiv(max(rows, 1), BLOCK_R)
    n_slices, rows_per_prog = row_slices(rows, BLOCK_R, columns, persistent_programs(tiles * columns, device))
    return block_h, columns, n_slices, rows_per_prog


def _mlp_gelu_bwd(pre: torch.Tensor, grad_h: torch.Tensor, h: Optional[torch.Tensor] = None,
                  grad_pre: Optional[torch.Tensor] = None,
                  grad_bias: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """pre, grad_h [rows, Hd] -> (h in pre's dtype, grad_pre in grad_h's dtype, grad_bias [Hd] fp32);
    ``h`` / ``grad_pre`` / ``grad_bias``: contiguous tensors to write into (e.g. one group's slice
    of a larger buffer) instead of new ones."""
    pre, grad_h = pre.contiguous(), grad_h.contiguous()
    rows, H = pre.shape
    dev = pre.device
    h = torch.empty_like(pre) if h is None else h
    grad_pre = torch.empty_like(grad_h) if grad_pre is None else grad_pre
    block_h, columns, n_slices, rows_per_prog = _bwd_config(rows, H, dev)
    db_part = torch.empty((n_slices, H), dtype=torch.float32, device=dev)
    if rows and H:
        launch(_mlp_gelu_bwd_kernel, (n_slices, columns),
            pre, grad_h, h, grad_pre, db_part, rows, H, rows_per_prog,
            BLOCK_R=BLOCK_R, BLOCK_H=block_h, num_warps=4)
    else:
        db_part.zero_()
    return h, grad_pre, torch.sum(db_part, 0, out=grad_bias)


# ---- torch.library registration: what torch.compile and dispatch modes see -------------------

@torch.library.custom_op("tec_fast::mlp_gelu", mutates_args=())
def _mlp_gelu_op(pre: torch.Tensor) -> torch.Tensor:
    return _mlp_gelu_fwd(pre)


@_mlp_gelu_op.register_fake
def _(pre):
    return torch.empty_like(pre, memory_format=torch.contiguous_format)


@torch.library.custom_op("tec_fast::mlp_gelu_backward", mutates_args=())
def _mlp_gelu_backward_op(pre: torch.Tensor, grad_h: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _mlp_gelu_bwd(pre, grad_h)


@_mlp_gelu_backward_op.register_fake
def _(pre, grad_h):
    cont = dict(memory_format=torch.contiguous_format)
    return (torch.empty_like(pre, **cont), torch.empty_like(grad_h, **cont),
            pre.new_empty((pre.shape[1],), dtype=torch.float32))


# ---- autograd ---------------------------------------------------------------------------------

def _mlp_forward(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor,
                 b2: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """x [..., C] -> (out [..., Cout], pre [..., Hd]); x and the weights of one dtype (the biases
    are cast to it). ``F.linear`` runs the same addmm on x's rows as ``addmm(b, x2d, w.t())``
    (the same values) in one call from Python instead of three (reshape, t, addmm)."""
    dt = x.dtype
    pre = F.linear(x, w1, b1 if b1.dtype == dt else b1.to(dt))
    gelu = _mlp_gelu_fwd if direct_launch() else _mlp_gelu_op  # no autograd here: same values
    return F.linear(gelu(pre), w2, b2 if b2.dtype == dt else b2.to(dt)), pre


class _Mlp(torch.autograd.Function):
    """The MLP as one autograd node on x [..., C]: saves x, W1, W2 and pre (not h). The biases
    come in their own dtype and get their gradients in it, summed in fp32: under autocast that
    spares the bf16 round trip (and two launches) autograd's cast would add to each bias
    gradient. Runs with autocast off inside (the caller cast x and the weights)."""

    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2):
        with autocast_off(x.device.type):
            out, pre = _mlp_forward(x, w1, b1, w2, b2)
        ctx.save_for_backward(x, w1, w2, pre)
        ctx.bias_dtypes = b1.dtype, b2.dtype
        # F.linear of a 3-D x with a bias returns a view of its 2-D result; a view made inside a
        # Function cannot be modified in place (y += x), its detached alias can (same storage and
        # version counter, so autograd still sees the change); traced, the tracer's are no views
        return out.detach() if not torch.compiler.is_compiling() and out._is_view() else out

    @staticmethod
    @first_order("mlp")
    def backward(ctx, grad_out):
        x, w1, w2, pre = ctx.saved_tensors
        with autocast_off(x.device.type):
            return _Mlp._backward(ctx, grad_out, x, w1, w2, pre)

    @staticmethod
    def _backward(ctx, grad_out, x, w1, w2, pre):
        need_x, need_w1, need_b1, need_w2, need_b2 = ctx.needs_input_grad
        b1_dtype, b2_dtype = ctx.bias_dtypes
        shape_x = x.shape
        rows = math.prod(shape_x[:-1])  # not -1 in the views: a 0-wide hidden layer or output is allowed
        grad_out = grad_out.reshape(rows, grad_out.shape[-1])  # [rows, Cout]
        if grad_out.dtype != w2.dtype:
            grad_out = grad_out.to(w2.dtype)
        gelu_bwd = _mlp_gelu_bwd if direct_launch() else _mlp_gelu_backward_op
        h, grad_pre, grad_b1 = gelu_bwd(pre.view(rows, pre.shape[-1]), torch.mm(grad_out, w2))
        grad_x = torch.mm(grad_pre, w1).view(shape_x) if need_x else None
        grad_w1 = torch.mm(grad_pre.t(), x.reshape(rows, shape_x[-1])) if need_w1 else None
        grad_b1 = (grad_b1 if b1_dtype == torch.float32 else grad_b1.to(b1_dtype)) if need_b1 else None
        grad_w2 = torch.mm(grad_out.t(), h) if need_w2 else None
        grad_b2 = grad_out.sum(0, dtype=b2_dtype) if need_b2 else None
        return grad_x, grad_w1, grad_b1, grad_w2, grad_b2


_apply = eager_apply(_Mlp)


def mlp(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor,
        b2: torch.Tensor) -> torch.Tensor:
    """Triton path of ``tec_fast.ops.reference.mlp`` with the exact GELU: x [..., C], w1 [Hd, C],
    b1 [Hd], w2 [Cout, Hd], b2 [Cout] -> [..., Cout]. Operands share x's dtype, or autocast is on
    (x and the weights are then cast to the autocast dtype, as ``F.linear`` does; the biases are
    cast inside, where their gradients can stay fp32)."""
    dev = x.device.type
    dt = autocast_dtype(dev)
    if dt is not None:
        x, w1, w2 = (t if t.dtype == dt else t.to(dt) for t in (x, w1, w2))
    if torch.is_grad_enabled() and (x.requires_grad or w1.requires_grad or b1.requires_grad
                                    or w2.requires_grad or b2.requires_grad):
        return _apply(x, w1, b1, w2, b2)
    with autocast_off(dev):
        return _mlp_forward(x, w1, b1, w2, b2)[0]


def not_supported_reasons(dtype: torch.dtype, shape: Tuple[int, ...], act: str = "gelu",
                          **_info) -> List[str]:
    """Why this kernel cannot take x of ``dtype`` / ``shape`` with activation ``act`` (empty: it can).
    No size limit: both kernels tile the hidden dimension."""
    reasons = dtype_reasons(dtype)
    if act not in ACTIVATIONS:
        reasons.append(f"activation {act!r} (the kernels compute the exact-erf GELU only)")
    return reasons
