"""relation_loss: Triton (interpreter on CPU) vs the plain-torch reference."""
import pytest
import torch
import torch.nn.functional as F

from conftest import assert_close, assert_low_precision_ok
from tec_fast import ops
from tec_fast.ops import reference

SHAPES = [  # B, H, N, d, topk: L = N-1 prime and over one key block (online softmax), odd d, k=1, B=1
    (2, 3, 68, 12, 4),
    (1, 2, 14, 16, 1),
    (2, 1, 6, 5, 5),
]


def _inputs(B, H, N, d, topk, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, N, d, generator=g).to(dtype).requires_grad_()
    k = torch.randn(B, H, N, d, generator=g).to(dtype).requires_grad_()
    idx = torch.stack([torch.randperm(N - 1, generator=g)[:topk] for _ in range(B)])
    target = torch.randn(B, 1 + topk, H, N - 1, generator=g) * 2
    return q, k, idx, target


def _eager_lowp(q, k, idx, target, tau, scale):
    """The relation loss in eager torch at the input precision (no upcast)."""
    B, H, N, d = q.shape
    rows = torch.cat([torch.zeros_like(idx[:, :1]), idx + 1], 1)
    q_rows = torch.gather(q, 2, rows[:, None, :, None].expand(B, H, rows.shape[1], d))
    logits = (q_rows @ k[:, :, 1:].transpose(-1, -2) * scale).permute(0, 2, 1, 3)
    p = F.softmax(target.to(q.dtype) / tau, dim=-1)
    return -(p * F.log_softmax(logits, dim=-1)).sum(dim=-1).mean()


def _run(fn, q, k, idx, target, tau=1.8, scale=0.3):
    """(loss, its gradients w.r.t. q and k) with an incoming gradient of 2.7, not 1: a backward
    that ignores the gradient it is handed (a loss weight, a loss scaler) must not pass."""
    loss = fn(q, k, idx, target, tau, scale)
    return (loss, *torch.autograd.grad(loss, (q, k), torch.tensor(2.7, dtype=loss.dtype)))


NAMES = ["loss", "grad_q", "grad_k"]


@pytest.mark.parametrize("shape", SHAPES)
def test_fp32_matches_reference(triton_path, shape):
    q, k, idx, target = _inputs(*shape, torch.float32)
    assert ops.why_not_fast("relation_loss", q, topk=shape[-1]) == []
    got = _run(ops.relation_loss, q, k, idx, target)
    want = _run(reference.relation_loss, q, k, idx, target)
    assert got[0].dtype == torch.float32 and got[0].dim() == 0
    for name, a, b in zip(NAMES, got, want):
        assert_close(a, b, atol=1e-6, rtol=1e-5, name=name)


def test_sharp_and_large_logits(triton_path):
    # big scale and small tau: the online max-shifting must keep exp() finite
    q, k, idx, target = _inputs(2, 2, 40, 8, 3, torch.float32)
    got = _run(ops.relation_loss, q, k, idx, target * 20, tau=0.1, scale=8.0)
    want = _run(reference.relation_loss, q, k, idx, target * 20, tau=0.1, scale=8.0)
    for name, a, b in zip(NAMES, got, want):
        assert_close(a, b, atol=1e-5, rtol=1e-4, name=name)


def test_repeated_topk_rows(triton_path):
    q, k, _, target = _inputs(2, 2, 10, 8, 3, torch.float32)
    idx = torch.tensor([[4, 4, 0], [8, 2, 8]])
    got = _run(ops.relation_loss, q, k, idx, target)
    want = _run(reference.relation_loss, q, k, idx, target)
    for name, a, b in zip(NAMES, got, want):
        assert_close(a, b, atol=1e-6, rtol=1e-5, name=name)


def test_bf16_error_within_budget(triton_path):
    q, k, idx, target = _inputs(*SHAPES[0], torch.bfloat16)
    got = _run(ops.relation_loss, q, k, idx, target)
    eager = _run(_eager_lowp, q, k, idx, target)
    q32, k32 = (t.detach().float().requires_grad_() for t in (q, k))
    exact = _run(reference.relation_loss, q32, k32, idx, target)
    assert got[1].dtype == got[2].dtype == torch.bfloat16
    for name, a, e, r in zip(NAMES, got, eager, exact):
        assert_low_precision_ok(a, e, r, atol=1e-5, name=name)


def test_non_contiguous_qk(triton_path):
    B, H, N, d, topk = 2, 3, 11, 8, 2
    qkv = torch.randn(B, N, 3, H, d, requires_grad=True)
    _, _, idx, target = _inputs(B, H, N, d, topk, torch.float32)

    def loss_and_grad(fn):
        qkv_ = qkv.permute(2, 0, 3, 1, 4)
        loss = fn(qkv_[0], qkv_[1], idx, target, 1.8, 0.3)
        return loss, torch.autograd.grad(loss, qkv)[0]

    for name, a, b in zip(["loss", "grad_qkv"], loss_and_grad(ops.relation_loss),
                          loss_and_grad(reference.relation_loss)):
        assert_close(a, b, atol=1e-6, rtol=1e-5, name=name)


@pytest.mark.parametrize("case, match", [
    (lambda q, k, i, t: (q[0], k, i, t, 1.8, 0.3), "q must be 4-D"),
    (lambda q, k, i, t: (q, k[..., :-1], i, t, 1.8, 0.3), "must have the same shape"),
    (lambda q, k, i, t: (q, k, i[0], t, 1.8, 0.3), r"topk_idx must be a \[B=2, k\] index tensor"),
    (lambda q, k, i, t: (q, k, i + 9, t, 1.8, 0.3), r"topk_idx holds indices .* outside \[0, 9\)"),
    (lambda q, k, i, t: (q, k, i - 1, t, 1.8, 0.3), "topk_idx holds indices"),
    (lambda q, k, i, t: (q, k, i, t[:, :-1], 1.8, 0.3), r"target must have shape \(2, 4, 2, 9\)"),
    (lambda q, k, i, t: (q, k, i, t, 0.0, 0.3), "tau must be a finite number > 0"),
])
def test_validation(case, match):
    q, k, idx, target = _inputs(2, 2, 10, 8, 3, torch.float32)
    with pytest.raises(ValueError, match=match):
        ops.relation_loss(*case(q.detach(), k.detach(), idx, target))


def test_opcheck(triton_path):
    q, k, idx, target = (t.detach() for t in _inputs(2, 2, 10, 8, 3, torch.float32))  # launcher op: no autograd
    torch.library.opcheck(torch.ops.tec_fast.relation_loss.default, (q, k, idx, target, 1.8, 0.3))


def test_compile_smoke(triton_path):
    q, k, idx, target = _inputs(2, 2, 10, 8, 3, torch.float32)
    fn = torch.compile(lambda q, k, i, t, tau, s: ops.relation_loss(q * 2, k, i, t, tau, s),
                       backend="aot_eager", fullgraph=True)
    got = _run(fn, q, k, idx, target)
    want = _run(lambda q, k, i, t, tau, s: reference.relation_loss(q * 2, k, i, t, tau, s), q, k, idx, target)
    for name, a, b in zip(NAMES, got, want):
        assert_close(a, b, atol=1e-6, rtol=1e-5, name=name)
