"""The Triton kernels compiled for a real GPU (not the interpreter), at ViT-B-like sizes, against
the reference on the same device: values and every gradient, fp32 and bf16, plus a
torch.compile (inductor) run. Skipped without CUDA; ``benchmarks/run_device.sh`` runs them."""
import pytest
import torch
import torch.nn.functional as F

from conftest import assert_close, assert_low_precision_ok, strided_copy
from tec_fast import ops
from tec_fast.models.adapter import EncoderAdapter
from tec_fast.ops import reference

pytestmark = pytest.mark.gpu
DEV = "cuda"


def _grads(out, leaves, grad=None):
    return [out, *torch.autograd.grad(out, leaves, grad)]


def _check(got, eager, exact, dtype, names, atol32=1e-4, rtol32=1e-4, atol_lowp=1e-2):
    for name, a, e, r in zip(names, got, eager, exact):
        if dtype == torch.float32:
            assert_close(a, r, atol=atol32, rtol=rtol32, name=name)
        else:
            assert_low_precision_ok(a, e, r, atol=atol_lowp, name=name)


def _leaf(t, dtype):
    return t.detach().to(dtype).requires_grad_()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_masked_gather(cuda_triton_path, dtype):
    B, L, C, K = 8, 196, 768, 49
    x0, pos0 = torch.randn(B, L, C, device=DEV), torch.randn(L, C, device=DEV)
    ids = torch.rand(B, L, device=DEV).argsort(1)[:, :K]
    grad = torch.randn(B, K, C, device=DEV)
    run = lambda fn, dt: _grads(fn(*(x := _leaf(x0, dt), ids, p := _leaf(pos0, dt))), [x, p], grad.to(dt))  # noqa
    got = run(ops.masked_gather, dtype)
    eager = run(reference.masked_gather, dtype)
    exact = run(reference.masked_gather, torch.float32) if dtype == torch.float32 else \
        _grads(reference.masked_gather(x := _leaf(x0.to(dtype), torch.float32), ids,
                                       p := _leaf(pos0.to(dtype), torch.float32)), [x, p], grad.to(dtype).float())
    _check(got, eager, exact, dtype, ["out", "grad_x", "grad_pos"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_scatter_masked(cuda_triton_path, dtype):
    B, L, C, K = 8, 196, 512, 49
    vis0, tok0, pos0 = (torch.randn(B, K, C, device=DEV), torch.randn(C, device=DEV),
                        torch.randn(L, C, device=DEV))
    ids = torch.rand(B, L, device=DEV).argsort(1).argsort(1)
    grad = torch.randn(B, L, C, device=DEV)

    def run(fn, dt, src=torch.float32):
        v, t, p = (_leaf(a.to(src), dt) for a in (vis0, tok0, pos0))
        return _grads(fn(v, ids, t, p), [v, t, p], grad.to(src).to(dt))
    got, eager = run(ops.scatter_masked, dtype), run(reference.scatter_masked, dtype)
    exact = run(reference.scatter_masked, torch.float32, src=dtype)
    _check(got, eager, exact, dtype, ["out", "grad_vis", "grad_mask_token", "grad_pos"], atol_lowp=0.1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_patch_norm_mse(cuda_triton_path, dtype):
    B, L, C = 8, 196, 768
    pred0, target0 = torch.randn(B, L, C, device=DEV), torch.randn(B, L, C, device=DEV) * 3 + 2
    mask = (torch.rand(B, L, device=DEV) < 0.75).float()

    def eager_lowp(pred, target, mask):
        t = (target - target.mean(1, keepdim=True)) / torch.sqrt(target.var(1, keepdim=True) + 1e-6)
        return ((((pred - t) ** 2).mean(-1)) * mask.to(pred.dtype)).sum() / mask.sum()

    def run(fn, dt, src=torch.float32):
        p = _leaf(pred0.to(src), dt)
        return _grads(fn(p, target0.to(src).to(dt), mask), [p])
    got = run(ops.patch_norm_mse, dtype)
    eager = run(eager_lowp, dtype)
    exact = run(reference.patch_norm_mse, torch.float32, src=dtype)
    _check(got, eager, exact, dtype, ["loss", "grad_pred"], atol_lowp=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_relation_targets(cuda_triton_path, dtype):
    B, H, N, d, topk = 8, 12, 197, 64, 15
    q, k = (torch.randn(B, H, N, d, device=DEV).to(dtype) for _ in range(2))
    rel, idx = ops.relation_targets(q, k, topk, d ** -0.5)
    rrel, ridx = reference.relation_targets(q.float(), k.float(), topk, d ** -0.5)
    assert torch.equal(idx, ridx)
    # tl.dot on bf16 operands accumulates in fp32 like the reference; fp32 uses "ieee"
    assert_close(rel, rrel, atol=1e-3, rtol=1e-3, name="relation")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_relation_loss(cuda_triton_path, dtype):
    B, H, N, d, topk = 8, 12, 197, 64, 15
    q0, k0 = (torch.randn(B, H, N, d, device=DEV) for _ in range(2))
    idx = torch.rand(B, N - 1, device=DEV).topk(topk, dim=1).indices
    target = torch.randn(B, 1 + topk, H, N - 1, device=DEV) * 3

    def eager_lowp(q, k, idx, target, tau, scale):
        rows = torch.cat([torch.zeros_like(idx[:, :1]), idx + 1], 1)
        qr = torch.gather(q, 2, rows[:, None, :, None].expand(B, H, 1 + topk, d))
        logits = (qr @ k[:, :, 1:].transpose(-1, -2) * scale).permute(0, 2, 1, 3)
        return -(F.softmax(target.to(q.dtype) / tau, -1) * F.log_softmax(logits, -1)).sum(-1).mean()

    def run(fn, dt, src=torch.float32):
        q, k = _leaf(q0.to(src), dt), _leaf(k0.to(src), dt)
        return _grads(fn(q, k, idx, target, 1.8, d ** -0.5), [q, k])
    got, eager = run(ops.relation_loss, dtype), run(eager_lowp, dtype)
    exact = run(reference.relation_loss, torch.float32, src=dtype)
    _check(got, eager, exact, dtype, ["loss", "grad_q", "grad_k"], atol32=1e-5, atol_lowp=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_encoder_adapter(cuda_triton_path, monkeypatch, dtype):
    D, G, B, T, C, hidden = 12, 4, 4, 50, 768, 2048
    torch.manual_seed(0)
    m32 = EncoderAdapter(C, D, G, hidden).to(DEV)
    feats0 = torch.randn(D, B, T, C, device=DEV)
    grad = torch.randn(B, T, C, device=DEV)

    def run(mode, dt, src=torch.float32):
        monkeypatch.setenv("TEC_FAST_KERNELS", mode)
        m = EncoderAdapter(C, D, G, hidden).to(DEV)
        m.load_state_dict({k: v.to(src) for k, v in m32.state_dict().items()})
        m = m.to(dt)
        f = _leaf(feats0.to(src), dt)
        return _grads(m(f), [f, *m.parameters()], grad.to(src).to(dt))
    got, eager = run("triton", dtype), run("reference", dtype)
    exact = run("reference", torch.float32, src=dtype)
    names = ["out", "grad_feats"] + [n for n, _ in m32.named_parameters()]
    # fp32: the Triton path's GEMMs (vit_block's kernel, exact fp32) sum in another order than the reference's
    _check(got, eager, exact, dtype, names, atol32=1e-3, rtol32=1e-3, atol_lowp=5e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mlp(cuda_triton_path, dtype):
    rows, C, hidden = 4 * 50, 768, 3072
    x0 = torch.randn(rows, C, device=DEV) * 2
    w0 = [torch.randn(hidden, C, device=DEV) * C ** -0.5, torch.randn(hidden, device=DEV) * 0.5,
          torch.randn(C, hidden, device=DEV) * hidden ** -0.5, torch.randn(C, device=DEV) * 0.5]
    grad = torch.randn(rows, C, device=DEV)

    def run(fn, dt, src=torch.float32):
        args = [_leaf(t.to(src), dt) for t in (x0, *w0)]
        return _grads(fn(*args), args, grad.to(src).to(dt))
    got, eager = run(ops.mlp, dtype), run(reference.mlp, dtype)
    exact = run(reference.mlp, torch.float32, src=dtype)
    # fp32: the same cuBLAS GEMMs on both paths; only GELU and the b1 sum differ in rounding
    _check(got, eager, exact, dtype, ["out", "grad_x", "grad_w1", "grad_b1", "grad_w2", "grad_b2"],
           atol32=1e-3, rtol32=1e-3, atol_lowp=5e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_qkv_heads(cuda_triton_path, dtype):
    B, N, C, H = 4, 50, 768, 12
    x0 = torch.randn(B, N, C, device=DEV)
    w0 = torch.randn(3 * C, C, device=DEV) * C ** -0.5
    b0 = torch.randn(3 * C, device=DEV) * 0.5
    grads = [torch.randn(B, H, N, C // H, device=DEV) for _ in range(3)]

    def run(fn, dt, src=torch.float32):
        args = [_leaf(t.to(src), dt) for t in (x0, w0, b0)]
        q, k, v = fn(*args, H)
        loss = sum((t.float() * g.to(src).to(dt).float()).sum() for t, g in zip((q, k, v), grads))
        return [q, k, v, *torch.autograd.grad(loss, args)]
    got, eager = run(ops.qkv_heads, dtype), run(reference.qkv_heads, dtype)
    exact = run(reference.qkv_heads, torch.float32, src=dtype)
    # the same cuBLAS GEMMs on both paths; the packing is a copy, the bias sum runs in fp32
    _check(got, eager, exact, dtype, ["q", "k", "v", "grad_x", "grad_weight", "grad_bias"],
           atol32=1e-3, rtol32=1e-3, atol_lowp=5e-2)


def test_gelu_accuracy_as_compiled(cuda_triton_path):
    """The kernels' GELU compiled for the GPU (Phi through erfc, with the approximate reciprocal
    and exp2 where Triton has them) against float64 with fixed bounds: value and derivative within
    5e-7; for the bf16 inputs from -3 up, bf16 outputs equal to the correctly rounded exact value
    but for a few roundings the approximations move (at most 1 in 1 000, by one bf16 step).
    torch's own CUDA GELU is printed beside it, never part of a bound."""
    from tec_fast.kernels.mlp import _mlp_gelu_bwd, _mlp_gelu_fwd
    z = torch.cat([torch.linspace(-12, 12, 1_000_001, device=DEV), torch.randn(1_000_000, device=DEV) * 3])
    zd = z.double()
    two_phi = torch.special.erfc(-zd / 2 ** 0.5)
    exact, d_exact = 0.5 * zd * two_phi, 0.5 * two_phi + zd * torch.exp(-0.5 * zd * zd) / (2 * torch.pi) ** 0.5
    _, d_ours, _ = _mlp_gelu_bwd(z[None], torch.ones(1, z.numel(), device=DEV))
    err = (_mlp_gelu_fwd(z[None])[0].double() - exact).abs().max().item()
    d_err = (d_ours[0].double() - d_exact).abs().max().item()
    torch_err = (F.gelu(z).double() - exact).abs().max().item()
    print(f"GELU max abs error: kernel {err:.3g}, derivative {d_err:.3g} (torch's CUDA GELU: {torch_err:.3g})")
    assert err < 5e-7, err
    assert d_err < 5e-7, d_err
    every = torch.arange(-2 ** 15, 2 ** 15, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    zb = every[torch.isfinite(every) & (every >= -3) & (every.abs() < 1e18)].to(DEV)
    zbd = zb.double()
    want_b = (0.5 * zbd * torch.special.erfc(-zbd / 2 ** 0.5)).float().to(torch.bfloat16)
    ours_b = _mlp_gelu_fwd(zb[None])[0]
    differ = ours_b != want_b
    print(f"bf16 inputs >= -3: {int(differ.sum())} of {zb.numel()} outputs differ from the correctly rounded value")
    assert int(differ.sum()) <= zb.numel() // 1000
    step = torch.finfo(torch.bfloat16).eps * want_b[differ].float().abs()
    assert ((ours_b[differ].float() - want_b[differ].float()).abs() <= step * 1.01).all()


def test_compile_inductor(cuda_triton_path):
    B, H, N, d, topk = 4, 12, 197, 64, 15
    q = torch.randn(B, H, N, d, device=DEV, requires_grad=True)
    k = torch.randn(B, H, N, d, device=DEV, requires_grad=True)
    rel, idx = ops.relation_targets(q.detach(), k.detach(), topk, d ** -0.5)

    def step(q, k):
        return ops.relation_loss(q * 1.0, k, idx, rel, 1.8, d ** -0.5)
    compiled = torch.compile(step, fullgraph=True)
    got = _grads(compiled(q, k), [q, k])
    want = _grads(reference.relation_loss(q, k, idx, rel, 1.8, d ** -0.5), [q, k])
    for name, a, b in zip(["loss", "grad_q", "grad_k"], got, want):
        assert_close(a, b, atol=1e-5, rtol=1e-4, name=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_patch_embed(cuda_triton_path, dtype):
    B, p, D = 8, 16, 768
    images = torch.randn(B, 3, 224, 224, device=DEV)
    w0, b0 = torch.randn(D, 3, p, p, device=DEV) * 0.02, torch.randn(D, device=DEV)
    grad = torch.randn(B, 196, D, device=DEV)

    def run(fn, dt, wide=torch.float32):
        w, b = w0.to(wide).requires_grad_(), b0.to(wide).requires_grad_()
        with torch.autocast("cuda", dtype=dt, enabled=dt not in (torch.float32, torch.float64)):
            out = fn(images.to(wide), w, b)
        return [t.float() for t in _grads(out, [w, b], grad.to(out.dtype))]

    got = run(ops.patch_embed, dtype)
    eager = run(reference.patch_embed, dtype)
    exact = run(reference.patch_embed, torch.float64, torch.float64)  # cuDNN's fp32 conv may use TF32
    _check(got, eager, exact, dtype, ("out", "grad_weight", "grad_bias"), atol32=1e-3, rtol32=1e-3)


# ---- every registered op, from its registry example (tec_fast/ops/registry.py) ----------------

# max |error| allowed, as a fraction of the largest |exact| value of each output (fp32: against
# float64; bf16: on top of twice eager bf16's own error). A new op uses the default until measured.
_REGISTRY_TOL = {"default": (1e-3, 2e-2), "scatter_masked": (1e-3, 0.1), "encoder_adapter": (1e-3, 5e-2)}


def _cast_example(ex, dtype):
    """The example's arguments as fresh tensors of ``dtype`` (floating ones; index tensors as
    they are), leaves where the example has them; returns (args, kwargs, leaves)."""
    leaves = []
    grad_ids = {id(t) for t in ex.grad_of}

    def conv(a):
        if isinstance(a, (list, tuple)):
            return type(a)(conv(t) for t in a)
        if isinstance(a, torch.Tensor) and a.is_floating_point():
            t = a.detach().to(dtype).requires_grad_(id(a) in grad_ids)
            if id(a) in grad_ids:
                leaves.append(t)
            return t
        return a
    args = conv(ex.args)
    kwargs = {k: conv(v) for k, v in ex.kwargs.items()}
    return args, kwargs, leaves


def _registry_run(fn, ex, dtype):
    from tec_fast.ops.registry import outputs
    args, kwargs, leaves = _cast_example(ex, dtype)
    out = fn(*args, **kwargs)
    items = list(out) if isinstance(out, (tuple, list)) else [out]
    outs = outputs(out)
    grads = []
    if leaves and outs:
        g = torch.Generator(device=DEV).manual_seed(1)
        weights = [torch.randn(o.shape, device=DEV, generator=g).to(o.dtype) for o in outs]
        grads = torch.autograd.grad(outs, leaves, weights, allow_unused=True)
    return [t.detach().double() for t in items if isinstance(t, torch.Tensor) and t.is_floating_point()] + \
        [torch.zeros(()) if g is None else g.double() for g in grads]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("op", sorted(__import__("tec_fast.ops.registry", fromlist=["OPS"]).OPS))
def test_registered_op_matches_reference(cuda_triton_path, op, dtype):
    """Every op of the registry on its example (ViT-B widths, B=8), Triton against the reference:
    the values and every gradient."""
    from tec_fast.ops.registry import OPS, SIZES
    torch.manual_seed(0)
    ex = OPS[op].example(dict(SIZES["vitb"], B=8), torch.float32, torch.device(DEV))
    got = _registry_run(getattr(ops, op), ex, dtype)
    exact = _registry_run(getattr(reference, op), ex, torch.float64)
    eager = _registry_run(getattr(reference, op), ex, dtype)
    tol32, tol_lowp = _REGISTRY_TOL.get(op, _REGISTRY_TOL["default"])
    assert len(got) == len(exact) == len(eager)
    for i, (a, e, r) in enumerate(zip(got, eager, exact)):
        scale = max(1.0, r.abs().max().item())
        if dtype == torch.float32:
            assert_close(a, r, atol=tol32 * scale, rtol=tol32, name=f"{op} output/grad {i}")
        else:
            assert_low_precision_ok(a, e, r, atol=tol_lowp * scale, name=f"{op} output/grad {i}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_launch_reuse_gives_what_jitfunction_run_gives(cuda_triton_path, monkeypatch, dtype):
    """Every op, forward and backward at ViT-S sizes (B = 8), launched through Triton's
    ``JITFunction.run`` (``TEC_FAST_LAUNCH=0``) and then twice with the compiled kernels reused
    and each reuse checked against Triton's choice (``verify``): the same values, bit for bit
    where the op sums in a fixed order, within a few roundings where it adds with atomics."""
    from tec_fast.kernels import _common
    from tec_fast.ops import dispatch
    from tec_fast.ops.registry import OPS, SIZES, unit_grads
    shape = dict(SIZES["vits"], B=8)

    def run(op, spec):
        torch.manual_seed(0)
        ex = spec.example(shape, dtype, torch.device(DEV))
        result = getattr(ops, op)(*ex.args, **ex.kwargs)
        outs = [t for t in (result if isinstance(result, (tuple, list)) else (result,)) if isinstance(t, torch.Tensor)]
        diff = [t for t in outs if t.requires_grad]
        grads = torch.autograd.grad(diff, ex.grad_of, unit_grads(diff), allow_unused=True) if ex.grad_of else ()
        return [t.detach().clone() for t in (*outs, *grads) if t is not None]

    for op, spec in OPS.items():
        monkeypatch.setenv("TEC_FAST_LAUNCH", "0")
        dispatch.reload_environment()
        plain = run(op, spec)
        monkeypatch.setenv("TEC_FAST_LAUNCH", "verify")
        dispatch.reload_environment()
        if _common.launch_mode() != "verify":
            pytest.skip(f"launch reuse is off here: {_common.launch_path()}")
        for _ in range(2):  # the second call reuses every kernel the first compiled or looked up
            reused = run(op, spec)
            assert len(reused) == len(plain), op
            for i, (a, b) in enumerate(zip(reused, plain)):
                if op not in ("masked_gather", "scatter_masked"):
                    assert torch.equal(a, b), f"{op} output {i}: launch reuse changed the values"
                else:  # their backwards add with atomics: the order of the adds may differ
                    tol = 4 * torch.finfo(a.dtype).eps
                    torch.testing.assert_close(a, b, rtol=tol, atol=tol * float(b.abs().max()),
                                               msg=f"{op} output {i}")


@pytest.mark.parametrize("head_dim,H,B,dtype,amp", [
    (64, 6, 4, torch.bfloat16, False), (64, 12, 32, torch.bfloat16, False), (80, 6, 4, torch.bfloat16, False),
    (160, 2, 4, torch.bfloat16, False), (16, 6, 4, torch.float32, False), (80, 4, 4, torch.float32, False),
    (12, 6, 4, torch.bfloat16, False), (64, 6, 4, torch.float32, True)])
def test_vit_block_kernels_on_gpu(cuda_triton_path, head_dim, H, B, dtype, amp):
    """``ops.vit_block``'s own GEMM and attention kernels compiled for the GPU, at each attention
    tile row (16-bit heads padded to 64, 128 and 256 values, fp32 heads to 64 and 128, heads of
    12) and both 16-bit GEMM tilings (64 x 64 on a small block, 128 x 128 on B=32 x ViT-B
    widths), fp32 weights under bf16 autocast; values and every gradient against float64."""
    torch.manual_seed(0)
    N = 50
    C = H * head_dim
    x = torch.randn(B, N, C, device=DEV)
    pending = torch.randn(B, N, C, device=DEV)
    params = [torch.ones(C) + 0.3 * torch.randn(C), 0.3 * torch.randn(C), torch.randn(3 * C, C) * C ** -0.5,
              0.3 * torch.randn(3 * C), torch.randn(C, C) * C ** -0.5, 0.3 * torch.randn(C),
              torch.ones(C) + 0.3 * torch.randn(C), 0.3 * torch.randn(C), torch.randn(4 * C, C) * 2 * C ** -0.5,
              0.5 * torch.randn(4 * C), torch.randn(C, 4 * C) * (4 * C) ** -0.5, 0.3 * torch.randn(C)]
    params = [p.to(DEV) for p in params]

    def run(fn, dt, autocast):
        leaves = [_leaf(t, dt) for t in (x, pending, *params)]
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            out = fn(leaves[0], *leaves[2:], H, 1e-6, pending=leaves[1])
        g = torch.Generator(device=DEV).manual_seed(1)
        grads = [torch.randn(o.shape, device=DEV, generator=g).to(o.dtype) for o in out]
        return [*out, *torch.autograd.grad(out, leaves, grads)]
    got = run(ops.vit_block, dtype, amp)
    eager = run(reference.vit_block, dtype, amp)
    exact = run(reference.vit_block, torch.float64, False)
    for i, (a, e, r) in enumerate(zip(got, eager, exact)):
        scale = max(1.0, r.abs().max().item())
        if dtype == torch.float32 and not amp:
            assert_close(a, r, atol=1e-3 * scale, rtol=1e-3, name=f"vit_block result {i}")
        else:
            assert_low_precision_ok(a, e, r, atol=2e-2 * scale, name=f"vit_block result {i}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_vit_blocks_stack_is_the_chained_blocks_on_gpu(cuda_triton_path, dtype):
    """``ops.vit_blocks`` on the GPU (three ViT-B-wide blocks as one node: the paired weight
    gradients, one reduction for the six LayerNorms' gradients, buffers that the blocks reuse in
    stream order): bitwise what three chained ``ops.vit_block`` calls give, outputs tapped and
    every gradient, and without a gradient the same values."""
    torch.manual_seed(0)
    B, N, C, H = 4, 50, 768, 12

    def block():
        return [torch.ones(C) + 0.3 * torch.randn(C), 0.3 * torch.randn(C), torch.randn(3 * C, C) * C ** -0.5,
                0.3 * torch.randn(3 * C), torch.randn(C, C) * C ** -0.5, 0.3 * torch.randn(C),
                torch.ones(C) + 0.3 * torch.randn(C), 0.3 * torch.randn(C), torch.randn(4 * C, C) * 2 * C ** -0.5,
                0.5 * torch.randn(4 * C), torch.randn(C, 4 * C) * (4 * C) ** -0.5, 0.3 * torch.randn(C)]
    params = [[_leaf(p.to(DEV), dtype) for p in block()] for _ in range(3)]
    x = _leaf(torch.randn(B, N, C, device=DEV), dtype)
    leaves = [x] + [p for ps in params for p in ps]
    h, m, (o0, o1), _ = ops.vit_blocks(x, params, H, 1e-6, outputs=(0, 1))
    got = [h, m, o0, o1, *torch.autograd.grad((h * m).sum() + o0.square().sum() + o1.sum(), leaves)]
    taps, hc, mc = [], x, None
    for ps in params:
        x_in, hc, mc = ops.vit_block(hc, *ps, H, 1e-6, pending=mc)
        taps.append(x_in)
    want = [hc, mc, taps[1], taps[2],
            *torch.autograd.grad((hc * mc).sum() + taps[1].square().sum() + taps[2].sum(), leaves)]
    for i, (a, e) in enumerate(zip(got, want)):
        assert torch.equal(a, e), f"vit_blocks result {i}"
    with torch.no_grad():  # the frozen base's route: one set of buffers the blocks reuse
        h2, m2, (o0b, o1b), (q, k) = ops.vit_blocks(x, params, H, 1e-6, outputs=(0, 1), qk_block=1)
    for i, (a, e) in enumerate(zip((h2, m2, o0b, o1b), (h, m, o0, o1))):
        assert torch.equal(a, e), f"vit_blocks without a gradient, result {i}"
    assert q.shape == k.shape == (B, H, N, C // H)


def test_vit_block_compiles(cuda_triton_path):
    """``ops.vit_block`` under torch.compile (``aot_eager``: dynamo and AOT autograd trace the
    kernels' custom ops, without inductor's code generation, which
    the GPU stage's time cap cannot spare), the same values and gradients as eager."""
    torch.manual_seed(0)
    from tec_fast.ops.registry import OPS, SIZES
    ex = OPS["vit_block"].example(dict(SIZES["vitb"], B=4), torch.bfloat16, torch.device(DEV))

    def step(*args):
        x_in, h, m = ops.vit_block(*args, **ex.kwargs)
        return (h.float() + m.float()).square().mean() + x_in.float().mean()
    want = _grads(step(*ex.args), ex.grad_of)
    got = _grads(torch.compile(step, backend="aot_eager", fullgraph=True)(*ex.args), ex.grad_of)
    for i, (a, b) in enumerate(zip(got, want)):
        assert_close(a.float(), b.float(), atol=3e-2 * max(1.0, b.abs().max().item()), rtol=3e-2,
                     name=f"compiled vit_block result {i}")


@pytest.mark.parametrize("op", ["masked_gather", "scatter_masked", "layer_norm", "vit_block"])
def test_strided_small_arguments_on_gpu(cuda_triton_path, op):
    """The index tensors, tokens and LayerNorm weights the kernels read densely, handed over
    strided (the CPU test covers every argument; here the ones that were once read wrongly, at
    the sizes the registry test compiled for): the contiguous call's outputs and gradients."""
    from tec_fast.ops.registry import OPS, SIZES, outputs
    torch.manual_seed(0)
    ex = OPS[op].example(dict(SIZES["vitb"], B=8), torch.float32, torch.device(DEV))

    def run(args):
        outs = outputs(getattr(ops, op)(*args, **ex.kwargs))
        leaves = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
        torch.manual_seed(1)
        weights = [torch.randn(o.shape, device=DEV) for o in outs]
        return [*outs, *torch.autograd.grad(outs, leaves, weights, allow_unused=True)]

    want = run(ex.args)
    small = [i for i, a in enumerate(ex.args)
             if isinstance(a, torch.Tensor) and (a.dim() == 1 or not a.is_floating_point())]
    assert small
    for i in small:
        args = list(ex.args)
        args[i] = strided_copy(args[i])
        for k, (g, w) in enumerate(zip(run(args), want)):
            assert (g is None) == (w is None)
            if g is not None:
                assert torch.equal(g, w), f"{op}: argument {i} strided changes output/gradient {k}"


@pytest.mark.parametrize("op", ["masked_gather", "scatter_masked", "patch_norm_mse", "relation_loss",
                                "encoder_adapter", "layer_norm", "mlp", "qkv_heads", "vit_block"])
def test_second_derivative_fails_naming_the_op_on_gpu(cuda_triton_path, op):
    from tec_fast.ops.registry import OPS, SIZES, outputs
    torch.manual_seed(0)
    ex = OPS[op].example(dict(SIZES["vitb"], B=8), torch.float32, torch.device(DEV))
    outs = outputs(getattr(ops, op)(*ex.args, **ex.kwargs))
    weights = [torch.randn(o.shape, device=DEV).requires_grad_() for o in outs]
    grads = torch.autograd.grad(outs, ex.grad_of, weights, create_graph=True, allow_unused=True)
    s = sum((g.double() ** 2).sum() for g in grads if g is not None)
    with pytest.raises(RuntimeError, match=rf"tec_fast\.ops\.{op}: the Triton path's backward cannot"):
        torch.autograd.grad(s, [*ex.grad_of, *weights], allow_unused=True)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_tensor_off_the_current_device_takes_the_reference(cuda_triton_path):
    """Triton launches on the current device: a tensor on another one is not handed to it."""
    from tec_fast.ops import dispatch
    dispatch.set_kernel_mode("auto")
    x, w, b = (torch.randn(4, 5, 64, device="cuda:1"), torch.randn(64, device="cuda:1"),
               torch.randn(64, device="cuda:1"))
    with torch.cuda.device(0):
        assert any("current CUDA device is cuda:0" in r for r in ops.why_not_fast("layer_norm", x))
        torch.testing.assert_close(ops.layer_norm(x, w, b), F.layer_norm(x, (64,), w, b, 1e-6))


@pytest.mark.parametrize("op", ["masked_gather", "scatter_masked", "relation_loss"])
def test_index_checks_on_gpu(cuda_triton_path, op, monkeypatch):
    """The kernels check their indices: valid calls leave the device's flag at 1 and make no host
    sync; with TEC_FAST_CHECKS=1 a bad index is a ValueError (one sync, a fresh flag)."""
    from test_ops_index_checks import CASES
    from tec_fast.kernels import _common
    make = CASES[op]
    call = make(device=DEV)[0]
    call()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        call()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    flag = _common._INDEX_OK[torch.cuda.current_device()]
    assert flag.tolist() == [1]
    monkeypatch.setenv("TEC_FAST_CHECKS", "1")
    bound = make(device=DEV)[2]
    call, name, _ = make(bad=bound, device=DEV)
    with pytest.raises(ValueError, match=rf"{name} holds indices in \[0, {bound}\], outside \[0, {bound}\)"):
        call()
    assert flag.tolist() == [1]


def test_bad_index_ends_in_a_device_assertion(tmp_path):
    """Without TEC_FAST_CHECKS a bad index on CUDA is a device-side assertion after the launch (no
    host sync): run in a child process, whose CUDA context it ends."""
    import subprocess
    import sys
    script = tmp_path / "bad_index.py"
    script.write_text(
        "import torch\n"
        "from tec_fast import ops\n"
        "x = torch.randn(2, 6, 8, device='cuda')\n"
        "ids = torch.tensor([[0, 3, 9], [1, 2, 4]], device='cuda')\n"
        "ops.masked_gather(x, ids)\n"
        "torch.cuda.synchronize()\n"
        "print('no error')\n")
    env = dict(__import__("os").environ, TEC_FAST_KERNELS="triton", TEC_FAST_CHECKS="0", TRITON_INTERPRET="0")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode != 0 and "no error" not in done.stdout, done.stdout + done.stderr
    assert "device-side assert" in done.stderr or "ids_keep holds indices" in done.stderr, done.stderr[-2000:]
