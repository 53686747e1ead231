"""Second derivatives: the Triton path's backward runs kernels autograd cannot see, so a second
derivative through it (``create_graph=True``, then differentiating the gradients) must fail
naming the op, never return gradients that silently miss terms; the first derivatives of a
``create_graph=True`` backward stay what the usual backward gives. The reference path, plain
torch, differentiates twice."""
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from conftest import assert_close
from tec_fast import ops
from tec_fast.ops import dispatch
from tec_fast.ops.registry import OPS, SIZES, outputs

WITH_BACKWARD = [name for name, spec in OPS.items()
                 if spec.example(SIZES["tiny"], torch.float32, torch.device("cpu")).grad_of]


def _first_derivatives(name: str, create_graph: bool, dtype: torch.dtype = torch.float32):
    torch.manual_seed(0)
    ex = OPS[name].example(SIZES["tiny"], dtype, torch.device("cpu"))
    outs = outputs(getattr(ops, name)(*ex.args, **ex.kwargs))
    # output gradients that differ per element and require grad: the first derivatives depend on
    # them for every op (the linear ops' on nothing else); seeded here, whatever the op drew
    torch.manual_seed(1)
    weights = [torch.randn(o.shape).to(o.dtype).requires_grad_() for o in outs]
    grads = torch.autograd.grad(outs, ex.grad_of, weights, create_graph=create_graph, allow_unused=True)
    return [*ex.grad_of, *weights], grads


def _square_sum(grads):
    return sum((g.double() ** 2).sum() for g in grads if g is not None)


# patch_embed's backward is torch's own (the inverse permutation of its gather kernel): it
# differentiates twice on either path
TWICE_ON_TRITON = ["patch_embed"]
FIRST_ORDER = [name for name in WITH_BACKWARD if name not in TWICE_ON_TRITON]


def test_every_backward_that_launches_kernels_is_first_order():
    """A new op's Function is covered too: its backward carries ``first_order`` unless the op
    is listed as differentiating twice (and then the test below must show it does)."""
    import importlib
    for name in WITH_BACKWARD:
        module = importlib.import_module(f"tec_fast.kernels.{OPS[name].kernel}")
        functions = [f for f in vars(module).values()
                     if isinstance(f, type) and issubclass(f, torch.autograd.Function) and f.__module__ == module.__name__]
        assert functions, name
        for f in functions:
            wrapped = hasattr(f.backward, "__wrapped__")
            assert wrapped == (name not in TWICE_ON_TRITON), f"{name}: {f.__name__}.backward"


@pytest.mark.parametrize("name", FIRST_ORDER)
def test_triton_second_derivative_fails_naming_the_op(name, triton_path):
    _, plain = _first_derivatives(name, create_graph=False)
    assert all(g is None or g.grad_fn is None for g in plain)  # the usual backward: untouched
    leaves, grads = _first_derivatives(name, create_graph=True)
    assert [g is None for g in grads] == [g is None for g in plain]
    for g, p in zip(grads, plain):
        if g is not None:
            assert torch.equal(g, p), f"{name}: create_graph=True changed a first derivative"
    with pytest.raises(RuntimeError, match=rf"tec_fast\.ops\.{name}: the Triton path's backward cannot be "
                                           r"differentiated again.*TEC_FAST_KERNELS=reference"):
        torch.autograd.grad(_square_sum(grads), leaves, allow_unused=True)


@pytest.mark.parametrize("name", WITH_BACKWARD)
def test_reference_differentiates_twice(name, reference_path):
    # torch's fused CPU attention has no second derivative; its math backend has
    with sdpa_kernel(SDPBackend.MATH):
        leaves, grads = _first_derivatives(name, create_graph=True)
        second = torch.autograd.grad(_square_sum(grads), leaves, allow_unused=True)
    got = [s for s in second if s is not None]
    assert got and all(torch.isfinite(s).all() for s in got)
    assert any(s.abs().sum() > 0 for s in got), f"{name}: every second derivative is zero"


def test_patch_embed_differentiates_twice_on_triton(triton_path):
    """Against the reference in float64 (fp32 sums of products: 1e-4 of each tensor's scale)."""
    second = {}
    for mode, dtype in (("reference", torch.float64), ("triton", torch.float32)):
        dispatch.set_kernel_mode(mode)
        leaves, grads = _first_derivatives("patch_embed", create_graph=True, dtype=dtype)
        second[mode] = torch.autograd.grad(_square_sum(grads), leaves, allow_unused=True)
    for t, r in zip(second["triton"], second["reference"]):
        assert (t is None) == (r is None)
        if t is not None:
            assert_close(t, r, atol=1e-4 * float(r.abs().max()), rtol=0.0, name="second derivative")
