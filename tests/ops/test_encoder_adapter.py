"""EncoderAdapter: Triton path (interpreter on CPU) vs the plain-torch reference, and the dispatch."""
import pytest
import torch

from conftest import assert_close, assert_low_precision_ok
from tec_fast import ops
from tec_fast.models.adapter import ADAPTER_LN_EPS, EncoderAdapter
from tec_fast.ops import reference

SHAPES = [  # D, G, B, T, C, hidden: odd C and T, G = 1, B = 1, M = 1 (one block per group)
    (6, 2, 2, 3, 20, 24),
    (3, 1, 1, 5, 9, 12),
    (4, 4, 2, 1, 16, 8),
]


def _module(D, G, C, hidden, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    m = EncoderAdapter(C, D, G, hidden)
    with torch.no_grad():  # non-trivial LayerNorm affines
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return m.to(dtype)


def _feats(D, B, T, C, dtype=torch.float32, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(D, B, T, C, generator=g) * 2 + 1).to(dtype).requires_grad_()


def _run(module, feats, grad, fast: bool, monkeypatch):
    monkeypatch.setenv("TEC_FAST_KERNELS", "triton" if fast else "reference")
    out = module(feats)
    params = [feats] + list(module.parameters())
    return (out, *torch.autograd.grad(out, params, grad))


def _names(module):
    return ["out", "grad_feats"] + [f"grad_{n}" for n, _ in module.named_parameters()]


@pytest.mark.parametrize("shape", SHAPES)
def test_fp32_matches_reference(triton_path, monkeypatch, shape):
    D, G, B, T, C, hidden = shape
    m, feats = _module(D, G, C, hidden), _feats(D, B, T, C)
    assert ops.why_not_fast("encoder_adapter", feats) == []
    grad = torch.randn(B, T, C)
    got = _run(m, feats, grad, True, monkeypatch)
    want = _run(m, feats, grad, False, monkeypatch)
    for name, a, b in zip(_names(m), got, want):
        assert a.dtype == b.dtype, name
        assert_close(a, b, atol=1e-5, rtol=1e-4, name=name)


def test_non_contiguous_buffer(triton_path, monkeypatch):
    # a [D, B, T, C] view into a bigger buffer (e.g. the T visible tokens of a longer one)
    m = _module(4, 2, 12, 16)
    big = torch.randn(4, 2, 7, 12, requires_grad=True)
    grad = torch.randn(2, 5, 12)
    outs = []
    for fast in (True, False):
        monkeypatch.setenv("TEC_FAST_KERNELS", "triton" if fast else "reference")
        out = m(big[:, :, 1:6])
        outs.append((out, torch.autograd.grad(out, big, grad)[0]))
    for name, a, b in zip(["out", "grad_buffer"], *outs):
        assert_close(a, b, atol=1e-5, rtol=1e-4, name=name)


def test_bf16_error_within_budget(triton_path, monkeypatch):
    D, G, B, T, C, hidden = SHAPES[0]
    m32, feats32 = _module(D, G, C, hidden), _feats(D, B, T, C)
    m16 = _module(D, G, C, hidden, torch.bfloat16)
    feats16 = feats32.detach().bfloat16().requires_grad_()
    with torch.no_grad():  # the fp32 model holds exactly the bf16 values
        for p32, p16 in zip(m32.parameters(), m16.parameters()):
            p32.copy_(p16.float())
    feats32 = feats16.detach().float().requires_grad_()
    grad = torch.randn(B, T, C).bfloat16()
    got = _run(m16, feats16, grad, True, monkeypatch)
    eager = _run(m16, feats16, grad, False, monkeypatch)
    exact = _run(m32, feats32, grad.float(), False, monkeypatch)
    for name, a, e, r in zip(_names(m16), got, eager, exact):
        assert a.dtype == torch.bfloat16, name
        assert_low_precision_ok(a, e, r, atol=1e-2, name=name)


def test_autocast_dtypes_follow_reference(triton_path, monkeypatch):
    D, G, B, T, C, hidden = SHAPES[0]
    m, feats = _module(D, G, C, hidden), _feats(D, B, T, C)
    grad = torch.randn(B, T, C)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = _run(m, feats, grad, True, monkeypatch)
        want = _run(m, feats, grad, False, monkeypatch)
    for name, a, b in zip(_names(m), got, want):
        assert a.dtype == b.dtype, name
        assert_close(a, b, atol=0.1, rtol=0.05, name=name)  # both run their GEMMs in bf16


def test_functional_takes_stacked_weights(triton_path):
    D, G, B, T, C, hidden = SHAPES[0]
    m, feats = _module(D, G, C, hidden), _feats(D, B, T, C)
    w = list(m._weights())
    stacked = w[:2] + [torch.stack(ts) for ts in w[2:8]] + w[8:]
    out = ops.encoder_adapter(feats, *stacked, ADAPTER_LN_EPS, ADAPTER_LN_EPS)
    assert_close(out, reference.encoder_adapter(feats, *w, ADAPTER_LN_EPS, ADAPTER_LN_EPS),
                 atol=1e-5, rtol=1e-4, name="out")


def test_validation():
    m, feats = _module(6, 2, 20, 24), _feats(6, 2, 3, 20)
    with pytest.raises(ValueError, match=r"feats must be one tensor \[D=6, B, T, C=20\]"):
        m(feats[:5])
    w = list(m._weights())
    with pytest.raises(ValueError, match="fuse_w holds G=4 groups, which must divide the depth D=6"):
        ops.encoder_adapter(feats, w[0], w[1], w[2] * 2, w[3] * 2, w[4] * 2, w[5] * 2, w[6] * 2, w[7] * 2,
                            w[8], w[9], 1e-5, 1e-5)
    with pytest.raises(ValueError, match=r"fc1_w\[1\] must have shape \(24, 20\)"):
        ops.encoder_adapter(feats, w[0], w[1], w[2], w[3], [w[4][0], w[4][1][:, :-1]], *w[5:], 1e-5, 1e-5)
    with pytest.raises(ValueError, match=r"ln_before_w must have shape \(120,\)"):
        ops.encoder_adapter(feats, w[0][:-1], *w[1:], 1e-5, 1e-5)


def test_opcheck(triton_path):
    D, G, B, T, C, hidden = 4, 2, 2, 3, 8, 12
    m, feats = _module(D, G, C, hidden), _feats(D, B, T, C)
    w = list(m._weights())
    # the custom op is the launcher (autograd is the Function around it): inputs without grad
    args = (feats.detach(), w[0].detach(), w[1].detach(), *[torch.stack(ts).detach() for ts in w[2:8]],
            w[8].detach(), w[9].detach(), 1e-5, 1e-5, torch.float32, torch.float32)
    torch.library.opcheck(torch.ops.tec_fast.encoder_adapter.default, args)


def test_compile_smoke(triton_path, monkeypatch):
    D, G, B, T, C, hidden = 4, 2, 2, 3, 8, 12
    m, feats = _module(D, G, C, hidden), _feats(D, B, T, C)
    grad = torch.randn(B, T, C)
    compiled = torch.compile(m, backend="aot_eager", fullgraph=True)
    got = _run(compiled, feats, grad, True, monkeypatch)
    want = _run(m, feats, grad, False, monkeypatch)
    for name, a, b in zip(_names(m), got, want):
        assert_close(a, b, atol=1e-5, rtol=1e-4, name=name)


def test_cpu_default_dispatch_is_reference(monkeypatch):
    """With TEC_FAST_KERNELS unset (auto), CPU tensors take the reference path for every op."""
    monkeypatch.delenv("TEC_FAST_KERNELS", raising=False)
    x = torch.randn(2, 5, 8)
    for op in ops.OPS:
        assert any("auto uses Triton only on CUDA tensors" in r for r in ops.why_not_fast(op, x))
    report = ops.dispatch_report("cpu")
    assert all(backend == "reference" for backend, _ in report.values()), report
    # auto on CUDA follows the committed H200 measurements (relation_loss: faster than the reference)
    assert ops.dispatch_report("cuda", gpu="H200")["relation_loss"][0] == "triton"
    called = []
    real = reference.encoder_adapter
    monkeypatch.setattr(reference, "encoder_adapter", lambda *a: called.append(1) or real(*a))
    _module(6, 2, 20, 24)(_feats(6, 2, 3, 20))
    assert called == [1]


def test_reference_mode_is_respected(monkeypatch):
    monkeypatch.setenv("TEC_FAST_KERNELS", "reference")
    assert "TEC_FAST_KERNELS=reference" in ops.why_not_fast("masked_gather", torch.randn(1, 2, 3))
    monkeypatch.setenv("TEC_FAST_KERNELS", "bogus")
    with pytest.raises(ValueError, match="TEC_FAST_KERNELS must be one of"):
        ops.why_not_fast("masked_gather", torch.randn(1, 2, 3))
