"""Kernel paths the op-level tests do not reach at their small shapes (interpreter, fp32):
masked_gather reading a channel-strided x in place, the encoder adapter's LayerNorm
kernels with many tiles per token and many token slices per weight-gradient partial, and the
shared partial-sum launch over many tiles."""
import pytest
import torch

from conftest import assert_close
from tec_fast.ops import reference


def _grads(fn, inputs, grad):
    out = fn()
    return (out, *torch.autograd.grad(out, inputs, grad))


@pytest.mark.parametrize("B, L, K, C", [(2, 13, 5, 37), (1, 9, 9, 8), (3, 6, 1, 130)])
def test_masked_gather_reads_transposed_x_in_place(triton_path, B, L, K, C):
    from tec_fast.kernels import masked_gather as m
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, C, L, generator=g).transpose(1, 2).requires_grad_()  # patch_embed's layout
    assert x.stride(2) != 1
    pos = torch.randn(L, C, generator=g, requires_grad=True)
    ids = torch.rand(B, L, generator=g).argsort(1)[:, :K]
    grad = torch.randn(B, K, C, generator=g)
    seen = []
    original = m._channel_strided_config
    m_calls = lambda K_, C_: seen.append((K_, C_)) or original(K_, C_)  # noqa: E731
    try:
        m._channel_strided_config = m_calls
        got = _grads(lambda: m.masked_gather(x, ids, pos), [x, pos], grad)
    finally:
        m._channel_strided_config = original
    assert seen, "the channel-strided launch configuration was not used"
    want = _grads(lambda: reference.masked_gather(x, ids, pos), [x, pos], grad)
    for name, a, b in zip(["out", "grad_x", "grad_pos"], got, want):
        assert_close(a, b, atol=1e-6, rtol=1e-6, name=name)


@pytest.mark.parametrize("tile", [64, 256])
def test_encoder_adapter_many_tiles_and_slices(triton_path, monkeypatch, tile):
    from tec_fast.kernels import encoder_adapter as m
    # small tiles: several depth blocks and channel chunks per token (C = 72 is not a power of
    # two: a masked tail); many programs: the weight gradients come from several token slices
    monkeypatch.setattr(m, "_TILE", tile)
    monkeypatch.setattr(m, "persistent_programs", lambda rows, device, per_sm=8: 64)
    D, G, B, T, C, Hd = 6, 3, 3, 7, 72, 16
    g = torch.Generator().manual_seed(1)
    feats = (torch.randn(D, B, T, C, generator=g) * 3 + 2).requires_grad_()
    params = [torch.randn(D * C, generator=g) * 0.3 + 1, torch.randn(D * C, generator=g) * 0.3,
              torch.randn(G, C, (D // G) * C, generator=g) * 0.1, torch.randn(G, C, generator=g) * 0.1,
              torch.randn(G, Hd, C, generator=g) * 0.1, torch.randn(G, Hd, generator=g) * 0.1,
              torch.randn(G, C, Hd, generator=g) * 0.1, torch.randn(G, C, generator=g) * 0.1,
              torch.randn(C, generator=g) * 0.3 + 1, torch.randn(C, generator=g) * 0.3]
    params = [p.requires_grad_() for p in params]
    block_depth, block_c = m._ln_in_config(D, C)
    assert block_depth < D and block_depth * block_c <= tile
    assert (block_c < C) == (tile == 64)
    grad = torch.randn(B, T, C, generator=g)
    inputs = [feats] + params
    got = _grads(lambda: m.encoder_adapter(feats, *params, 1e-5, 1e-5), inputs, grad)
    want = _grads(lambda: reference.encoder_adapter(feats, *params, 1e-5, 1e-5), inputs, grad)
    names = ["out", "grad_feats", "ln_before_w", "ln_before_b", "fuse_w", "fuse_b", "fc1_w", "fc1_b",
             "fc2_w", "fc2_b", "ln_after_w", "ln_after_b"]
    for name, a, b in zip(names, got, want):
        assert_close(a, b, atol=1e-5, rtol=1e-4, name=name)


def test_pow2_block_rule():
    from tec_fast.kernels.encoder_adapter import _ln_in_config, _pow2_block
    assert _pow2_block(768, 256) == 256 and _pow2_block(1280, 256) == 256 and _pow2_block(384, 256) == 128
    assert _pow2_block(20, 256) == 32 and _pow2_block(9, 256) == 16  # small widths: one masked block
    assert _ln_in_config(12, 768) == (4, 256) and _ln_in_config(24, 1024) == (8, 256)
    assert _ln_in_config(32, 1280) == (8, 256)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sum_parts_adds_every_tile(triton_path, monkeypatch, dtype):
    """``sum_parts`` (the gradient partials of masked_gather and scatter_masked) over 37 partial
    rows of 300 values taken 4 rows x 64 columns at a time: 10 row tiles (the last one short)
    and 5 column blocks (the last partial); against the float64 sum, rounded once to ``dtype``."""
    from tec_fast.kernels import _common as c
    monkeypatch.setattr(c, "_sum_parts_config", lambda n_parts, N: (4, 64, -(-N // 64)))
    parts = torch.randn(37, 6, 50, generator=torch.Generator().manual_seed(1))
    got = c.sum_parts(parts, (6, 50), dtype)
    assert got.shape == (6, 50) and got.dtype == dtype
    want = parts.double().sum(0)
    ulp = 2 ** -8 if dtype == torch.bfloat16 else 2 ** -23
    assert_close(got.double(), want, atol=1e-5, rtol=ulp, name="sum")
    assert c.sum_parts(parts[:0], (6, 50), dtype).eq(0).all()  # no partials: zeros
