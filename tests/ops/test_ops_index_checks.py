"""Index values on the Triton path are checked by the kernels that read them (masked_gather's
ids_keep, scatter_masked's ids_restore, relation_loss's topk_idx), not before the launch. On CPU
(the interpreter) an index out of range is the same ValueError as on the reference path, naming
the argument and the range found; the next call is unaffected; an op with an empty output still
checks. The CUDA route (a flag kept per device, one device-side assertion after the launch) runs
here forced onto CPU tensors, where ``torch._assert_async`` raises at once. A bad row of
relation_loss reads nothing: the other rows' losses are those a valid index gives."""
from __future__ import annotations

import pytest
import torch

from tec_fast import ops


# each: (a call of the op, the index argument's name, its bound), an index set to ``bad`` if given
def _gather(bad=None, C=5, device="cpu"):
    x = torch.randn(2, 6, C, device=device, requires_grad=True)
    ids = torch.tensor([[0, 3, 5], [1, 2, 4]], device=device)
    if bad is not None:
        ids[1, 2] = bad
    return (lambda: ops.masked_gather(x, ids, torch.randn(6, C, device=device))), "ids_keep", 6


def _scatter(bad=None, C=5, device="cpu"):
    vis = torch.randn(2, 3, C, device=device, requires_grad=True)
    ids = torch.tensor([[4, 0, 6, 2, 1, 5, 3], [0, 1, 2, 3, 4, 5, 6]], device=device)
    if bad is not None:
        ids[0, 4] = bad
    return (lambda: ops.scatter_masked(vis, ids, torch.randn(C, device=device), torch.randn(7, C, device=device)),
            "ids_restore", 7)


def _relation(bad=None, H=2, device="cpu"):
    q = torch.randn(2, H, 9, 4, device=device, requires_grad=True)
    k = torch.randn(2, H, 9, 4, device=device, requires_grad=True)
    idx = torch.tensor([[0, 7, 3], [2, 5, 1]], device=device)
    if bad is not None:
        idx[1, 0] = bad
    return (lambda: ops.relation_loss(q, k, idx, torch.randn(2, 4, H, 8, device=device), 1.8, 0.5)), "topk_idx", 8


CASES = {"masked_gather": _gather, "scatter_masked": _scatter, "relation_loss": _relation}


@pytest.fixture(params=["triton", "reference"])
def path(request, monkeypatch):
    if request.param == "triton":
        request.getfixturevalue("triton_path")
    else:
        monkeypatch.setenv("TEC_FAST_KERNELS", "reference")
    return request.param


def _expect(name, bound, where):
    lo, hi = (-2, bound - 1) if where == "low" else (0, bound)
    return rf"{name} holds indices in \[{lo}, {hi}\], outside \[0, {bound}\)"


@pytest.mark.parametrize("op", sorted(CASES))
@pytest.mark.parametrize("where", ["high", "low"])
def test_out_of_range_is_a_value_error(path, op, where):
    make = CASES[op]
    call, _, bound = make()
    call()
    call, name, _ = make(bound if where == "high" else -2)
    with pytest.raises(ValueError, match=_expect(name, bound, where)):
        call()
    make()[0]()  # the next call runs: nothing left over from the failed one


@pytest.mark.parametrize("op, empty", [("masked_gather", dict(C=0)), ("scatter_masked", dict(C=0)),
                                       ("relation_loss", dict(H=0))])
def test_empty_output_still_checks(path, op, empty):
    make = CASES[op]
    make(**empty)[0]()
    call, name, bound = make(-2, **empty)
    with pytest.raises(ValueError, match=_expect(name, bound, "low")):
        call()


@pytest.mark.parametrize("op", sorted(CASES))
def test_cuda_route_asserts_after_the_launch(triton_path, op, monkeypatch):
    """The route CUDA tensors take (forced here on CPU): one flag kept across calls, 1 after valid
    ones, and the assertion's message names the argument."""
    from tec_fast.kernels import _common
    monkeypatch.setattr(_common, "_asserts_on_device", lambda device: True)
    monkeypatch.setattr(_common, "_INDEX_OK", {})
    make = CASES[op]
    make()[0]()
    make()[0]()
    (flag,) = _common._INDEX_OK.values()
    assert flag.tolist() == [1]
    call, name, bound = make(-2)
    with pytest.raises(RuntimeError, match=rf"{name} holds indices outside \[0, {bound}\)"):
        call()
    assert flag.tolist() == [0] and _common.index_flag(torch.device("cpu")) is flag


def test_host_route_flags_are_fresh_per_call(triton_path):
    from tec_fast.kernels import _common
    cpu = torch.device("cpu")
    a, b = _common.index_flag(cpu), _common.index_flag(cpu)
    assert a is not b and a.tolist() == b.tolist() == [1] and a.dtype == torch.int32


def test_relation_loss_bad_row_reads_nothing(triton_path, monkeypatch):
    from tec_fast.kernels import relation_loss as kernel
    monkeypatch.setattr(kernel, "check_index_flag", lambda *a: None)  # the error after the launch, off
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 2, 9, 4, generator=g), torch.randn(2, 2, 9, 4, generator=g)
    target = torch.randn(2, 4, 2, 8, generator=g)

    def run(idx):
        rows, lse_r, lse_t = kernel._relation_loss_fwd(q, k, idx, target, 1.8, 0.5)
        dq, dk = kernel._relation_loss_bwd(torch.ones_like(rows), q, k, idx, target, lse_r, lse_t, 1.8, 0.5)
        return rows, dq, dk

    good = torch.tensor([[0, 7, 3], [2, 5, 1]])
    rows_good, dq_good, dk_good = run(good)
    keep = torch.ones_like(rows_good, dtype=torch.bool)
    keep[1, :, 1] = False  # image 1's row 1 (its topk_idx[1, 0]), every head
    for value in (-1, 8, 1 << 40):
        bad = good.clone()
        bad[1, 0] = value
        rows, dq, dk = run(bad)
        assert torch.equal(rows[keep], rows_good[keep]), value
        assert torch.equal(dq[0], dq_good[0]) and torch.equal(dk[0], dk_good[0]), value  # image 0 untouched
        assert torch.isfinite(dq).all() and torch.isfinite(dk).all(), value
