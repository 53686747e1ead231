"""qkv_heads: a block's fused q/k/v projection split into heads, whose backward writes the
projection's gradient once and sums its bias gradient on the way.

    qkv = x W^T + b                   x [B, N, C], W [3 H d, C]           (torch addmm)
    q, k, v = qkv.view(B, N, 3, H, d)[:, :, s].transpose(1, 2)           views, [B, H, N, d]

Backward: attention hands back dq, dk, dv as three [B, H, N, d] tensors. Autograd would stack
them into qkv's layout (one pass: read three, write one) and then, in addmm's backward, read that
gradient once more to sum the bias gradient over the B*N rows, in the autocast dtype, and cast the
sum to the bias's fp32. ``_qkv_pack_kernel`` does the stack and the bias sum in one pass (fp32
partial sums per program, added up by torch, handed over in the bias's own dtype); the input and
weight gradients stay torch ``mm`` (cuBLAS). On the H200 the stack ran at about 1 TB/s
(``CatArrayBatchedCopy``, 14 calls, 2.6 ms at ViT-B, B=256) and the bias sums were part of
``aten::sum``'s 2.8 ms.

The program (slice, s * H + h) walks a slice of the B*N rows in tiles of ``ROWS`` and copies
head h of part s (q, k or v): rows of d values, contiguous in the source whatever its layout
([B, H, N, d] or a transposed [B, N, H, d]) and in the destination. Under autocast the GEMM runs
in the autocast dtype, as ``F.linear`` would, and q, k, v have that dtype.
Reference: ``tec_fast.ops.reference.qkv_heads``.
"""
from __future__ import annotations

import functools
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from tec_fast.kernels._common import (autocast_dtype, autocast_off, cdiv, direct_launch, dtype_reasons,
                                      eager_apply, first_order, launch, next_pow2, persistent_programs, row_slices)

ROWS = 32          # rows per tile
MAX_HEAD_DIM = 256  # one row of a head in a tile: ROWS x d values


@triton.jit(do_not_specialize=["sqb", "sqh", "sqn", "skb", "skh", "skn", "svb", "svh", "svn"])
def _qkv_pack_kernel(dq_ptr, dk_ptr, dv_ptr, out_ptr, part_ptr, rows, N, H, D, rows_per_prog,
                     sqb, sqh, sqn, skb, skh, skn, svb, svh, svn,
                     ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    slice_id = tl.program_id(0)
    s = tl.program_id(1) // H
    h = tl.program_id(1) % H
    if s == 0:
        src, sb, sh, sn = dq_ptr, sqb, sqh, sqn
    elif s == 1:
        src, sb, sh, sn = dk_ptr, skb, skh, skn
    else:
        src, sb, sh, sn = dv_ptr, svb, svh, svn
    dd = tl.arange(0, BLOCK_D)
    d_ok = dd < D
    col = (s * H + h) * D + dd          # column in the [rows, 3 H d] gradient
    width = 3 * H * D
    acc = tl.zeros((BLOCK_D,), tl.float32)
    first = slice_id * rows_per_prog
    last = tl.minimum(first + rows_per_prog, rows)
    for r0 in range(first, last, ROWS):
        rr = r0 + tl.arange(0, ROWS)
        ok = (rr < last)[:, None] & d_ok[None, :]
        b, n = rr // N, rr % N
        src_off = (b.to(tl.int64) * sb + h.to(tl.int64) * sh + n.to(tl.int64) * sn)[:, None] + dd[None, :]
        g = tl.load(src + src_off, mask=ok, other=0.0)
        tl.store(out_ptr + rr.to(tl.int64)[:, None] * width + col[None, :], g.to(out_ptr.dtype.element_ty),
                 mask=ok)
        acc += tl.sum(g.to(tl.float32), axis=0)
    tl.store(part_ptr + slice_id.to(tl.int64) * width + col, acc, mask=d_ok)


@functools.lru_cache(maxsize=None)
def _pack_config(rows: int, H: int, D: int, device: torch.device) -> Tuple[int, int, int]:
    """(row slices, rows per slice, BLOCK_D) of the pack kernel's (slice, s * H + h) grid."""
    tiles = cdiv(max(rows, 1), ROWS)
    n_slices, rows_per_prog = row_slices(rows, ROWS, 3 * H, persistent_programs(tiles * 3 * H, device))
    return n_slices, rows_per_prog, next_pow2(D)


def _qkv_pack(dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """dq, dk, dv [B, H, N, d] (unit last stride) -> (grad_qkv [B*N, 3 H d] in dq's dtype, its
    column sums [3 H d] in fp32)."""
    B, H, N, D = dq.shape
    rows, width = B * N, 3 * H * D
    dev = dq.device
    out = torch.empty((rows, width), dtype=dq.dtype, device=dev)
    n_slices, rows_per_prog, block_d = _pack_config(rows, H, D, dev)
    part = torch.empty((n_slices, width), dtype=torch.float32, device=dev)
    if rows and width:
        launch(_qkv_pack_kernel, (n_slices, 3 * H),
            dq, dk, dv, out, part, rows, N, H, D, rows_per_prog,
            dq.stride(0), dq.stride(1), dq.stride(2), dk.stride(0), dk.stride(1), dk.stride(2),
            dv.stride(0), dv.stride(1), dv.stride(2),
            ROWS=ROWS, BLOCK_D=block_d, num_warps=4)
    else:
        part.zero_()
    return out, part.sum(0)


# ---- torch.library registration: what torch.compile and dispatch modes see -------------------

@torch.library.custom_op("tec_fast::qkv_heads_backward", mutates_args=())
def _qkv_pack_op(dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    return _qkv_pack(dq, dk, dv)


@_qkv_pack_op.register_fake
def _(dq, dk, dv):
    B, H, N, D = dq.shape
    return dq.new_empty((B * N, 3 * H * D)), dq.new_empty((3 * H * D,), dtype=torch.float32)


# ---- autograd ---------------------------------------------------------------------------------

def _unit_last(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _project(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
             H: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [B, N, C] -> q, k, v [B, H, N, d], views of x W^T + b (bias cast to x's dtype);
    autocast is off (the caller cast x and the weight). ``F.linear`` runs the addmm of
    ``addmm(b, x2d, w.t())`` on x's rows (the same values) in one call from Python."""
    if bias is not None and bias.dtype != x.dtype:
        bias = bias.to(x.dtype)
    B, N = x.shape[:2]  # d, not -1: a view cannot infer the head width of an empty batch
    d = weight.shape[0] // (3 * H)
    return F.linear(x, weight, bias).view(B, N, 3, H, d).permute(2, 0, 3, 1, 4).unbind(0)  # 3 x [B, H, N, d]


class _QkvHeads(torch.autograd.Function):
    """The projection and the head split as one autograd node on x [B, N, C]: returns q, k, v as
    views of the projection's output; the backward takes dq, dk, dv and gives x, W and b their
    gradients (the pack kernel writes the projection's gradient and sums the bias's)."""

    @staticmethod
    def forward(ctx, x, weight, bias, H):
        ctx.save_for_backward(x, weight)
        ctx.bias_dtype = None if bias is None else bias.dtype
        with autocast_off(x.device.type):
            return _project(x, weight, bias, H)

    @staticmethod
    @first_order("qkv_heads")
    def backward(ctx, dq, dk, dv):
        x, weight = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        dt = x.dtype
        grads = [_unit_last(g if g.dtype == dt else g.to(dt)) for g in (dq, dk, dv)]
        pack = _qkv_pack if direct_launch() else _qkv_pack_op
        grad_qkv, grad_b = pack(*grads)
        grad_x = torch.mm(grad_qkv, weight).view(x.shape) if need_x else None
        grad_w = torch.mm(grad_qkv.t(), x.reshape(-1, x.shape[-1])) if need_w else None
        if need_b and ctx.bias_dtype is not None:
            grad_b = grad_b if grad_b.dtype == ctx.bias_dtype else grad_b.to(ctx.bias_dtype)
        else:
            grad_b = None
        return grad_x, grad_w, grad_b, None


_apply = eager_apply(_QkvHeads)


def qkv_heads(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
              num_heads: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton path of ``tec_fast.ops.reference.qkv_heads`` (inputs validated there): x [B, N, C],
    weight [3 H d, C], bias [3 H d] or None -> q, k, v [B, H, N, d]. Under autocast x and the
    weight are cast to the autocast dtype (as ``F.linear`` does; the bias inside, where its
    gradient can stay fp32)."""
    dev = x.device.type
    dt = autocast_dtype(dev)
    if dt is not None:
        x, weight = (t if t.dtype == dt else t.to(dt) for t in (x, weight))
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                    or (bias is not None and bias.requires_grad)):
        return _apply(x, weight, bias, num_heads)
    with autocast_off(dev):  # inference (the frozen base): no node
        return _project(x, weight, bias, num_heads)


def not_supported_reasons(dtype: torch.dtype, shape: Tuple[int, ...], head_dim: Optional[int] = None,
                          **_info) -> List[str]:
    """Why this kernel cannot take x of ``dtype`` / ``shape`` with heads of ``head_dim`` values
    (empty: it can)."""
    reasons = dtype_reasons(dtype)
    if head_dim is not None and head_dim > MAX_HEAD_DIM:
        reasons.append(f"head dim {head_dim} > {MAX_HEAD_DIM}")
    return reasons
