"""Arguments the ops reject the same way on both paths: dtypes of the weights, scalars (eps, tau,
scale), an empty top-k, group weights that are not sequences; and what reaches the target of a
loss (no gradient on either path). Each case runs on the reference and, forced, on the Triton path
(the interpreter on CPU)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tec_fast import ops

PATHS = ("reference_path", "triton_path")


@pytest.fixture(params=PATHS)
def path(request):
    return request.getfixturevalue(request.param)


def _adapter_args(dtype=torch.float32, D=2, G=1, B=1, T=3, C=4, hidden=8):
    g = torch.Generator().manual_seed(0)

    def r(*shape):
        return torch.randn(*shape, generator=g).to(dtype)
    M = D // G
    return (r(D, B, T, C), r(D * C), r(D * C), [r(C, M * C) for _ in range(G)], [r(C) for _ in range(G)],
            [r(hidden, C) for _ in range(G)], [r(hidden) for _ in range(G)], [r(C, hidden) for _ in range(G)],
            [r(C) for _ in range(G)], r(C), r(C), 1e-5, 1e-5)


def test_layer_norm_weights_must_be_floating_point(path):
    x = torch.randn(2, 5, 16)
    with pytest.raises(ValueError, match="weight must be floating point"):
        ops.layer_norm(x, torch.ones(16, dtype=torch.int64), torch.zeros(16))
    with pytest.raises(ValueError, match="bias must be floating point"):
        ops.layer_norm(x, torch.ones(16), torch.zeros(16, dtype=torch.int32), residual=x)


def test_layer_norm_dtypes(path):
    x = torch.randn(2, 5, 16)
    with pytest.raises(ValueError, match="weight has dtype torch.bfloat16 but x has torch.float32"):
        ops.layer_norm(x, torch.ones(16, dtype=torch.bfloat16), torch.zeros(16, dtype=torch.bfloat16))
    # a 16-bit x with fp32 parameters is LayerNorm's mixed form: allowed, and the value is x's LayerNorm
    xb = x.to(torch.bfloat16)
    y = ops.layer_norm(xb, torch.ones(16), torch.zeros(16))
    assert y.dtype == torch.bfloat16
    ref = torch.nn.functional.layer_norm(xb.double(), (16,), eps=1e-6)
    assert (y.double() - ref).abs().max() < 0.02


def test_layer_norm_residual_dtypes(path, request):
    """A residual of another dtype: refused where it is not floating point, or where x + residual
    is of a dtype the parameters cannot normalise (outside autocast); a 16-bit x on an fp32 stream
    with fp32 parameters (the autocast model's case) is taken by the reference, h in fp32 (the
    kernel takes one dtype: forced, it says so)."""
    x, w, b = torch.randn(2, 5, 16), torch.ones(16), torch.zeros(16)
    with pytest.raises(ValueError, match="residual must be floating point, got dtype torch.int64"):
        ops.layer_norm(x, w, b, residual=x.long())
    with pytest.raises(ValueError, match="residual has dtype torch.float64, so x \\+ residual is torch.float64"):
        ops.layer_norm(x, w, b, residual=x.double())
    if request.node.callspec.params["path"] == "triton_path":
        with pytest.raises(RuntimeError, match="residual dtype torch.float32 differs from x's torch.bfloat16"):
            ops.layer_norm(x.to(torch.bfloat16), w, b, residual=x)
        return
    y, h = ops.layer_norm(x.to(torch.bfloat16), w, b, residual=x)
    assert h.dtype == torch.float32 and y.dtype == torch.float32
    ref = torch.nn.functional.layer_norm(x.to(torch.bfloat16).double() + x.double(), (16,), eps=1e-6)
    assert (y.double() - ref).abs().max() < 0.05


@pytest.mark.parametrize("eps, message", [(-1e-6, "eps must be a finite number >= 0"), (math.nan, "eps must be a finite"),
                                          (math.inf, "eps must be a finite"), (None, "eps must be a real number"),
                                          ("1e-6", "eps must be a real number"), (True, "eps must be a real number")])
def test_layer_norm_eps(path, eps, message):
    """Every op holding a LayerNorm checks its eps as patch_norm_mse does; 0, ints and NumPy
    floats are taken."""
    x = torch.randn(2, 5, 16)
    w, b = torch.ones(16), torch.zeros(16)
    with pytest.raises(ValueError, match=message):
        ops.layer_norm(x, w, b, eps)
    with pytest.raises(ValueError, match=message):
        ops.layer_norm(x, w, b, eps, residual=x)
    args = list(_adapter_args())
    for i, name in ((-2, "eps_before"), (-1, "eps_after")):
        bad = list(args)
        bad[i] = eps
        with pytest.raises(ValueError, match=message.replace("eps", name)):
            ops.encoder_adapter(*bad)
    want = ops.layer_norm(x, w, b, 0.0)
    for ok in (0, np.float64(0.0), np.float32(0.0)):
        assert torch.equal(ops.layer_norm(x, w, b, ok), want)


def test_patch_embed_dtypes(path):
    images = torch.randn(1, 3, 8, 8)
    with pytest.raises(ValueError, match="weight has dtype torch.float64 but images has torch.float32"):
        ops.patch_embed(images, torch.randn(4, 3, 4, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="bias has dtype torch.bfloat16 but images has torch.float32"):
        ops.patch_embed(images, torch.randn(4, 3, 4, 4), torch.zeros(4, dtype=torch.bfloat16))


def test_encoder_adapter_arguments(path):
    args = list(_adapter_args())
    bad = list(args)
    bad[1] = bad[1].to(torch.int64)
    with pytest.raises(ValueError, match="ln_before_w must be floating point"):
        ops.encoder_adapter(*bad)
    bad = list(args)
    bad[3] = [bad[3][0].double()]
    with pytest.raises(ValueError, match=r"fuse_w\[0\] has dtype torch.float64 but feats has torch.float32"):
        ops.encoder_adapter(*bad)
    bad = list(args)
    bad[3] = None
    with pytest.raises(ValueError, match="fuse_w must be a list / tuple of per-group tensors"):
        ops.encoder_adapter(*bad)
    assert ops.encoder_adapter(*args).shape == (1, 3, 4)


def _relation_inputs(B=2, H=2, N=6, d=4, k=2):
    g = torch.Generator().manual_seed(1)
    q, kk = torch.randn(B, H, N, d, generator=g), torch.randn(B, H, N, d, generator=g)
    idx = torch.tensor([[0, 3], [4, 1]])[:, :k]
    target = torch.randn(B, 1 + k, H, N - 1, generator=g)
    return q, kk, idx, target


def test_relation_loss_needs_one_index(path):
    q, k, _, _ = _relation_inputs()
    with pytest.raises(ValueError, match="topk_idx must hold k >= 1"):
        ops.relation_loss(q, k, torch.zeros(2, 0, dtype=torch.long), torch.zeros(2, 1, 2, 5), 1.8, 0.5)


@pytest.mark.parametrize("tau, message", [(None, "tau must be a real number"), (0.0, "tau must be a finite number > 0"),
                                          (-1, "tau must be a finite number > 0"), (math.inf, "tau must be a finite"),
                                          (True, "tau must be a real number")])
def test_relation_loss_tau(path, tau, message):
    q, k, idx, target = _relation_inputs()
    with pytest.raises(ValueError, match=message):
        ops.relation_loss(q, k, idx, target, tau, 0.5)


def test_scalars_of_numpy_and_python_types_are_taken(path):
    q, k, idx, target = _relation_inputs()
    a = ops.relation_loss(q, k, idx, target, np.float32(1.8), np.float64(0.5))
    b = ops.relation_loss(q, k, idx, target, 1.8, 0.5)
    assert torch.allclose(a, b, rtol=1e-6, atol=0)
    with pytest.raises(ValueError, match="scale must be a finite number"):
        ops.relation_loss(q, k, idx, target, 1.8, math.nan)
    with pytest.raises(ValueError, match="scale must be a real number"):
        ops.relation_targets(q, k, 2, None)
    pred = torch.randn(2, 5, 3)
    mask = torch.ones(2, 5)
    for eps, message in (("a", "eps must be a real number"), (-1e-6, "eps must be a finite number >= 0"),
                         (math.nan, "eps must be a finite number")):
        with pytest.raises(ValueError, match=message):
            ops.patch_norm_mse(pred, torch.randn(2, 5, 3), mask, eps)


def test_integers_of_numpy_types_are_taken(path):
    """topk, num_heads and block indices as NumPy integers (a sweep's values) act as Python ints;
    bools and floats stay refused."""
    q, k, _, _ = _relation_inputs()
    rel, idx = ops.relation_targets(q, k, np.int64(2), 0.5)
    assert torch.equal(idx, ops.relation_targets(q, k, 2, 0.5)[1]) and rel.shape[1] == 3
    x, w = torch.randn(2, 3, 8), torch.randn(24, 8)
    for got, want in zip(ops.qkv_heads(x, w, None, np.int32(2)), ops.qkv_heads(x, w, None, 2)):
        assert torch.equal(got, want)
    for bad in (True, 2.0):
        with pytest.raises(ValueError, match="topk must be an int"):
            ops.relation_targets(q, k, bad, 0.5)
        with pytest.raises(ValueError, match="num_heads must be a positive int"):
            ops.qkv_heads(x, w, None, bad)


def test_ragged_errors_name_the_image(path):
    """The ragged ops check each length group as a stacked batch; their errors say which of the
    caller's images, not only the group's shapes."""
    q, k = torch.randn(13, 2, 4), torch.randn(13, 2, 4)
    rel, idx = ops.relation_targets_ragged(q, k, [5, 8], 3, 0.5)
    with pytest.raises(ValueError, match=r"relation_loss_ragged: image 1 \(8 tokens: L = 7 patches.*topk_idx holds"):
        ops.relation_loss_ragged(q, k, [5, 8], [idx[0], torch.tensor([0, 1, 7])], rel, 1.8, 0.5)
    with pytest.raises(ValueError, match=r"relation_targets_ragged: image 0 \(5 tokens.*topk must be an int in \[1, 4\]"):
        ops.relation_targets_ragged(q, k, [5, 8], 5, 0.5)


def test_no_gradient_reaches_a_loss_target(path):
    """The targets are the base's: neither loss differentiates them, on either path."""
    pred = torch.randn(2, 5, 3, requires_grad=True)
    target = torch.randn(2, 5, 3, requires_grad=True)
    ops.patch_norm_mse(pred, target, torch.ones(2, 5)).backward()
    assert pred.grad is not None and target.grad is None
    q, k, idx, rel = _relation_inputs()
    q.requires_grad_(True)
    rel.requires_grad_(True)
    ops.relation_loss(q, k, idx, rel, 1.8, 0.5).backward()
    assert q.grad is not None and rel.grad is None


def test_meta_tensors_never_reach_a_kernel(triton_path, monkeypatch):
    """Forced, the Triton path refuses meta tensors with the reason (it used to hand them to the
    interpreter, which failed reading them); auto takes the reference, which computes shapes."""
    from tec_fast.ops import why_not_fast
    x = torch.zeros(2, 3, 16, device="meta")
    ids = torch.zeros(2, 2, dtype=torch.long, device="meta")
    assert any("meta" in r for r in why_not_fast("masked_gather", x))
    with pytest.raises(RuntimeError, match="tensor on meta"):
        ops.masked_gather(x, ids)
    monkeypatch.setenv("TEC_FAST_KERNELS", "auto")
    out = ops.masked_gather(x, ids)
    assert out.shape == (2, 2, 16) and out.device.type == "meta"
