"""``tec_fast.ops.layer_norm``: the block LayerNorm with the residual add fused in. First the
kernel (``kernels/layer_norm.py``) against plain torch: forward and every gradient, fp32 and bf16,
awkward shapes, with and without a residual, both launch routes; then the public op: validation,
both paths give the same values and gradients, and the ViT block equals its unfused definition."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import assert_close, assert_low_precision_ok, assert_routes_agree
from tec_fast import ops
from tec_fast.models.layers import Block


# ------------------------------------------------------------------------------ the kernel
SHAPES = [(1, 1, 7), (3, 5, 37), (2, 13, 64), (1, 3, 130)]  # odd widths, B = 1, a single row


def _kernel_inputs(shape, dtype, seed=0):
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
    x, res, w, b = _kernel_inputs(shape, torch.float32)
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
    x, res, w, b = _kernel_inputs((2, 11, 24), torch.float32)
    gy, gh = torch.randn(2, 11, 24), torch.randn(2, 11, 24)
    got = _run(_fast, x, res, w, b, gy, gh)
    want = _run(lambda *a: _eager(*a, 1e-6), x, res, w, b, gy, gh)
    for name, a, e in zip(["y", "h", "grad_x", "grad_w", "grad_b", "grad_res"], got, want):
        assert_close(a, e, atol=1e-5, rtol=1e-4, name=name)


@pytest.mark.parametrize("w_dtype,b_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32)])
def test_weight_and_bias_gradients_sum_every_partial(triton_path, monkeypatch, w_dtype, b_dtype):
    """The second backward launch adds up the per-program partials of dweight and dbias: here 7
    programs' partials summed 2 at a time (4 tiles, the last half empty) in column blocks of 16
    (C = 40: the last block partial), written in each parameter's own dtype. Against float64."""
    import tec_fast.kernels.layer_norm as m
    monkeypatch.setattr(m, "persistent_programs", lambda rows, device, per_sm=8: 7)
    monkeypatch.setattr(m, "_dwdb_config", lambda n_parts, C: (2, 16, -(-C // 16)))
    x, res, w, b = _kernel_inputs((3, 9, 40), torch.float32, seed=3)
    w = w.detach().to(w_dtype).requires_grad_()
    b = b.detach().to(b_dtype).requires_grad_()
    gy = torch.randn(3, 9, 40, generator=torch.Generator().manual_seed(4))
    y, _ = m.layer_norm(x, w, b, 1e-6, residual=res)
    dw, db = torch.autograd.grad(y, (w, b), gy)
    h = x.detach().double() + res.detach().double()
    xhat = (h - h.mean(-1, keepdim=True)) / torch.sqrt(h.var(-1, unbiased=False, keepdim=True) + 1e-6)
    want_dw, want_db = (gy.double() * xhat).sum((0, 1)), gy.double().sum((0, 1))
    assert dw.dtype == w_dtype and db.dtype == b_dtype
    # fp32 sums of 27 rows; bf16: one rounding of the fp32 sum (half an ulp, 2^-9 relative)
    rtol = 2 ** -8 if w_dtype == torch.bfloat16 else 1e-5
    assert_close(dw.double(), want_dw, atol=1e-4, rtol=rtol, name="grad_w")
    assert_close(db.double(), want_db, atol=1e-4, rtol=1e-5, name="grad_b")


@pytest.mark.parametrize("shape", [(3, 5, 37), (2, 7, 96)])
def test_bf16_error_within_budget(triton_path, shape):
    x, res, w, b = _kernel_inputs(shape, torch.bfloat16)
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
    x, res, w, b = _kernel_inputs((2, 3, 8), torch.float32)
    with pytest.raises(ValueError, match="residual must match x"):
        layer_norm(x, w, b, residual=res[:, :2])
    with pytest.raises(ValueError, match="C=8192"):
        layer_norm(torch.zeros(1, 8192), torch.ones(8192), torch.zeros(8192))
    assert MAX_C < 8192


def test_opcheck(triton_path):
    import tec_fast.kernels.layer_norm  # noqa: F401  (registers the op)
    # the custom ops are the launchers (autograd is the Function around them): inputs without grad
    x, res, w, b = (t.detach() for t in _kernel_inputs((3, 20), torch.float32))
    torch.library.opcheck(torch.ops.tec_fast.layer_norm.default, (x, res, w, b, 1e-6))
    torch.library.opcheck(torch.ops.tec_fast.layer_norm.default, (x, None, w, b, 1e-5))


@pytest.mark.parametrize("with_res", [True, False])
def test_eager_route_matches_custom_op(triton_path, monkeypatch, with_res):
    """Eager calls skip the custom-op machinery (``direct_launch``); values and every gradient
    are bitwise those of the custom op, which torch.compile and dispatch modes go through."""
    import tec_fast.kernels.layer_norm as m

    def run():
        x, res, w, b = _kernel_inputs((2, 5, 37), torch.bfloat16)
        res = res if with_res else None
        out = m.layer_norm(x, w, b, residual=res)
        y = out[0] if with_res else out
        loss = y.float().square().sum() + (out[1].float().sum() if with_res else 0)
        leaves = [x, w, b] + ([res] if with_res else [])
        return [y, *torch.autograd.grad(loss, leaves)]

    assert_routes_agree(m, run, monkeypatch)


# ------------------------------------------------------------------------------ the public op

def _inputs(rows=7, C=24, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    make = lambda *s: torch.randn(*s, generator=g).to(dtype).requires_grad_()  # noqa: E731
    return make(rows, C), make(rows, C), make(C), make(C)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_triton_path_matches_reference(triton_path, dtype):
    x, res, w, b = _inputs(dtype=dtype)
    gy, gh = torch.randn(7, 24).to(dtype), torch.randn(7, 24).to(dtype)

    def run(fast: bool):
        for t in (x, res, w, b):
            t.grad = None
        if fast:
            y, h = ops.layer_norm(x, w, b, 1e-6, residual=res)
        else:
            y, h = ops.reference.layer_norm(x, w, b, 1e-6, res)
        torch.autograd.backward([y, h], [gy, gh])
        return [y, h] + [t.grad.clone() for t in (x, res, w, b)]

    assert ops.use_fast_path("layer_norm", x, residual_dtype=dtype)
    got, want = run(True), run(False)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=6e-2, rtol=3e-2)
    for name, a, e in zip(("y", "h", "dx", "dres", "dw", "db"), got, want):
        assert_close(a.float(), e.float(), name=name, **tol)


def test_validation_names_the_argument():
    x, res, w, b = _inputs()
    with pytest.raises(ValueError, match=r"weight must have shape \(24,\)"):
        ops.layer_norm(x, w[:5], b)
    with pytest.raises(ValueError, match="residual must have x's shape"):
        ops.layer_norm(x, w, b, residual=res[:3])
    with pytest.raises(ValueError, match="x must be a floating-point tensor"):
        ops.layer_norm(x.long(), w, b)
    reasons = ops.why_not_fast("layer_norm", torch.empty(2, 8192), residual_dtype=torch.float16)
    assert any("8192" in r for r in reasons) and any("residual dtype" in r for r in reasons)


def test_block_equals_its_unfused_definition():
    torch.manual_seed(0)
    blk = Block(32, 4)
    x = torch.randn(2, 9, 32)
    a = x + blk.attn(F.layer_norm(x, (32,), blk.norm1.weight, blk.norm1.bias, 1e-6))
    want = a + blk.mlp(F.layer_norm(a, (32,), blk.norm2.weight, blk.norm2.bias, 1e-6))
    assert_close(blk(x), want, atol=1e-6, rtol=1e-6, name="block")


def _stack(layer_scale=False, depth=3, C=32):
    torch.manual_seed(1)
    blocks = torch.nn.ModuleList([Block(C, 4, layer_scale=layer_scale) for _ in range(depth)])
    if layer_scale:  # non-trivial gammas
        for blk in blocks:
            blk.ls1.gamma.data.uniform_(0.5, 1.5)
            blk.ls2.gamma.data.uniform_(0.5, 1.5)
    return blocks


def _plain(blocks, x):
    outs, qk = [], None
    for i, blk in enumerate(blocks):
        if i == len(blocks) - 1:
            x, qk = blk(x, return_qk=True)
        else:
            x = blk(x)
        outs.append(x)
    return outs, qk


@pytest.mark.parametrize("layer_scale", [False, True], ids=["plain", "layer_scale"])
def test_run_blocks_equals_the_block_loop_bitwise_on_the_reference_path(layer_scale):
    """Deferring each block's closing residual add into the next norm1 computes the same sums in
    the same order: on the reference path the outputs, the kept block outputs and qk are bitwise
    those of ``for blk in blocks: x = blk(x)``."""
    from tec_fast.models.layers import run_blocks
    blocks = _stack(layer_scale)
    x = torch.randn(2, 9, 32)
    want, want_qk = _plain(blocks, x)
    h, m, outs, qk = run_blocks(blocks, x, outputs=[0, 1, 2], qk_block=2)
    assert sorted(outs) == [0, 1]  # the last block's output is h + m, left to the caller
    for i in (0, 1):
        assert torch.equal(outs[i], want[i]), i
    assert torch.equal(h + m, want[2])
    assert all(torch.equal(a, b) for a, b in zip(qk, want_qk))
    with pytest.raises(ValueError, match="blocks is empty"):
        run_blocks(torch.nn.ModuleList(), x)


def _outputs_and_grads(blocks, x0, runner):
    from tec_fast.models.layers import run_blocks
    x = x0.clone().requires_grad_()
    if runner == "loop":
        outs, _ = _plain(blocks, x)
    else:
        h, m, kept, _ = run_blocks(blocks, x, outputs=[0, 1])
        outs = [kept[0], kept[1], h + m]
    loss = sum((o.float() * (i + 1)).sin().sum() for i, o in enumerate(outs))  # every output in the loss
    params = [x] + list(blocks.parameters())
    return [torch.stack([o.float() for o in outs])] + [g.float() for g in torch.autograd.grad(loss, params)]


def test_run_blocks_triton_path_values_and_gradients(triton_path):
    """fp32: run_blocks and the block loop agree closely; bf16: run_blocks is as accurate against
    the fp32 result as the bf16 block loop is (both accumulate the residual gradients in bf16,
    in different orders)."""
    blocks, x0 = _stack(), torch.randn(2, 9, 32)
    exact = _outputs_and_grads(blocks, x0, "loop")
    fused = _outputs_and_grads(blocks, x0, "run_blocks")
    for i, (a, b) in enumerate(zip(fused, exact)):
        assert_close(a, b, atol=1e-5, rtol=1e-5, name=f"fp32 tensor {i}")
    blocks_b, xb = _stack().to(torch.bfloat16), x0.to(torch.bfloat16)
    loop_b = _outputs_and_grads(blocks_b, xb, "loop")
    fused_b = _outputs_and_grads(blocks_b, xb, "run_blocks")
    for i, (k, e, r) in enumerate(zip(fused_b, loop_b, exact)):
        assert_low_precision_ok(k, e, r, atol=1e-2, name=f"bf16 tensor {i}")


@pytest.mark.parametrize("used", ["y", "h"])
def test_gradient_through_one_of_the_two_outputs(triton_path, used):
    """A caller that uses only y (the last block's norm) or only h (a stream that keeps the sum):
    the gradients still reach x, residual, weight and bias as eager's do (through h alone: x and
    residual get exactly the incoming gradient, the norm's parameters nothing)."""
    shape = (2, 5, 37)
    x, res, w, b = _kernel_inputs(shape, torch.float32)
    g = torch.randn(shape)
    y, h = _fast(x, res, w, b)
    ey, eh = _eager(x, res, w, b, 1e-6)
    out, eout = (y, ey) if used == "y" else (h, eh)
    leaves = [x, res] + ([w, b] if used == "y" else [])
    got = torch.autograd.grad(out, leaves, g)
    want = torch.autograd.grad(eout, leaves, g)
    for name, a, e in zip(["grad_x", "grad_res", "grad_w", "grad_b"], got, want):
        assert_close(a, e, atol=1e-5, rtol=1e-4, name=name)
    if used == "h":
        assert torch.equal(got[0], g) and torch.equal(got[1], g)
