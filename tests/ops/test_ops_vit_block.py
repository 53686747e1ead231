"""``tec_fast.ops.vit_block`` (kernels/vit_block.py): a whole pre-norm ViT block as one autograd
node. The Triton path (interpreter on CPU) against the float64 reference, value and every gradient (x, pending and the twelve parameters), fp32, bf16 and
under autocast, on awkward shapes (one token, odd widths, heads of 3 and 5 values, no qkv bias);
the eager and custom-op routes; what it keeps for backward; validation; and ``Block`` taking it."""
from __future__ import annotations

import pytest
import torch

from conftest import assert_close, assert_low_precision_ok, assert_routes_agree
from tec_fast import ops
from tec_fast.models.layers import Block, run_blocks
from tec_fast.ops import reference

# (B, N, C, H, hidden): one token, odd token counts, head widths 3 / 4 / 5, hidden past one GELU
# column block (128); LayerNorm rows past one backward slice
SHAPES = [(1, 1, 8, 2, 12), (3, 7, 12, 4, 20), (2, 17, 15, 5, 130), (5, 9, 24, 8, 96)]
NAMES = ["norm1_weight", "norm1_bias", "qkv_weight", "qkv_bias", "proj_weight", "proj_bias", "norm2_weight",
         "norm2_bias", "fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias"]


def _inputs(B, N, C, H, hidden, dtype=torch.float32, seed=0, qkv_bias=True):
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=1.0, shift=0.0):
        return (torch.randn(*shape, generator=g) * scale + shift).to(dtype).requires_grad_()
    x, pending = r(B, N, C, scale=2.0), r(B, N, C)
    # LayerNorm weights around 1, projections scaled so attention logits and the GELU's input
    # reach |.| ~ 2 (softmax far from uniform, GELU in its curved part)
    params = [r(C, scale=0.3, shift=1.0), r(C, scale=0.3), r(3 * C, C, scale=1.5 * C ** -0.5),
              r(3 * C, scale=0.3) if qkv_bias else None, r(C, C, scale=C ** -0.5), r(C, scale=0.3),
              r(C, scale=0.3, shift=1.0), r(C, scale=0.3), r(hidden, C, scale=2 * C ** -0.5), r(hidden, scale=0.5),
              r(C, hidden, scale=hidden ** -0.5), r(C, scale=0.3)]
    return x, pending, params, H


def _run(fn, x, pending, params, H, grads, **kw):
    """Outputs and the gradients of (x, pending, parameters) for output gradients ``grads``."""
    out = fn(x, *params, H, 1e-6, pending=pending, **kw)
    leaves = [x] + ([pending] if pending is not None else []) + [p for p in params if p is not None]
    used = [(o, g) for o, g in zip(out, grads) if g is not None]
    return list(out) + list(torch.autograd.grad([o for o, _ in used], leaves, [g for _, g in used],
                                                allow_unused=True))


def _double(x, pending, params):
    d = lambda t: None if t is None else t.detach().double().requires_grad_()  # noqa: E731
    return d(x), d(pending), [d(p) for p in params]


@pytest.mark.parametrize("with_pending", [True, False])
@pytest.mark.parametrize("shape", SHAPES)
def test_fp32_value_and_every_gradient(triton_path, shape, with_pending):
    x, pending, params, H = _inputs(*shape)
    pending = pending if with_pending else None
    assert ops.use_fast_path("vit_block", x)
    g = torch.Generator().manual_seed(1)
    grads = [torch.randn(x.shape, generator=g) for _ in range(3)]
    got = _run(ops.vit_block, x, pending, params, H, grads)
    xd, pd, prd = _double(x, pending, params)
    exact = _run(reference.vit_block, xd, pd, prd, H, [t.double() for t in grads])
    assert len(got) == len(exact)
    for i, (a, e) in enumerate(zip(got, exact)):
        assert a.dtype == torch.float32, i
        assert_close(a, e, atol=2e-5 * max(1.0, e.abs().max().item()), rtol=1e-4, name=f"result {i}")


def test_attention_split_into_launches_past_the_grid_limit(triton_path, monkeypatch):
    """B x H past CUDA's second-axis grid limit (thousands of images in inference): the attention
    runs in launches of whole images, bitwise what one launch gives (the limit lowered to 2 heads'
    worth here: 5 images of 8 heads take launches of 2, 2 and 1 images)."""
    from tec_fast.kernels import vit_block as kernel

    x, pending, params, H = _inputs(5, 9, 24, 8, 96)
    g = torch.Generator().manual_seed(1)
    grads = [torch.randn(x.shape, generator=g) for _ in range(3)]
    whole = _run(ops.vit_block, x, pending, params, H, grads)
    assert kernel._image_chunks(5, 8) == [(0, 5)]
    monkeypatch.setattr(kernel, "_MAX_GRID_Y", 2 * 8 + 3)  # two images of 8 heads per launch
    assert kernel._image_chunks(5, 8) == [(0, 2), (2, 2), (4, 1)]
    split = _run(ops.vit_block, x, pending, params, H, grads)
    for i, (a, e) in enumerate(zip(split, whole)):
        assert torch.equal(a, e), i


@pytest.mark.parametrize("frozen", [("qkv_weight", "fc1_weight", "proj_bias"),
                                    ("fc2_weight", "fc2_bias", "fc1_bias", "proj_weight", "qkv_bias")])
def test_frozen_weights_cost_no_gemm_and_the_rest_are_unchanged(triton_path, frozen):
    """A weight that does not require grad costs no GEMM in the backward (partial fine-tuning):
    one matrix product less per frozen weight, and every trainable tensor's gradient still right
    (against float64, with the fp32 test's bound). Not bitwise the fully trainable block's: a
    weight gradient computed alone is tiled for its own shape, where paired with its neighbour's
    it takes the pair's tile, and the interpreter's matmul (numpy's BLAS) rounds a tile's dot
    products differently by tile shape on some CPUs (seen on an AMD EPYC)."""
    x, pending, params, H = _inputs(*SHAPES[1])
    g = torch.Generator().manual_seed(1)
    grads = [torch.randn(x.shape, generator=g) for _ in range(3)]
    xd, pd, prd = _double(x, pending, params)
    exact = _run(reference.vit_block, xd, pd, prd, H, [t.double() for t in grads])
    part = [p.detach().requires_grad_(name not in frozen) for name, p in zip(NAMES, params)]
    leaves = [x, pending] + [p for p in part if p.requires_grad]
    out = ops.vit_block(x, *part, H, 1e-6, pending=pending)
    got = torch.autograd.grad(out, leaves, grads)
    want = exact[3:5] + [f for name, f in zip(NAMES, exact[5:]) if name not in frozen]
    assert len(got) == len(want)
    for i, (a, e) in enumerate(zip(got, want)):
        assert_close(a, e, atol=2e-5 * max(1.0, e.abs().max().item()), rtol=1e-4, name=f"gradient {i}")
    # the frozen weights' products are not run (8 with every weight trainable: 4 weight
    # gradients, 4 input gradients); a trainable bias of a frozen weight is summed without one
    import tec_fast.kernels.vit_block as vb
    products = []

    def counting(kernel, grid, config, *args):
        if kernel is vb._gemm_kernel and config.meta["DOT"]:
            products.append(1)
        elif kernel is vb._weight_grads_kernel:  # one launch, one or two products
            products.extend([1] * (1 + (args[20] < grid[0])))  # the second's programs, if any
        return launch(kernel, grid, config, *args)
    launch = vb.launch_with
    for params_, n_products in ((params, 8), (part, 8 - sum(n.endswith("weight") and "norm" not in n
                                                            for n in frozen))):
        out = ops.vit_block(x, *params_, H, 1e-6, pending=pending)
        products.clear()
        vb.launch_with = counting
        try:
            torch.autograd.grad(out, [x, pending] + [p for p in params_ if p.requires_grad], grads)
        finally:
            vb.launch_with = launch
        assert len(products) == n_products


def test_no_qkv_bias_and_unused_outputs(triton_path):
    """No qkv bias (CLIP-style towers); only m gets a gradient (h and x_in unused), then only h."""
    x, pending, params, H = _inputs(2, 6, 12, 3, 24, qkv_bias=False)
    for grads in ([None, None, torch.randn(x.shape)], [None, torch.randn(x.shape), None]):
        got = _run(ops.vit_block, x, pending, params, H, grads)
        xd, pd, prd = _double(x, pending, params)
        exact = _run(reference.vit_block, xd, pd, prd, H, [None if t is None else t.double() for t in grads])
        for i, (a, e) in enumerate(zip(got, exact)):
            if e is None:  # a parameter the used outputs do not depend on (fc1, fc2 for h)
                assert a is None or not a.any(), i
                continue
            assert_close(a, e, atol=2e-5 * max(1.0, e.abs().max().item()), rtol=1e-4, name=f"result {i}")


@pytest.mark.parametrize("shape", [(3, 7, 12, 4, 20), (2, 17, 15, 5, 130)])
def test_bf16_error_within_budget(triton_path, shape):
    x, pending, params, H = _inputs(*shape, dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(1)
    grads = [torch.randn(x.shape, generator=g).bfloat16() for _ in range(3)]
    got = _run(ops.vit_block, x, pending, params, H, grads)
    eager = _run(reference.vit_block, x, pending, params, H, grads)
    xd, pd, prd = _double(x, pending, params)
    exact = _run(reference.vit_block, xd, pd, prd, H, [t.double() for t in grads])
    for i, (k, e, r) in enumerate(zip(got, eager, exact)):
        assert k.dtype == torch.bfloat16, i
        assert_low_precision_ok(k, e, r, atol=2e-2, name=f"result {i}")


def test_autocast_matches_the_reference_under_autocast(triton_path):
    """fp32 stream and parameters under bf16 autocast: GEMMs and attention in bf16, the stream
    (x_in, h) in fp32, the MLP branch m in bf16, fp32 parameter gradients."""
    x, pending, params, H = _inputs(2, 9, 24, 4, 40)
    pending = pending.detach().bfloat16().requires_grad_()  # the previous block's m: bf16 under autocast
    g = torch.Generator().manual_seed(1)
    grads = [torch.randn(x.shape, generator=g), torch.randn(x.shape, generator=g),
             torch.randn(x.shape, generator=g).bfloat16()]

    def under_autocast(fn):
        def run(*a, **kw):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return fn(*a, **kw)
        return run
    got = _run(under_autocast(ops.vit_block), x, pending, params, H, grads)
    eager = _run(under_autocast(reference.vit_block), x, pending, params, H, grads)
    xd, pd, prd = _double(x, pending, params)
    exact = _run(reference.vit_block, xd, pd, prd, H, [t.double() for t in grads])
    for i, (k, e, r) in enumerate(zip(got, eager, exact)):
        assert k.dtype == e.dtype, (i, k.dtype, e.dtype)
        assert_low_precision_ok(k, e, r, atol=2e-2, name=f"result {i}")


def test_a_pending_wider_than_x_takes_the_reference(triton_path, monkeypatch):
    """A bf16 x with an fp32 pending: the reference keeps x_in = x + pending in fp32, the kernels
    would keep it in x's bf16; so the Triton path refuses it (forced: an error naming pending;
    auto: the reference, the reason in why_not_fast). fp32 x with a bf16 pending (the model's
    case above) stays on the kernels."""
    from tec_fast.ops.dispatch import why_not_fast
    x, pending, params, H = _inputs(2, 5, 8, 2, 12)
    x = x.detach().bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with pytest.raises(RuntimeError, match="pending is torch.float32, wider than x's torch.bfloat16"):
            ops.vit_block(x, *params, H, 1e-6, pending=pending)
    assert any("pending" in r for r in why_not_fast("vit_block", x, pending_dtype=torch.float32))
    assert not why_not_fast("vit_block", x.float(), pending_dtype=torch.bfloat16)
    monkeypatch.setenv("TEC_FAST_KERNELS", "reference")  # re-read at the next call (conftest)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        x_in, h, m = ops.vit_block(x, *params, H, 1e-6, pending=pending)
    assert x_in.dtype == h.dtype == torch.float32
    assert torch.equal(x_in, x.float() + pending)


def test_eager_route_and_custom_ops_agree(triton_path, monkeypatch):
    import tec_fast.kernels.layer_norm as ln
    import tec_fast.kernels.vit_block as vb
    x, pending, params, H = _inputs(2, 5, 12, 3, 20)
    grads = [torch.ones(x.shape)] * 3
    calls = []
    monkeypatch.setattr(ln, "_layer_norm_op", lambda *a, real=ln._layer_norm_op: calls.append(1) or real(*a))
    assert_routes_agree(vb, lambda: _run(ops.vit_block, x, pending, params, H, grads), monkeypatch, also=(ln,))
    assert calls  # the LayerNorms went through their custom op on the second run


def test_keeps_no_more_than_the_per_op_block(triton_path):
    """What autograd keeps for backward: no GELU activation (hidden-wide tensors: the
    pre-activation and fc1's weight only), and in all no more elements than the reference."""
    B, N, C, H, hidden = 2, 6, 15, 3, 40  # B * N != C: a token-by-hidden tensor is told apart from a weight
    x, pending, params, _ = _inputs(B, N, C, H, hidden)
    sizes = {}
    for name, fn in (("fast", ops.vit_block), ("reference", reference.vit_block)):
        kept = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t.numel()) or t, lambda t: t):
            fn(x, *params, H, 1e-6, pending=pending)
        sizes[name] = kept
    assert sizes["fast"].count(B * N * hidden) == 1, sizes["fast"]
    assert sum(sizes["fast"]) <= sum(sizes["reference"]), sizes
    # under bf16 autocast (fp32 stream and weights), the bytes kept that exist only for the
    # backward (not the inputs and weights themselves): the LayerNorms' outputs kept in bf16, as
    # the reference's GEMMs keep their cast inputs; the weights kept as they are, where the
    # reference keeps bf16 copies
    inputs = {t.data_ptr() for t in (x, pending, *params) if t is not None}
    kept_bytes = {}
    for name, fn in (("fast", ops.vit_block), ("reference", reference.vit_block)):
        kept = []

        def pack(t):
            if t.data_ptr() not in inputs:
                kept.append((t.numel(), t.dtype))
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16):
            fn(x, *params, H, 1e-6, pending=pending)
        kept_bytes[name] = sum(n * dt.itemsize for n, dt in kept)
        if name == "fast":  # token-wide fp32: the stream (x_in, h) only, not the LayerNorms' outputs
            assert kept.count((B * N * C, torch.float32)) == 2, kept
    assert kept_bytes["fast"] <= kept_bytes["reference"], kept_bytes


def test_no_grad_forward_keeps_nothing(triton_path):
    x, pending, params, H = _inputs(2, 5, 12, 3, 20)
    with torch.no_grad():
        got = ops.vit_block(x, *params, H, 1e-6, pending=pending)
        want = reference.vit_block(x, *params, H, 1e-6, pending=pending)
    for a, e in zip(got, want):
        assert a.grad_fn is None
        assert_close(a, e, atol=1e-5, rtol=1e-5, name="no-grad output")


def test_validation_names_the_argument():
    x, pending, params, H = _inputs(2, 5, 12, 3, 20)
    for eps in (-1.0, float("inf"), "1e-6"):
        with pytest.raises(ValueError, match="eps must be a"):
            ops.vit_block(x, *params, H, eps)
    with pytest.raises(ValueError, match="num_heads must be a positive int dividing C=12"):
        ops.vit_block(x, *params, 5)
    with pytest.raises(ValueError, match=r"x must be 3-D"):
        ops.vit_block(x[0], *params, H)
    bad = list(params)
    bad[4] = params[4][:, :6]
    with pytest.raises(ValueError, match=r"proj_weight must be a floating-point tensor of shape \(12, 12\)"):
        ops.vit_block(x, *bad, H)
    bad = list(params)
    bad[10] = torch.randn(12, 21)
    with pytest.raises(ValueError, match=r"fc2_weight .* shape \(12, 20\).*hidden=20"):
        ops.vit_block(x, *bad, H)
    bad = list(params)
    bad[8] = params[8].detach().double()
    with pytest.raises(ValueError, match="fc1_weight has dtype torch.float64 but x has torch.float32"):
        ops.vit_block(x, *bad, H)
    with pytest.raises(ValueError, match="pending must be a floating-point tensor of x's shape"):
        ops.vit_block(x, *params, H, pending=pending[:, :3])
    bad = list(params)
    bad[0] = params[0].detach().to("meta")
    with pytest.raises(ValueError, match="norm1_weight is on meta"):
        ops.vit_block(x, *bad, H)
    bad = list(params)
    bad[3], bad[8] = None, None  # no qkv bias (allowed) and no fc1 weight (not)
    with pytest.raises(ValueError, match="fc1_weight must be a floating-point tensor of shape"):
        ops.vit_block(x, *bad, H)


def _blocks(depth, C, H, **kw):
    torch.manual_seed(0)
    blocks = torch.nn.ModuleList([Block(C, H, **kw) for _ in range(depth)])
    with torch.no_grad():  # non-trivial LayerNorms and biases
        for p in blocks.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return blocks


def test_blocks_take_it_and_give_the_per_op_values(triton_path):
    """``run_blocks`` over plain blocks: one vit_block node per block, the same outputs and
    gradients as the reference."""
    blocks = _blocks(3, 12, 3)
    x = torch.randn(2, 5, 12, requires_grad=True)
    h, m, outs, _ = run_blocks(blocks, x, outputs=(0,))
    assert type(m.grad_fn).__name__ == "_VitBlocksBackward"
    loss = (h + m).square().sum() + outs[0].sum()
    got = [loss, *torch.autograd.grad(loss, [x, *blocks.parameters()])]
    ops.dispatch.set_kernel_mode("reference")
    try:
        h, m, outs, _ = run_blocks(blocks, x, outputs=(0,))
        loss = (h + m).square().sum() + outs[0].sum()
        want = [loss, *torch.autograd.grad(loss, [x, *blocks.parameters()])]
    finally:
        ops.dispatch.reload_environment()
    for i, (a, e) in enumerate(zip(got, want)):
        assert_close(a, e, atol=1e-4, rtol=1e-4, name=f"result {i}")


def test_layer_scale_and_other_activations_keep_the_per_op_path(triton_path):
    """Blocks the op does not compute run part by part: LayerScale (DINOv2, DeiT-III) through
    the separate ops; another activation (CLIP's quick GELU) too, which the forced Triton mode
    then refuses in the MLP, naming it."""
    from tec_fast.models.layers import _one_op_tensors
    x = torch.randn(2, 5, 12, requires_grad=True)
    scaled = _blocks(1, 12, 3, layer_scale=True)[0]
    assert _one_op_tensors(scaled) is None and not _one_op(scaled, x)
    quick = _blocks(1, 12, 3, act="quick_gelu")[0]
    assert _one_op_tensors(quick) is None
    with pytest.raises(RuntimeError, match="TEC_FAST_KERNELS=triton but mlp"):
        quick(x)


def _one_op(blk, x) -> bool:
    return type(blk(x, split=True)[2].grad_fn).__name__ == "_VitBlocksBackward"


def test_hooks_and_replaced_layers_keep_the_per_op_path(triton_path):
    """A hook on a part (fine-tuning's drop path sits on ls1 / ls2) or a part replaced by another
    class (a LoRA-style Linear) must run, so such a block runs part by part."""
    from tec_fast.models.layers import _one_op_tensors

    def _plain(b):
        return _one_op_tensors(b) is not None
    x = torch.randn(2, 5, 12, requires_grad=True)
    blk = _blocks(1, 12, 3)[0]
    assert _one_op(blk, x)
    calls = []
    handle = blk.ls2.register_forward_hook(lambda module, args, out: calls.append(1) or out * 0)
    out = blk(x)  # the hook drops the MLP branch: the output is h
    assert calls and not _one_op(blk, x)
    params = [p for p in blk.parameters()]
    h = reference.vit_block(x, *params, 3, blk.norm1.eps)[1]
    assert_close(out, h, atol=1e-5, rtol=1e-5, name="block output with the MLP branch dropped")
    handle.remove()
    assert _one_op(blk, x)

    class LoraLinear(torch.nn.Linear):
        pass
    blk.attn.qkv = LoraLinear(12, 36)
    assert not _plain(blk) and not _one_op(blk, x)
    blk.attn.qkv = torch.nn.Linear(12, 36)
    assert _plain(blk)
    for register in (torch.nn.modules.module.register_module_forward_pre_hook,
                     torch.nn.modules.module.register_module_forward_hook):
        handle = register(lambda *a: None)
        try:
            assert not _plain(blk)
        finally:
            handle.remove()
    assert _plain(blk)


@pytest.mark.parametrize("with_pending", [True, False])
def test_strided_inputs(triton_path, with_pending):
    """x and pending as strided views (every other channel of a wider tensor), the output
    gradients transposed views: the same values and gradients as contiguous copies give."""
    x, pending, params, H = _inputs(3, 7, 12, 4, 20)
    g = torch.Generator().manual_seed(5)
    wide_x = torch.randn(3, 7, 24, generator=g, requires_grad=True)
    wide_p = torch.randn(3, 7, 24, generator=g, requires_grad=True)
    xs, ps = wide_x[..., ::2], (wide_p[..., 1::2] if with_pending else None)
    grads = [torch.randn(3, 12, 7, generator=g).transpose(1, 2) for _ in range(3)]
    leaves = [wide_x] + ([wide_p] if with_pending else []) + params
    out = ops.vit_block(xs, *params, H, 1e-6, pending=ps)
    got = list(out) + list(torch.autograd.grad(out, leaves, grads[3 - len(out):]))
    xd = xs.detach().double().requires_grad_()
    pd = ps.detach().double().requires_grad_() if with_pending else None
    prd = [p.detach().double().requires_grad_() for p in params]
    out_d = reference.vit_block(xd, *prd, H, 1e-6, pending=pd)
    want = list(out_d) + list(torch.autograd.grad(out_d, [xd] + ([pd] if with_pending else []) + prd,
                                                  [t.double() for t in grads[3 - len(out_d):]]))
    for i, (a, e) in enumerate(zip(got, want)):
        if a.shape != e.shape:  # a wide leaf's gradient: the view's channels hold it, the others zero
            used, unused = (a[..., ::2], a[..., 1::2]) if i == len(out) else (a[..., 1::2], a[..., ::2])
            assert_close(used, e, atol=2e-5 * max(1.0, e.abs().max().item()), rtol=1e-4, name=f"result {i}")
            assert not unused.any(), i
            continue
        assert_close(a, e, atol=2e-5 * max(1.0, e.abs().max().item()), rtol=1e-4, name=f"result {i}")


@pytest.mark.parametrize("dtype,C,H", [(torch.bfloat16, 64, 4), (torch.float32, 64, 4), (torch.bfloat16, 48, 4)])
def test_whole_block_on_meta_tensors(dtype, C, H):
    """The block's forward and backward on meta tensors (shapes and dtypes only), every Triton
    launch recorded and skipped: each of the 14 gradients comes back in its leaf's shape and
    dtype, and the block's own GEMM and attention kernels and the LayerNorm's are the ones
    launched."""
    from benchmarks.triton_stub import launches_stubbed
    import tec_fast.kernels.vit_block as vb
    from tec_fast.ops.registry import OPS, SIZES, unit_grads
    ex = OPS["vit_block"].example(dict(SIZES["tiny"], C=C, H=H), dtype, torch.device("meta"))
    launched = []
    with launches_stubbed(lambda name, args, kwargs: launched.append(name)):
        out = vb.vit_block(*ex.args, **ex.kwargs)
        n_forward = len(launched)
        grads = torch.autograd.grad(out, ex.grad_of, unit_grads(list(out)))
    assert [o.shape for o in out] == [ex.args[0].shape] * 3
    assert len(grads) == 14 and all(g.shape == t.shape and g.dtype == t.dtype for g, t in zip(grads, ex.grad_of))
    assert set(launched) == {"_layer_norm_fwd_kernel", "_layer_norm_bwd_kernel", "_layer_norm_dwdb_kernel",
                             "_gemm_kernel", "_weight_grads_kernel", "_attention_fwd_kernel", "_attention_bwd_kernel"}
    assert (n_forward, len(launched) - n_forward) == (7, 10)
    assert launched.count("_weight_grads_kernel") == 2  # the four weight gradients in two launches
    assert launched.count("_layer_norm_dwdb_kernel") == 1  # both LayerNorms' weight and bias sums


@pytest.mark.parametrize("mode", ["reference", "triton"])
def test_blocks_compile_whole(mode, request):
    """A stack of blocks through ``run_blocks`` under torch.compile (aot_eager, fullgraph: the
    one-op check on the block's parts traces without a break), bitwise what eager gives."""
    request.getfixturevalue(f"{mode}_path")
    torch._dynamo.reset()
    blocks = _blocks(2, 32, 4)
    x = torch.randn(2, 5, 32, requires_grad=True)
    node = type(run_blocks(blocks, x)[1].grad_fn).__name__
    assert (node == "_VitBlocksBackward") == (mode == "triton"), node

    def loss(x):
        h, m, outs, _ = run_blocks(blocks, x, outputs=(0,))
        return (h + m).square().sum() + outs[0].sum()
    want = [loss(x), *torch.autograd.grad(loss(x), [x, *blocks.parameters()])]
    compiled = torch.compile(loss, backend="aot_eager", fullgraph=True)
    got = [compiled(x), *torch.autograd.grad(compiled(x), [x, *blocks.parameters()])]
    for i, (a, e) in enumerate(zip(got, want)):
        assert torch.equal(a, e), i


# ---- ops.vit_blocks: a stack of blocks as one node ---------------------------------------------

def _stack(n, B, N, C, H, hidden, dtype=torch.float32):
    """x and n blocks' parameters (the first block's pending is not used: a stack starts without)."""
    x, _, first, _ = _inputs(B, N, C, H, hidden, dtype=dtype)
    params = [first] + [_inputs(B, N, C, H, hidden, dtype=dtype, seed=s, qkv_bias=s != 2)[2] for s in range(1, n)]
    return x, params


def _stack_run(fn, x, params, H, outputs, qk_block, seed=1):
    """(h, m, outs..., q, k) and the gradients of x and every parameter, for random output
    gradients (q and k get theirs too)."""
    h, m, outs, qk = fn(x, params, H, 1e-6, outputs=outputs, qk_block=qk_block)
    res = [h, m, *outs, *(qk or ())]
    g = torch.Generator().manual_seed(seed)
    grads = [torch.randn(t.shape, generator=g).to(t.dtype) for t in res]
    leaves = [x] + [p for ps in params for p in ps if p is not None]
    return res + list(torch.autograd.grad(res, leaves, grads, allow_unused=True))


@pytest.mark.parametrize("shape", [(3, 7, 12, 4, 20), (2, 17, 15, 5, 130)])
def test_stack_fp32_value_and_every_gradient(triton_path, shape):
    """Three blocks (one without a qkv bias), the first block's output tapped, q and k of the
    middle one read: every output and gradient against float64."""
    x, params = _stack(3, *shape)
    H = shape[3]
    got = _stack_run(ops.vit_blocks, x, params, H, (0, 1), 1)
    assert got[1].grad_fn is got[0].grad_fn and type(got[0].grad_fn).__name__ == "_VitBlocksBackward"
    d = lambda t: None if t is None else t.detach().double().requires_grad_()  # noqa: E731
    exact = _stack_run(reference.vit_blocks, d(x), [[d(p) for p in ps] for ps in params], H, (0, 1), 1)
    assert len(got) == len(exact) == 6 + 1 + 35
    for i, (a, e) in enumerate(zip(got, exact)):
        assert (a is None) == (e is None), i
        if a is not None:
            assert a.dtype == torch.float32 and a.shape == e.shape, i
            assert_close(a, e, atol=2e-5 * max(1.0, e.abs().max().item()), rtol=1e-4, name=f"result {i}")


def test_stack_is_bitwise_the_chained_blocks(triton_path):
    """The stack's node runs the blocks' kernels as ``vit_block`` does one block at a time:
    bitwise the same outputs and gradients as chaining ``ops.vit_block`` (pending = the
    previous m), and without a gradient to compute the same values and no node."""
    x, params = _stack(3, 2, 9, 24, 4, 40)
    h, m, (o0, o1), _ = ops.vit_blocks(x, params, 4, 1e-6, outputs=(0, 1))
    loss = (h * m).sum() + o0.square().sum() + o1.sum()
    leaves = [x] + [p for ps in params for p in ps if p is not None]
    got = [h, m, o0, o1, *torch.autograd.grad(loss, leaves)]
    taps, pending, xc = [], None, x
    for ps in params:
        x_in, xc, pending = ops.vit_block(xc, *ps, 4, 1e-6, pending=pending)
        taps.append(x_in)
    loss = (xc * pending).sum() + taps[1].square().sum() + taps[2].sum()
    want = [xc, pending, taps[1], taps[2], *torch.autograd.grad(loss, leaves)]
    for i, (a, e) in enumerate(zip(got, want)):
        assert torch.equal(a, e), i
    with torch.no_grad():
        h2, m2, (o0b,), qk = ops.vit_blocks(x, params, 4, 1e-6, outputs=(0,), qk_block=2)
    assert h2.grad_fn is None and torch.equal(h2, h) and torch.equal(m2, m) and torch.equal(o0b, o0)
    assert qk[0].shape == qk[1].shape == (2, 4, 9, 6)


def _chained(x, params, H, outputs):
    """``ops.vit_block`` block after block: (h, m, the outputs of the blocks in ``outputs``)."""
    taps, pending = [], None
    for ps in params:
        x_in, x, pending = ops.vit_block(x, *ps, H, 1e-6, pending=pending)
        taps.append(x_in)
    return x, pending, [taps[i + 1] for i in outputs]


def _tapped_loss(h, m, outs):
    return (h.float() * m.float()).sum() + sum((i + 1) * o.float().square().sum() for i, o in enumerate(outs))


@pytest.mark.parametrize("mixed", [False, True])
def test_stack_buffers_under_autocast_are_the_chained_blocks(triton_path, mixed):
    """Under bf16 autocast (fp32 stream and weights) the stack's buffers hold bf16 GEMM outputs
    and the fp32 stream: bitwise the chained blocks, and without a gradient the same values,
    the q and k of a middle block included. ``mixed``: the middle block's parameters in bf16
    (their gradients then come in bf16, not in the stack's fp32 gradient tensors)."""
    x, params = _stack(3, 2, 9, 24, 4, 40)
    if mixed:
        params[1] = [None if p is None else p.detach().bfloat16().requires_grad_() for p in params[1]]
    leaves = [x] + [p for ps in params for p in ps if p is not None]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h, m, outs, (q, k) = ops.vit_blocks(x, params, 4, 1e-6, outputs=(0, 1), qk_block=1)
        hc, mc, outs_c = _chained(x, params, 4, (0, 1))
    assert (h.dtype, m.dtype, outs[0].dtype, q.dtype) == (torch.float32, torch.bfloat16, torch.float32, torch.bfloat16)
    got = [h, m, *outs, *torch.autograd.grad(_tapped_loss(h, m, outs), leaves)]
    want = [hc, mc, *outs_c, *torch.autograd.grad(_tapped_loss(hc, mc, outs_c), leaves)]
    for i, (a, e) in enumerate(zip(got, want)):
        assert torch.equal(a, e), i
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        h2, m2, outs2, (q2, k2) = ops.vit_blocks(x, params, 4, 1e-6, outputs=(0, 1), qk_block=1)
    for i, (a, e) in enumerate(zip([h2, m2, *outs2, q2, k2], [h, m, *outs, q, k])):
        assert torch.equal(a, e), i


def test_stack_gradients_accumulate_into_each_parameter(triton_path):
    """A stack writes each kind of weight gradient into one allocation, a slice per block, that
    autograd keeps as the parameters' .grad: two backward passes accumulate into every .grad on
    its own (twice one pass, bitwise). A frozen weight in the middle block (no slices for its
    kind) leaves every gradient as the chained blocks give it."""
    x, params = _stack(3, 2, 5, 12, 3, 20)
    params[1][8].requires_grad_(False)  # block 1's fc1 weight
    leaves = [x] + [p for ps in params for p in ps if p is not None and p.requires_grad]
    h, m, outs, _ = ops.vit_blocks(x, params, 3, 1e-6, outputs=(0,))
    once = torch.autograd.grad(_tapped_loss(h, m, outs), leaves)
    want = torch.autograd.grad(_tapped_loss(*_chained(x, params, 3, (0,))), leaves)
    for i, (a, e) in enumerate(zip(once, want)):
        assert torch.equal(a, e), i
    for _ in range(2):
        h, m, outs, _ = ops.vit_blocks(x, params, 3, 1e-6, outputs=(0,))
        _tapped_loss(h, m, outs).backward()
    for i, (leaf, g) in enumerate(zip(leaves, once)):
        assert torch.equal(leaf.grad, 2 * g), i
    assert params[1][8].grad is None


def test_stack_of_blocks_of_different_widths(triton_path):
    """Blocks of different MLP widths in one stack (each allocating its own tensors): bitwise the
    chained blocks, with and without a gradient."""
    x, _, first, _ = _inputs(2, 5, 12, 3, 20)
    params = [first, _inputs(2, 5, 12, 3, 36, seed=1)[2], _inputs(2, 5, 12, 3, 20, seed=2)[2]]
    leaves = [x] + [p for ps in params for p in ps if p is not None]
    h, m, outs, _ = ops.vit_blocks(x, params, 3, 1e-6, outputs=(0, 1))
    hc, mc, outs_c = _chained(x, params, 3, (0, 1))
    got = [h, m, *outs, *torch.autograd.grad(_tapped_loss(h, m, outs), leaves)]
    want = [hc, mc, *outs_c, *torch.autograd.grad(_tapped_loss(hc, mc, outs_c), leaves)]
    for i, (a, e) in enumerate(zip(got, want)):
        assert torch.equal(a, e), i
    with torch.no_grad():
        h2, m2, outs2, _ = ops.vit_blocks(x, params, 3, 1e-6, outputs=(0, 1))
    for i, (a, e) in enumerate(zip([h2, m2, *outs2], [h, m, *outs])):
        assert torch.equal(a, e), i


def test_stack_takes_a_strided_x(triton_path):
    """x with non-contiguous rows (the first block reads it in place, its LayerNorm writing
    into the stack's buffer): bitwise the chained blocks, with and without a gradient."""
    _, params = _stack(3, 2, 5, 12, 3, 20)
    x = torch.randn(2, 12, 5).transpose(1, 2).requires_grad_()
    leaves = [x] + [p for ps in params for p in ps if p is not None]
    h, m, outs, _ = ops.vit_blocks(x, params, 3, 1e-6, outputs=(0,))
    hc, mc, outs_c = _chained(x, params, 3, (0,))
    got = [h, m, *outs, *torch.autograd.grad(_tapped_loss(h, m, outs), leaves)]
    want = [hc, mc, *outs_c, *torch.autograd.grad(_tapped_loss(hc, mc, outs_c), leaves)]
    for i, (a, e) in enumerate(zip(got, want)):
        assert torch.equal(a, e), i
    with torch.no_grad():
        h2, m2, outs2, _ = ops.vit_blocks(x, params, 3, 1e-6, outputs=(0,))
    for i, (a, e) in enumerate(zip([h2, m2, *outs2], [h, m, *outs])):
        assert torch.equal(a, e), i


def test_stack_bf16_error_within_budget(triton_path):
    x, params = _stack(2, 3, 7, 12, 4, 20, dtype=torch.bfloat16)
    got = _stack_run(ops.vit_blocks, x, params, 4, (0,), 0)
    eager = _stack_run(reference.vit_blocks, x, params, 4, (0,), 0)
    d = lambda t: None if t is None else t.detach().double().requires_grad_()  # noqa: E731
    exact = _stack_run(reference.vit_blocks, d(x), [[d(p) for p in ps] for ps in params], 4, (0,), 0)
    for i, (k, e, r) in enumerate(zip(got, eager, exact)):
        if k is not None:
            assert k.dtype == torch.bfloat16, i
            assert_low_precision_ok(k, e, r, atol=2e-2, name=f"result {i}")


def test_stack_validation_names_the_argument():
    x, params = _stack(2, 2, 5, 12, 3, 20)
    with pytest.raises(ValueError, match="params must be a non-empty sequence"):
        ops.vit_blocks(x, [], 3)
    with pytest.raises(ValueError, match=r"params\[1\] must be a sequence of the block's 12 tensors"):
        ops.vit_blocks(x, [params[0], params[1][:11]], 3)
    bad = list(params[1])
    bad[8] = bad[8][:, :5]
    with pytest.raises(ValueError, match=r"params\[1\]: fc1_weight must be a floating-point tensor of shape"):
        ops.vit_blocks(x, [params[0], bad], 3)
    with pytest.raises(ValueError, match=r"outputs must hold block indices in \[0, 1\)"):
        ops.vit_blocks(x, params, 3, outputs=(1,))
    with pytest.raises(ValueError, match=r"qk_block must be None or a block index in \[0, 2\)"):
        ops.vit_blocks(x, params, 3, qk_block=2)
    with pytest.raises(ValueError, match="num_heads must be a positive int"):
        ops.vit_blocks(x, params, 5)
    with pytest.raises(ValueError, match="outputs must be a sequence of block indices, got int 0"):
        ops.vit_blocks(x, params, 3, outputs=0)
    for eps in (-1.0, float("nan"), None):
        with pytest.raises(ValueError, match="eps must be a"):
            ops.vit_blocks(x, params, 3, eps)


def _block_nodes(t) -> int:
    """The ``vit_blocks`` nodes the graph of ``t`` holds."""
    seen, todo = set(), [t.grad_fn]
    while todo:
        node = todo.pop()
        if node is not None and node not in seen:
            seen.add(node)
            todo += [n for n, _ in node.next_functions]
    return sum(type(n).__name__ == "_VitBlocksBackward" for n in seen)


def test_run_blocks_makes_one_node_unless_a_block_is_hooked(triton_path):
    """``run_blocks`` hands a stack of plain blocks to ``ops.vit_blocks`` (one node); a hook on
    one block (it must see that block run), or blocks of different heads, keep the blocks one
    node each, with the same values."""
    blocks = _blocks(3, 12, 3)
    x = torch.randn(2, 5, 12, requires_grad=True)
    h, m, outs, _ = run_blocks(blocks, x, outputs=(0, 1))
    assert _block_nodes(m) == 1 and h.grad_fn is m.grad_fn is outs[0].grad_fn is outs[1].grad_fn
    calls = []
    handle = blocks[1].register_forward_hook(lambda *a: calls.append(1))
    try:
        h2, m2, outs2, _ = run_blocks(blocks, x, outputs=(0, 1))
    finally:
        handle.remove()
    assert calls == [1] and _block_nodes(m2) == 3
    for a, e in ((h2, h), (m2, m), (outs2[0], outs[0]), (outs2[1], outs[1])):
        assert torch.equal(a, e)
    mixed = torch.nn.ModuleList([*_blocks(1, 12, 3), *_blocks(1, 12, 4)])
    assert _block_nodes(run_blocks(mixed, x)[1]) == 2


def test_stack_launches(triton_path):
    """Three blocks: 7 launches a block forward, 9 a block backward and one more that sums every
    LayerNorm's weight and bias gradients of the stack."""
    from benchmarks.triton_stub import launches_stubbed
    x, params = _stack(3, 2, 5, 12, 3, 20)
    launched = []
    with launches_stubbed(lambda name, args, kwargs: launched.append(name)):
        h, m, _, _ = ops.vit_blocks(x, params, 3, 1e-6)
        n_forward = len(launched)
        torch.autograd.grad((h + m).sum(), [x])
    assert (n_forward, len(launched) - n_forward) == (21, 28)
    assert launched.count("_layer_norm_dwdb_kernel") == 1
