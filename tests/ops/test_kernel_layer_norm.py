"""kernels/layer_norm.py (LayerNorm with the residual add fused in), interpreter vs plain torch:
forward and every gradient, fp32 and bf16, awkward shapes, with and without a residual."""
import pytest
import torch
import torch.nn.functional as F

from conftest import assert_close, assert_low_precision_ok, assert_routes_agree

SHAPES = [(1, 1, 7), (3, 5, 37), (2, 13, 64), (1, 3, 130)]  # odd widths, B = 1, a single row


def _inputs(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    C = shape[-1]
    x = (torch.randn(*shape, generator=g) * 2 + 0.5).to(dtype).requires_grad_()
    res = torch.randn(*shape, generator=g).to(dtype).requires_grad_()
    w = (torch.randn(C, generator=g) * 0.3 + 1).requires_grad_()
    b = (torch.randn(C, generator=g) * 0.3).requires_grad_()
    return x, res, w, b


def _eager(x, res, w, b, eps):
    h = x if res is None else x + res
    y = F.layer_norm(h.float(), (h.shape[-1],), w, b, eps).to(x.dtype)
    return y, h


def _run(fn, x, res, w, b, gy, gh):
    y, h = fn(x, res, w, b)
    inputs = [x, w, b] + ([res] if res is not None else [])
    outs, grads = ([y], [gy]) if res is None else ([y, h], [gy, gh])
    return (y, h, *torch.autograd.grad(outs, inputs, grads))


def _fast(x, res, w, b, eps=1e-6):
    from tec_fast.kernels.layer_norm import layer_norm
    out = layer_norm(x, w, b, eps, residual=res)
    return (out, x) if res is None else out


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("with_res", [True, False])
def test_fp32_matches_torch(triton_path, shape, with_res):
    x, res, w, b = _inputs(shape, torch.float32)
    res = res if with_res else None
    gy, gh = torch.randn(shape), torch.randn(shape)
    got = _run(_fast, x, res, w, b, gy, gh)
    want = _run(lambda *a: _eager(*a, 1e-6), x, res, w, b, gy, gh)
    names = ["y", "h", "grad_x", "grad_w", "grad_b", "grad_res"]
    for name, a, e in zip(names, got, want):
        assert a.dtype == e.dtype, name
        assert_close(a, e, atol=1e-5, rtol=1e-4, name=name)


def test_many_rows_per_backward_program(triton_path, monkeypatch):
    import tec_fast.kernels.layer_norm as m
    monkeypatch.setattr(m, "persistent_programs", lambda rows, device, per_sm=8: 3)  # 3 programs, uneven row slices
    x, res, w, b = _inputs((2, 11, 24), torch.float32)
    gy, gh = torch.randn(2, 11, 24), torch.randn(2, 11, 24)
    got = _run(_fast, x, res, w, b, gy, gh)
    want = _run(lambda *a: _eager(*a, 1e-6), x, res, w, b, gy, gh)
    for name, a, e in zip(["y", "h", "grad_x", "grad_w", "grad_b", "grad_res"], got, want):
        assert_close(a, e, atol=1e-5, rtol=1e-4, name=name)


@pytest.mark.parametrize("shape", [(3, 5, 37), (2, 7, 96)])
def test_bf16_error_within_twice_eager(triton_path, shape):
    x, res, w, b = _inputs(shape, torch.bfloat16)
    gy, gh = torch.randn(shape).bfloat16(), torch.randn(shape).bfloat16()
    got = _run(_fast, x, res, w, b, gy, gh)
    eager = _run(lambda *a: _eager(*a, 1e-6), x, res, w, b, gy, gh)
    x32, r32 = x.detach().float().requires_grad_(), res.detach().float().requires_grad_()
    exact = _run(lambda *a: _eager(*a, 1e-6), x32, r32, w, b, gy.float(), gh.float())
    for name, k, e, ref in zip(["y", "h", "grad_x", "grad_w", "grad_b", "grad_res"], got, eager, exact):
        assert k.dtype == e.dtype, name
        assert_low_precision_ok(k, e, ref, atol=1e-2, name=name)


def test_rejects_bad_residual_and_width():
    from tec_fast.kernels.layer_norm import MAX_C, layer_norm
    x, res, w, b = _inputs((2, 3, 8), torch.float32)
    with pytest.raises(ValueError, match="residual must match x"):
        layer_norm(x, w, b, residual=res[:, :2])
    with pytest.raises(ValueError, match="C=8192"):
        layer_norm(torch.zeros(1, 8192), torch.ones(8192), torch.zeros(8192))
    assert MAX_C < 8192


def test_opcheck(triton_path):
    import tec_fast.kernels.layer_norm  # noqa: F401  (registers the op)
    # the custom ops are the launchers (autograd is the Function around them): inputs without grad
    x, res, w, b = (t.detach() for t in _inputs((3, 20), torch.float32))
    torch.library.opcheck(torch.ops.tec_fast.layer_norm.default, (x, res, w, b, 1e-6))
    torch.library.opcheck(torch.ops.tec_fast.layer_norm.default, (x, None, w, b, 1e-5))


@pytest.mark.parametrize("with_res", [True, False])
def test_eager_route_matches_custom_op(triton_path, monkeypatch, with_res):
    """Eager calls skip the custom-op machinery (``direct_launch``); values and every gradient
    are bitwise those of the custom op, which torch.compile and dispatch modes go through."""
    import tec_fast.kernels.layer_norm as m

    def run():
        x, res, w, b = _inputs((2, 5, 37), torch.bfloat16)
        res = res if with_res else None
        out = m.layer_norm(x, w, b, residual=res)
        y = out[0] if with_res else out
        loss = y.float().square().sum() + (out[1].float().sum() if with_res else 0)
        leaves = [x, w, b] + ([res] if with_res else [])
        return [y, *torch.autograd.grad(loss, leaves)]

    assert_routes_agree(m, run, monkeypatch)
