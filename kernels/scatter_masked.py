"""scatter_masked: decoder input assembly (mask-token fill + unshuffle + position add) in one pass.

    out[b, j] = (vis[b, r] if r < K else mask_token) + pos[j],   r = ids_restore[b, j]
    vis [B, K, C], ids_restore [B, L], mask_token [C], pos [L, C]  ->  out [B, L, C]

This replaces MAE's cat(vis, mask_tokens) + gather + add, which writes the [B, L, C] tensor
three times, by one read of vis and one write of out.
Forward: one program per block of output rows. Backward, fused into one kernel: each program
owns a block of (row, channel) columns and a slice of the batch; it gathers grad_vis[b, i] from
the grad_out rows j with ids_restore[b, j] == i (it scans the image's ids_restore for them,
``_common.next_match``: no sort of the indices; sums in ascending j where ids_restore is not a
permutation), writing each element once in vis's dtype, and keeps running sums for the mask
token and grad_pos over its batch slice. Per-slice partial sums of grad_pos and grad_mask_token
are added up by one launch each (``_common.sum_parts``, straight into the parameter's dtype and
shape). Indices outside [0, L) read and write nothing; the forward kernel flags them and the
launch is followed by the op's error (``_common.check_index_flag``).
Reference: ``tec_fast.ops.reference.scatter_masked``.
"""
from __future__ import annotations

import functools
from typing import List, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

from tec_fast.kernels._common import (LaunchConfig, added_slices, cdiv, check_index_flag, check_index_without_kernel,
                                      direct_launch, dtype_reasons, eager_apply, first_order, index_flag, launch_with,
                                      match_block, next_match, next_pow2, row_slices, slice_partials, sum_parts,
                                      unit_last_stride)


@triton.jit
def _scatter_masked_fwd_kernel(vis_ptr, ids_ptr, tok_ptr, pos_ptr, out_ptr, ok_ptr,
                               n_rows, K, L, C, stride_vb, stride_vk, stride_ib, stride_pl,
                               HAS_POS: tl.constexpr, ROWS: tl.constexpr, BLOCK_C: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)  # flat output rows b * L + j
    row_ok = rows < n_rows
    b = rows // L
    j = rows % L
    r = tl.load(ids_ptr + b * stride_ib + j, mask=row_ok, other=0).to(tl.int64)
    from_vis = row_ok & (r >= 0) & (r < K)
    from_tok = row_ok & (r >= K) & (r < L)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    if tl.program_id(1) == 0:  # an index out of range: flagged (``check_index_flag``), nothing read
        tl.store(ok_ptr + rows * 0, tl.zeros((ROWS,), tl.int32), mask=row_ok & ((r < 0) | (r >= L)))
    col_ok = cols < C
    val = tl.load(vis_ptr + b.to(tl.int64)[:, None] * stride_vb + r[:, None] * stride_vk + cols[None, :],
                  mask=from_vis[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
    tok = tl.load(tok_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    val += tl.where(from_tok[:, None], tok[None, :], 0.0)
    if HAS_POS:
        val += tl.load(pos_ptr + j[:, None] * stride_pl + cols[None, :],
                       mask=row_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
    tl.store(out_ptr + rows.to(tl.int64)[:, None] * C + cols[None, :], val.to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _scatter_masked_bwd_kernel(grad_out_ptr, ids_ptr, grad_vis_ptr, tok_part_ptr,
                               pos_part_ptr, B, K, L, C, b_per_prog, stride_gb, stride_gl, stride_ib,
                               POS_GRAD: tl.constexpr, ROWS: tl.constexpr, BLOCK_C: tl.constexpr,
                               BLOCK_L: tl.constexpr):
    # Program (row block, channel block, batch slice). Rows j < L: grad_out[b, j] goes to the
    # running mask-token sum where ids_restore[b, j] is in [K, L) and to the grad_pos sum. Rows
    # i < K: grad_vis[b, i] is the sum of grad_out[b, j] over the j with ids_restore[b, j] == i,
    # in ascending j (``next_match`` scans the image's L indices for them), written once, in
    # vis's dtype: a gather by the inverse index, no sort, no atomics, no memset.
    pid_j, pid_c, pid_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    j = pid_j * ROWS + tl.arange(0, ROWS)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    j_ok = j < L
    i_ok = j < K  # the same row numbers, as rows of grad_vis
    has_vis_rows = pid_j * ROWS < K
    col_ok = cols < C
    tile_ok = j_ok[:, None] & col_ok[None, :]
    none_yet = tl.zeros((ROWS,), tl.int32) - 1
    tok_acc = tl.zeros((ROWS, BLOCK_C), dtype=tl.float32)
    pos_acc = tl.zeros((ROWS, BLOCK_C), dtype=tl.float32)
    b_start = pid_b * b_per_prog
    # walk the batch slice by advancing 64-bit pointers (no int32 overflow on big tensors)
    g_img = grad_out_ptr + b_start.to(tl.int64) * stride_gb + cols[None, :]
    ids_row = ids_ptr + b_start.to(tl.int64) * stride_ib
    v_ptr = grad_vis_ptr + b_start.to(tl.int64) * K * C + j[:, None] * C + cols[None, :]
    for _ in range(b_start, tl.minimum(b_start + b_per_prog, B)):
        g = tl.load(g_img + j[:, None] * stride_gl, mask=tile_ok, other=0.0).to(tl.float32)
        r = tl.load(ids_row + j, mask=j_ok, other=-1).to(tl.int64)
        to_tok = j_ok & (r >= K) & (r < L)
        tok_acc += tl.where(to_tok[:, None], g, 0.0)
        if POS_GRAD:
            pos_acc += g
        acc = tl.zeros((ROWS, BLOCK_C), dtype=tl.float32)
        if has_vis_rows:
            src, count = next_match(ids_row, L, j, none_yet, i_ok, BLOCK_L)
            for t in range(0, tl.max(count, axis=0)):  # 0 or 1 for MAE's permutations
                if t > 0:
                    src = next_match(ids_row, L, j, src, i_ok, BLOCK_L)[0]
                hit = i_ok & (src < L)
                acc += tl.load(g_img + src[:, None] * stride_gl, mask=hit[:, None] & col_ok[None, :],
                               other=0.0).to(tl.float32)
            tl.store(v_ptr, acc.to(grad_vis_ptr.dtype.element_ty), mask=i_ok[:, None] & col_ok[None, :])
        g_img += stride_gb
        ids_row += stride_ib
        v_ptr += K * C
    part = pid_b * tl.num_programs(0) + pid_j
    tl.store(tok_part_ptr + part.to(tl.int64) * C + cols, tl.sum(tok_acc, axis=0), mask=col_ok)
    if POS_GRAD:
        tl.store(pos_part_ptr + (pid_b.to(tl.int64) * L + j[:, None]) * C + cols[None, :],
                 pos_acc.to(pos_part_ptr.dtype.element_ty), mask=tile_ok)


_TARGET_PROGRAMS = 1024  # backward: split the batch until about this many programs run


@functools.lru_cache(maxsize=None)
def _launch_config(C: int) -> Tuple[int, int, int]:
    block_c = min(next_pow2(C), 512)
    # at most 16 rows: Triton 3.6's layout pass fails on the backward kernel's 32x32 and 64x32
    # tiles (seen on the H200, reproduced offline); 16 rows already fill a program at C <= 128
    rows = max(1, min(16, 2048 // block_c))
    return rows, block_c, 4 if block_c * rows <= 2048 else 8


@functools.lru_cache(maxsize=None)
def _fwd_plan(B: int, L: int, C: int, has_pos: bool) -> Tuple[Tuple[int, int], LaunchConfig]:
    """(grid, constexprs and options) of the forward launch."""
    rows, block_c, num_warps = _launch_config(C)
    return (cdiv(B * L, rows), cdiv(C, block_c)), LaunchConfig(HAS_POS=has_pos, ROWS=rows, BLOCK_C=block_c,
                                                               num_warps=num_warps)


@functools.lru_cache(maxsize=None)
def _bwd_config(B: int, L: int, C: int, pos_grad: bool, target: int
                ) -> Tuple[Tuple[int, int, int], int, LaunchConfig]:
    """(grid: row blocks, column blocks, batch slices; images per slice; constexprs and options)
    for about ``target`` programs (each sums over its slice of the batch)."""
    rows, block_c, num_warps = _launch_config(C)
    n_j, n_c = cdiv(L, rows), cdiv(C, block_c)
    n_b, b_per_prog = row_slices(B, 1, n_j * n_c, target)  # the batch in slices of whole images
    config = LaunchConfig(POS_GRAD=pos_grad, ROWS=rows, BLOCK_C=block_c, BLOCK_L=match_block(L, 64),
                          num_warps=num_warps)
    return (n_j, n_c, n_b), b_per_prog, config


def _out_dtype(vis: torch.Tensor, pos: Optional[torch.Tensor]) -> torch.dtype:
    return vis.dtype if pos is None else torch.promote_types(vis.dtype, pos.dtype)  # as vis + pos


def _scatter_masked_fwd(vis: torch.Tensor, ids_restore: torch.Tensor, mask_token: torch.Tensor,
                        pos: Optional[torch.Tensor]) -> torch.Tensor:
    vis = unit_last_stride(vis)
    B, K, C = vis.shape
    L = ids_restore.shape[1]
    out = torch.empty((B, L, C), dtype=_out_dtype(vis, pos), device=vis.device)
    if out.numel() == 0:
        check_index_without_kernel(ids_restore, "ids_restore", L)
        return out
    ids_restore = unit_last_stride(ids_restore)  # the kernel reads the indices and the token densely
    tok = unit_last_stride(mask_token.reshape(C))
    tok = tok if tok.dtype == vis.dtype else tok.to(vis.dtype)  # added in vis's dtype, as the reference
    if pos is not None:
        pos = unit_last_stride(pos)
    grid, config = _fwd_plan(B, L, C, pos is not None)
    ok = index_flag(vis.device)
    sv = vis.stride()
    launch_with(_scatter_masked_fwd_kernel, grid, config,
                vis, ids_restore, tok, pos if pos is not None else vis, out, ok, B * L, K, L, C,
                sv[0], sv[1], ids_restore.stride(0), pos.stride(0) if pos is not None else 0)
    check_index_flag(ok, ids_restore, "ids_restore", L)
    return out


def _scatter_masked_bwd(grad_out: torch.Tensor, ids_restore: torch.Tensor, K: int, vis_dtype: torch.dtype,
                        tok_shape: Optional[Sequence[int]], tok_dtype: torch.dtype,
                        pos_dtype: Optional[torch.dtype]) -> Tuple[torch.Tensor, Optional[torch.Tensor],
                                                                   Optional[torch.Tensor]]:
    """Returns (grad_vis [B, K, C] in vis_dtype, grad_mask_token in ``tok_shape`` and ``tok_dtype``
    (None when ``tok_shape`` is None: no gradient wanted), grad_pos [L, C] in ``pos_dtype`` (None
    when that is None))."""
    grad_out, ids_restore = unit_last_stride(grad_out), unit_last_stride(ids_restore)
    B, L, C = grad_out.shape
    dev = grad_out.device
    # the kernel inverts the unshuffle by scanning each image's ids_restore for the rows of
    # grad_vis it owns; indices outside [0, K) match no row
    grad_vis = torch.empty(B, K, C, dtype=vis_dtype, device=dev)
    pos_grad = pos_dtype is not None
    grid, b_per_prog, config = _bwd_config(B, L, C, pos_grad, _TARGET_PROGRAMS)
    n_j, _, n_b = grid
    tok_part = torch.empty(n_b * n_j, C, dtype=torch.float32, device=dev)  # a row per program
    pos_part = slice_partials(n_b, (L, C), pos_dtype, dev) if pos_grad else tok_part
    if grad_out.numel():
        sg = grad_out.stride()
        launch_with(_scatter_masked_bwd_kernel, grid, config,
                    grad_out, ids_restore, grad_vis, tok_part, pos_part,
                    B, K, L, C, b_per_prog, sg[0], sg[1], ids_restore.stride(0))
    else:
        grad_vis.zero_()
        tok_part.zero_()
        pos_part.zero_()
    grad_tok = sum_parts(tok_part, tok_shape, tok_dtype) if tok_shape is not None else None
    if not pos_grad:
        return grad_vis, grad_tok, None
    return grad_vis, grad_tok, added_slices(pos_part, n_b, (L, C), pos_dtype)


# ---- torch.library registration: what torch.compile and dispatch modes see -------------------

@torch.library.custom_op("tec_fast::scatter_masked", mutates_args=())
def _scatter_masked_op(vis: torch.Tensor, ids_restore: torch.Tensor, mask_token: torch.Tensor,
                       pos: Optional[torch.Tensor]) -> torch.Tensor:
    return _scatter_masked_fwd(vis, ids_restore, mask_token, pos)


@_scatter_masked_op.register_fake
def _(vis, ids_restore, mask_token, pos):
    return vis.new_empty((vis.shape[0], ids_restore.shape[1], vis.shape[2]), dtype=_out_dtype(vis, pos))


@torch.library.custom_op("tec_fast::scatter_masked_backward", mutates_args=())
def _scatter_masked_backward_op(grad_out: torch.Tensor, ids_restore: torch.Tensor, K: int, vis_dtype: torch.dtype,
                                tok_shape: Optional[List[int]], tok_dtype: torch.dtype,
                                pos_dtype: Optional[torch.dtype]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    grad_vis, grad_tok, grad_pos = _scatter_masked_bwd(grad_out, ids_restore, K, vis_dtype, tok_shape, tok_dtype,
                                                       pos_dtype)
    none = grad_out.new_empty((0,))  # a custom op returns tensors only
    return grad_vis, none if grad_tok is None else grad_tok, none if grad_pos is None else grad_pos


@_scatter_masked_backward_op.register_fake
def _(grad_out, ids_restore, K, vis_dtype, tok_shape, tok_dtype, pos_dtype):
    B, L, C = grad_out.shape
    none = grad_out.new_empty((0,))
    return (grad_out.new_empty((B, K, C), dtype=vis_dtype),
            none if tok_shape is None else grad_out.new_empty(tok_shape, dtype=tok_dtype),
            none if pos_dtype is None else grad_out.new_empty((L, C), dtype=pos_dtype))


# ---- autograd ---------------------------------------------------------------------------------

class _ScatterMasked(torch.autograd.Function):
    """Saves ids_restore only; the backward gathers grad_vis and sums the mask token's and
    pos's gradients in one kernel (and a partial-sum launch each)."""

    @staticmethod
    def forward(ctx, vis, ids_restore, mask_token, pos):
        out = (_scatter_masked_fwd if direct_launch() else _scatter_masked_op)(vis, ids_restore, mask_token, pos)
        ctx.save_for_backward(ids_restore)
        ctx.K, ctx.vis_dtype = vis.shape[1], vis.dtype
        ctx.tok_shape, ctx.tok_dtype = tuple(mask_token.shape), mask_token.dtype
        ctx.pos_dtype = pos.dtype if pos is not None else None
        return out

    @staticmethod
    @first_order("scatter_masked")
    def backward(ctx, grad_out):
        (ids_restore,) = ctx.saved_tensors
        need_vis, _, need_tok, need_pos = ctx.needs_input_grad
        pos_dtype = ctx.pos_dtype if need_pos else None
        tok_shape = ctx.tok_shape if need_tok else None
        if direct_launch():
            grad_vis, grad_tok, grad_pos = _scatter_masked_bwd(grad_out, ids_restore, ctx.K, ctx.vis_dtype,
                                                               tok_shape, ctx.tok_dtype, pos_dtype)
        else:
            grad_vis, grad_tok, grad_pos = _scatter_masked_backward_op(
                grad_out, ids_restore, ctx.K, ctx.vis_dtype, None if tok_shape is None else list(tok_shape),
                ctx.tok_dtype, pos_dtype)
        return (grad_vis if need_vis else None, None, grad_tok if need_tok else None,
                grad_pos if pos_dtype is not None else None)


_apply = eager_apply(_ScatterMasked)


def scatter_masked(vis: torch.Tensor, ids_restore: torch.Tensor, mask_token: torch.Tensor,
                   pos: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Triton path of ``tec_fast.ops.scatter_masked`` (inputs already validated there):
    mask_token holds C values (any shape); it is added in vis's dtype, as the reference does, and
    gets its gradient in its own shape and dtype; the output dtype is that of ``vis + pos``."""
    if torch.is_grad_enabled() and (vis.requires_grad or mask_token.requires_grad
                                    or (pos is not None and pos.requires_grad)):
        return _apply(vis, ids_restore, mask_token, pos)
    return (_scatter_masked_fwd if direct_launch() else _scatter_masked_op)(vis, ids_restore, mask_token, pos)


def not_supported_reasons(dtype: torch.dtype, shape: Tuple[int, ...], **_info) -> List[str]:
    """Why this kernel cannot take an input of ``dtype`` / ``shape`` (empty: it can)."""
    return dtype_reasons(dtype)
