"""patch_embed: the ViT patch embedding (a stride-p convolution) as one gather kernel and a GEMM.

    patches[b*L + l, c*p*p + y*p + x] = images[b, c, gy*p + y, gx*p + x]     l = gy * (S/p) + gx
    out = patches @ W.reshape(D, C*p*p)^T + bias                             -> [B, L, D]

Measured on an H200 (torch 2.11, bf16 autocast, B=256, 224 px, ViT-B): cuDNN ran this
convolution in 2.1 ms per call (an Ampere-generation CUTLASS kernel). Its 59 GFLOP take 0.08 ms
at the 772 TFLOP/s that an 8192³ bf16 GEMM reached on that machine (computed, not timed).
The gather (``_patchify_kernel``) reads the images once in place, whatever their strides
and dtype (fp32 images under autocast), and writes the patches once in the GEMM's dtype, so the
cast costs no extra pass; torch ``addmm`` (cuBLAS) does the rest, and autograd gives the weight
and bias gradients from the patches it keeps (as the convolution keeps its input). Images that
require a gradient get it by the inverse rearrangement of the patches' gradient (a permute in
torch, cast to the images' dtype); the training step's images need none.
Reference: ``tec_fast.ops.reference.patch_embed``.
"""
from __future__ import annotations

from typing import List, Tuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from tec_fast.kernels._common import (autocast_dtype, cdiv, direct_launch, dtype_reasons, eager_apply, launch,
                                      next_pow2)

ROWS = 16  # patches per program


@triton.jit
def _patchify_kernel(img_ptr, out_ptr, n_rows, L, GW, K, stride_b, stride_c, stride_h, stride_w,
                     P: tl.constexpr, ROWS: tl.constexpr, BLOCK_K: tl.constexpr):
    # Program: ROWS patches (output rows b * L + l) by a block of BLOCK_K of their K = C*p*p
    # values in the convolution weight's (c, y, x) order; each row of p pixels is contiguous
    # in a plain NCHW image, so the loads coalesce in runs of p.
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    ks = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    row_ok, k_ok = rows < n_rows, ks < K
    b, l = rows // L, rows % L
    gy, gx = l // GW, l % GW
    c, y, x = ks // (P * P), (ks // P) % P, ks % P
    src = (b.to(tl.int64)[:, None] * stride_b + c[None, :].to(tl.int64) * stride_c
           + (gy[:, None] * P + y[None, :]).to(tl.int64) * stride_h
           + (gx[:, None] * P + x[None, :]).to(tl.int64) * stride_w)
    ok = row_ok[:, None] & k_ok[None, :]
    v = tl.load(img_ptr + src, mask=ok, other=0.0)
    tl.store(out_ptr + rows.to(tl.int64)[:, None] * K + ks[None, :], v.to(out_ptr.dtype.element_ty), mask=ok)


def _patchify(images: torch.Tensor, patch: int, dtype: torch.dtype) -> torch.Tensor:
    """images [B, C, S, S] (any strides) -> patches [B * L, C * p * p] in ``dtype``."""
    B, C, H, W = images.shape
    gh, gw = H // patch, W // patch
    L, K = gh * gw, C * patch * patch
    out = torch.empty((B * L, K), dtype=dtype, device=images.device)
    if out.numel():
        block_k = min(next_pow2(K), 256)
        grid = (cdiv(B * L, ROWS), cdiv(K, block_k))
        launch(_patchify_kernel, grid, images, out, B * L, L, gw, K, *images.stride(), P=patch, ROWS=ROWS,
                               BLOCK_K=block_k, num_warps=4)
    return out


# ---- torch.library registration: what torch.compile and dispatch modes see -------------------

@torch.library.custom_op("tec_fast::patchify", mutates_args=())
def _patchify_op(images: torch.Tensor, patch: int, dtype: torch.dtype) -> torch.Tensor:
    return _patchify(images, patch, dtype)


@_patchify_op.register_fake
def _(images, patch, dtype):
    B, C, H, W = images.shape
    return images.new_empty((B * (H // patch) * (W // patch), C * patch * patch), dtype=dtype)


# ---- autograd ---------------------------------------------------------------------------------

class _Patchify(torch.autograd.Function):
    """The gather, for images that require a gradient: its backward puts each patch's gradient
    back where the patch came from."""

    @staticmethod
    def forward(ctx, images, patch, dtype):
        ctx.shape, ctx.dtype, ctx.patch = images.shape, images.dtype, patch
        return (_patchify if direct_launch() else _patchify_op)(images, patch, dtype)

    @staticmethod
    def backward(ctx, grad):
        B, C, H, W = ctx.shape
        p = ctx.patch
        g = grad.view(B, H // p, W // p, C, p, p).permute(0, 3, 1, 4, 2, 5).reshape(B, C, H, W)
        return (g if g.dtype == ctx.dtype else g.to(ctx.dtype)), None, None


_apply = eager_apply(_Patchify)


def patch_embed(images: torch.Tensor, weight: torch.Tensor, bias) -> torch.Tensor:
    """Triton path of ``tec_fast.ops.reference.patch_embed``: images [B, C, S, S], weight
    [D, C, p, p], bias [D] or None -> [B, L, D] (contiguous), in the autocast dtype when autocast
    is on, else in weight's dtype."""
    dev = images.device.type
    dtype = autocast_dtype(dev) or weight.dtype
    patch = weight.shape[-1]
    if images.requires_grad and torch.is_grad_enabled():
        patches = _apply(images, patch, dtype)
    else:  # the training step's images: no node
        patches = (_patchify if direct_launch() else _patchify_op)(images, patch, dtype)
    out = F.linear(patches, weight.reshape(weight.shape[0], -1), bias)
    B, _, H, W = images.shape
    return out.view(B, (H // patch) * (W // patch), weight.shape[0])


def not_supported_reasons(dtype: torch.dtype, shape: Tuple[int, ...], **_info) -> List[str]:
    """Why this path cannot take images of ``dtype`` / ``shape`` (empty: it can)."""
    return dtype_reasons(dtype)
