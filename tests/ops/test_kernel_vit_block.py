"""The kernels ``vit_block`` launches besides the LayerNorm's (kernels/vit_block.py), one by one
through their launchers, against float64: the GEMM and each of its epilogues (bias, fc1's GELU,
GELU's backward on fc2's input gradient, a weight gradient's bias sums) with operands at any
strides and in other dtypes than the product's (autocast's fp32 weights), and the attention's
forward and backward. Shapes cross every tile edge (64-wide tiles, 32 / 64-deep K steps; more
than one key block, so the online softmax rescales), heads of 3 and 12 values (padded to 16),
one token. Interpreter on CPU."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import assert_close, assert_low_precision_ok

vb = pytest.importorskip("tec_fast.kernels.vit_block")

BF16_RTOL = 2 ** -7  # one bf16 rounding of the result, relative (and again for a second rounding)


@pytest.fixture(autouse=True)
def _interpreter(triton_path):
    yield


def _r(*shape, seed, scale=1.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


def _check(got, exact, dt, name, scale=None):
    """fp32: |error| <= 2e-5 max|exact|; bf16 / fp16: the result rounded once or twice in dt."""
    scale = exact.abs().max().item() if scale is None else scale
    if dt == torch.float32:
        assert_close(got, exact, atol=2e-5 * max(scale, 1.0), rtol=1e-5, name=name)
    else:
        assert_close(got, exact, atol=4 * BF16_RTOL * max(scale, 1.0) * 0.05, rtol=2.5 * BF16_RTOL, name=name)


def _in(t, dt):
    """What the kernel multiplies: t rounded to the product's dtype, as float64."""
    return t.to(dt).double()


@pytest.mark.parametrize("dt,out_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                          (torch.bfloat16, torch.float32), (torch.float16, torch.float16)])
@pytest.mark.parametrize("gelu", [False, True])
def test_linear_and_its_gelu_epilogue(dt, out_dtype, gelu):
    """x w^T + b with x a transposed view and w an fp32 weight read through a stride-2 view; the
    pre-activation reaches |z| ~ 4 (GELU's curved part and its tails)."""
    M, K, N = 70, 75, 130
    x = _r(K, M, seed=0).t()  # column-major rows
    w = _r(N, 2 * K, seed=1, scale=2 * K ** -0.5)[:, ::2]
    b = _r(N, seed=2)
    xin = x.to(dt) if dt != torch.float32 else x
    out, pre = vb._linear(xin, w, b, dt, out_dtype, gelu)
    want = _in(xin, dt) @ _in(w, dt).t() + _in(b, dt)
    assert out.dtype == out_dtype and out.shape == (M, N)
    if not gelu:
        assert pre is None
        _check(out, want, dt, "x w^T + b")
        return
    assert pre.dtype == dt
    _check(pre, want, dt, "pre-activation")
    # GELU of the stored (rounded) pre-activation, as the separate GELU kernel computes it
    _check(out, F.gelu(pre.double()), dt, "GELU(pre)")


@pytest.mark.parametrize("dt", [torch.float32, torch.bfloat16])
def test_gelu_epilogue_without_the_pre_activation(dt):
    """Inference (no backward to come): fc1's GELU without the pre-activation stored or even
    allocated, bitwise the output of the epilogue that keeps it."""
    x, w, b = _r(70, 36, seed=1).to(dt), _r(130, 36, seed=2, scale=36 ** -0.5).to(dt), _r(130, seed=3).to(dt)
    kept, pre = vb._linear(x, w, b, dt, dt, gelu=True)
    alone, none = vb._linear(x, w, b, dt, dt, gelu=True, keep_pre=False)
    assert pre is not None and none is None and torch.equal(alone, kept)


@pytest.mark.parametrize("dt", [torch.float32, torch.bfloat16])
def test_linear_dx_and_the_gelu_backward_epilogue(dt):
    M, C, hidden = 67, 40, 130
    dm = _r(M, C, seed=3).to(dt)
    w2 = _r(C, hidden, seed=4, scale=C ** -0.5)  # fp32 weight, cast in the kernel
    pre = (_r(M, hidden, seed=5) * 3).to(dt)
    dpre, g = vb._gelu_grad(dm, w2, pre, dt)
    dg = (dm.double() @ _in(w2, dt)).to(dt).double()  # rounded as a GEMM in dt returns it
    z = pre.double().requires_grad_()
    (gelu_grad,) = torch.autograd.grad(F.gelu(z), z, dg)
    assert dpre.dtype == dt and g.dtype == dt
    _check(dpre, gelu_grad, dt, "d pre")
    _check(g, F.gelu(pre.double()), dt, "GELU(pre)")
    dx = vb._linear_dx(dpre, _r(hidden, C, seed=6, scale=hidden ** -0.5), dt, torch.float32)
    assert dx.dtype == torch.float32
    _check(dx, dpre.double() @ _in(_r(hidden, C, seed=6, scale=hidden ** -0.5), dt), dt, "d pre w1")


@pytest.mark.parametrize("dt,w_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                        (torch.bfloat16, torch.bfloat16)])
def test_weight_gradient_with_its_bias_sums(dt, w_dtype):
    """dy^T x and the column sums of dy (over more rows than one K step, dy in the stream's fp32
    under autocast: summed as rounded to dt); without the product the sums are bitwise the same."""
    M, N, K = 140, 70, 36
    dy = _r(M, N, seed=7)
    x = _r(M, K, seed=8)
    dw, db = vb._weight_grad(dy, x, dt, w_dtype, torch.float32)
    assert dw.dtype == w_dtype and db.dtype == torch.float32 and dw.shape == (N, K)
    _check(dw, _in(dy, dt).t() @ _in(x, dt), dt, "dy^T x")
    assert_close(db, _in(dy, dt).sum(0), atol=1e-4, rtol=1e-5, name="column sums")
    none, sums_only = vb._weight_grad(dy, x, dt, None, torch.float32)
    assert none is None and torch.equal(sums_only, db)
    dw0, db0 = vb._weight_grad(dy[:0], x[:0], dt, w_dtype, torch.float32)  # no rows: zeros
    assert not dw0.any() and not db0.any() and dw0.shape == (N, K)


def _launched(fn):
    """(fn(), the names of the kernels it launched, in order)."""
    names, launch = [], vb.launch_with

    def counting(kernel, grid, config, *args):
        names.append(kernel.fn.__name__)
        return launch(kernel, grid, config, *args)
    vb.launch_with = counting
    try:
        return fn(), names
    finally:
        vb.launch_with = launch


@pytest.mark.parametrize("dt,w_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32)])
@pytest.mark.parametrize("shapes", [[(70, 36), (20, 130)], [(36, 36), (108, 36)]])
def test_two_weight_gradients_in_one_launch(dt, w_dtype, shapes):
    """Two weight gradients over the same rows in one launch (a block's fc2 and fc1, its proj and
    qkv), each of its own shape (across tile edges; a transposed operand; one without a bias):
    each dW and bias sum against float64, and the sums bitwise what ``_weight_grad`` gives a
    frozen weight's bias alone."""
    M = 140
    problems = []
    for i, (N, K) in enumerate(shapes):
        dy = _r(M, N, seed=20 + i + N)
        x = _r(K, M, seed=30 + i).t() if K == 130 else _r(M, K, seed=30 + i)
        problems.append((dy, x, w_dtype, None if N == 108 else torch.float32))  # qkv without its bias
    got, launches = _launched(lambda: vb._weight_grads(*problems, dt))
    assert launches == ["_weight_grads_kernel"]
    for i, ((dy, x, wd, bd), (dw, db)) in enumerate(zip(problems, got)):
        assert dw.dtype == wd and dw.shape == (dy.shape[1], x.shape[1]), i
        _check(dw, _in(dy, dt).t() @ _in(x, dt), dt, f"dW {i}")
        if bd is None:
            assert db is None
        else:
            assert db.dtype == bd
            assert_close(db, _in(dy, dt).sum(0), atol=1e-4, rtol=1e-5, name=f"bias sums {i}")
            assert torch.equal(db, vb._weight_grad(dy, x, dt, None, bd)[1]), i


def test_weight_gradients_that_cannot_share_a_launch_run_one_by_one():
    """A frozen weight (its bias summed alone), or weight gradients of different dtypes: each as
    ``_weight_grad`` gives it, no shared launch."""
    dy, x = _r(40, 20, seed=1), _r(40, 16, seed=2)
    for p0, p1 in (((dy, x, torch.float32, torch.float32), (dy, x, torch.bfloat16, torch.float32)),
                   ((dy, x, None, torch.float32), (dy, x, torch.float32, None))):
        got, launches = _launched(lambda: vb._weight_grads(p0, p1, torch.float32))
        assert "_weight_grads_kernel" not in launches
        for (dw, db), (_, _, wd, bd) in zip(got, (p0, p1)):
            want = vb._weight_grad(dy, x, torch.float32, wd, bd)
            for a, e in ((dw, want[0]), (db, want[1])):
                assert (a is None and e is None) or torch.equal(a, e)


@pytest.mark.parametrize("dt", [torch.float32, torch.bfloat16])
def test_batched_products_with_shared_operands_and_the_residual_epilogue(dt):
    """The encoder adapter's batched launches: G products on the grid's second axis, one
    operand shared by all (batch stride 0), per-group biases and row sums, and the epilogue that
    adds a shared matrix before the product's one rounding (du = dh W1_g + ds)."""
    from tec_fast.kernels.encoder_adapter import _bgemm, _cols, _rows
    G, M, K, N = 3, 70, 36, 40
    a = _r(G, M, K, seed=1).to(dt)
    shared = _r(M, N, seed=2).to(dt)
    w = _r(G, K, N, seed=3, scale=K ** -0.5).to(dt)
    c = torch.empty(G, M, N, dtype=dt)
    _bgemm(a, _rows(a), w, _rows(w), c, M, N, K, pre=shared, pre_batch=0, epilogue=4)
    for z in range(G):
        _check(c[z], _in(a[z], dt) @ _in(w[z], dt) + shared.double(), dt, f"group {z}")
    # a shared A read transposed (ds^T h_g), the row sums per group (all equal: the same A)
    h = _r(G, M, K, seed=4).to(dt)
    dw, db = torch.empty(G, N, K, dtype=dt), torch.empty(G, N)
    _bgemm(shared, (1, N, 0), h, _rows(h), dw, N, K, M, row_sum=db)
    for z in range(G):
        _check(dw[z], _in(shared, dt).t() @ _in(h[z], dt), dt, f"shared A^T, group {z}")
        assert torch.equal(db[z], db[0])
    assert_close(db[0], _in(shared, dt).sum(0), atol=1e-4, rtol=1e-5, name="row sums")
    # per-group bias, the weight read transposed (x W_g^T + b_g)
    bias = _r(G, N, seed=5).to(dt)
    wt = _r(G, N, K, seed=6, scale=K ** -0.5).to(dt)
    out = torch.empty(G, M, N, dtype=dt)
    _bgemm(a, _rows(a), wt, _cols(wt), out, M, N, K, bias=bias)
    for z in range(G):
        _check(out[z], _in(a[z], dt) @ _in(wt[z], dt).t() + _in(bias[z], dt), dt, f"biased group {z}")


def _attention_exact(q, k, v):
    """float64 softmax(q k^T / sqrt(d)) v and the rows' base-2 log-sum-exp of the scaled logits."""
    s = q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5
    return torch.softmax(s, -1) @ v, torch.logsumexp(s, -1) / torch.log(torch.tensor(2.0, dtype=s.dtype))


@pytest.mark.parametrize("dt", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B,N,H,d", [(2, 70, 2, 12), (3, 7, 4, 3), (1, 1, 2, 16)])
def test_attention_forward_and_backward(dt, B, N, H, d):
    C = H * d
    qkv = (_r(B, N, 3, H, d, seed=9) * 1.7).to(dt)  # logits reach |.| ~ 5: softmax far from uniform
    o, lse = vb._attention(qkv.view(B * N, 3 * C), B, N, H, True)
    q, k, v = (qkv[:, :, i].transpose(1, 2).double().requires_grad_() for i in range(3))  # [B, H, N, d]
    want, want_lse = _attention_exact(q, k, v)
    assert o.dtype == dt and o.shape == (B * N, C) and lse.shape == (B, H, N)
    _check(o.view(B, N, H, d).transpose(1, 2), want, dt, "attention output")
    assert_close(lse, want_lse, atol=1e-4 if dt == torch.float32 else 3e-2, rtol=1e-5, name="log-sum-exp")
    no_lse, none = vb._attention(qkv.view(B * N, 3 * C), B, N, H, False)
    assert none is None and torch.equal(no_lse, o)
    do = _r(B, N, H, d, seed=10).to(dt)
    dqkv = vb._attention_grad(do.reshape(B * N, C), qkv.view(B * N, 3 * C), o, lse).view(B, N, 3, H, d)
    # the exact gradient of the exact attention for this dO
    grads = torch.autograd.grad(want, (q, k, v), do.double().transpose(1, 2))
    assert dqkv.dtype == dt
    if dt == torch.float32:
        for i, (name, e) in enumerate(zip(("dq", "dk", "dv"), grads)):
            _check(dqkv[:, :, i].transpose(1, 2), e, dt, name)
        return
    # 16-bit: P and dS are rounded to the input dtype for their products (as flash attention does): the
    # budget for a 16-bit result, beside torch's own attention in that dtype (reported, bounds nothing)
    # (written out, not torch's fused kernel: its CPU bf16 backward needs AVX-512, which CI's
    # second pass at another instruction set may not have)
    ql, kl, vl = (t.detach().to(dt).requires_grad_() for t in (q, k, v))
    p = torch.softmax((ql @ kl.transpose(-2, -1)).float() * d ** -0.5, -1).to(dt)
    eager = torch.autograd.grad(p @ vl, (ql, kl, vl), do.transpose(1, 2))
    for i, (name, e, r) in enumerate(zip(("dq", "dk", "dv"), eager, grads)):
        assert_low_precision_ok(dqkv[:, :, i].transpose(1, 2), e, r, atol=1e-2, name=name, dtype=dt)


def test_large_tiles_and_a_partial_group_of_row_blocks():
    """Enough output tiles for the 128 x 128 x 64 tiling (16-bit operands), with 10 row blocks:
    the programs' grouping by 8 row blocks ends in a group of 2, and the last row and column
    blocks are partial. Every element is written once with its own product."""
    M, N, K = 1240, 2100, 72
    assert vb._gemm_config(M, N, K, torch.bfloat16)[:3] == (128, 128, 64)
    assert vb.cdiv(M, 128) % vb._GROUP_M and vb.cdiv(M, 128) * vb.cdiv(N, 128) >= vb._FEW_TILES
    x = _r(M, K, seed=11).bfloat16()
    w = _r(N, K, seed=12, scale=K ** -0.5).bfloat16()
    out, _ = vb._linear(x, w, None, torch.bfloat16, torch.float32)
    _check(out, x.double() @ w.double().t(), torch.bfloat16, "x w^T, 128 x 128 tiles")
