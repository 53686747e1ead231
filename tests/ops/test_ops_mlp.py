"""``tec_fast.ops.mlp`` (kernels/mlp.py): the MLP that saves only its pre-activation. The Triton
path (interpreter on CPU) against the reference, value and every gradient, fp32, bf16 and under
autocast, on awkward shapes; what it saves for backward; the custom ops; validation; and the
model's Mlp on the default CPU path being bitwise the Linear -> GELU -> Linear it replaced."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from conftest import assert_close, assert_low_precision_ok, assert_routes_agree
from tec_fast import ops
from tec_fast.models.layers import Block, Mlp
from tec_fast.ops import reference

# (x shape, hidden, out_dim): one row, odd widths, hidden not a power of two, hidden past one
# column block (128), rows past several row tiles and backward slices (16 rows per tile)
SHAPES = [((1, 1, 5), 7, 5), ((3, 7, 13), 37, 13), ((2, 45, 24), 130, 11), ((97, 8), 64, 8)]
NAMES = ["out", "grad_x", "grad_w1", "grad_b1", "grad_w2", "grad_b2"]


def _inputs(shape, hidden, out_dim, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    C = shape[-1]
    make = lambda *s, scale=1.0: (torch.randn(*s, generator=g) * scale).to(dtype).requires_grad_()  # noqa: E731
    # weights scaled so the pre-activation spans GELU's curved part (|pre| ~ 2)
    return (make(*shape, scale=2.0), make(hidden, C, scale=C ** -0.5), make(hidden, scale=0.5),
            make(out_dim, hidden, scale=hidden ** -0.5), make(out_dim, scale=0.5))


def _run(fn, args, grad):
    out = fn(*args)
    return [out, *torch.autograd.grad(out, args, grad)]


@pytest.mark.parametrize("shape,hidden,out_dim", SHAPES)
def test_fp32_value_and_every_gradient(triton_path, shape, hidden, out_dim):
    args = _inputs(shape, hidden, out_dim)
    assert ops.use_fast_path("mlp", args[0])
    grad = torch.randn(*shape[:-1], out_dim)
    got = _run(ops.mlp, args, grad)
    want = _run(reference.mlp, args, grad)
    for name, a, e in zip(NAMES, got, want):
        assert a.dtype == e.dtype, name
        assert_close(a, e, atol=1e-5, rtol=1e-5, name=name)


def test_many_slices_per_column_block(triton_path, monkeypatch):
    import tec_fast.kernels.mlp as m
    monkeypatch.setattr(m, "persistent_programs", lambda work, device, per_sm=8: 64)  # one row tile per program
    args = _inputs((5, 13, 20), 40, 20)
    grad = torch.randn(5, 13, 20)
    for name, a, e in zip(NAMES, _run(ops.mlp, args, grad), _run(reference.mlp, args, grad)):
        assert_close(a, e, atol=1e-5, rtol=1e-5, name=name)


@pytest.mark.parametrize("shape,hidden,out_dim", [((3, 7, 13), 37, 13), ((2, 45, 24), 130, 11)])
def test_bf16_error_within_budget(triton_path, shape, hidden, out_dim):
    args = _inputs(shape, hidden, out_dim, torch.bfloat16)
    grad = torch.randn(*shape[:-1], out_dim).bfloat16()
    got = _run(ops.mlp, args, grad)
    eager = _run(reference.mlp, args, grad)
    exact = _run(reference.mlp, [a.detach().float().requires_grad_() for a in args], grad.float())
    for name, k, e, r in zip(NAMES, got, eager, exact):
        assert k.dtype == e.dtype == torch.bfloat16, name
        assert_low_precision_ok(k, e, r, atol=1e-2, name=name)


def test_autocast_matches_eager_autocast(triton_path):
    """fp32 parameters under bf16 autocast: GEMMs in bf16, bf16 output, fp32 parameter gradients."""
    args = _inputs((2, 9, 24), 40, 24)
    grad = torch.randn(2, 9, 24)

    def under_autocast(fn):
        def run(*a):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return fn(*a)
        return run
    got = _run(under_autocast(ops.mlp), args, grad.bfloat16())
    eager = _run(under_autocast(reference.mlp), args, grad.bfloat16())
    exact = _run(reference.mlp, [a.detach().bfloat16().float().requires_grad_() for a in args], grad.bfloat16().float())
    for name, k, e, r in zip(NAMES, got, eager, exact):
        assert k.dtype == e.dtype, name
        assert_low_precision_ok(k, e, r, atol=1e-2, name=name)


def _saved(fn, args):
    """Element counts of the tensors autograd keeps for backward."""
    sizes = []

    def pack(t):
        sizes.append(t.numel())
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*args)
    return sizes


def test_saves_the_pre_activation_but_not_the_activation(triton_path):
    rows, C, hidden = 24, 16, 50
    args = _inputs((4, 6, C), hidden, C)
    fast, eager = _saved(ops.mlp, args), _saved(reference.mlp, args)
    assert fast.count(rows * hidden) == 1, fast             # pre only
    assert eager.count(rows * hidden) == 2, eager           # pre (for GELU) and h (for fc2)
    assert fast.count(rows * C) == 1, fast                  # and x


def test_no_grad_forward(triton_path):
    args = [a.detach() for a in _inputs((3, 5, 12), 20, 12)]
    with torch.no_grad():
        assert_close(ops.mlp(*args), reference.mlp(*args), atol=1e-5, rtol=1e-5, name="out")


def test_other_activations_take_the_reference(triton_path, monkeypatch):
    args = _inputs((2, 3, 8), 16, 8)
    for act in ("gelu_tanh", "quick_gelu"):
        reasons = ops.why_not_fast("mlp", args[0], act=act)
        assert any("exact-erf GELU only" in r and act in r for r in reasons), reasons
        # TEC_FAST_KERNELS=triton forces the kernels: a call they cannot take is an error ...
        with pytest.raises(RuntimeError, match=f"TEC_FAST_KERNELS=triton but mlp cannot.*{act}"):
            ops.mlp(*args, act=act)
    assert ops.why_not_fast("mlp", args[0].double()) and not ops.why_not_fast("mlp", args[0])
    monkeypatch.setenv("TEC_FAST_KERNELS", "auto")  # ... where auto quietly runs the reference
    for act in ("gelu_tanh", "quick_gelu"):
        assert torch.equal(ops.mlp(*args, act=act), reference.mlp(*args, act=act))


def test_opcheck(triton_path):
    import tec_fast.kernels.mlp  # noqa: F401  (registers the ops)
    g = torch.Generator().manual_seed(3)
    pre = torch.randn(19, 37, generator=g) * 2  # launcher op: autograd is the MLP's Function
    torch.library.opcheck(torch.ops.tec_fast.mlp_gelu.default, (pre,))
    torch.library.opcheck(torch.ops.tec_fast.mlp_gelu_backward.default,
                          (pre.detach(), torch.randn(19, 37, generator=g)))


def _bf16_rounds_correctly(ours_fp32: torch.Tensor, exact: torch.Tensor, rel_tol: float) -> torch.Tensor:
    """Per element: the bf16 rounding of ``ours_fp32`` is the correctly rounded bf16 of the float64
    ``exact``, or its neighbour where ``exact`` lies within ``rel_tol * |exact|`` (the fp32 error
    bound) of the midpoint between the two, where no fp32 result could tell them apart."""
    ours_b = ours_fp32.to(torch.bfloat16).double()
    want_b = exact.float().to(torch.bfloat16).double()
    want = want_b.to(torch.bfloat16)
    up = torch.nextafter(want, torch.full_like(want, float("inf"))).double()
    down = torch.nextafter(want, torch.full_like(want, float("-inf"))).double()
    neighbour = (ours_b == up) | (ours_b == down)
    near_mid = (exact - (ours_b + want_b) / 2).abs() <= rel_tol * exact.abs()
    return (ours_b == want_b) | (neighbour & near_mid)


def test_gelu_error_against_float64(triton_path):
    """The kernels' GELU (Phi through erfc = exp(-x^2) R(t), not libdevice's erf) against float64
    with fixed bounds: fp32 values and derivative within 5e-7 on a dense grid and random values
    (measured 3.7e-7 and 2.0e-7; about half an fp32 ulp of gelu(12)); and every bf16 input rounds
    to the correctly rounded bf16 of the exact value, except within the fp32 error of a rounding
    midpoint (bf16 rounded with torch's round-to-nearest: the interpreter's own bf16 stores
    truncate). No comparison with torch's GELU: its CPU error depends on the instruction set
    its kernels were dispatched to."""
    from tec_fast.kernels.mlp import _mlp_gelu_bwd, _mlp_gelu_fwd
    g = torch.Generator().manual_seed(5)
    z = torch.cat([torch.linspace(-12, 12, 60001), torch.randn(20000, generator=g) * 3])
    zd = z.double()
    two_phi = torch.special.erfc(-zd / 2 ** 0.5)
    exact = 0.5 * zd * two_phi
    d_exact = 0.5 * two_phi + zd * torch.exp(-0.5 * zd * zd) / (2 * torch.pi) ** 0.5
    ours = _mlp_gelu_fwd(z[None])[0].double()
    h, d_ours, _ = _mlp_gelu_bwd(z[None], torch.ones(1, z.numel()))
    err, d_err = (ours - exact).abs().max(), (d_ours[0].double() - d_exact).abs().max()
    assert err < 5e-7 and d_err < 5e-7, (err, d_err)
    assert torch.equal(h[0], _mlp_gelu_fwd(z[None])[0])  # backward recomputes the forward's h bitwise

    every = torch.arange(-2 ** 15, 2 ** 15, dtype=torch.int32).to(torch.int16).view(torch.bfloat16).float()
    zb = every[torch.isfinite(every) & (every > -12) & (every.abs() < 1e18)  # z * z stays finite
               & ((every.abs() > 1e-30) | (every == 0))]
    ours_b = _mlp_gelu_fwd(zb[None])[0]
    exact_b = 0.5 * zb.double() * torch.special.erfc(-zb.double() / 2 ** 0.5)
    # fp32 relative error: <= 32 ulps from -3 up (measured 23), <= 0.6% in the far tail where
    # exp(-z^2 / 2) nears fp32's smallest normals (measured 0.49% at z = -11.9).
    head = zb >= -3
    assert _bf16_rounds_correctly(ours_b[head], exact_b[head], 2.0 ** -18).all()
    assert _bf16_rounds_correctly(ours_b[~head], exact_b[~head], 6e-3).all()
    assert ours_b[zb == 0].eq(0).all()


def test_backward_op_values(triton_path):
    """h, grad_pre and the fused bias gradient of the backward op, against torch."""
    from tec_fast.kernels.mlp import _mlp_gelu_backward_op
    g = torch.Generator().manual_seed(4)
    pre, gh = torch.randn(41, 150, generator=g) * 3, torch.randn(41, 150, generator=g)
    h, gpre, db = _mlp_gelu_backward_op(pre, gh)
    z = pre.clone().requires_grad_()
    want_h = torch.nn.functional.gelu(z)
    (want_gpre,) = torch.autograd.grad(want_h, z, gh)
    assert_close(h, want_h, atol=1e-6, rtol=1e-6, name="h")
    assert_close(gpre, want_gpre, atol=1e-6, rtol=1e-5, name="grad_pre")
    assert_close(db, want_gpre.sum(0), atol=1e-5, rtol=1e-5, name="grad_b1")
    assert db.dtype == torch.float32


def test_compile_smoke(triton_path):
    args = _inputs((2, 5, 12), 24, 12)
    fn = torch.compile(lambda *a: ops.mlp(*a).square().sum(), backend="aot_eager", fullgraph=True)
    loss = fn(*args)
    got = torch.autograd.grad(loss, args)
    ref = reference.mlp(*args).square().sum()
    want = torch.autograd.grad(ref, args)
    assert_close(loss, ref, atol=1e-4, rtol=1e-5, name="loss")
    for name, a, e in zip(NAMES[1:], got, want):
        assert_close(a, e, atol=1e-5, rtol=1e-5, name=name)


@pytest.mark.parametrize("case,match", [
    (lambda x, w1, b1, w2, b2: (x.long(), w1, b1, w2, b2), "x must be a floating-point tensor"),
    (lambda x, w1, b1, w2, b2: (x, w1[:, :3], b1, w2, b2), r"w1 must have shape \(16, 8\)"),
    (lambda x, w1, b1, w2, b2: (x, w1, b1[:5], w2, b2), r"b1 must have shape \(16,\)"),
    (lambda x, w1, b1, w2, b2: (x, w1, b1, w2[:, :4], b2), r"w2 must have shape \(6, 16\)"),
    (lambda x, w1, b1, w2, b2: (x, w1, b1, w2, b2[:2]), r"b2 must have shape \(6,\)"),
    (lambda x, w1, b1, w2, b2: (x, w1[None], b1, w2, b2), "w1 must be a 2-D floating-point tensor"),
    (lambda x, w1, b1, w2, b2: (x, w1, b1, w2, None), "b2 must be a 1-D floating-point tensor"),
    (lambda x, w1, b1, w2, b2: (x, w1.double(), b1, w2, b2), "w1 has dtype torch.float64 but x has torch.float32"),
])
def test_validation_names_the_argument(case, match):
    args = [a.detach() for a in _inputs((2, 3, 8), 16, 6)]
    with pytest.raises(ValueError, match=match):
        ops.mlp(*case(*args))
    with pytest.raises(ValueError, match="act must be one of"):
        ops.mlp(*args, act="relu")


# ---- the model's Mlp on the default (CPU, reference) path -----------------------------------

_OLD_ACTS = {"gelu": nn.GELU, "gelu_tanh": lambda: nn.GELU(approximate="tanh"),
             "quick_gelu": lambda: (lambda t: t * torch.sigmoid(1.702 * t))}


def _old_mlp_forward(self, x):
    """Mlp.forward before ops.mlp: the modules one after the other."""
    return self.fc2(_OLD_ACTS[self.act]()(self.fc1(x)))


@pytest.mark.parametrize("act", sorted(_OLD_ACTS))
def test_block_is_bitwise_the_unfused_mlp_on_cpu(monkeypatch, act):
    monkeypatch.delenv("TEC_FAST_KERNELS", raising=False)  # auto: CPU tensors take the reference

    def run():
        torch.manual_seed(0)
        blk = Block(32, 4, act=act)
        x = (torch.randn(2, 9, 32) * 2).requires_grad_()
        out = blk(x)
        out.backward(torch.randn(2, 9, 32))
        return [out, x.grad] + [p.grad for p in blk.parameters()], list(blk.state_dict())
    new, new_keys = run()
    monkeypatch.setattr(Mlp, "forward", _old_mlp_forward)
    old, old_keys = run()
    assert new_keys == old_keys
    for i, (a, b) in enumerate(zip(new, old)):
        assert torch.equal(a, b), f"tensor {i} differs (max {(a - b).abs().max().item():.3g})"


def test_mlp_state_dict_names_unchanged():
    assert list(Mlp(8, 16).state_dict()) == ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"]
    keys = set(Block(16, 2).state_dict())
    assert {"mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias"} <= keys
    with pytest.raises(ValueError, match="unknown MLP activation 'relu'"):
        Mlp(8, 16, act="relu")


def test_eager_route_matches_custom_op(triton_path, monkeypatch):
    """Eager calls launch the GELU kernels without the custom-op machinery (``direct_launch``);
    values and all five gradients are bitwise those of the custom-op route."""
    import tec_fast.kernels.mlp as m

    def run():
        g = torch.Generator().manual_seed(3)
        leaves = [torch.randn(*s, generator=g).to(torch.bfloat16).requires_grad_()
                  for s in ((7, 24), (40, 24), (40,), (24, 40), (24,))]
        out = m.mlp(*leaves)
        return [out, *torch.autograd.grad(out.float().square().sum(), leaves)]

    assert_routes_agree(m, run, monkeypatch)
