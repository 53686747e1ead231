"""masked_gather: the MAE visible-token gather fused with the position-embedding add.

    out[b, i] = x[b, ids_keep[b, i]] + pos[ids_keep[b, i]]      x [B, L, C], ids_keep [B, K]

Forward: one program per block of output rows, each row C channels of x plus the matching row
of ``pos``; x is read in place whatever its strides (the patch embedding's transposed conv
output included: a contiguous copy of it would move 4x the op's own traffic).
Backward, one kernel for both gradients: each program scans its images' ids_keep for the rows
of grad_x it owns (``_common.next_match``: a [rows, 32] comparison per block of indices, no sort
of the indices) and *gathers* those rows (zero rows for dropped patches, sums in ascending i
where ids_keep repeats an index), writing each element once, in x's dtype: no memset, no
atomics, deterministic. The same program sums its rows over its slice of the batch for grad_pos
(written directly when one slice covers the batch, else per-slice fp32 partials added up by one
more launch, ``_common.sum_parts``).
Indices outside [0, L) read and write nothing; the forward kernel flags them and the launch is
followed by the op's error (``_common.check_index_flag``: on CUDA a device-side assertion, no
host sync; on CPU a ValueError), so the public op does not check the values itself first.
Reference: ``tec_fast.ops.reference.masked_gather``.
"""
from __future__ import annotations

import functools
from typing import List, Optional, Tuple

import torch
import triton
import triton.language as tl

from tec_fast.kernels._common import (LaunchConfig, added_slices, cdiv, check_index_flag, check_index_without_kernel,
                                      direct_launch, dtype_reasons, eager_apply, first_order, index_flag, launch_with,
                                      match_block, next_match, next_pow2, row_slices, slice_partials, unit_last_stride)


@triton.jit
def _masked_gather_fwd_kernel(x_ptr, ids_ptr, pos_ptr, out_ptr, ok_ptr,
                              n_rows, K, L, C,
                              stride_xb, stride_xl, stride_xc, stride_ib, stride_pl,
                              HAS_POS: tl.constexpr, ROWS: tl.constexpr, BLOCK_C: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)  # flat output rows b * K + i
    row_ok = rows < n_rows
    b = rows // K
    i = rows % K
    src = tl.load(ids_ptr + b * stride_ib + i, mask=row_ok, other=0).to(tl.int64)
    src_ok = row_ok & (src >= 0) & (src < L)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    if tl.program_id(1) == 0:  # an index out of range: flagged (``check_index_flag``), nothing read
        tl.store(ok_ptr + rows * 0, tl.zeros((ROWS,), tl.int32), mask=row_ok & ~src_ok)
    col_ok = cols < C
    m = src_ok[:, None] & col_ok[None, :]
    val = tl.load(x_ptr + b.to(tl.int64)[:, None] * stride_xb + src[:, None] * stride_xl
                  + cols.to(tl.int64)[None, :] * stride_xc, mask=m, other=0.0).to(tl.float32)
    if HAS_POS:
        val += tl.load(pos_ptr + src[:, None] * stride_pl + cols[None, :], mask=m, other=0.0).to(tl.float32)
    tl.store(out_ptr + rows.to(tl.int64)[:, None] * C + cols[None, :], val.to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _masked_gather_bwd_kernel(grad_out_ptr, ids_ptr, grad_x_ptr, pos_part_ptr,
                              B, K, L, C, b_per_prog, stride_gb, stride_gk, stride_ib,
                              POS_GRAD: tl.constexpr, ROWS: tl.constexpr, BLOCK_C: tl.constexpr,
                              BLOCK_K: tl.constexpr):
    # Each program owns rows l of grad_x for a slice of the batch: grad_x[b, l] is the sum of
    # grad_out[b, i] over the i with ids_keep[b, i] == l, in ascending i (``next_match`` scans
    # the image's K indices for them). Every element is written once, in x's dtype: no sort, no
    # atomics, no memset.
    pid_l, pid_c, pid_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    ls = pid_l * ROWS + tl.arange(0, ROWS)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    l_ok = ls < L
    col_ok = cols < C
    tile_ok = l_ok[:, None] & col_ok[None, :]
    none_yet = tl.zeros((ROWS,), tl.int32) - 1
    pos_acc = tl.zeros((ROWS, BLOCK_C), dtype=tl.float32)
    b_start = pid_b * b_per_prog
    g_ptr = grad_out_ptr + b_start.to(tl.int64) * stride_gb + cols[None, :]
    ids_row = ids_ptr + b_start.to(tl.int64) * stride_ib
    x_ptr = grad_x_ptr + b_start.to(tl.int64) * L * C + ls[:, None] * C + cols[None, :]
    for _ in range(b_start, tl.minimum(b_start + b_per_prog, B)):
        i, count = next_match(ids_row, K, ls, none_yet, l_ok, BLOCK_K)
        acc = tl.zeros((ROWS, BLOCK_C), dtype=tl.float32)
        for _t in range(0, tl.max(count, axis=0)):  # 1 for MAE's distinct ids
            hit = l_ok & (i < K)
            acc += tl.load(g_ptr + i[:, None] * stride_gk, mask=hit[:, None] & col_ok[None, :],
                           other=0.0).to(tl.float32)
            i = next_match(ids_row, K, ls, i, l_ok, BLOCK_K)[0]
        tl.store(x_ptr, acc.to(grad_x_ptr.dtype.element_ty), mask=tile_ok)
        if POS_GRAD:
            pos_acc += acc
        g_ptr += stride_gb
        ids_row += stride_ib
        x_ptr += L * C
    if POS_GRAD:
        tl.store(pos_part_ptr + (pid_b.to(tl.int64) * L + ls[:, None]) * C + cols[None, :],
                 pos_acc.to(pos_part_ptr.dtype.element_ty), mask=tile_ok)


_TARGET_PROGRAMS = 1024  # backward: split the batch until about this many programs run


@functools.lru_cache(maxsize=None)
def _launch_config(C: int) -> Tuple[int, int, int]:
    block_c = min(next_pow2(C), 1024)
    # ~2K elements per program, at most 16 rows: Triton 3.6's layout pass fails on the backward
    # kernel's 32- and 64-row tiles at C <= 64 (seen on the H200, reproduced offline)
    rows = max(1, min(16, 2048 // block_c))
    num_warps = 4 if block_c * rows <= 2048 else 8
    return rows, block_c, num_warps


@functools.lru_cache(maxsize=None)
def _channel_strided_config(K: int, C: int) -> Tuple[int, int, int]:
    """Forward tiles when x's channels are not contiguous (the patch embedding's conv output
    [B, C, h*w] seen as [B, L, C]): a program takes the K visible tokens of an image for a few
    channels, so each 32-byte sector of a channel's row x[b, c, :] is fetched from DRAM once and
    serves all of that program's tokens in it from L1. Reading x in place this way moves at most
    ~B*L*C elements; the contiguous copy it replaces read and wrote all of them before the
    gather read a quarter of them again."""
    rows = min(next_pow2(max(K, 1)), 256)
    return rows, max(1, min(next_pow2(C), 2048 // rows)), 4


@functools.lru_cache(maxsize=None)
def _fwd_plan(B: int, K: int, C: int, channels_contiguous: bool, has_pos: bool) -> Tuple[Tuple[int, int], LaunchConfig]:
    """(grid, constexprs and options) of the forward launch."""
    rows, block_c, num_warps = _launch_config(C) if channels_contiguous else _channel_strided_config(K, C)
    return (cdiv(B * K, rows), cdiv(C, block_c)), LaunchConfig(HAS_POS=has_pos, ROWS=rows, BLOCK_C=block_c,
                                                               num_warps=num_warps)


def _masked_gather_fwd(x: torch.Tensor, ids_keep: torch.Tensor, pos: Optional[torch.Tensor]) -> torch.Tensor:
    B, L, C = x.shape  # any strides: x is read in place, never copied
    K = ids_keep.shape[1]
    out_dtype = x.dtype if pos is None or pos.dtype == x.dtype else torch.promote_types(x.dtype, pos.dtype)
    out = torch.empty(B, K, C, dtype=out_dtype, device=x.device)  # out's dtype: that of x + pos
    if B * K * C == 0:
        check_index_without_kernel(ids_keep, "ids_keep", L)
        return out
    has_pos = pos is not None
    if has_pos:
        pos = unit_last_stride(pos)  # an [L, C] parameter: contiguous in practice
    ids_keep = unit_last_stride(ids_keep)  # the kernel reads an image's K indices densely
    sx = x.stride()
    grid, config = _fwd_plan(B, K, C, sx[2] == 1, has_pos)
    ok = index_flag(x.device)
    launch_with(_masked_gather_fwd_kernel, grid, config,
                x, ids_keep, pos if has_pos else x, out, ok, B * K, K, L, C, sx[0], sx[1], sx[2], ids_keep.stride(0),
                pos.stride(0) if has_pos else 0)
    check_index_flag(ok, ids_keep, "ids_keep", L)
    return out


@functools.lru_cache(maxsize=None)
def _bwd_config(B: int, L: int, C: int, K: int, pos_grad: bool, target: int
                ) -> Tuple[Tuple[int, int, int], int, LaunchConfig]:
    """(grid: row blocks, column blocks, batch slices; images per slice; constexprs and options)
    for about ``target`` programs."""
    rows, block_c, num_warps = _launch_config(C)
    n_l, n_c = cdiv(L, rows), cdiv(C, block_c)
    n_b, b_per_prog = row_slices(B, 1, n_l * n_c, target)  # the batch in slices of whole images
    config = LaunchConfig(POS_GRAD=pos_grad, ROWS=rows, BLOCK_C=block_c, BLOCK_K=match_block(K, 32),
                          num_warps=num_warps)
    return (n_l, n_c, n_b), b_per_prog, config


def _masked_gather_bwd(grad_out: torch.Tensor, ids_keep: torch.Tensor, L: int, x_dtype: torch.dtype,
                       pos_dtype: Optional[torch.dtype]) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Returns (grad_x [B, L, C] in x_dtype, grad_pos [L, C] in ``pos_dtype``, or None without one)."""
    # the kernel inverts the gather by scanning each image's ids_keep for its rows; indices
    # outside [0, L) match no row: dropped
    grad_out, ids_keep = unit_last_stride(grad_out), unit_last_stride(ids_keep)
    B, K, C = grad_out.shape
    dev = grad_out.device
    grad_x = torch.empty(B, L, C, dtype=x_dtype, device=dev)
    pos_grad = pos_dtype is not None
    grid, b_per_prog, config = _bwd_config(B, L, C, K, pos_grad, _TARGET_PROGRAMS)
    n_b = grid[2]
    pos_part = slice_partials(n_b, (L, C), pos_dtype, dev) if pos_grad else grad_x
    if grad_x.numel():
        sg = grad_out.stride()
        launch_with(_masked_gather_bwd_kernel, grid, config,
                    grad_out, ids_keep, grad_x, pos_part, B, K, L, C, b_per_prog, sg[0], sg[1], ids_keep.stride(0))
    elif pos_grad:
        pos_part.zero_()
    if not pos_grad:
        return grad_x, None
    return grad_x, added_slices(pos_part, n_b, (L, C), pos_dtype)


# ---- torch.library registration: what torch.compile and dispatch modes see -------------------

@torch.library.custom_op("tec_fast::masked_gather", mutates_args=())
def _masked_gather_op(x: torch.Tensor, ids_keep: torch.Tensor, pos: Optional[torch.Tensor]) -> torch.Tensor:
    return _masked_gather_fwd(x, ids_keep, pos)


@_masked_gather_op.register_fake
def _(x, ids_keep, pos):
    out_dtype = x.dtype if pos is None else torch.promote_types(x.dtype, pos.dtype)
    return x.new_empty((x.shape[0], ids_keep.shape[1], x.shape[2]), dtype=out_dtype)


@torch.library.custom_op("tec_fast::masked_gather_backward", mutates_args=())
def _masked_gather_backward_op(grad_out: torch.Tensor, ids_keep: torch.Tensor, L: int, x_dtype: torch.dtype,
                               pos_dtype: Optional[torch.dtype]) -> Tuple[torch.Tensor, torch.Tensor]:
    grad_x, grad_pos = _masked_gather_bwd(grad_out, ids_keep, L, x_dtype, pos_dtype)
    if grad_pos is None:  # a custom op returns tensors only
        grad_pos = grad_out.new_empty((0,))
    return grad_x, grad_pos


@_masked_gather_backward_op.register_fake
def _(grad_out, ids_keep, L, x_dtype, pos_dtype):
    B, _, C = grad_out.shape
    return (grad_out.new_empty((B, L, C), dtype=x_dtype),
            grad_out.new_empty((L, C)) if pos_dtype is None else grad_out.new_empty((L, C), dtype=pos_dtype))


# ---- autograd ---------------------------------------------------------------------------------

class _MaskedGather(torch.autograd.Function):
    """Saves ids_keep only; the backward gathers grad_x's rows (and sums grad_pos) in one kernel."""

    @staticmethod
    def forward(ctx, x, ids_keep, pos):
        out = (_masked_gather_fwd if direct_launch() else _masked_gather_op)(x, ids_keep, pos)
        ctx.save_for_backward(ids_keep)
        ctx.L, ctx.x_dtype = x.shape[1], x.dtype
        ctx.pos_dtype = pos.dtype if pos is not None else None
        return out

    @staticmethod
    @first_order("masked_gather")
    def backward(ctx, grad_out):
        (ids_keep,) = ctx.saved_tensors
        need_x, _, need_pos = ctx.needs_input_grad
        pos_dtype = ctx.pos_dtype if need_pos else None
        bwd = _masked_gather_bwd if direct_launch() else _masked_gather_backward_op
        grad_x, grad_pos = bwd(grad_out, ids_keep, ctx.L, ctx.x_dtype, pos_dtype)
        return grad_x if need_x else None, None, grad_pos if pos_dtype is not None else None


_apply = eager_apply(_MaskedGather)


def masked_gather(x: torch.Tensor, ids_keep: torch.Tensor, pos: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Triton path of ``tec_fast.ops.masked_gather`` (inputs already validated there).
    The output dtype is that of ``x + pos`` (torch's promotion), as in the reference."""
    if torch.is_grad_enabled() and (x.requires_grad or (pos is not None and pos.requires_grad)):
        return _apply(x, ids_keep, pos)
    return (_masked_gather_fwd if direct_launch() else _masked_gather_op)(x, ids_keep, pos)


def not_supported_reasons(dtype: torch.dtype, shape: Tuple[int, ...], **_info) -> List[str]:
    """Why this kernel cannot take an input of ``dtype`` / ``shape`` (empty: it can)."""
    return dtype_reasons(dtype)
