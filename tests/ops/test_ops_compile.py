"""Every registered op traces whole under ``torch.compile`` (``fullgraph=True``, aot_eager): its
``autograd.Function`` calls the launchers' custom ops there, and the values and gradients match
the eager route, which calls the launchers directly."""
import pytest
import torch

from conftest import assert_close
from tec_fast import ops
from tec_fast.ops.registry import OPS, SIZES, outputs


def _loss(out):
    return sum(t.float().square().sum() for t in outputs(out)) if outputs(out) else \
        sum(t.float().sum() for t in (out if isinstance(out, tuple) else (out,)) if t.is_floating_point())


@pytest.mark.parametrize("op", sorted(OPS))
def test_op_compiles_whole_and_matches_eager(triton_path, op):
    torch._dynamo.reset()
    torch.manual_seed(0)
    ex = OPS[op].example(SIZES["tiny"], torch.float32, torch.device("cpu"))
    fn = getattr(ops, op)

    def step(*args):
        return _loss(fn(*args, **ex.kwargs))
    want = step(*ex.args)
    want_grads = torch.autograd.grad(want, ex.grad_of) if ex.grad_of else []
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    got = compiled(*ex.args)
    got_grads = torch.autograd.grad(got, ex.grad_of) if ex.grad_of else []
    assert_close(got, want, atol=1e-5, rtol=1e-5, name=f"{op} loss")
    for i, (a, b) in enumerate(zip(got_grads, want_grads)):
        assert_close(a, b, atol=1e-5, rtol=1e-5, name=f"{op} grad {i}")


@pytest.mark.parametrize("op", sorted(OPS))
def test_no_grad_forward_is_the_same_without_a_node(triton_path, op):
    """Without a gradient to compute the ops skip their autograd.Function (no node, nothing kept
    for backward) and give bitwise the same values."""
    torch.manual_seed(0)
    ex = OPS[op].example(SIZES["tiny"], torch.float32, torch.device("cpu"))
    fn = getattr(ops, op)
    with_grad = fn(*ex.args, **ex.kwargs)
    with torch.no_grad():
        without = fn(*ex.args, **ex.kwargs)
    with_grad = with_grad if isinstance(with_grad, tuple) else (with_grad,)
    without = without if isinstance(without, tuple) else (without,)
    assert len(with_grad) == len(without)
    for a, b in zip(with_grad, without):
        assert b.grad_fn is None and torch.equal(a.detach(), b), op
