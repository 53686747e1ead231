"""Sequence packing: the tokens of many images in one [T, C] sequence with ``cu_seqlens``.

Public API (docs/architecture.md):

- ``pack(x, keep)`` -> ``(packed [T, C], cu_seqlens [B+1] int32, max_len, index [T] int64)``:
  the kept tokens of x [B, L, C], images in batch order, tokens in patch order;
  ``index`` holds their flat positions b*L+j. Differentiable w.r.t. x.
- ``unpack(packed, index, fill, (B, L))`` -> [B, L, C]: packed rows back at ``index``, ``fill``
  [C] everywhere else. Differentiable w.r.t. packed and fill.
- ``plan_bins(lengths, capacity)`` -> list of bins (lists of sequence ids): best-fit-decreasing.
- ``position_ids(index, seq_len, grid_w)`` -> [T, 2] int64 (patch row, patch column) of every
  packed token, for per-image sin-cos embeddings.

pack/unpack run as ``torch.ops.tec_fast.*`` operators defined here (schema, fake and autograd
formula), so torch.compile traces them. Their kernels: C++ (``tec_fast._C``, csrc/packing_cpu.cpp)
on CPU, CUDA (``tec_fast._C_cuda``, csrc/packing_cuda.cu) on GPU, and the plain-torch
``*_reference`` functions below on any device the compiled extension does not cover. A missing or
broken extension is one warning at import; ``TEC_FAST_NO_EXT=1`` skips it on purpose (no warning).
``extension_status()`` says what loaded and why not.
"""
from __future__ import annotations

from typing import List, Sequence, Tuple, Union

import numpy as np
import torch

from tec_fast.packing import library  # noqa: F401  (defines torch.ops.tec_fast.pack, ...)
from tec_fast.packing.extension import _C, backend, extension_status
from tec_fast.packing.reference import (_check_index_values, check_no_repeats, pack_reference,
                                        plan_bins_reference, position_ids_reference,
                                        unpack_reference)

__all__ = ["pack", "unpack", "plan_bins", "position_ids", "extension_status", "backend",
           "pack_reference", "unpack_reference", "plan_bins_reference", "position_ids_reference"]

_FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


# --------------------------------------------------------------------------------------------
# Public API: validation up front, then the operators.
# --------------------------------------------------------------------------------------------
def _shape(t) -> str:
    return str(tuple(t.shape)) if isinstance(t, torch.Tensor) else type(t).__name__


def pack(x: torch.Tensor, keep: torch.Tensor
         ) -> Tuple[torch.Tensor, torch.Tensor, int, torch.Tensor]:
    """Pack the kept tokens of x [B, L, C] (keep [B, L] bool).

    Returns (packed [T, C], cu_seqlens [B+1] int32, max_len, index [T] int64 = b*L + j).
    Differentiable w.r.t. x (the gradient scatters back, zeros where not kept).
    """
    if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"pack: x must be a float/bf16/half [B, L, C] tensor, got "
                         f"{getattr(x, 'dtype', '')} {_shape(x)}")
    if not isinstance(keep, torch.Tensor) or keep.dtype != torch.bool or \
            tuple(keep.shape) != tuple(x.shape[:2]):
        raise ValueError(f"pack: keep must be a bool mask of shape {tuple(x.shape[:2])} "
                         f"(x is {tuple(x.shape)}), got {getattr(keep, 'dtype', '')} {_shape(keep)}")
    if keep.device != x.device:
        raise ValueError(f"pack: keep is on {keep.device} but x is on {x.device}")
    packed, cu_seqlens, index, max_len = torch.ops.tec_fast.pack(x, keep)
    return packed, cu_seqlens, int(max_len), index


def unpack(packed: torch.Tensor, index: torch.Tensor, fill: torch.Tensor,
           shape: Tuple[int, int]) -> torch.Tensor:
    """Inverse of pack: [B, L, C] with packed[t] at flat position index[t], ``fill`` [C]
    elsewhere (cast to packed's dtype). Differentiable w.r.t. packed and fill."""
    if not isinstance(packed, torch.Tensor) or packed.dim() != 2 or packed.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"unpack: packed must be a float/bf16/half [T, C] tensor, got "
                         f"{getattr(packed, 'dtype', '')} {_shape(packed)}")
    T, C = packed.shape
    if not isinstance(shape, (tuple, list, torch.Size)) or len(shape) != 2 or \
            not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape):
        raise ValueError(f"unpack: shape must be (B, L), two non-negative ints, got {shape!r}")
    B, L = (int(s) for s in shape)
    if not isinstance(index, torch.Tensor) or index.dim() != 1 or index.shape[0] != T or \
            index.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"unpack: index must be an int64 [T] = ({T},) tensor (T = packed rows), "
                         f"got {getattr(index, 'dtype', '')} {_shape(index)}")
    if not isinstance(fill, torch.Tensor) or fill.numel() != C or not fill.is_floating_point():
        raise ValueError(f"unpack: fill must be a float tensor of C = {C} values, got "
                         f"{getattr(fill, 'dtype', '')} {_shape(fill)}")
    for name, t in (("index", index), ("fill", fill)):
        if t.device != packed.device:
            raise ValueError(f"unpack: {name} is on {t.device} but packed is on {packed.device}")
    index = index.long()
    if packed.device.type != "cpu":
        # the CUDA kernel skips bad indices instead of reading out of bounds, and of a repeated
        # position keeps the last row: say so loudly (the CPU kernels raise these themselves)
        _check_index_values(index, B * L, "unpack")
        check_no_repeats(index, B * L, "unpack")
    return torch.ops.tec_fast.unpack(packed, index, fill.reshape(C).to(packed.dtype), B, L)


def position_ids(index: torch.Tensor, seq_len: int,
                 grid_w: Union[int, Sequence[int], torch.Tensor]) -> torch.Tensor:
    """(patch row, patch column) [T, 2] int64 of packed tokens at flat positions ``index``
    (as returned by pack) of images with ``seq_len`` patch slots, laid out row-major on a grid
    ``grid_w`` patches wide: one int for all images or one width per image [B]."""
    if not isinstance(index, torch.Tensor) or index.dim() != 1 or \
            index.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"position_ids: index must be a 1-D int64 tensor, got "
                         f"{getattr(index, 'dtype', '')} {_shape(index)}")
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len <= 0:
        raise ValueError(f"position_ids: seq_len must be a positive int, got {seq_len!r}")
    if isinstance(grid_w, bool):
        raise ValueError(f"position_ids: grid_w must be an int or [B] ints, got {grid_w!r}")
    widths = torch.as_tensor([grid_w] if isinstance(grid_w, int) else grid_w, device=index.device)
    if widths.dim() != 1 or widths.numel() == 0 or widths.is_floating_point() or \
            widths.dtype == torch.bool:
        raise ValueError(f"position_ids: grid_w must be an int or a 1-D [B] integer tensor, got "
                         f"{getattr(grid_w, 'dtype', type(grid_w).__name__)} {_shape(widths)}")
    widths = widths.long()
    if index.device.type != "cpu":  # the CUDA kernel clamps instead of raising
        bound = widths.numel() * seq_len if widths.numel() > 1 else 2 ** 63 - 1
        _check_index_values(index.long(), bound, "position_ids")
        if bool((widths <= 0).any()):
            raise ValueError(f"position_ids: grid_w must hold positive widths, got {widths.tolist()}")
    return torch.ops.tec_fast.position_ids(index.long(), seq_len, widths)


def plan_bins(lengths: Union[Sequence[int], torch.Tensor], capacity: int) -> List[List[int]]:
    """Group sequences of the given lengths into bins of at most ``capacity`` tokens.

    Best-fit-decreasing (at least as good as first-fit-decreasing in practice, same worst-case
    bound), O(n log n) in C++. Returns bins as lists of sequence ids (longest first within a
    bin); every id appears exactly once. A negative length or one over capacity is a ValueError
    naming it.
    """
    if isinstance(capacity, (bool, np.bool_)):  # True is not a capacity of 1 token
        raise ValueError(f"plan_bins: capacity must be a positive int, got {capacity!r}")
    if not isinstance(capacity, int):
        try:
            capacity = int(capacity.__index__())
        except (AttributeError, TypeError):
            raise ValueError(f"plan_bins: capacity must be a positive int, got {capacity!r}") from None
    if not 0 < capacity < 2 ** 63:
        raise ValueError(f"plan_bins: capacity must be a positive int64, got {capacity}")
    if isinstance(lengths, torch.Tensor):
        lengths = lengths.detach().cpu().numpy()
    try:
        arr = np.asarray(lengths)
    except (TypeError, ValueError, OverflowError) as exc:
        raise ValueError(f"plan_bins: lengths must be a 1-D sequence of ints ({exc})") from None
    if arr.ndim == 1 and arr.size == 0:
        return []
    if arr.ndim != 1 or arr.dtype.kind not in "iu":
        raise ValueError(f"plan_bins: lengths must be a 1-D sequence of ints, got dtype {arr.dtype} "
                         f"and shape {arr.shape}")
    if arr.dtype.kind == "u" and arr.size and int(arr.max()) >= 2 ** 63:
        bad = int(np.argmax(arr >= 2 ** 63))
        raise ValueError(f"plan_bins: lengths[{bad}] = {int(arr[bad])} does not fit in int64")
    arr = arr.astype(np.int64, copy=False)
    if _C is not None:
        return _C.plan_bins(arr, capacity)
    return plan_bins_reference(arr.tolist(), capacity)
