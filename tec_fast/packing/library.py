"""The ``torch.ops.tec_fast`` packing operators: schema, fallback kernels (the references),
fake kernels and autograd formulas. Importing this module defines them; the compiled extension
(``extension.py``) then registers its CPU/CUDA kernels for the same schemas."""
from __future__ import annotations

import torch

from tec_fast.packing.reference import (_gather_rows_reference, _unkept_row_sum_reference,
                                        pack_reference, position_ids_reference, unpack_reference)

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


def _row_count_setup(ctx, inputs, output):
    """gather_rows and unkept_row_sum: (rows [N, C], index) in; the backward needs N and index."""
    rows, index = inputs
    ctx.n_rows = rows.shape[0]
    ctx.save_for_backward(index)


def _rows_at(ctx, packed: torch.Tensor, fill: torch.Tensor) -> torch.Tensor:
    """[N, C]: packed[t] on row index[t], ``fill`` on every other row (unpack with L = 1)."""
    (index,) = ctx.saved_tensors
    return torch.ops.tec_fast.unpack(packed, index, fill, ctx.n_rows, 1).reshape(ctx.n_rows, fill.shape[0])


def _gather_rows_backward(ctx, grad):
    # index comes from unpack (checked there): no repeats, so scattering needs no accumulation
    return _rows_at(ctx, grad, grad.new_zeros(grad.shape[1])), None


def _unkept_row_sum_backward(ctx, grad_sum):
    # out[c] = sum of grad[r, c] over the rows r not in index: its gradient is grad_sum on every
    # such row and zero on the kept ones. What a second derivative through unpack's fill
    # gradient needs.
    (index,) = ctx.saved_tensors
    return _rows_at(ctx, grad_sum.new_zeros(index.shape[0], grad_sum.shape[0]), grad_sum), None


torch.library.register_autograd("tec_fast::pack", _pack_backward, setup_context=_pack_setup,
                                lib=_LIB)
torch.library.register_autograd("tec_fast::unpack", _unpack_backward, setup_context=_unpack_setup,
                                lib=_LIB)
torch.library.register_autograd("tec_fast::gather_rows", _gather_rows_backward,
                                setup_context=_row_count_setup, lib=_LIB)
torch.library.register_autograd("tec_fast::unkept_row_sum", _unkept_row_sum_backward,
                                setup_context=_row_count_setup, lib=_LIB)


