"""patch_norm_mse: Triton (interpreter on CPU) vs the plain-torch reference."""
import pytest
import torch

from conftest import assert_close, assert_low_precision_ok
from tec_fast import ops
from tec_fast.ops import reference

SHAPES = [  # B, L, C: odd C, prime L over one patch block, C over one channel block, B = 1
    (2, 67, 37),
    (1, 2, 5),
    (3, 13, 70),
]


def _inputs(B, L, C, dtype, seed=0, offset=5.0):
    g = torch.Generator().manual_seed(seed)
    pred = torch.randn(B, L, C, generator=g).to(dtype).requires_grad_()
    # features far from zero mean: the variance must not cancel
    target = (torch.randn(B, L, C, generator=g) * 3 + offset).to(dtype)
    mask = (torch.rand(B, L, generator=g) < 0.75).float()
    mask[:, 0] = 1.0
    return pred, target, mask


def _eager_lowp(pred, target, mask, eps=1e-6):
    """The feature loss written in eager torch without upcasting (the low-precision baseline)."""
    mean = target.mean(dim=1, keepdim=True)
    var = target.var(dim=1, keepdim=True)
    t = (target - mean) / torch.sqrt(var + eps)
    per_patch = ((pred - t) ** 2).mean(dim=-1)
    mask = mask.to(pred.dtype)
    return (per_patch * mask).sum() / mask.sum()


def _run(fn, pred, target, mask):
    """(loss, its gradient w.r.t. pred) with an incoming gradient of 2.7, not 1: a backward that
    ignores the gradient it is handed (a loss weight, a loss scaler) must not pass."""
    loss = fn(pred, target, mask)
    return loss, torch.autograd.grad(loss, pred, torch.tensor(2.7, dtype=loss.dtype))[0]


@pytest.mark.parametrize("shape", SHAPES)
def test_fp32_matches_reference(triton_path, shape):
    pred, target, mask = _inputs(*shape, torch.float32)
    assert ops.why_not_fast("patch_norm_mse", pred) == []
    loss, grad = _run(ops.patch_norm_mse, pred, target, mask)
    rloss, rgrad = _run(reference.patch_norm_mse, pred, target, mask)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert_close(loss, rloss, atol=1e-6, rtol=1e-5, name="loss")
    assert_close(grad, rgrad, atol=1e-7, rtol=1e-5, name="grad_pred")


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.int64, torch.bfloat16])
def test_mask_dtypes(triton_path, mask_dtype):
    pred, target, mask = _inputs(2, 13, 37, torch.float32)
    loss = ops.patch_norm_mse(pred, target, mask.to(mask_dtype))
    assert_close(loss, reference.patch_norm_mse(pred, target, mask), atol=1e-6, rtol=1e-5, name="loss")


def test_large_offset_statistics(triton_path):
    pred, target, mask = _inputs(2, 31, 9, torch.float32, offset=1000.0)
    assert_close(ops.patch_norm_mse(pred, target, mask), reference.patch_norm_mse(pred, target, mask),
                 atol=1e-5, rtol=1e-4, name="loss")


def test_bf16_error_within_budget(triton_path):
    pred, target, mask = _inputs(2, 67, 37, torch.bfloat16)
    got = _run(ops.patch_norm_mse, pred, target, mask)
    eager = _run(_eager_lowp, pred, target, mask)
    p32 = pred.detach().float().requires_grad_()
    exact = _run(reference.patch_norm_mse, p32, target.float(), mask)
    assert got[0].dtype == torch.float32 and got[1].dtype == torch.bfloat16
    for name, a, e, r in zip(["loss", "grad_pred"], got, eager, exact):
        assert_low_precision_ok(a, e, r, atol=1e-5, name=name)


@pytest.mark.parametrize("case, match", [
    (lambda p, t, m: (p[0], t, m), "pred must be 3-D"),
    (lambda p, t, m: (p, t[:, :-1], m), r"pred \(2, 13, 37\) and target \(2, 12, 37\) must match"),
    (lambda p, t, m: (p[:, :1], t[:, :1], m[:, :1]), "need L >= 2 patches"),
    (lambda p, t, m: (p, t, m[:, :-1]), r"mask must have shape \(2, 13\)"),
    (lambda p, t, m: (p.long(), t, m), "pred must be floating point"),
])
def test_validation(case, match):
    pred, target, mask = _inputs(2, 13, 37, torch.float32)
    with pytest.raises(ValueError, match=match):
        ops.patch_norm_mse(*case(pred.detach(), target, mask))


def test_opcheck(triton_path):
    pred, target, mask = (t.detach() for t in _inputs(2, 7, 9, torch.float32))  # launcher op: no autograd
    torch.library.opcheck(torch.ops.tec_fast.patch_norm_mse.default, (pred, target, mask, 1e-6))


def test_compile_smoke(triton_path):
    pred, target, mask = _inputs(2, 7, 9, torch.float32)
    fn = torch.compile(lambda p, t, m: ops.patch_norm_mse(p * 2, t, m), backend="aot_eager", fullgraph=True)
    loss, grad = _run(fn, pred, target, mask)
    rloss, rgrad = _run(lambda p, t, m: reference.patch_norm_mse(p * 2, t, m), pred, target, mask)
    assert_close(loss, rloss, atol=1e-6, rtol=1e-5, name="loss")
    assert_close(grad, rgrad, atol=1e-7, rtol=1e-5, name="grad_pred")
