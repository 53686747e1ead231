"""Sequence packing: the tokens of many images in one [T, C] sequence with ``cu_seqlens``.

Public API (DESIGN.md):

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

import bisect
import importlib
import json
import os
import warnings
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

__all__ = ["pack", "unpack", "plan_bins", "position_ids", "extension_status", "backend",
           "pack_reference", "unpack_reference", "plan_bins_reference", "position_ids_reference"]

_FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


# --------------------------------------------------------------------------------------------
# References: plain torch, the definition. They are also the kernels wherever the compiled
# extension is absent.
# --------------------------------------------------------------------------------------------
def _check_index_values(index: torch.Tensor, bound: int, op: str, name: str = "index") -> None:
    if index.numel() == 0:
        return
    lo, hi = torch.aminmax(index)
    lo, hi = int(lo), int(hi)
    if lo < 0 or hi >= bound:
        bad = int(((index < 0) | (index >= bound)).nonzero()[0, 0])
        raise ValueError(f"{op}: {name}[{bad}] = {int(index[bad])} is outside [0, {bound})")


def pack_reference(x: torch.Tensor, keep: torch.Tensor
                   ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(packed [T, C], cu_seqlens [B+1] int32, index [T] int64, max_len 0-dim int64 on CPU)."""
    B, L, C = x.shape
    index = keep.reshape(B * L).nonzero().reshape(-1)  # [T], sorted: batch order, patch order
    packed = x.reshape(B * L, C).index_select(0, index)  # [T, C]
    lengths = keep.sum(1)  # [B]
    cu_seqlens = torch.zeros(B + 1, dtype=torch.int32, device=x.device)
    cu_seqlens[1:] = lengths.cumsum(0)
    max_len = int(lengths.max()) if B else 0
    return packed, cu_seqlens, index, torch.tensor(max_len, dtype=torch.int64)


def unpack_reference(packed: torch.Tensor, index: torch.Tensor, fill: torch.Tensor,
                     B: int, L: int) -> torch.Tensor:
    T, C = packed.shape
    _check_index_values(index, B * L, "unpack")
    if torch.unique(index).numel() != T:
        raise ValueError("unpack: index holds a position twice")
    out = fill.reshape(1, C).expand(B * L, C).clone()  # [B*L, C]
    out.index_copy_(0, index, packed)
    return out.reshape(B, L, C)


def _gather_rows_reference(src: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    _check_index_values(index, src.shape[0], "gather_rows")
    return src.index_select(0, index)


def _unkept_row_sum_reference(grad: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    _check_index_values(index, grad.shape[0], "unkept_row_sum")
    unkept = torch.ones(grad.shape[0], dtype=torch.bool, device=grad.device)
    unkept[index] = False
    acc = torch.float64 if grad.dtype == torch.float64 else torch.float32
    return grad[unkept].sum(0, dtype=acc).to(grad.dtype)


def position_ids_reference(index: torch.Tensor, seq_len: int, grid_w: torch.Tensor) -> torch.Tensor:
    """[T, 2] int64 (row, col); grid_w [B] widths per image, or [1] shared by all."""
    if seq_len <= 0:
        raise ValueError(f"position_ids: seq_len must be positive, got {seq_len}")
    if grid_w.numel() == 0 or bool((grid_w <= 0).any()):
        raise ValueError(f"position_ids: grid_w must hold positive widths, got {grid_w.tolist()}")
    bound = grid_w.numel() * seq_len if grid_w.numel() > 1 else 2 ** 63 - 1
    _check_index_values(index, bound, "position_ids")
    j = index % seq_len
    w = grid_w[0] if grid_w.numel() == 1 else grid_w[index // seq_len]
    return torch.stack([j // w, j % w], dim=1)


def plan_bins_reference(lengths: Sequence[int], capacity: int) -> List[List[int]]:
    """Best-fit-decreasing in plain Python: the same bins as the C++ plan, tie for tie."""
    _check_bin_lengths(lengths, capacity)
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])  # stable: ties by id
    bins: List[List[int]] = []
    room: List[Tuple[int, int]] = []  # sorted (room left, bin id); full bins stay for length 0
    for i in order:
        need = lengths[i]
        k = bisect.bisect_left(room, (need, -1))
        if k == len(room):
            bins.append([i])
            bisect.insort(room, (capacity - need, len(bins) - 1))
        else:
            left, b = room.pop(k)
            bins[b].append(i)
            bisect.insort(room, (left - need, b))
    return bins


def _check_bin_lengths(lengths: Sequence[int], capacity: int) -> None:
    if capacity <= 0:
        raise ValueError(f"plan_bins: capacity must be a positive integer, got {capacity}")
    for i, n in enumerate(lengths):
        if n < 0:
            raise ValueError(f"plan_bins: lengths[{i}] = {n} is negative")
        if n > capacity:
            raise ValueError(f"plan_bins: lengths[{i}] = {n} exceeds capacity {capacity}")


# --------------------------------------------------------------------------------------------
# Operators: schema, fallback kernels, fake kernels, autograd.
# --------------------------------------------------------------------------------------------
_LIB = torch.library.Library("tec_fast", "FRAGMENT")
_LIB.define("pack(Tensor x, Tensor keep) -> (Tensor, Tensor, Tensor, Tensor)")
_LIB.define("unpack(Tensor packed, Tensor index, Tensor fill, SymInt B, SymInt L) -> Tensor")
_LIB.define("gather_rows(Tensor src, Tensor index) -> Tensor")
_LIB.define("unkept_row_sum(Tensor grad, Tensor index) -> Tensor")
_LIB.define("position_ids(Tensor index, SymInt seq_len, Tensor grid_w) -> Tensor")

# CompositeExplicitAutograd serves every backend that has no kernel of its own, so the compiled
# CPU/CUDA kernels (registered when the extension loads) take precedence where they exist.
_LIB.impl("pack", pack_reference, "CompositeExplicitAutograd")
_LIB.impl("unpack", unpack_reference, "CompositeExplicitAutograd")
_LIB.impl("gather_rows", _gather_rows_reference, "CompositeExplicitAutograd")
_LIB.impl("unkept_row_sum", _unkept_row_sum_reference, "CompositeExplicitAutograd")
_LIB.impl("position_ids", position_ids_reference, "CompositeExplicitAutograd")


@torch.library.register_fake("tec_fast::pack", lib=_LIB)
def _pack_fake(x, keep):
    B, L, C = x.shape
    T = torch.library.get_ctx().new_dynamic_size()
    return (x.new_empty(T, C), keep.new_empty(B + 1, dtype=torch.int32),
            keep.new_empty(T, dtype=torch.int64), torch.empty((), dtype=torch.int64))


@torch.library.register_fake("tec_fast::unpack", lib=_LIB)
def _unpack_fake(packed, index, fill, B, L):
    return packed.new_empty(B, L, packed.shape[1])


@torch.library.register_fake("tec_fast::gather_rows", lib=_LIB)
def _gather_rows_fake(src, index):
    return src.new_empty(index.shape[0], src.shape[1])


@torch.library.register_fake("tec_fast::unkept_row_sum", lib=_LIB)
def _unkept_row_sum_fake(grad, index):
    return grad.new_empty(grad.shape[1])


@torch.library.register_fake("tec_fast::position_ids", lib=_LIB)
def _position_ids_fake(index, seq_len, grid_w):
    return index.new_empty(index.shape[0], 2)


def _pack_setup(ctx, inputs, output):
    x, _ = inputs
    ctx.x_shape = tuple(x.shape)
    ctx.save_for_backward(output[2])


def _pack_backward(ctx, grad_packed, *_):
    (index,) = ctx.saved_tensors
    B, L, C = ctx.x_shape
    grad_x = torch.ops.tec_fast.unpack(grad_packed, index, grad_packed.new_zeros(C), B, L)
    return grad_x, None


def _unpack_setup(ctx, inputs, output):
    _, index, _, _, _ = inputs
    ctx.save_for_backward(index)


def _unpack_backward(ctx, grad):
    (index,) = ctx.saved_tensors
    g = grad.reshape(-1, grad.shape[-1])  # [B*L, C]
    grad_packed = torch.ops.tec_fast.gather_rows(g, index) if ctx.needs_input_grad[0] else None
    grad_fill = torch.ops.tec_fast.unkept_row_sum(g, index) if ctx.needs_input_grad[2] else None
    return grad_packed, None, grad_fill, None, None


def _gather_rows_setup(ctx, inputs, output):
    src, index = inputs
    ctx.n_src = src.shape[0]
    ctx.save_for_backward(index)


def _gather_rows_backward(ctx, grad):
    # index comes from unpack (checked there): no repeats, so scattering needs no accumulation
    (index,) = ctx.saved_tensors
    C = grad.shape[1]
    grad_src = torch.ops.tec_fast.unpack(grad, index, grad.new_zeros(C), ctx.n_src, 1)
    return grad_src.reshape(ctx.n_src, C), None


torch.library.register_autograd("tec_fast::pack", _pack_backward, setup_context=_pack_setup,
                                lib=_LIB)
torch.library.register_autograd("tec_fast::unpack", _unpack_backward, setup_context=_unpack_setup,
                                lib=_LIB)
torch.library.register_autograd("tec_fast::gather_rows", _gather_rows_backward,
                                setup_context=_gather_rows_setup, lib=_LIB)


# --------------------------------------------------------------------------------------------
# The compiled extension: loaded once at import, after the schemas above exist.
# --------------------------------------------------------------------------------------------
_BUILD_INFO = Path(__file__).with_name("_build_info.json")


def _load_extensions() -> Tuple[Optional[object], Dict[str, object]]:
    """Import tec_fast._C (and tec_fast._C_cuda where built and torch has CUDA); importing
    registers their kernels. Returns (the CPU module or None, status)."""
    status: Dict[str, object] = {
        "built": False, "loaded": False, "openmp": False, "reason": "",
        "cuda_built": False, "cuda": False, "cuda_reason": "",
        "built_for": None, "present": {"torch": torch.__version__, "cuda": torch.version.cuda}}
    if os.environ.get("TEC_FAST_NO_EXT", "0") not in ("", "0"):
        status["reason"] = status["cuda_reason"] = "TEC_FAST_NO_EXT is set"
        return None, status
    try:
        info = json.loads(_BUILD_INFO.read_text())
    except FileNotFoundError:
        info = {}
        status["reason"] = (f"no compiled extension ({_BUILD_INFO.name} not found; build it with "
                            "`pip install --no-build-isolation -e .`)")
    except (OSError, ValueError) as exc:
        info = {}
        status["reason"] = f"unreadable {_BUILD_INFO.name} ({exc})"
    built_torch, built_cuda = str(info.get("torch")), info.get("torch_cuda")
    status["built"] = bool(info.get("cpu", {}).get("built"))
    status["cuda_built"] = bool(info.get("cuda", {}).get("built"))
    cpu_ext = None
    if info:
        status["built_for"] = {"torch": built_torch, "cuda": built_cuda}
        if built_torch.split("+")[0] != torch.__version__.split("+")[0]:
            status["reason"] = (f"extension built for torch {built_torch}, but torch "
                                f"{torch.__version__} is installed: rebuild it")
        elif not status["built"]:
            status["reason"] = ("C++ extension was not built: "
                                f"{info.get('cpu', {}).get('reason') or 'no reason recorded'}")
        else:
            try:
                cpu_ext = importlib.import_module("tec_fast._C")
                status["loaded"] = True
                status["openmp"] = bool(cpu_ext.build_facts().get("openmp"))
            except Exception as exc:  # ImportError, undefined symbols of another torch, ...
                status["reason"] = (f"tec_fast._C (built for torch {built_torch}) does not load "
                                    f"on torch {torch.__version__}: {type(exc).__name__}: {exc}")
    if not status["cuda_built"]:
        status["cuda_reason"] = ("CUDA part not built: "
                                 f"{info.get('cuda', {}).get('reason') or status['reason']}")
    elif torch.version.cuda is None:
        status["cuda_reason"] = f"CUDA part built for CUDA {built_cuda}, but this torch has no CUDA"
    elif status["loaded"]:  # same torch as the CPU part, checked above
        try:
            importlib.import_module("tec_fast._C_cuda")
            status["cuda"] = True
        except Exception as exc:
            status["cuda_reason"] = (f"tec_fast._C_cuda (built for CUDA {built_cuda}) does not "
                                     f"load on torch {torch.__version__} / CUDA "
                                     f"{torch.version.cuda}: {type(exc).__name__}: {exc}")
    else:
        status["cuda_reason"] = status["reason"]
    problems = [status["reason"]] if not status["loaded"] else []
    if status["cuda_built"] and torch.version.cuda is not None and not status["cuda"] and \
            status["loaded"]:
        problems.append(status["cuda_reason"])
    if problems:
        warnings.warn(f"tec_fast.packing: {'; '.join(problems)} (using the plain-torch packing "
                      "kernels there)", RuntimeWarning, stacklevel=3)
    return cpu_ext, status


_C, _STATUS = _load_extensions()


def extension_status() -> Dict[str, object]:
    """What ``python -m tec_fast.info`` shows. Keys: built / loaded / openmp / reason (the C++
    part: built at install, imported now, parallel, why not in use), cuda_built / cuda /
    cuda_reason (the same for the CUDA part), built_for / present (torch and CUDA versions)."""
    return dict(_STATUS)


def backend(device: Union[str, torch.device] = "cpu") -> str:
    """Which kernel pack/unpack/position_ids run on tensors of ``device``, and why."""
    kind = torch.device(device).type
    if kind == "cpu" and _STATUS["loaded"]:
        return "C++ extension (tec_fast._C" + (", OpenMP)" if _STATUS["openmp"] else ")")
    if kind == "cuda" and _STATUS["cuda"]:
        return "CUDA extension (tec_fast._C_cuda)"
    why = _STATUS["cuda_reason"] if kind == "cuda" else _STATUS["reason"]
    return f"plain-torch reference ({why or 'no compiled kernel for ' + kind})"


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
        # the CUDA kernel skips bad indices instead of reading out of bounds; say so loudly
        _check_index_values(index, B * L, "unpack")
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
    if isinstance(capacity, bool) or not isinstance(capacity, int):
        try:
            capacity = int(capacity.__index__())
        except (AttributeError, TypeError):
            raise ValueError(f"plan_bins: capacity must be a positive int, got {capacity!r}") from None
    if capacity <= 0:
        raise ValueError(f"plan_bins: capacity must be a positive integer, got {capacity}")
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
    arr = arr.astype(np.int64, copy=False)
    if _C is not None:
        return _C.plan_bins(arr, capacity)
    return plan_bins_reference(arr.tolist(), capacity)
