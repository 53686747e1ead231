"""tec_fast.packing at the edges: the operators' own argument checks for direct ``torch.ops`` /
``tec_fast._C`` callers (who skip the Python wrappers' checks), index bounds at exactly B*L, the
wrappers' checks of fill, capacity and unsigned lengths, and unpack's gradient with a frozen fill.

Like tests/ops/test_packing.py these run on whatever kernels this install uses; the ones about the
compiled extension itself skip when it is not loaded.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from tec_fast import packing


def _raises(match, fn, *args):
    with pytest.raises(ValueError, match=match):
        fn(*args)


def _extension():
    status = packing.extension_status()
    if not status["loaded"]:
        pytest.skip(f"the C++ extension is not loaded ({status['reason']})")
    from tec_fast import _C
    return _C


# ---- unpack's operator checks -----------------------------------------------------------------
def test_unpack_operator_refuses_an_index_of_another_length():
    packed, fill = torch.randn(4, 3), torch.zeros(3)
    _raises(r"unpack: index must have T = 4 entries \(one per packed row\), got 3",
            torch.ops.tec_fast.unpack, packed, torch.tensor([0, 1, 2]), fill, 2, 5)
    _raises(r"unpack: index must have T = 2 entries \(one per packed row\), got 5",
            torch.ops.tec_fast.unpack, packed[:2], torch.arange(5), fill, 2, 5)


def test_unpack_operator_refuses_a_fill_of_another_dtype():
    packed, index = torch.randn(2, 3), torch.tensor([0, 4])
    _raises(r"unpack: fill must be \[C = 3\] of dtype (Float|torch.float32), got (Double|torch.float64)",
            torch.ops.tec_fast.unpack, packed, index, torch.zeros(3, dtype=torch.float64), 2, 3)
    _raises(r"unpack: fill must be \[C = 3\] of dtype (BFloat16|torch.bfloat16)",
            torch.ops.tec_fast.unpack, packed.bfloat16(), index, torch.zeros(3), 2, 3)


def test_unpack_operator_refuses_a_negative_length():
    packed, index, fill = torch.randn(1, 3), torch.tensor([0]), torch.zeros(3)
    _raises(r"unpack: \(B, L\) must be non-negative, got \(2, -3\)",
            torch.ops.tec_fast.unpack, packed, index, fill, 2, -3)
    _raises(r"unpack: \(B, L\) must be non-negative, got \(-2, 3\)",
            torch.ops.tec_fast.unpack, packed, index, fill, -2, 3)


def test_unpack_index_equal_to_b_times_l_is_outside():
    """B*L is one past the last position: refused like any other position outside [0, B*L)."""
    packed, fill = torch.randn(2, 3), torch.zeros(3)
    _raises(r"unpack: index\[1\] = 6 is outside \[0, 6\)", packing.unpack, packed, torch.tensor([0, 6]),
            fill, (2, 3))
    _raises(r"unpack: index\[0\] = 6 is outside \[0, 6\)", torch.ops.tec_fast.unpack, packed,
            torch.tensor([6, 5]), fill, 2, 3)
    out = packing.unpack(packed, torch.tensor([0, 5]), fill, (2, 3))  # the last position is inside
    assert torch.equal(out[1, 2], packed[1]) and torch.equal(out[0, 0], packed[0])


def test_operators_refuse_an_int32_index():
    _extension()
    packed, fill = torch.randn(2, 3), torch.zeros(3)
    index = torch.tensor([0, 4], dtype=torch.int32)
    _raises(r"unpack: index must be a 1-D int64 tensor, got Int", torch.ops.tec_fast.unpack,
            packed, index, fill, 2, 3)
    _raises(r"gather_rows: index must be a 1-D int64 tensor, got Int", torch.ops.tec_fast.gather_rows,
            torch.randn(6, 3), index)
    _raises(r"position_ids: index must be a 1-D int64 tensor, got Int", torch.ops.tec_fast.position_ids,
            index, 3, torch.tensor([3]))
    # the public wrapper converts an int32 index itself
    assert torch.equal(packing.unpack(packed, index, fill, (2, 3)),
                       packing.unpack(packed, index.long(), fill, (2, 3)))


# ---- pack's operator checks -------------------------------------------------------------------
def test_pack_operator_refuses_a_keep_with_fewer_images():
    x = torch.randn(3, 5, 2)
    _raises(r"pack: keep must be a bool \[B, L\] mask matching x", torch.ops.tec_fast.pack, x,
            torch.ones(2, 5, dtype=torch.bool))
    _raises(r"pack: keep must be a bool \[B, L\] mask matching x", torch.ops.tec_fast.pack, x,
            torch.ones(4, 5, dtype=torch.bool))


# ---- position_ids' operator checks ------------------------------------------------------------
def test_position_ids_operator_refuses_seq_len_zero():
    index = torch.tensor([0, 1, 2])
    _raises(r"position_ids: seq_len must be positive, got 0", torch.ops.tec_fast.position_ids,
            index, 0, torch.tensor([3]))
    _raises(r"position_ids: seq_len must be positive, got -4", torch.ops.tec_fast.position_ids,
            index, -4, torch.tensor([3, 2]))


# ---- plan_bins --------------------------------------------------------------------------------
def test_compiled_plan_bins_refuses_capacity_zero():
    """The compiled plan_bins checks its capacity itself (the Python wrapper checks it too): zero-
    length sequences in bins of capacity 0 are no plan."""
    _C = _extension()
    for lengths in ([0, 0], []):
        with pytest.raises(ValueError, match=r"plan_bins: capacity must be a positive integer, got 0"):
            _C.plan_bins(np.array(lengths, dtype=np.int64), 0)
    with pytest.raises(ValueError, match=r"plan_bins: capacity must be a positive integer, got -3"):
        _C.plan_bins(np.array([0], dtype=np.int64), -3)
    _raises(r"plan_bins: capacity must be a positive integer, got 0", packing.plan_bins_reference, [0], 0)


@pytest.mark.parametrize("capacity", [True, False, np.bool_(True)])
def test_plan_bins_refuses_a_bool_capacity(capacity):
    """True passed the bool check to int conversion as a capacity of 1; False was named 0."""
    with pytest.raises(ValueError, match=rf"^plan_bins: capacity must be a positive int, got {capacity!r}$"):
        packing.plan_bins([1, 0], capacity)


def test_plan_bins_names_an_unsigned_length_of_two_to_the_63():
    """2**63 does not fit in int64: named as such, not wrapped around to a negative length."""
    lengths = np.array([3, 2 ** 63], dtype=np.uint64)
    _raises(r"plan_bins: lengths\[1\] = 9223372036854775808 does not fit in int64", packing.plan_bins,
            lengths, 10)
    assert packing.plan_bins(np.array([3, 10], dtype=np.uint64), 10) == [[1], [0]]


# ---- unpack's fill ----------------------------------------------------------------------------
def test_unpack_refuses_an_integer_fill():
    packed, index = torch.randn(2, 3), torch.tensor([0, 4])
    for fill in (torch.zeros(3, dtype=torch.long), torch.ones(3, dtype=torch.bool)):
        _raises(r"unpack: fill must be a float tensor of C = 3 values, got torch\.(int64|bool)",
                packing.unpack, packed, index, fill, (2, 3))


# ---- gradients --------------------------------------------------------------------------------
def test_unpack_gradient_reaches_packed_when_fill_is_frozen():
    """A constant fill (no gradient asked for) still leaves the packed rows theirs."""
    gen = torch.Generator().manual_seed(0)
    packed = torch.randn(3, 4, generator=gen, requires_grad=True)
    index = torch.tensor([1, 3, 4])
    g = torch.randn(2, 3, 4, generator=gen)
    out = packing.unpack(packed, index, torch.zeros(4), (2, 3))
    out.backward(g)
    assert torch.equal(packed.grad, g.reshape(6, 4)[index])
    # and the other way round: only fill asks for a gradient
    fill = torch.zeros(4, requires_grad=True)
    packing.unpack(packed.detach(), index, fill, (2, 3)).backward(g)
    assert torch.allclose(fill.grad, g.reshape(6, 4)[[0, 2, 5]].sum(0))


# ---- switching the extension off --------------------------------------------------------------
def test_an_empty_no_ext_variable_keeps_the_extension(monkeypatch):
    """Only a set TEC_FAST_NO_EXT (not "" or "0") switches the compiled kernels off."""
    _extension()
    from tec_fast.packing import extension

    for value in ("", "0"):
        monkeypatch.setenv("TEC_FAST_NO_EXT", value)
        module, status = extension._load_extensions()  # the loaded module again: nothing re-registers
        assert module is not None and status["loaded"] and status["reason"] == "", (value, status)
    monkeypatch.setenv("TEC_FAST_NO_EXT", "1")
    module, status = extension._load_extensions()
    assert module is None and not status["loaded"] and status["reason"] == "TEC_FAST_NO_EXT is set"
