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
