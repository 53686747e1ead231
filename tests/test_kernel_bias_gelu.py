"""kernels/bias_gelu.py (bias add + exact GELU), interpreter vs plain torch: forward and both
gradients, fp32 and bf16, awkward shapes."""
import pytest
import torch
import torch.nn.functional as F

from conftest import assert_close, assert_low_precision_ok

SHAPES = [(1, 1, 5), (3, 7, 37), (2, 9, 300), (1, 4, 1)]  # odd widths, > one column block, N = 1


def _inputs(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(*shape, generator=g) * 2).to(dtype).requires_grad_()
    b = (torch.randn(shape[-1], generator=g)).to(dtype).requires_grad_()
    return x, b


def _run(fn, x, b, grad):
    y = fn(x, b)
    return (y, *torch.autograd.grad(y, [x, b], grad))


def _fast(x, b):
    from tec_fast.kernels.bias_gelu import bias_gelu
    return bias_gelu(x, b)


def _eager(x, b):
    return F.gelu(x + b)


@pytest.mark.parametrize("shape", SHAPES)
def test_fp32_matches_torch(triton_path, shape):
    x, b = _inputs(shape, torch.float32)
    grad = torch.randn(shape)
    for name, a, e in zip(["y", "grad_x", "grad_bias"], _run(_fast, x, b, grad), _run(_eager, x, b, grad)):
        assert a.dtype == e.dtype, name
        assert_close(a, e, atol=1e-5, rtol=1e-5, name=name)


def test_rows_split_across_programs(triton_path, monkeypatch):
    import tec_fast.kernels.bias_gelu as m
    monkeypatch.setattr(m, "_TILE", 64)            # ROWS = 1 with 64-wide column blocks ...
    monkeypatch.setattr(m, "_TARGET_PROGRAMS", 4)  # ... and several row slices summed for dbias
    x, b = _inputs((5, 7, 70), torch.float32)
    grad = torch.randn(5, 7, 70)
    for name, a, e in zip(["y", "grad_x", "grad_bias"], _run(_fast, x, b, grad), _run(_eager, x, b, grad)):
        assert_close(a, e, atol=1e-5, rtol=1e-5, name=name)


def test_bf16_error_within_twice_eager(triton_path):
    x, b = _inputs((3, 11, 96), torch.bfloat16)
    grad = torch.randn(3, 11, 96).bfloat16()
    got = _run(_fast, x, b, grad)
    eager = _run(_eager, x, b, grad)
    x32, b32 = x.detach().float().requires_grad_(), b.detach().float().requires_grad_()
    exact = _run(_eager, x32, b32, grad.float())
    for name, k, e, ref in zip(["y", "grad_x", "grad_bias"], got, eager, exact):
        assert k.dtype == e.dtype, name
        assert_low_precision_ok(k, e, ref, atol=1e-2, name=name)


def test_non_contiguous_input(triton_path):
    x, b = _inputs((4, 6, 20), torch.float32)
    xt = x.transpose(0, 1)  # rows not in memory order
    grad = torch.randn(6, 4, 20)
    for name, a, e in zip(["y", "grad_x", "grad_bias"], _run(_fast, xt, b, grad), _run(_eager, xt, b, grad)):
        assert_close(a, e, atol=1e-5, rtol=1e-5, name=name)


def test_opcheck(triton_path):
    import tec_fast.kernels.bias_gelu  # noqa: F401  (registers the op)
    x, b = _inputs((6, 33), torch.float32)
    torch.library.opcheck(torch.ops.tec_fast.bias_gelu.default, (x.detach().requires_grad_(), b))
