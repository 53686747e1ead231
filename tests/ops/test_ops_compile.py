"""Every registered op traces whole under ``torch.compile`` (``fullgraph=True``, aot_eager): its
``autograd.Function`` calls the launchers' custom ops there, and the values and gradients match
the eager route, which calls the launchers directly; float arguments that change between calls
trace too. And what autograd lets a caller do with the outputs (no node without a gradient,
in-place changes where plain torch allows them) is the same as on the reference."""
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


def test_layer_norm_without_residual_compiles_whole(triton_path):
    """Without a residual the op's node has one output (a None second output reached
    torch.compile's backward as a gradient to make contiguous)."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    x, w, b = (torch.randn(*s, requires_grad=True) for s in ((2, 3, 7), (7,), (7,)))

    def step(x, w, b):
        return ops.layer_norm(x, w, b, 1e-6).square().sum()
    want = torch.autograd.grad(step(x, w, b), (x, w, b))
    got = torch.autograd.grad(torch.compile(step, backend="aot_eager", fullgraph=True)(x, w, b), (x, w, b))
    for name, a, e in zip("xwb", got, want):
        assert_close(a, e, atol=1e-5, rtol=1e-5, name=f"grad {name}")


def test_float_arguments_that_change_between_calls_compile_whole(triton_path):
    """A tau, scale or eps that changes between calls (a schedule) is traced as a symbol after the
    first recompile; the argument checks compare it rather than hand it to math (which fails
    there)."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    q, k = torch.randn(2, 2, 8, 4, requires_grad=True), torch.randn(2, 2, 8, 4, requires_grad=True)
    idx, target = torch.tensor([[0, 3, 5], [6, 1, 2]]), torch.randn(2, 4, 2, 7)
    pred, feats, mask = torch.randn(2, 7, 5), torch.randn(2, 7, 5), torch.ones(2, 7)

    def losses(tau, scale, eps):
        return ops.relation_loss(q, k, idx, target, tau, scale) + ops.patch_norm_mse(pred, feats, mask, eps)
    compiled = torch.compile(losses, backend="aot_eager", fullgraph=True)
    for tau, scale, eps in ((1.8, 0.25, 1e-6), (1.4, 0.5, 1e-5), (1.0, 0.125, 1e-4)):
        assert_close(compiled(tau, scale, eps), losses(tau, scale, eps), atol=1e-6, rtol=1e-6, name=f"tau {tau}")


@pytest.mark.parametrize("op", sorted(OPS))
def test_outputs_can_be_modified_in_place_where_the_reference_can(triton_path, monkeypatch, op):
    """``y = op(...); y.mul_(2)`` works on the Triton path wherever it works on the reference,
    with the gradients of the out-of-place version (a view made inside an autograd.Function
    cannot be modified in place; ``mlp`` and ``encoder_adapter`` returned one). Where the
    reference refuses (q, k, v: views of one tensor; an h its backward keeps) the kernels may
    refuse too."""
    torch.manual_seed(0)
    ex = OPS[op].example(SIZES["tiny"], torch.float32, torch.device("cpu"))
    if not ex.grad_of:
        pytest.skip(f"{op} has no gradient")
    fn = getattr(ops, op)

    def grads(in_place):
        outs = outputs(fn(*ex.args, **ex.kwargs))
        if in_place:
            for t in outs:
                t.mul_(2.0)
        else:
            outs = [t * 2.0 for t in outs]
        return torch.autograd.grad(sum(t.float().square().sum() for t in outs), ex.grad_of)

    def in_place_works():
        try:
            got = grads(True)
        except RuntimeError as exc:
            assert "inplace" in str(exc), exc
            return False
        for i, (a, b) in enumerate(zip(got, grads(False))):
            assert torch.equal(a, b), f"{op} grad {i}"
        return True
    kernels = in_place_works()
    monkeypatch.setenv("TEC_FAST_KERNELS", "reference")
    assert kernels or not in_place_works(), f"{op}: the reference's outputs can be modified in place, the kernels' not"
