"""Attention over a packed sequence (tokens of several images in one [T, H, d] tensor, image b
owning rows cu_seqlens[b]:cu_seqlens[b+1]): block-diagonal, no compute spent on padding.

Backends, the first that applies (``packed_attention_backend`` says which and why not the others):
1. xformers ``memory_efficient_attention`` with a ``BlockDiagonalMask`` (CUDA, when xformers'
   compiled ops load on the installed torch);
2. SDPA on jagged nested tensors (``torch.nested.nested_tensor_from_jagged``; CPU and GPU,
   forward and backward);
3. dense SDPA with the materialised block-diagonal mask (tiny cases; always works).
FlexAttention with a document mask is not used: on CPU it has no backward, and on GPU the jagged
SDPA route already reaches the flash / efficient kernels.
"""
from __future__ import annotations

import functools
import os
import warnings
from typing import List, Tuple

import torch
import torch.nn.functional as F

BACKENDS = ("xformers", "nested", "dense")


@functools.lru_cache(maxsize=None)
def _xformers_ops():
    try:
        import xformers.ops as xops
        from xformers.ops.fmha.attn_bias import BlockDiagonalMask  # noqa: F401
        return xops, ""
    except Exception as exc:  # ImportError, or compiled ops built for another torch
        return None, f"xformers unavailable ({type(exc).__name__}: {str(exc)[:100]})"


def packed_attention_backend(device: torch.device, dtype: torch.dtype) -> Tuple[str, List[str]]:
    """The backend ``packed_attention`` takes for tensors on ``device``, and why not the faster ones.
    ``TEC_FAST_PACKED_ATTENTION=xformers|nested|dense`` forces one."""
    forced = os.environ.get("TEC_FAST_PACKED_ATTENTION", "").strip().lower()
    if forced:
        if forced not in BACKENDS:
            raise ValueError(f"TEC_FAST_PACKED_ATTENTION must be one of {BACKENDS}, got {forced!r}")
        return forced, [f"forced by TEC_FAST_PACKED_ATTENTION={forced}"]
    reasons = []
    xops, why = _xformers_ops()
    if xops is None:
        reasons.append(why)
    elif device.type != "cuda":
        reasons.append(f"xformers needs CUDA tensors, got {device.type}")
    elif dtype not in (torch.float16, torch.bfloat16, torch.float32):
        reasons.append(f"xformers: unsupported dtype {dtype}")
    else:
        return "xformers", reasons
    return "nested", reasons


def packed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                     max_len: int, backend: str = None) -> torch.Tensor:
    """Block-diagonal softmax attention (scale d^-0.5) of packed q, k, v [T, H, d] -> [T, H, d]."""
    if q.dim() != 3 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(f"q, k, v must be [T, H, d] of one shape, got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if cu_seqlens.dim() != 1 or int(cu_seqlens[-1]) != q.shape[0] or int(cu_seqlens[0]) != 0:
        raise ValueError(f"cu_seqlens must run from 0 to T={q.shape[0]}, got {cu_seqlens.tolist()[:8]}")
    if backend is None:
        backend, _ = packed_attention_backend(q.device, q.dtype)
    if backend == "xformers":
        xops, _ = _xformers_ops()
        from xformers.ops.fmha.attn_bias import BlockDiagonalMask
        lens = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
        bias = BlockDiagonalMask.from_seqlens(lens)
        return xops.memory_efficient_attention(q[None], k[None], v[None], attn_bias=bias)[0]
    if backend == "nested":
        offsets = cu_seqlens.to(torch.int64)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "nested tensors are a prototype"

            def nt(x):
                return torch.nested.nested_tensor_from_jagged(x.contiguous(), offsets=offsets, max_seqlen=max_len) \
                    .transpose(1, 2)  # [B, H, j, d]
            out = F.scaled_dot_product_attention(nt(q), nt(k), nt(v))
        return out.transpose(1, 2).values()
    if backend == "dense":
        seg = torch.repeat_interleave(torch.arange(len(cu_seqlens) - 1, device=q.device),
                                      (cu_seqlens[1:] - cu_seqlens[:-1]).to(q.device))
        mask = seg[:, None] == seg[None, :]  # [T, T]
        out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None],
                                             v.transpose(0, 1)[None], attn_mask=mask)
        return out[0].transpose(0, 1)
    raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
