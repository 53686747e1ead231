"""``tec_fast.ops.qkv_heads`` (kernels/qkv_heads.py): the q/k/v projection split into heads, whose
backward packs dq, dk, dv into the projection's layout and sums the bias gradient in the same
pass. The Triton path (interpreter on CPU) against the reference, values and every gradient,
fp32, bf16 and under autocast, on awkward shapes; the custom op; validation; and the model's
attention on the default CPU path being bitwise what it was."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import assert_close, assert_low_precision_ok, assert_routes_agree
from tec_fast import ops
from tec_fast.ops import reference

# (B, N, C, H, d, bias): one token, odd sizes, a head dim that is not a power of two, rows past
# several 32-row tiles and backward slices
SHAPES = [(1, 1, 4, 1, 2, True), (2, 7, 13, 3, 5, True), (3, 45, 24, 2, 24, False), (2, 197, 16, 4, 8, True)]
NAMES = ["q", "k", "v", "grad_x", "grad_weight", "grad_bias"]


def _inputs(B, N, C, H, d, bias, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    make = lambda *s, scale=1.0: (torch.randn(*s, generator=g) * scale).to(dtype).requires_grad_()  # noqa: E731
    x, w = make(B, N, C), make(3 * H * d, C, scale=C ** -0.5)
    return x, w, (make(3 * H * d) if bias else None)


def _run(fn, x, w, b, H, grads):
    q, k, v = fn(x, w, b, H)
    leaves = [x, w] + ([b] if b is not None else [])
    loss = sum((t.float() * g).sum() for t, g in zip((q, k, v), grads))
    return [q, k, v, *torch.autograd.grad(loss, leaves)]


def _grads(B, N, H, d, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, N, d, generator=g) for _ in range(3)]


@pytest.mark.parametrize("B,N,C,H,d,bias", SHAPES)
def test_fp32_values_and_every_gradient(triton_path, B, N, C, H, d, bias):
    x, w, b = _inputs(B, N, C, H, d, bias)
    assert ops.use_fast_path("qkv_heads", x, head_dim=d)
    grads = _grads(B, N, H, d)
    got, want = _run(ops.qkv_heads, x, w, b, H, grads), _run(reference.qkv_heads, x, w, b, H, grads)
    for name, a, e in zip(NAMES, got, want):
        assert a.shape == e.shape and a.dtype == e.dtype, name
        assert_close(a, e, atol=1e-5, rtol=1e-5, name=name)
    assert got[0].shape == (B, H, N, d)
    assert got[0].data_ptr() != got[1].data_ptr() and got[0]._base is got[1]._base  # views of one buffer


@pytest.mark.parametrize("B,N,C,H,d,bias", SHAPES[1:])
def test_bf16_and_autocast(triton_path, B, N, C, H, d, bias):
    grads = _grads(B, N, H, d)
    exact = _run(reference.qkv_heads, *_inputs(B, N, C, H, d, bias), H, grads)
    # bf16 tensors
    kern = _run(ops.qkv_heads, *_inputs(B, N, C, H, d, bias, torch.bfloat16), H, grads)
    eager = _run(reference.qkv_heads, *_inputs(B, N, C, H, d, bias, torch.bfloat16), H, grads)
    for name, k, e, r in zip(NAMES, kern, eager, exact):
        assert k.dtype == e.dtype, name
        assert_low_precision_ok(k, e, r, atol=1e-2, name=name)
    # fp32 parameters under bf16 autocast: bf16 q, k, v, fp32 gradients of fp32 leaves
    with torch.autocast("cpu", dtype=torch.bfloat16):
        kern = _run(ops.qkv_heads, *_inputs(B, N, C, H, d, bias), H, grads)
        eager = _run(reference.qkv_heads, *_inputs(B, N, C, H, d, bias), H, grads)
    for name, k, e, r in zip(NAMES, kern, eager, exact):
        assert k.dtype == e.dtype, (name, k.dtype, e.dtype)
        assert_low_precision_ok(k, e, r, atol=1e-2, name=f"autocast {name}")


def test_backward_op_packs_and_sums(triton_path):
    """The backward custom op alone: the packed gradient is the stack in qkv's layout, the bias
    gradient its fp32 column sum; sources in either head layout ([B, H, N, d] or a transposed
    [B, N, H, d]) give the same."""
    from tec_fast.kernels.qkv_heads import _qkv_pack_op
    g = torch.Generator().manual_seed(2)
    B, N, H, d = 3, 37, 2, 6
    dq, dk, dv = (torch.randn(B, H, N, d, generator=g) for _ in range(3))
    want = torch.stack([t.transpose(1, 2) for t in (dq, dk, dv)], dim=2).reshape(B * N, 3 * H * d)
    for layout in ("BHNd", "BNHd"):
        srcs = (dq, dk, dv) if layout == "BHNd" else tuple(t.transpose(1, 2).contiguous().transpose(1, 2)
                                                          for t in (dq, dk, dv))
        packed, bias_grad = _qkv_pack_op(*srcs)
        assert torch.equal(packed, want), layout
        assert bias_grad.dtype == torch.float32
        assert_close(bias_grad, want.sum(0), atol=1e-5, rtol=1e-5, name=f"bias grad {layout}")


def test_eager_route_matches_custom_op(triton_path, monkeypatch):
    from tec_fast.kernels import qkv_heads as m
    x, w, b = _inputs(2, 9, 12, 2, 4, True)
    grads = _grads(2, 9, 2, 4)
    assert_routes_agree(m, lambda: _run(ops.qkv_heads, x, w, b, 2, grads), monkeypatch)


def test_opcheck(triton_path):
    import tec_fast.kernels.qkv_heads  # noqa: F401  (registers the op)
    g = torch.Generator().manual_seed(3)
    dq, dk, dv = (torch.randn(2, 3, 11, 4, generator=g) for _ in range(3))
    torch.library.opcheck(torch.ops.tec_fast.qkv_heads_backward.default, (dq, dk, dv))


def test_compile_smoke(triton_path):
    x, w, b = _inputs(2, 5, 12, 2, 4, True)

    def loss(x, w, b):
        q, k, v = ops.qkv_heads(x, w, b, 2)
        return F.scaled_dot_product_attention(q, k, v).square().sum()
    fn = torch.compile(loss, backend="aot_eager")
    got_loss = fn(x, w, b)
    got = torch.autograd.grad(got_loss, [x, w, b])
    q, k, v = reference.qkv_heads(x, w, b, 2)
    ref_loss = F.scaled_dot_product_attention(q, k, v).square().sum()
    want = torch.autograd.grad(ref_loss, [x, w, b])
    assert_close(got_loss, ref_loss, atol=1e-5, rtol=1e-5, name="loss")
    for name, a, e in zip(NAMES[3:], got, want):
        assert_close(a, e, atol=1e-5, rtol=1e-5, name=name)


@pytest.mark.parametrize("case,match", [
    (lambda x, w, b, H: (x.long(), w, b, H), "x must be floating point"),
    (lambda x, w, b, H: (x[0], w, b, H), "x must be 3-D"),
    (lambda x, w, b, H: (x, w[:, :5], b, H), r"weight must be \[3 \* num_heads \* head_dim, C=8\]"),
    (lambda x, w, b, H: (x, w[:-1], b, H), r"weight must be \[3 \* num_heads \* head_dim"),
    (lambda x, w, b, H: (x, w, b[:5], H), r"bias must have shape \(24,\)"),
    (lambda x, w, b, H: (x, w, b, 0), "num_heads must be a positive int"),
    (lambda x, w, b, H: (x, w, b, 5), "with num_heads=5"),
    (lambda x, w, b, H: (x, w.double(), b, H), "weight has dtype torch.float64 but x has torch.float32"),
])
def test_validation_names_the_argument(case, match):
    x, w, b = (t.detach() for t in _inputs(2, 3, 8, 2, 4, True))
    with pytest.raises(ValueError, match=match):
        ops.qkv_heads(*case(x, w, b, 2))


def test_attention_on_the_default_path_is_the_timm_split_bitwise():
    """The blocks' attention calls the op; on the default CPU path it is the split it replaced
    (timm's reshape / permute / unbind), values and gradients bitwise."""
    from tec_fast.models.layers import Attention
    torch.manual_seed(0)
    attn = Attention(24, 3)
    x = torch.randn(2, 9, 24, requires_grad=True)

    def timm(x):
        B, N, C = x.shape
        q, k, v = attn.qkv(x).reshape(B, N, 3, 3, 8).permute(2, 0, 3, 1, 4).unbind(0)
        return attn.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, C))
    leaves = [x, *attn.parameters()]
    got = [attn(x), *torch.autograd.grad(attn(x).square().sum(), leaves)]
    want = [timm(x), *torch.autograd.grad(timm(x).square().sum(), leaves)]
    for i, (a, e) in enumerate(zip(got, want)):
        assert torch.equal(a, e), i


def test_inference_builds_no_autograd_node(triton_path):
    """Under no_grad (the frozen base) the op is the projection and the views, nothing saved."""
    x, w, b = _inputs(2, 7, 13, 3, 5, True)
    with torch.no_grad():
        got = ops.qkv_heads(x, w, b, 3)
        want = reference.qkv_heads(x, w, b, 3)
    for a, e in zip(got, want):
        assert a.grad_fn is None and not a.requires_grad
        assert_close(a, e, atol=1e-5, rtol=1e-5, name="q/k/v")
