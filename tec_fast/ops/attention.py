"""Attention over a packed sequence (tokens of several images in one [T, H, d] tensor, image b
owning rows cu_seqlens[b]:cu_seqlens[b+1]): block-diagonal, no compute spent on padding.

Backends, the first that applies (``packed_attention_backend`` says which and why not the others):
1. ``varlen``: torch's flash-attention varlen kernel (``torch.nn.attention.varlen.varlen_attn``,
   forward and backward; CUDA, fp16 / bf16, compute capability >= 8.0, head dim a multiple of 8
   up to 256);
2. ``xformers``: ``memory_efficient_attention`` with a ``BlockDiagonalMask`` (CUDA, when xformers'
   compiled ops load on the installed torch);
3. ``nested``: SDPA on jagged nested tensors (``torch.nested.nested_tensor_from_jagged``; CPU and
   GPU, forward and backward);
4. ``dense``: SDPA with the materialised block-diagonal mask (tiny cases, tests; always works).
FlexAttention with a document mask is not used: on CPU it has no backward.

Nothing here reads a tensor back to the host when the caller passes what the host already knows:
``max_len`` always, and ``lengths`` (the images' token counts) for xformers, which builds its
mask on the host, and for nested tensors, whose SDPA otherwise computes the shortest length. The layouts (``models/layout.py``) know both from the sampler's masks.
"""
from __future__ import annotations

import functools
import os
import warnings
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

BACKENDS = ("varlen", "xformers", "nested", "dense")
_FLASH_DTYPES = (torch.float16, torch.bfloat16)


@functools.lru_cache(maxsize=None)
def _varlen_attn():
    try:
        from torch.nn.attention.varlen import varlen_attn
        return varlen_attn, ""
    except Exception as exc:  # torch < 2.10
        return None, f"varlen: torch {torch.__version__} has no torch.nn.attention.varlen ({type(exc).__name__})"


@functools.lru_cache(maxsize=None)
def _capability(index: Optional[int]) -> Tuple[int, int]:
    return torch.cuda.get_device_capability(index)


@functools.lru_cache(maxsize=None)
def _xformers_ops():
    try:
        import xformers.ops as xops
        from xformers.ops.fmha.attn_bias import BlockDiagonalMask  # noqa: F401
        return xops, ""
    except Exception as exc:  # ImportError, or compiled ops built for another torch
        return None, f"xformers unavailable ({type(exc).__name__}: {str(exc)[:100]})"


def varlen_not_supported_reasons(device: torch.device, dtype: torch.dtype,
                                 head_dim: Optional[int] = None) -> List[str]:
    """Why the flash varlen kernel cannot run these tensors (empty: it can). ``head_dim`` None:
    not judged."""
    fn, why = _varlen_attn()
    if fn is None:
        return [why]
    reasons = []
    if device.type != "cuda":
        reasons.append(f"varlen: needs CUDA tensors, got {device.type}")
    elif _capability(device.index) < (8, 0):
        reasons.append(f"varlen: flash attention needs compute capability >= 8.0, this GPU has "
                       f"{'.'.join(map(str, _capability(device.index)))}")
    if dtype not in _FLASH_DTYPES:
        reasons.append(f"varlen: flash attention takes fp16 / bf16, got {dtype} (train under bf16 autocast)")
    if head_dim is not None and (head_dim % 8 or head_dim > 256):
        reasons.append(f"varlen: head dim must be a multiple of 8 up to 256, got {head_dim}")
    return reasons


def _xformers_not_supported_reasons(device: torch.device, dtype: torch.dtype) -> List[str]:
    xops, why = _xformers_ops()
    if xops is None:
        return [why]
    if device.type != "cuda":
        return [f"xformers needs CUDA tensors, got {device.type}"]
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return [f"xformers: unsupported dtype {dtype}"]
    return []


@functools.lru_cache(maxsize=1)
def _forced() -> str:
    """``TEC_FAST_PACKED_ATTENTION``, read once (``reload_environment()`` after changing it)."""
    forced = os.environ.get("TEC_FAST_PACKED_ATTENTION", "").strip().lower()
    if forced and forced not in BACKENDS:
        raise ValueError(f"TEC_FAST_PACKED_ATTENTION must be one of {BACKENDS}, got {forced!r}")
    return forced


def reload_environment() -> None:
    """Re-read ``TEC_FAST_PACKED_ATTENTION``: the setting and the backend choices made under it."""
    _forced.cache_clear()
    packed_attention_backend.cache_clear()


@functools.lru_cache(maxsize=64)
def packed_attention_backend(device: torch.device, dtype: torch.dtype,
                             head_dim: Optional[int] = None) -> Tuple[str, Tuple[str, ...]]:
    """The backend ``packed_attention`` takes for tensors on ``device``, and why not the faster ones.
    ``TEC_FAST_PACKED_ATTENTION=varlen|xformers|nested|dense`` forces one."""
    forced = _forced()
    if forced:
        return forced, (f"forced by TEC_FAST_PACKED_ATTENTION={forced}",)
    device = torch.device(device)
    reasons = varlen_not_supported_reasons(device, dtype, head_dim)
    if not reasons:
        return "varlen", ()
    why = _xformers_not_supported_reasons(device, dtype)
    if not why:
        return "xformers", tuple(reasons)
    return "nested", tuple(reasons + why)


def packed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                     max_len: int, backend: Optional[str] = None,
                     lengths: Optional[Sequence[int]] = None) -> torch.Tensor:
    """Block-diagonal softmax attention (scale d^-0.5) of packed q, k, v [T, H, d] -> [T, H, d].
    ``cu_seqlens`` [B+1] int32 on q's device, ``max_len`` the longest image (host int),
    ``lengths`` the B token counts when the host knows them. The values of ``cu_seqlens`` are
    checked only when it lives on the CPU (a check of a GPU tensor would wait for the GPU)."""
    if q.dim() != 3 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(f"q, k, v must be [T, H, d] of one shape, got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2 or cu_seqlens.dtype != torch.int32:
        raise ValueError(f"cu_seqlens must be an int32 [B+1] tensor, got {cu_seqlens.dtype} "
                         f"{tuple(cu_seqlens.shape)}")
    T = q.shape[0]
    if lengths is not None and (len(lengths) != cu_seqlens.numel() - 1 or sum(lengths) != T):
        raise ValueError(f"lengths must hold B={cu_seqlens.numel() - 1} counts adding up to T={T}, "
                         f"got {len(lengths)} adding up to {sum(lengths)}")
    if cu_seqlens.device.type == "cpu":
        counts = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
        if int(cu_seqlens[0]) != 0 or int(cu_seqlens[-1]) != T or min(counts) < 0:
            raise ValueError(f"cu_seqlens must rise from 0 to T={T}, got {cu_seqlens.tolist()[:8]}"
                             f"{' ...' if cu_seqlens.numel() > 8 else ''}")
        if lengths is not None and list(lengths) != counts:
            raise ValueError(f"lengths {list(lengths)[:8]} differ from the counts cu_seqlens gives, {counts[:8]}")
    if not isinstance(max_len, int) or isinstance(max_len, bool) or not 1 <= max_len <= T:
        raise ValueError(f"max_len must be an int in [1, T={T}] (the longest image), got {max_len!r}")
    if backend is None:
        backend, _ = packed_attention_backend(q.device, q.dtype, q.shape[-1])
    if backend == "varlen":
        fn, why = _varlen_attn()
        if fn is None:
            raise ValueError(why)
        return fn(q, k, v, cu_seqlens, cu_seqlens, max_len, max_len)
    if backend == "xformers":
        xops, _ = _xformers_ops()
        from xformers.ops.fmha.attn_bias import BlockDiagonalMask
        if lengths is None:
            lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()  # reads back: pass lengths
        bias = BlockDiagonalMask.from_seqlens(list(lengths))
        return xops.memory_efficient_attention(q[None], k[None], v[None], attn_bias=bias)[0]
    if backend == "nested":
        offsets = cu_seqlens.to(torch.int64)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "nested tensors are a prototype"

            def nt(x):
                return torch.nested.nested_tensor_from_jagged(
                    x.contiguous(), offsets=offsets, max_seqlen=max_len,
                    min_seqlen=min(lengths) if lengths is not None else None).transpose(1, 2)  # [B, H, j, d]
            out = F.scaled_dot_product_attention(nt(q), nt(k), nt(v))
        return out.transpose(1, 2).values()
    if backend == "dense":
        seg = torch.repeat_interleave(torch.arange(cu_seqlens.numel() - 1, device=q.device),
                                      (cu_seqlens[1:] - cu_seqlens[:-1]).to(q.device), output_size=T)
        mask = seg[:, None] == seg[None, :]  # [T, T]
        out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None],
                                             v.transpose(0, 1)[None], attn_mask=mask)
        return out[0].transpose(0, 1)
    raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
