"""An empty batch (B = 0: the last shard of a ragged split, a rank with nothing left) goes
through every op on both paths: outputs of the shapes the sizes give, gradients of the inputs'
shapes, the parameters' gradients zero. (The reference's q/k/v reshape once inferred the head
width with -1, which torch cannot do for zero elements.) Other zero-size dims (no patches, no
channels, a 0-wide hidden layer) too.""" 
import pytest
import torch

from tec_fast import ops
from tec_fast.ops import dispatch
from tec_fast.ops.registry import OPS, SIZES, outputs


def _run(name: str):
    torch.manual_seed(0)
    ex = OPS[name].example(dict(SIZES["tiny"], B=0), torch.float32, torch.device("cpu"))
    out = getattr(ops, name)(*ex.args, **ex.kwargs)
    outs = outputs(out)
    grads = torch.autograd.grad(outs, ex.grad_of, [torch.ones_like(o) for o in outs],
                                allow_unused=True) if ex.grad_of else ()
    every = out if isinstance(out, (tuple, list)) else (out,)
    return ex, [o for o in every if isinstance(o, torch.Tensor)], grads


# torch's var() warns that an empty tensor has no degrees of freedom (the reference of patch_norm_mse)
@pytest.mark.filterwarnings(r"ignore:var\(\):UserWarning")
@pytest.mark.parametrize("name", list(OPS))
def test_empty_batch_on_both_paths(name, triton_path):
    got = {}
    for mode in ("reference", "triton"):
        dispatch.set_kernel_mode(mode)
        got[mode] = _run(name)
    (ex, ref_out, ref_grads), (_, tri_out, tri_grads) = got["reference"], got["triton"]
    assert [o.shape for o in tri_out] == [o.shape for o in ref_out]
    assert [o.dtype for o in tri_out] == [o.dtype for o in ref_out]
    for r, t in zip(ref_out, tri_out):  # empty, or a loss over no patches: the same value
        assert torch.equal(t.nan_to_num(), r.nan_to_num()) and torch.equal(t.isnan(), r.isnan())
    for leaf, rg, tg in zip(ex.grad_of, ref_grads, tri_grads):
        assert (rg is None) == (tg is None)
        if tg is not None:
            assert tg.shape == leaf.shape and tg.dtype == leaf.dtype
            assert torch.equal(tg.nan_to_num(), rg.nan_to_num())


def test_empty_batch_qkv_heads_with_head_width_not_c_over_h(triton_path):
    """The head width comes from the weight (3 H d rows), not from C / H."""
    for mode in ("reference", "triton"):
        dispatch.set_kernel_mode(mode)
        x = torch.randn(0, 5, 24, requires_grad=True)
        w, b = torch.randn(48, 24, requires_grad=True), torch.randn(48, requires_grad=True)
        q, k, v = ops.qkv_heads(x, w, b, 2)
        assert q.shape == k.shape == v.shape == (0, 2, 5, 8)
        gx, gw, gb = torch.autograd.grad((q.sum() + k.sum() + v.sum()), (x, w, b))
        assert gx.shape == x.shape and not gw.any() and not gb.any()


_ZERO_WIDTH = {  # a zero-size dim other than the batch: the forward and backward of both paths agree
    "masked_gather L=K=0": lambda: ((torch.randn(2, 0, 5), torch.zeros(2, 0, dtype=torch.long), torch.randn(0, 5)),
                                    ops.masked_gather, (0, 2)),
    "scatter_masked C=0": lambda: ((torch.randn(2, 3, 0), torch.arange(7).repeat(2, 1), torch.randn(0)),
                                   ops.scatter_masked, (0, 2)),
    "scatter_masked L=0": lambda: ((torch.randn(2, 0, 5), torch.zeros(2, 0, dtype=torch.long), torch.randn(5)),
                                   ops.scatter_masked, (0, 2)),
    "mlp hidden=0": lambda: ((torch.randn(2, 3, 5), torch.randn(0, 5), torch.randn(0), torch.randn(6, 0),
                              torch.randn(6)), ops.mlp, (0, 1, 2, 3, 4)),
}


@pytest.mark.parametrize("case", list(_ZERO_WIDTH))
def test_zero_width_on_both_paths(case, triton_path):
    got = {}
    for mode in ("reference", "triton"):
        dispatch.set_kernel_mode(mode)
        torch.manual_seed(0)
        args, fn, leaves = _ZERO_WIDTH[case]()
        args = [a.requires_grad_() if i in leaves else a for i, a in enumerate(args)]
        out = fn(*args)
        got[mode] = (out, torch.autograd.grad(out.square().sum(), [args[i] for i in leaves]))
    (ref_out, ref_grads), (tri_out, tri_grads) = got["reference"], got["triton"]
    assert tri_out.shape == ref_out.shape and torch.equal(tri_out, ref_out)
    for rg, tg in zip(ref_grads, tri_grads):
        assert tg.shape == rg.shape and torch.allclose(tg, rg, atol=1e-6, rtol=1e-6)
