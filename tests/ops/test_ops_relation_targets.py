"""relation_targets: Triton (interpreter on CPU) vs the plain-torch reference."""
import pytest
import torch

from conftest import assert_close, assert_low_precision_ok
from tec_fast import ops
from tec_fast.ops import reference

SHAPES = [  # B, H, N, d, topk: L = N-1 prime and over one key block, odd d, k = 1, B = 1, k = L
    (2, 3, 68, 12, 4),
    (1, 2, 14, 16, 1),
    (2, 1, 6, 5, 5),
]


def _inputs(B, H, N, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, H, N, d, generator=g).to(dtype), torch.randn(B, H, N, d, generator=g).to(dtype))


def _eager_lowp_rows(q, k, idx, scale):
    """The relation rows ``idx`` by eager torch in the input precision (no upcast), through the
    full-attention route: the low-precision baseline. (Its own ranking may pick other rows.)"""
    B, H, N, d = q.shape
    logits = (q @ k.transpose(-1, -2)) * scale
    rows = torch.cat([torch.zeros_like(idx[:, :1]), idx + 1], 1)
    rel = torch.gather(logits[..., 1:], 2, rows[:, None, :, None].expand(B, H, rows.shape[1], N - 1))
    return rel.permute(0, 2, 1, 3).float()


@pytest.mark.parametrize("shape", SHAPES)
def test_fp32_matches_reference(triton_path, shape):
    B, H, N, d, topk = shape
    q, k = _inputs(B, H, N, d, torch.float32)
    assert ops.why_not_fast("relation_targets", q, topk=topk) == []
    rel, idx = ops.relation_targets(q, k, topk, d ** -0.5)
    rrel, ridx = reference.relation_targets(q, k, topk, d ** -0.5)
    assert rel.dtype == torch.float32 and idx.dtype == torch.int64
    assert torch.equal(idx, ridx)
    assert_close(rel, rrel, atol=1e-5, rtol=1e-5, name="relation")


def test_bf16_error_within_budget(triton_path):
    B, H, N, d, topk = SHAPES[0]
    q, k = _inputs(B, H, N, d, torch.bfloat16)
    rel, idx = ops.relation_targets(q, k, topk, d ** -0.5)
    rrel, ridx = reference.relation_targets(q.float(), k.float(), topk, d ** -0.5)
    erel = _eager_lowp_rows(q, k, ridx, d ** -0.5)
    assert torch.equal(idx, ridx)  # ranking computed in fp32 from the bf16 inputs
    assert_low_precision_ok(rel, erel, rrel, atol=1e-5, name="relation")


def test_non_contiguous_qk(triton_path):
    # q, k as they come out of a fused qkv projection: [B, N, 3, H, d] permuted
    B, H, N, d = 2, 3, 11, 8
    qkv = torch.randn(B, N, 3, H, d).permute(2, 0, 3, 1, 4)
    q, k = qkv[0], qkv[1]
    rel, idx = ops.relation_targets(q, k, 3, 0.3)
    rrel, ridx = reference.relation_targets(q, k, 3, 0.3)
    assert torch.equal(idx, ridx)
    assert_close(rel, rrel, atol=1e-5, rtol=1e-5, name="relation")


def test_no_gradient(triton_path):
    q, k = (t.requires_grad_() for t in _inputs(1, 2, 9, 8, torch.float32))
    rel, _ = ops.relation_targets(q, k, 2, 0.3)
    assert not rel.requires_grad


def test_float64_falls_back_with_reason(triton_path, monkeypatch):
    q, k = _inputs(1, 2, 9, 8, torch.float64)
    assert any("dtype torch.float64" in r for r in ops.why_not_fast("relation_targets", q, topk=2))
    with pytest.raises(RuntimeError, match="TEC_FAST_KERNELS=triton but relation_targets cannot.*float64"):
        ops.relation_targets(q, k, 2, 0.3)  # forced Triton cannot take float64: an error, not a quiet fallback
    monkeypatch.setenv("TEC_FAST_KERNELS", "auto")
    rel, idx = ops.relation_targets(q, k, 2, 0.3)  # auto: the reference runs
    assert torch.equal(idx, reference.relation_targets(q, k, 2, 0.3)[1])


@pytest.mark.parametrize("case, match", [
    (lambda q, k: (q[0], k, 2, 0.3), "q must be 4-D"),
    (lambda q, k: (q, k[:, :, :-1], 2, 0.3), "q .* and k .* must have the same shape"),
    (lambda q, k: (q, k, 0, 0.3), r"topk must be an int in \[1, 8\]"),
    (lambda q, k: (q, k, 9, 0.3), r"topk must be an int in \[1, 8\]"),
    (lambda q, k: (q, k, 2.0, 0.3), "topk must be an int"),
])
def test_validation(case, match):
    q, k = _inputs(1, 2, 9, 8, torch.float32)
    with pytest.raises(ValueError, match=match):
        ops.relation_targets(*case(q, k))


def test_opcheck(triton_path):
    q, k = _inputs(2, 2, 9, 8, torch.float32)
    torch.library.opcheck(torch.ops.tec_fast.relation_targets.default, (q, k, 3, 0.3))


def test_compile_smoke(triton_path):
    q, k = _inputs(2, 2, 9, 8, torch.float32)
    fn = torch.compile(lambda q, k: ops.relation_targets(q * 1.5, k, 3, 0.3), backend="aot_eager",
                       fullgraph=True)
    rel, idx = fn(q, k)
    rrel, ridx = reference.relation_targets(q * 1.5, k, 3, 0.3)
    assert torch.equal(idx, ridx)
    assert_close(rel, rrel, atol=1e-5, rtol=1e-5, name="relation")


@pytest.mark.parametrize("path", ["reference_path", "triton_path"])
def test_autocast_leaves_the_relations_in_fp32(path, request):
    """Under bf16 autocast both paths compute the logits, the ranking and the loss in fp32, as
    outside it (the reference's matrix products ran in bf16 there: another top-k for 2 of 4
    images at ViT-B's N, relation values off by up to 5.6)."""
    request.getfixturevalue(path)
    B, H, N, d = 3, 2, 50, 8
    q, k = _inputs(B, H, N, d, torch.float32, seed=4)
    rel, idx = ops.relation_targets(q, k, 6, d ** -0.5)
    target = rel + torch.randn(rel.shape, generator=torch.Generator().manual_seed(5))
    q.requires_grad_(True)
    loss = ops.relation_loss(q, k, idx, target, 1.8, 0.3)
    (grad,) = torch.autograd.grad(loss, q)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        rel_ac, idx_ac = ops.relation_targets(q.detach(), k, 6, d ** -0.5)
        loss_ac = ops.relation_loss(q, k, idx, target, 1.8, 0.3)
    (grad_ac,) = torch.autograd.grad(loss_ac, q)
    assert rel_ac.dtype == loss_ac.dtype == torch.float32 and torch.equal(idx_ac, idx)
    assert_close(rel_ac, rel, atol=1e-6, rtol=1e-6, name="relation")
    assert_close(loss_ac, loss, atol=1e-6, rtol=1e-6, name="loss")
    assert_close(grad_ac, grad, atol=1e-6, rtol=1e-6, name="grad q")


@pytest.mark.parametrize("path", ["reference_path", "triton_path"])
def test_ties_are_ordered_as_torch_topk(path, request):
    """docs/tec.md §1: the top-k patches are those of torch.topk, ties included. A CLS query of
    zeros ties every patch (every rank is +0: the keys are positive, so no product is -0); torch.topk
    orders such ties neither by index nor stably (a stable descending sort gives 0, 1, 2, ...)."""
    request.getfixturevalue(path)
    B, H, N, d, topk = 2, 3, 17, 8, 5
    q, k = _inputs(B, H, N, d, torch.float32, seed=3)
    k = k.abs() + 0.1
    q[:, :, 0] = 0.0
    rel, idx = ops.relation_targets(q, k, topk, d ** -0.5)
    want = torch.topk(torch.zeros(B, N - 1), topk, dim=1).indices
    assert not torch.equal(want, torch.arange(topk).expand(B, topk))  # the order a stable sort would give
    assert torch.equal(idx, want), (idx, want)
    rows = torch.cat([torch.zeros_like(want[:, :1]), want + 1], 1)  # the rows of those patches, in that order
    logits = (q.double() @ k.double().transpose(-1, -2)) * d ** -0.5
    expect = torch.gather(logits[..., 1:], 2, rows[:, None, :, None].expand(B, H, topk + 1, N - 1))
    assert_close(rel, expect.permute(0, 2, 1, 3), atol=1e-5, rtol=1e-5, name="relation")
