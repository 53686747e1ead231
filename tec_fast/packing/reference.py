"""Plain-torch references of the packing operators: the definitions, and the kernels wherever
the compiled extension is absent. They raise the same errors as the C++/CUDA kernels."""
from __future__ import annotations

import bisect
from typing import List, Sequence, Tuple

import torch

# --------------------------------------------------------------------------------------------
def _check_index_values(index: torch.Tensor, bound: int, op: str, name: str = "index") -> None:
    if index.numel() == 0:
        return
    lo, hi = torch.aminmax(index)
    lo, hi = int(lo), int(hi)
    if lo < 0 or hi >= bound:
        bad = int(((index < 0) | (index >= bound)).nonzero()[0, 0])
        raise ValueError(f"{op}: {name}[{bad}] = {int(index[bad])} is outside [0, {bound})")


def check_no_repeats(index: torch.Tensor, bound: int, op: str) -> None:
    """``index`` (values in [0, bound), checked before) names each position once; a ValueError
    names the first position it repeats (the C++ kernel's message)."""
    if index.numel() < 2:
        return
    counts = torch.bincount(index, minlength=bound)
    if bool((counts > 1).any()):
        pos = int((counts > 1).nonzero()[0, 0])
        where = (index == pos).nonzero().reshape(-1)[:2].tolist()
        raise ValueError(f"{op}: index holds position {pos} twice (index[{where[0]}] and index[{where[1]}])")


def pack_reference(x: torch.Tensor, keep: torch.Tensor
                   ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(packed [T, C], cu_seqlens [B+1] int32, index [T] int64, max_len 0-dim int64 on CPU)."""
    if x.dim() != 3:
        raise ValueError(f"pack: x must be [B, L, C], got shape {list(x.shape)}")
    if keep.dtype != torch.bool or keep.dim() != 2 or tuple(keep.shape) != tuple(x.shape[:2]):
        raise ValueError(f"pack: keep must be a bool [B, L] mask matching x {list(x.shape)}, got "
                         f"{keep.dtype} of shape {list(keep.shape)}")
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
    if index.shape[0] != T:
        raise ValueError(f"unpack: index must have T = {T} entries (one per packed row), got "
                         f"{index.shape[0]}")
    if fill.dim() != 1 or fill.shape[0] != C or fill.dtype != packed.dtype:
        raise ValueError(f"unpack: fill must be [C = {C}] of dtype {packed.dtype}, got {fill.dtype} "
                         f"of shape {list(fill.shape)}")
    if B < 0 or L < 0:
        raise ValueError(f"unpack: (B, L) must be non-negative, got ({B}, {L})")
    for what, size in (("B * L", B * L), ("B * L * C", B * L * C)):
        if size > 2 ** 63 - 1:
            raise ValueError(f"unpack: {what} = {size} overflows int64")
    _check_index_values(index, B * L, "unpack")
    check_no_repeats(index, B * L, "unpack")
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
    return grad[unkept].sum(0, dtype=torch.float64).to(grad.dtype)  # double, as the C++ kernel sums


def position_ids_reference(index: torch.Tensor, seq_len: int, grid_w: torch.Tensor) -> torch.Tensor:
    """[T, 2] int64 (row, col); grid_w [B] widths per image, or [1] shared by all."""
    if seq_len <= 0:
        raise ValueError(f"position_ids: seq_len must be positive, got {seq_len}")
    if grid_w.numel() == 0:
        raise ValueError("position_ids: grid_w must hold at least one width")
    bad = (grid_w <= 0).nonzero()
    if bad.numel():
        g = int(bad[0, 0])
        raise ValueError(f"position_ids: grid_w[{g}] = {int(grid_w[g])} must be positive")
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


