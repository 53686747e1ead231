"""encoder_adapter: TEC's encoder adapter (docs/tec.md §2) over the stacked block outputs [D, B, T, C].

    Z' = LN_{D*C}(concat_d feats[d])          G groups of M = D/G blocks
    u_g = Z'[chunk g] W_g^T + b_g;  u_g += fc2_g(GELU(fc1_g(u_g)));  out = LN_C(sum_g u_g)

The encoder writes its block outputs into one [D, B, T, C] buffer, so the concatenation along
channels is never materialised:
- ``_adapter_ln_in_fwd_kernel``: one program per token walks its D x C values in small tiles
  (statistics merged tile by tile, Chan's formula), normalises them in fp32 and writes the G
  chunks as [G, B*T, M*C], the operand layout of one batched GEMM for all G fuse layers.
- every product of the fuse layers and the G MLPs, forward and backward, is one batched launch
  of ``vit_block``'s GEMM kernel (``kernels/vit_block.py``: the groups on the grid's second axis,
  the weights cast in registers, no stacked cast copies) with its epilogues: the bias, fc1's GELU
  (keeping h_pre), GELU's backward on the gradient of h (recomputing h, bitwise the forward's,
  so h is not kept for backward), the bias gradients as row sums of the weight gradients'
  operands, and the residual gradient ds added into du before the product's one rounding.
  (Until 2026-12-07 these were torch's batched GEMMs; the H200's measurement of this op was of
  that version and is left out of its dispatch table until it is measured again.)
- ``_adapter_ln_out_fwd_kernel``: residual add, group sum and the final LayerNorm in one pass.
Backward: ``_adapter_ln_out_bwd_kernel`` (LN_C backward + per-program partial sums for its
weight/bias), the batched GEMMs for the MLPs and fuse layers, then LN_{D*C} backward in two kernels:
``_adapter_ln_in_bwd_row_kernel`` (per token, the two row sums of the LayerNorm backward) and
``_adapter_ln_in_bwd_kernel`` (per channel chunk and slice of tokens: dx written straight back
in the [D, B, T, C] layout, weight/bias gradients summed over the slice). No kernel holds a
token's whole D x C row in registers (that spilled from ViT-B up: 6 KB per thread at ViT-L), so
nothing spills up to ViT-H (``benchmarks/compile_report.py``); the price is one more read of the
input and the incoming gradient. The normalised input Z' is not kept for backward: the second
kernel recomputes it and writes it over the incoming gradient buffer it has just consumed, ready
for the fuse layers' weight gradient.
Under autocast the GEMMs run in the autocast dtype and the output dtype is the one the reference
gets (fp32 on CUDA); LayerNorm statistics are fp32 always.
Reference: ``tec_fast.ops.reference.encoder_adapter``.
"""
from __future__ import annotations

import functools
from typing import List, Optional, Sequence, Tuple, Union

import torch
import triton
import triton.language as tl

from tec_fast.kernels._common import (autocast_dtype, autocast_off, cdiv, direct_launch, dtype_reasons,
                                      eager_apply, first_order, launch, next_pow2, persistent_programs, row_slices,
                                      unit_last_stride)
from tec_fast.kernels.vit_block import _gemm


@triton.jit
def _adapter_ln_in_fwd_kernel(x_ptr, w_ptr, b_ptr, z_ptr, mean_ptr, rstd_ptr,
                              BT, T, D, C, M, eps, stride_xd, stride_xb, stride_xt,
                              BLOCK_DEPTH: tl.constexpr, BLOCK_C: tl.constexpr):
    # One program per token; its D x C values are visited in [BLOCK_DEPTH, BLOCK_C] tiles, twice:
    # statistics (per-tile mean and M2 merged with Chan's formula: no cancellation, no big
    # register tile), then normalise and write (the second read mostly hits L1/L2).
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + (row // T) * stride_xb + (row % T) * stride_xt
    mean = 0.0
    m2 = 0.0
    count = 0.0
    for d0 in range(0, D, BLOCK_DEPTH):
        dd = d0 + tl.arange(0, BLOCK_DEPTH)
        for c0 in range(0, C, BLOCK_C):
            cc = c0 + tl.arange(0, BLOCK_C)
            ok = (dd < D)[:, None] & (cc < C)[None, :]
            x = tl.load(x_row + dd.to(tl.int64)[:, None] * stride_xd + cc[None, :], mask=ok, other=0.0)
            x = x.to(tl.float32)
            n_tile = (tl.minimum(D - d0, BLOCK_DEPTH) * tl.minimum(C - c0, BLOCK_C)).to(tl.float32)
            mean_tile = tl.sum(tl.sum(x, axis=1), axis=0) / n_tile
            xc = tl.where(ok, x - mean_tile, 0.0)
            m2_tile = tl.sum(tl.sum(xc * xc, axis=1), axis=0)
            total = count + n_tile
            delta = mean_tile - mean
            mean += delta * (n_tile / total)
            m2 += m2_tile + delta * delta * (count * n_tile / total)
            count = total
    rstd = 1.0 / tl.sqrt(m2 / count + eps)
    for d0 in range(0, D, BLOCK_DEPTH):
        dd = d0 + tl.arange(0, BLOCK_DEPTH)
        # block d goes to group d // M at channel offset (d % M) * C: z is [G, BT, M*C]
        z_row = z_ptr + ((dd // M).to(tl.int64) * BT + row) * M * C + (dd % M) * C
        for c0 in range(0, C, BLOCK_C):
            cc = c0 + tl.arange(0, BLOCK_C)
            ok = (dd < D)[:, None] & (cc < C)[None, :]
            x = tl.load(x_row + dd.to(tl.int64)[:, None] * stride_xd + cc[None, :], mask=ok, other=0.0)
            w = tl.load(w_ptr + dd[:, None] * C + cc[None, :], mask=ok, other=0.0).to(tl.float32)
            b = tl.load(b_ptr + dd[:, None] * C + cc[None, :], mask=ok, other=0.0).to(tl.float32)
            z = (x.to(tl.float32) - mean) * rstd * w + b
            tl.store(z_row[:, None] + cc[None, :], z.to(z_ptr.dtype.element_ty), mask=ok)
    tl.store(mean_ptr + row, mean)
    tl.store(rstd_ptr + row, rstd)


@triton.jit
def _adapter_ln_in_bwd_row_kernel(x_ptr, w_ptr, mean_ptr, rstd_ptr, dz_ptr, c1_ptr, c2_ptr,
                                  BT, T, D, C, M, stride_xd, stride_xb, stride_xt,
                                  BLOCK_DEPTH: tl.constexpr, BLOCK_C: tl.constexpr):
    # Per token: the two row sums LayerNorm's backward needs, c1 = mean(dxhat * xhat) and
    # c2 = mean(dxhat), dxhat = dz * w, from [BLOCK_DEPTH, BLOCK_C] tiles of its D x C values.
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + (row // T) * stride_xb + (row % T) * stride_xt
    mean = tl.load(mean_ptr + row)
    rstd = tl.load(rstd_ptr + row)
    c1 = tl.zeros((BLOCK_DEPTH, BLOCK_C), tl.float32)
    c2 = tl.zeros((BLOCK_DEPTH, BLOCK_C), tl.float32)
    for d0 in range(0, D, BLOCK_DEPTH):
        dd = d0 + tl.arange(0, BLOCK_DEPTH)
        z_row = dz_ptr + ((dd // M).to(tl.int64) * BT + row) * M * C + (dd % M) * C
        for c0 in range(0, C, BLOCK_C):
            cc = c0 + tl.arange(0, BLOCK_C)
            ok = (dd < D)[:, None] & (cc < C)[None, :]
            x = tl.load(x_row + dd.to(tl.int64)[:, None] * stride_xd + cc[None, :], mask=ok, other=0.0)
            xhat = tl.where(ok, (x.to(tl.float32) - mean) * rstd, 0.0)
            w = tl.load(w_ptr + dd[:, None] * C + cc[None, :], mask=ok, other=0.0).to(tl.float32)
            dxhat = tl.load(z_row[:, None] + cc[None, :], mask=ok, other=0.0).to(tl.float32) * w
            c1 += dxhat * xhat
            c2 += dxhat
    n = D * C
    tl.store(c1_ptr + row, tl.sum(tl.sum(c1, axis=1), axis=0) / n)
    tl.store(c2_ptr + row, tl.sum(tl.sum(c2, axis=1), axis=0) / n)


@triton.jit
def _adapter_ln_in_bwd_kernel(x_ptr, w_ptr, b_ptr, mean_ptr, rstd_ptr, c1_ptr, c2_ptr, dz_ptr, dx_ptr,
                              dw_part_ptr, db_part_ptr, BT, T, D, C, M, rows_per_prog,
                              stride_xd, stride_xb, stride_xt,
                              ROWS: tl.constexpr, BLOCK_C: tl.constexpr):
    # Program (d * n_chunks + chunk, slice) owns channels [chunk * BLOCK_C, +BLOCK_C) of block d
    # for the tokens of its slice: dx from the row sums, dw and db summed over the slice (one
    # partial row per slice, added up by torch), and dz_ptr ([G, BT, M*C], dL/dZ') overwritten
    # with Z' once read, ready for the fuse layers' weight gradient.
    n_chunks = tl.cdiv(C, BLOCK_C)
    d = tl.program_id(0) // n_chunks
    cc = (tl.program_id(0) % n_chunks) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = cc < C
    w = tl.load(w_ptr + d * C + cc, mask=c_ok, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + d * C + cc, mask=c_ok, other=0.0).to(tl.float32)
    dw = tl.zeros((ROWS, BLOCK_C), tl.float32)
    db = tl.zeros((ROWS, BLOCK_C), tl.float32)
    x_d = x_ptr + d.to(tl.int64) * stride_xd
    z_d = dz_ptr + (d // M).to(tl.int64) * BT * M * C + (d % M) * C
    dx_d = dx_ptr + d.to(tl.int64) * BT * C
    first = tl.program_id(1) * rows_per_prog
    for r0 in range(first, tl.minimum(first + rows_per_prog, BT), ROWS):
        rows = r0 + tl.arange(0, ROWS).to(tl.int64)
        r_ok = rows < tl.minimum(first + rows_per_prog, BT)
        ok = r_ok[:, None] & c_ok[None, :]
        mean = tl.load(mean_ptr + rows, mask=r_ok, other=0.0)
        rstd = tl.load(rstd_ptr + rows, mask=r_ok, other=0.0)
        c1 = tl.load(c1_ptr + rows, mask=r_ok, other=0.0)
        c2 = tl.load(c2_ptr + rows, mask=r_ok, other=0.0)
        x = tl.load(x_d + ((rows // T) * stride_xb + (rows % T) * stride_xt)[:, None] + cc[None, :],
                    mask=ok, other=0.0)
        xhat = tl.where(ok, (x.to(tl.float32) - mean[:, None]) * rstd[:, None], 0.0)
        z_off = (rows * M * C)[:, None] + cc[None, :]
        dz = tl.load(z_d + z_off, mask=ok, other=0.0).to(tl.float32)
        dw += dz * xhat
        db += dz
        dx = (dz * w[None, :] - xhat * c1[:, None] - c2[:, None]) * rstd[:, None]
        tl.store(dx_d + (rows * C)[:, None] + cc[None, :], dx.to(dx_ptr.dtype.element_ty), mask=ok)
        tl.store(z_d + z_off, (xhat * w[None, :] + b[None, :]).to(dz_ptr.dtype.element_ty), mask=ok)
    part = tl.program_id(1).to(tl.int64) * D * C + d * C + cc
    tl.store(dw_part_ptr + part, tl.sum(dw, axis=0), mask=c_ok)
    tl.store(db_part_ptr + part, tl.sum(db, axis=0), mask=c_ok)


@triton.jit
def _adapter_ln_out_fwd_kernel(u_ptr, y_ptr, w_ptr, b_ptr, out_ptr, s_ptr, mean_ptr, rstd_ptr,
                               BT, G, C, eps, BLOCK_C: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cc = tl.arange(0, BLOCK_C)
    ok = cc < C
    s = tl.zeros((BLOCK_C,), tl.float32)
    for g in range(G):  # sum_g (u_g + MLP_g(u_g))
        off = (g * BT + row) * C + cc
        s += tl.load(u_ptr + off, mask=ok, other=0.0).to(tl.float32)
        s += tl.load(y_ptr + off, mask=ok, other=0.0).to(tl.float32)
    mean = tl.sum(s, axis=0) / C
    sc = tl.where(ok, s - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(sc * sc, axis=0) / C + eps)
    w = tl.load(w_ptr + cc, mask=ok, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + cc, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * C + cc, (sc * rstd * w + b).to(out_ptr.dtype.element_ty), mask=ok)
    tl.store(s_ptr + row * C + cc, s, mask=ok)
    tl.store(mean_ptr + row, mean)
    tl.store(rstd_ptr + row, rstd)


@triton.jit
def _adapter_ln_out_bwd_kernel(dout_ptr, s_ptr, mean_ptr, rstd_ptr, w_ptr, ds_ptr, dw_part_ptr, db_part_ptr,
                               BT, C, BLOCK_C: tl.constexpr):
    pid = tl.program_id(0)
    cc = tl.arange(0, BLOCK_C)
    ok = cc < C
    w = tl.load(w_ptr + cc, mask=ok, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK_C,), tl.float32)
    db = tl.zeros((BLOCK_C,), tl.float32)
    for row in range(pid, BT, tl.num_programs(0)):
        s = tl.load(s_ptr + row * C + cc, mask=ok, other=0.0)
        xhat = tl.where(ok, (s - tl.load(mean_ptr + row)) * tl.load(rstd_ptr + row), 0.0)
        dy = tl.load(dout_ptr + row * C + cc, mask=ok, other=0.0).to(tl.float32)
        dw += dy * xhat
        db += dy
        dxhat = dy * w
        c1 = tl.sum(dxhat * xhat, axis=0) / C
        c2 = tl.sum(dxhat, axis=0) / C
        ds = (dxhat - xhat * c1 - c2) * tl.load(rstd_ptr + row)
        tl.store(ds_ptr + row * C + cc, ds.to(ds_ptr.dtype.element_ty), mask=ok)
    tl.store(dw_part_ptr + pid * C + cc, dw, mask=ok)
    tl.store(db_part_ptr + pid * C + cc, db, mask=ok)


def _pow2_block(n: int, cap: int) -> int:
    """A power-of-two block for a loop over n: the largest one <= cap that divides n (no masked
    lanes) when it is at least cap / 4 or covers n, else next_pow2(n) capped (masked tail)."""
    block = 1
    while block * 2 <= cap and n % (block * 2) == 0:
        block *= 2
    return block if block >= min(max(1, cap // 4), n) else min(next_pow2(n), cap)


_TILE = 2048  # elements per LayerNorm tile: 16 fp32 values per thread at 4 warps, no spills up to ViT-H


def _ln_in_config(D: int, C: int) -> Tuple[int, int]:
    """(BLOCK_DEPTH, BLOCK_C) of the LN_{D*C} tiles: channel chunks of <= 256, as many blocks as
    fill ``_TILE``."""
    return _ln_in_tiles(D, C, _TILE)


@functools.lru_cache(maxsize=None)
def _ln_in_tiles(D: int, C: int, tile: int) -> Tuple[int, int]:
    block_c = _pow2_block(C, min(256, tile))
    return _pow2_block(D, max(1, tile // block_c)), block_c


def _rows(t: torch.Tensor) -> Tuple[int, int, int]:
    """A batched operand t [G, R, K] read as is: (row stride, column stride, batch stride)."""
    return t.stride(1), t.stride(2), t.stride(0)


def _cols(t: torch.Tensor) -> Tuple[int, int, int]:
    """A batched operand t [G, R, K] read transposed ([G, K, R])."""
    return t.stride(2), t.stride(1), t.stride(0)


def _bgemm(a, a_s: Tuple[int, int, int], b, b_s: Tuple[int, int, int], c, M: int, N: int, K: int, bias=None,
           pre=None, g=None, row_sum=None, epilogue: int = 0, pre_batch: Optional[int] = None) -> None:
    """c[z] [M, N] = A[z] B[z] for the G groups z (c [G, M, N] contiguous, so are pre and g; A, B
    at the strides (row, column, batch) given, batch stride 0: one operand for all groups), in
    c's dtype's products (``vit_block``'s GEMM kernel and epilogues, the operands cast in
    registers); ``bias`` [G, N], ``row_sum`` [G, M]; ``pre_batch``: pre's batch stride (default
    c's)."""
    G = c.shape[0]
    if not (G and M and N):  # nothing to write (an empty batch: no launch of an empty grid)
        return
    _gemm(a, a_s[:2], b, b_s[:2], c, M, N, K, c.dtype, bias=bias, pre=pre, g=g, row_sum=row_sum, epilogue=epilogue,
          batch=G, batch_strides=(a_s[2], b_s[2], M * N, M * N if pre_batch is None else pre_batch,
                                  0 if bias is None else bias.stride(0), 0 if row_sum is None else row_sum.stride(0)))


def _linear_t(x, w, out, bias, pre=None) -> None:
    """out[z] = x[z] w[z]^T + bias[z] per group (x [G, R, K], w [G, N, K]); with ``pre``: GELU of
    it, the pre-activation written to ``pre``."""
    G, R, N = out.shape
    _bgemm(x, _rows(x), w, _cols(w), out, R, N, x.shape[2], bias=bias, pre=pre, epilogue=0 if pre is None else 1)


def _adapter_fwd(feats, ln_before_w, ln_before_b, fuse_w, fuse_b, fc1_w, fc1_b, fc2_w, fc2_b,
                 ln_after_w, ln_after_b, eps_before, eps_after, gemm_dtype, out_dtype):
    D, B, T, C = feats.shape
    G = fuse_w.shape[0]
    M = D // G
    BT = B * T
    dev = feats.device
    feats = unit_last_stride(feats)
    z = torch.empty((G, BT, M * C), dtype=gemm_dtype, device=dev)  # LN_{D*C}(Z), grouped
    mean_in = torch.empty((BT,), dtype=torch.float32, device=dev)
    rstd_in = torch.empty((BT,), dtype=torch.float32, device=dev)
    block_depth, block_c = _ln_in_config(D, C)
    launch(_adapter_ln_in_fwd_kernel, (BT,),
        feats, ln_before_w.contiguous(), ln_before_b.contiguous(), z, mean_in, rstd_in,
        BT, T, D, C, M, eps_before, feats.stride(0), feats.stride(1), feats.stride(2),
        BLOCK_DEPTH=block_depth, BLOCK_C=block_c, num_warps=4)
    gd, Hd = gemm_dtype, fc1_w.shape[1]
    # the G groups' products as one batched launch each (the weights cast to gd in registers)
    u = torch.empty((G, BT, C), dtype=gd, device=dev)
    _linear_t(z, fuse_w, u, fuse_b)  # [G, BT, C] = Z'_g W_g^T + b_g
    h = torch.empty((G, BT, Hd), dtype=gd, device=dev)
    h_pre = torch.empty((G, BT, Hd), dtype=gd, device=dev)
    _linear_t(u, fc1_w, h, fc1_b, pre=h_pre)  # h = GELU(h_pre), h_pre kept for backward
    y = torch.empty((G, BT, C), dtype=gd, device=dev)
    _linear_t(h, fc2_w, y, fc2_b)
    out = torch.empty((BT, C), dtype=out_dtype, device=dev)
    s = torch.empty((BT, C), dtype=torch.float32, device=dev)  # sum_g (u_g + y_g), for backward
    mean_out = torch.empty((BT,), dtype=torch.float32, device=dev)
    rstd_out = torch.empty((BT,), dtype=torch.float32, device=dev)
    launch(_adapter_ln_out_fwd_kernel, (BT,),
        u, y, ln_after_w.contiguous(), ln_after_b.contiguous(), out, s, mean_out, rstd_out,
        BT, G, C, eps_after, BLOCK_C=next_pow2(C), num_warps=4)
    return out.view(B, T, C), mean_in, rstd_in, u, h_pre, s, mean_out, rstd_out


def _adapter_bwd(grad_out, feats, ln_before_w, ln_before_b, fuse_w, fc1_w, fc2_w, ln_after_w,
                 mean_in, rstd_in, u, h_pre, s, mean_out, rstd_out):
    D, B, T, C = feats.shape
    G = fuse_w.shape[0]
    M = D // G
    BT = B * T
    dev, gd = feats.device, u.dtype
    feats = unit_last_stride(feats)
    f32 = dict(dtype=torch.float32, device=dev)

    # final LayerNorm: d(sum_g ...) is the same for every group's residual branch
    n_prog = persistent_programs(BT, dev)
    ds = torch.empty((BT, C), dtype=gd, device=dev)
    parts = torch.empty((2, n_prog, C), **f32)  # weight and bias partial sums: one reduction launch
    dw_part, db_part = parts[0], parts[1]
    launch(_adapter_ln_out_bwd_kernel, (n_prog,),
        grad_out.contiguous(), s, mean_out, rstd_out, ln_after_w.contiguous(), ds, dw_part, db_part,
        BT, C, BLOCK_C=next_pow2(C), num_warps=4)
    d_ln_after = parts.sum(1)  # [2, C]: weight, bias

    # the G residual MLPs: GELU's backward in the epilogue of d h = ds W2_g (h = GELU(h_pre)
    # recomputed there, bitwise the forward's), the bias gradients summed by the weight gradients
    Hd = h_pre.shape[-1]
    dh_pre, h = torch.empty_like(h_pre), torch.empty_like(h_pre)
    _bgemm(ds, (C, 1, 0), fc2_w, _rows(fc2_w), dh_pre, BT, Hd, C, pre=h_pre, g=h, epilogue=2)
    d_fc2_w, d_fc2_b = torch.empty((G, C, Hd), dtype=gd, device=dev), torch.empty((G, C), **f32)
    _bgemm(ds, (1, C, 0), h, _rows(h), d_fc2_w, C, Hd, BT, row_sum=d_fc2_b)  # the same sums for every g
    d_fc1_w, d_fc1_b = torch.empty((G, Hd, C), dtype=gd, device=dev), torch.empty((G, Hd), **f32)
    _bgemm(dh_pre, _cols(dh_pre), u, _rows(u), d_fc1_w, Hd, C, BT, row_sum=d_fc1_b)
    du = torch.empty((G, BT, C), dtype=gd, device=dev)
    _bgemm(dh_pre, _rows(dh_pre), fc1_w, _rows(fc1_w), du, BT, C, Hd, pre=ds, pre_batch=0, epilogue=4)  # + ds

    # fuse layers and the first LayerNorm; the kernel turns dz into z in place
    zbuf = torch.empty((G, BT, M * C), dtype=gd, device=dev)          # dL/dZ' [G, BT, M*C]
    _bgemm(du, _rows(du), fuse_w, _rows(fuse_w), zbuf, BT, M * C, C)
    block_depth, block_c = _ln_in_config(D, C)
    ln_w, ln_b = ln_before_w.contiguous(), ln_before_b.contiguous()
    c1, c2 = torch.empty((BT,), **f32), torch.empty((BT,), **f32)
    launch(_adapter_ln_in_bwd_row_kernel, (BT,),
        feats, ln_w, mean_in, rstd_in, zbuf, c1, c2, BT, T, D, C, M,
        feats.stride(0), feats.stride(1), feats.stride(2),
        BLOCK_DEPTH=block_depth, BLOCK_C=block_c, num_warps=4)
    rows = max(1, _TILE // block_c)
    columns = D * cdiv(C, block_c)
    # ~128 registers per thread: 4 four-warp programs fit on an SM, so aim for one wave of them
    n_slices, rows_per_prog = row_slices(BT, rows, columns, persistent_programs(BT, dev, per_sm=4))
    d_feats = torch.empty((D, B, T, C), dtype=feats.dtype, device=dev)
    parts = torch.empty((2, n_slices, D * C), **f32)
    dw_part, db_part = parts[0], parts[1]
    launch(_adapter_ln_in_bwd_kernel, (columns, n_slices),
        feats, ln_w, ln_b, mean_in, rstd_in, c1, c2, zbuf, d_feats, dw_part, db_part,
        BT, T, D, C, M, rows_per_prog, feats.stride(0), feats.stride(1), feats.stride(2),
        ROWS=rows, BLOCK_C=block_c, num_warps=4)
    d_fuse_w, d_fuse_b = torch.empty((G, C, M * C), dtype=gd, device=dev), torch.empty((G, C), **f32)
    _bgemm(du, _cols(du), zbuf, _rows(zbuf), d_fuse_w, C, M * C, BT, row_sum=d_fuse_b)  # zbuf holds Z' now
    # the LayerNorms' weight and bias gradients come as one [2, ...] tensor each (one reduction)
    return (d_feats, parts.sum(1), d_fuse_w, d_fuse_b, d_fc1_w, d_fc1_b, d_fc2_w, d_fc2_b, d_ln_after)


# ---- torch.library registration: what torch.compile and dispatch modes see -------------------

_T = torch.Tensor
_Forward = Tuple[_T, _T, _T, _T, _T, _T, _T, _T]  # out, then what backward needs
_Grads = Tuple[_T, _T, _T, _T, _T, _T, _T, _T, _T]  # per tensor input; a LayerNorm's w and b as one [2, .]
Params = Union[Sequence[torch.Tensor], torch.Tensor]


@torch.library.custom_op("tec_fast::encoder_adapter", mutates_args=())
def _encoder_adapter_op(feats: torch.Tensor, ln_before_w: torch.Tensor, ln_before_b: torch.Tensor,
                        fuse_w: torch.Tensor, fuse_b: torch.Tensor, fc1_w: torch.Tensor, fc1_b: torch.Tensor,
                        fc2_w: torch.Tensor, fc2_b: torch.Tensor, ln_after_w: torch.Tensor,
                        ln_after_b: torch.Tensor, eps_before: float, eps_after: float,
                        gemm_dtype: torch.dtype, out_dtype: torch.dtype) -> _Forward:
    with autocast_off(feats.device.type):
        return _adapter_fwd(feats, ln_before_w, ln_before_b, fuse_w, fuse_b, fc1_w, fc1_b, fc2_w, fc2_b,
                            ln_after_w, ln_after_b, eps_before, eps_after, gemm_dtype, out_dtype)


@_encoder_adapter_op.register_fake
def _(feats, ln_before_w, ln_before_b, fuse_w, fuse_b, fc1_w, fc1_b, fc2_w, fc2_b, ln_after_w, ln_after_b,
      eps_before, eps_after, gemm_dtype, out_dtype):
    D, B, T, C = feats.shape
    G, Hd = fc1_w.shape[0], fc1_w.shape[1]
    BT = B * T
    f32 = dict(dtype=torch.float32)
    return (feats.new_empty((B, T, C), dtype=out_dtype), feats.new_empty((BT,), **f32),
            feats.new_empty((BT,), **f32), feats.new_empty((G, BT, C), dtype=gemm_dtype),
            feats.new_empty((G, BT, Hd), dtype=gemm_dtype), feats.new_empty((BT, C), **f32),
            feats.new_empty((BT,), **f32), feats.new_empty((BT,), **f32))


@torch.library.custom_op("tec_fast::encoder_adapter_backward", mutates_args=())
def _encoder_adapter_backward_op(grad_out: torch.Tensor, feats: torch.Tensor, ln_before_w: torch.Tensor,
                                 ln_before_b: torch.Tensor, fuse_w: torch.Tensor, fc1_w: torch.Tensor,
                                 fc2_w: torch.Tensor, ln_after_w: torch.Tensor, mean_in: torch.Tensor,
                                 rstd_in: torch.Tensor, u: torch.Tensor, h_pre: torch.Tensor, s: torch.Tensor,
                                 mean_out: torch.Tensor, rstd_out: torch.Tensor) -> _Grads:
    with autocast_off(feats.device.type):
        return _adapter_bwd(grad_out, feats, ln_before_w, ln_before_b, fuse_w, fc1_w, fc2_w, ln_after_w,
                            mean_in, rstd_in, u, h_pre, s, mean_out, rstd_out)


@_encoder_adapter_backward_op.register_fake
def _(grad_out, feats, ln_before_w, ln_before_b, fuse_w, fc1_w, fc2_w, ln_after_w, mean_in, rstd_in,
      u, h_pre, s, mean_out, rstd_out):
    D, B, T, C = feats.shape
    G, Hd = fc1_w.shape[0], fc1_w.shape[1]
    gd, f32 = u.dtype, torch.float32
    e = feats.new_empty
    return (e(feats.shape), e((2, D * C), dtype=f32), e(fuse_w.shape, dtype=gd),
            e((G, C), dtype=f32), e((G, Hd, C), dtype=gd), e((G, Hd), dtype=f32), e((G, C, Hd), dtype=gd),
            e((G, C), dtype=f32), e((2, C), dtype=f32))


# ---- autograd ---------------------------------------------------------------------------------

class _EncoderAdapter(torch.autograd.Function):
    """The adapter as one node: saves feats, the weights and the intermediates its backward needs
    (u, h_pre, the LayerNorms' statistics and their input sum), not h or Z'."""

    @staticmethod
    def forward(ctx, feats, ln_before_w, ln_before_b, fuse_w, fuse_b, fc1_w, fc1_b, fc2_w, fc2_b,
                ln_after_w, ln_after_b, eps_before, eps_after, gemm_dtype, out_dtype):
        args = (feats, ln_before_w, ln_before_b, fuse_w, fuse_b, fc1_w, fc1_b, fc2_w, fc2_b, ln_after_w,
                ln_after_b, eps_before, eps_after, gemm_dtype, out_dtype)
        if direct_launch():
            with autocast_off(feats.device.type):
                out, *saved = _adapter_fwd(*args)
        else:
            out, *saved = _encoder_adapter_op(*args)
        ctx.save_for_backward(feats, ln_before_w, ln_before_b, fuse_w, fc1_w, fc2_w, ln_after_w, *saved)
        ctx.param_dtypes = [t.dtype for t in args[:11]]
        # in-place modifiable, as _Mlp's output (when traced, the tracer's outputs are no views)
        return out.detach() if not torch.compiler.is_compiling() and out._is_view() else out

    @staticmethod
    @first_order("encoder_adapter")
    def backward(ctx, grad_out):
        if grad_out is None:  # the output took no part in the loss
            return (None,) * 15
        saved = ctx.saved_tensors
        if direct_launch():
            with autocast_off(grad_out.device.type):
                grads = _adapter_bwd(grad_out, *saved)
        else:
            grads = _encoder_adapter_backward_op(grad_out, *saved)
        d_feats, d_ln_before, *d_mlps, d_ln_after = grads
        grads = [d_feats, *d_ln_before, *d_mlps, *d_ln_after]
        grads = [(g if g.dtype == dt else g.to(dt)) if need else None
                 for g, dt, need in zip(grads, ctx.param_dtypes, ctx.needs_input_grad)]
        return (*grads, None, None, None, None)


_apply = eager_apply(_EncoderAdapter)


def _stacked(ts: Params) -> torch.Tensor:
    return ts if isinstance(ts, torch.Tensor) else torch.stack(list(ts))


def encoder_adapter(feats: torch.Tensor, ln_before_w: torch.Tensor, ln_before_b: torch.Tensor,
                    fuse_w: Params, fuse_b: Params, fc1_w: Params, fc1_b: Params,
                    fc2_w: Params, fc2_b: Params, ln_after_w: torch.Tensor, ln_after_b: torch.Tensor,
                    eps_before: float, eps_after: float) -> torch.Tensor:
    """Triton path of ``tec_fast.ops.reference.encoder_adapter`` (same arguments): feats
    [D, B, T, C] -> [B, T, C]. Group weights are sequences indexed by g (stacked here; the
    stack's backward hands each parameter its gradient) or already-stacked tensors."""
    dev = feats.device.type
    gemm_dtype = autocast_dtype(dev)
    if gemm_dtype is not None:
        # as the reference under autocast: Linear in the autocast dtype; layer_norm is on the
        # fp32 list on CUDA, while on CPU it keeps its (autocast-dtype) input's dtype
        out_dtype = torch.float32 if dev == "cuda" else gemm_dtype
    else:
        gemm_dtype = feats.dtype
        out_dtype = torch.promote_types(feats.dtype, ln_after_w.dtype)
    args = (feats, ln_before_w, ln_before_b, _stacked(fuse_w), _stacked(fuse_b), _stacked(fc1_w),
            _stacked(fc1_b), _stacked(fc2_w), _stacked(fc2_b), ln_after_w, ln_after_b,
            float(eps_before), float(eps_after), gemm_dtype, out_dtype)
    if torch.is_grad_enabled() and any(t.requires_grad for t in args[:11]):
        return _apply(*args)
    if direct_launch():  # no gradient asked for: no autograd node, nothing kept for backward
        with autocast_off(dev):
            return _adapter_fwd(*args)[0]
    return _encoder_adapter_op(*args)[0]


def not_supported_reasons(dtype: torch.dtype, shape: Tuple[int, ...], **_info) -> List[str]:
    """Why this kernel cannot take feats [D, B, T, C] of ``dtype`` / ``shape`` (empty: it can).
    No size limit: the LayerNorm kernels walk a token's D*C row in tiles."""
    return dtype_reasons(dtype)
