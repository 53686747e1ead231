"""Inputs that reach the values where a constant decides the result: 16-bit pixels on rounding
boundaries (65535, not 65536), LayerNorm rows whose variance is the size of eps (1e-6 in the
ViT blocks, 1e-5 in the encoder adapter), patch-normalised targets with a near-constant channel
and few patches (eps 1e-6 and the unbiased divisor L - 1). Every expectation is computed here in
float64 or exact integers from the formula, never taken from the code under test."""
from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import assert_close
from tec_fast import ops


# ------------------------------------------------------------------ 16-bit and 32-bit pixels
def _expected_8bit(values: np.ndarray) -> np.ndarray:
    """round(v * 255 / 65535), half up, in exact integers (v / 257 is never a tie)."""
    v = values.astype(np.int64)
    return ((v * 255 * 2 + 65535) // (2 * 65535)).astype(np.uint8)


ALL_16BIT = np.arange(65536, dtype=np.int64).reshape(256, 256)


@pytest.mark.parametrize("mode", ["I;16", "I"])
def test_every_16bit_value_scales_by_65535(mode):
    from PIL import Image
    from tec_fast.data.decode import to_rgb
    arr = ALL_16BIT.astype(np.uint16 if mode == "I;16" else np.int32)
    img = Image.fromarray(arr) if mode == "I;16" else Image.fromarray(arr, mode="I")
    assert img.mode == mode
    rgb = np.asarray(to_rgb(img))
    want = _expected_8bit(ALL_16BIT)
    assert want[33025 // 256, 33025 % 256] == 129 and want[-1, -1] == 255 and want[0, 0] == 0
    assert rgb.shape == (256, 256, 3)
    mismatch = np.argwhere(rgb[..., 0] != want)
    assert len(mismatch) == 0, f"{len(mismatch)} values differ, first at value {mismatch[0][0] * 256 + mismatch[0][1]}"
    assert (rgb[..., 1] == rgb[..., 0]).all() and (rgb[..., 2] == rgb[..., 0]).all()


def test_a_16bit_png_file_decodes_on_the_same_boundaries():
    from PIL import Image
    from tec_fast.data.decode import to_rgb
    buf = io.BytesIO()
    Image.fromarray(ALL_16BIT.astype(np.uint16)).save(buf, format="PNG")
    img = Image.open(io.BytesIO(buf.getvalue()))
    assert np.array_equal(np.asarray(to_rgb(img))[..., 0], _expected_8bit(ALL_16BIT))


def test_float_pixels_in_unit_range_scale_by_255_on_half_boundaries():
    """Mode F with values in [0, 1]: v * 255 rounded; values just either side of k + 0.5."""
    from PIL import Image
    from tec_fast.data.decode import to_rgb
    k = np.arange(255, dtype=np.float64)
    below, above = (k + 0.5 - 1e-3) / 255, (k + 0.5 + 1e-3) / 255
    vals = np.concatenate([below, above, [0.0, 1.0]]).astype(np.float32).reshape(1, -1)
    out = np.asarray(to_rgb(Image.fromarray(vals, mode="F")))[0, :, 0]
    want = np.concatenate([k, k + 1, [0, 255]]).astype(np.uint8)
    assert np.array_equal(out, want)


# ------------------------------------------------------------------------------ LayerNorm
def _low_variance_rows(rows: int, C: int, std: float, seed: int) -> torch.Tensor:
    """Rows whose variance is std^2 around an offset (a near-constant activation)."""
    g = torch.Generator().manual_seed(seed)
    return 0.25 + std * torch.randn(rows, C, generator=g)


def _ln64(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, eps: float) -> torch.Tensor:
    x, w, b = x.double(), w.double(), b.double()
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * w + b


@pytest.mark.parametrize("path", ["reference_path", "triton_path"])
def test_layer_norm_rows_of_variance_eps(path, request):
    """Variance 1e-6 = eps: eps 1e-5 instead would shrink the output 2.3x, 1e-7 grow it 1.35x."""
    request.getfixturevalue(path)
    C = 37
    x = _low_variance_rows(9, C, 1e-3, 0)
    g = torch.Generator().manual_seed(1)
    w, b = 1 + 0.1 * torch.randn(C, generator=g), 0.1 * torch.randn(C, generator=g)
    want = _ln64(x, w, b, 1e-6)
    assert_close(ops.layer_norm(x, w, b, 1e-6), want, atol=2e-3, rtol=1e-3, name="y")
    assert (_ln64(x, w, b, 1e-5) - want).abs().max() > 0.5  # the data tells the two eps apart
    r = _low_variance_rows(9, C, 1e-3, 2) - 0.25
    y, h = ops.layer_norm(x - 0.25, w, b, 1e-6, residual=r + 0.25)
    assert_close(y, _ln64(x + r, w, b, 1e-6), atol=2e-3, rtol=1e-3, name="y with residual")


@pytest.mark.parametrize("path", ["reference_path", "triton_path"])
def test_vit_block_normalises_with_eps_1e6(path, request):
    """A ViT block (both of its LayerNorms) against the pre-norm block written out in float64 with
    eps 1e-6 (docs/tec.md: every ViT LayerNorm), on a stream of variance 1e-6."""
    request.getfixturevalue(path)
    from tec_fast.models.layers import Block
    torch.manual_seed(3)
    C, H, N = 16, 2, 5
    blk = Block(C, H, mlp_ratio=2.0)
    x = _low_variance_rows(2 * N, C, 1e-3, 4).reshape(2, N, C)
    with torch.no_grad():
        out = blk(x)
    p = {k: v.double() for k, v in blk.state_dict().items()}
    xd = x.double()

    def attn(y):
        qkv = F.linear(y, p["attn.qkv.weight"], p["attn.qkv.bias"]).reshape(2, N, 3, H, C // H).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(C // H), -1) @ v
        return F.linear(a.transpose(1, 2).reshape(2, N, C), p["attn.proj.weight"], p["attn.proj.bias"])

    def mlp(y):
        hid = F.gelu(F.linear(y, p["mlp.fc1.weight"], p["mlp.fc1.bias"]))
        return F.linear(hid, p["mlp.fc2.weight"], p["mlp.fc2.bias"])

    h = xd + attn(_ln64(xd, p["norm1.weight"], p["norm1.bias"], 1e-6))
    want = h + mlp(_ln64(h, p["norm2.weight"], p["norm2.bias"], 1e-6))
    assert_close(out, want, atol=2e-3, rtol=1e-3, name="block output")


@pytest.mark.parametrize("path", ["reference_path", "triton_path"])
def test_encoder_adapter_normalises_with_eps_1e5(path, request):
    """The encoder adapter's two LayerNorms use torch's default eps 1e-5 (the reference TEC code's
    nn.LayerNorm): block outputs of variance 1e-5 in, against its formula in float64."""
    request.getfixturevalue(path)
    from tec_fast.nn import EncoderAdapter
    torch.manual_seed(5)
    D, C, G, T = 3, 8, 1, 4
    ad = EncoderAdapter(C, D, G, hidden=8)
    feats = (0.25 + 3e-3 * torch.randn(D, 2, T, C))  # [D, B, T, C]
    with torch.no_grad():
        out = ad(feats)
    p = {k: v.double() for k, v in ad.state_dict().items()}
    z = feats.double().permute(1, 2, 0, 3).reshape(2, T, D * C)  # block 0 first along channels
    z = _ln64(z, p["adap_before.weight"], p["adap_before.bias"], 1e-5)
    u = F.linear(z, p["fuse_fcs.0.weight"], p["fuse_fcs.0.bias"])
    u = u + F.linear(F.gelu(F.linear(u, p["adap_mlps.0.fc1.weight"], p["adap_mlps.0.fc1.bias"])),
                     p["adap_mlps.0.fc2.weight"], p["adap_mlps.0.fc2.bias"])
    want = _ln64(u, p["adap_after.weight"], p["adap_after.bias"], 1e-5)
    assert_close(out, want, atol=2e-3, rtol=1e-3, name="adapter output")


@pytest.mark.parametrize("path", ["reference_path", "triton_path"])
def test_encoder_adapter_output_normalises_with_eps_1e5(path, request):
    """The adapter's last LayerNorm (adap_after, over the sum of the groups) on a sum whose
    variance is about eps: fusion weights of 5e-4 with a constant bias and MLP branches that add
    nothing. Two groups, against the formula in float64 (the test above reaches eps only at the
    first LayerNorm: after a fusion layer of unit-sized weights the variance is far above it)."""
    request.getfixturevalue(path)
    from tec_fast.nn import EncoderAdapter
    torch.manual_seed(6)
    D, C, G, T = 4, 8, 2, 5
    ad = EncoderAdapter(C, D, G, hidden=8)
    with torch.no_grad():
        for fc, mlp in zip(ad.fuse_fcs, ad.adap_mlps):
            fc.weight.copy_(5e-4 * torch.randn_like(fc.weight))
            fc.bias.fill_(0.25)
            mlp.fc2.weight.zero_()
            mlp.fc2.bias.zero_()
        ad.adap_after.weight.copy_(1 + 0.1 * torch.randn(C))
        ad.adap_after.bias.copy_(0.1 * torch.randn(C))
        feats = torch.randn(D, 2, T, C)  # [D, B, T, C]
        out = ad(feats)
    p = {k: v.double() for k, v in ad.state_dict().items()}
    z = feats.double().permute(1, 2, 0, 3).reshape(2, T, D * C)
    z = _ln64(z, p["adap_before.weight"], p["adap_before.bias"], 1e-5)
    M = D // G
    u = sum(F.linear(z[..., g * M * C:(g + 1) * M * C], p[f"fuse_fcs.{g}.weight"], p[f"fuse_fcs.{g}.bias"])
            for g in range(G))  # the MLP branches add zero
    want = _ln64(u, p["adap_after.weight"], p["adap_after.bias"], 1e-5)
    assert_close(out, want, atol=2e-3, rtol=1e-3, name="adapter output")
    assert (_ln64(u, p["adap_after.weight"], p["adap_after.bias"], 1e-6) - want).abs().max() > 0.3  # eps told apart


# ------------------------------------------------------------------------- patch_norm_mse
def _patch_norm_mse64(pred, target, mask, eps=1e-6):
    t = target.double()
    mean = t.mean(1, keepdim=True)
    var = t.var(1, keepdim=True, unbiased=True)
    tn = (t - mean) / torch.sqrt(var + eps)
    per_patch = ((pred.double() - tn) ** 2).mean(-1)
    m = mask.double()
    return (per_patch * m).sum() / m.sum()


@pytest.mark.parametrize("path", ["reference_path", "triton_path"])
@pytest.mark.parametrize("L", [3, 11])
def test_patch_norm_mse_near_constant_channel(path, L, request):
    """Channel 0 of the target varies by 1e-3 across patches (variance ~eps): eps, and at L = 3
    the unbiased divisor (2 instead of 3), change the loss by far more than the tolerance. Value
    and gradient against float64, with the op's default eps."""
    request.getfixturevalue(path)
    g = torch.Generator().manual_seed(L)
    B, C = 2, 7
    target = torch.randn(B, L, C, generator=g)
    target[..., 0] = 3.0 + 1e-3 * torch.randn(B, L, generator=g)
    pred = torch.randn(B, L, C, generator=g)
    mask = torch.zeros(B, L)
    mask[:, : L - 1] = 1
    pred64 = pred.double().requires_grad_()
    want = _patch_norm_mse64(pred64, target, mask)
    (want_grad,) = torch.autograd.grad(want, pred64)
    p = pred.clone().requires_grad_()
    loss = ops.patch_norm_mse(p, target, mask)
    loss.backward()
    assert_close(loss, want, atol=1e-5, rtol=1e-5, name="loss")
    # the near-constant channel costs fp32 digits (t - mean at t ~ 3 keeps ~4 of them): 2e-5
    assert_close(p.grad, want_grad, atol=2e-5, rtol=1e-4, name="grad pred")
    for other in (_patch_norm_mse64(pred, target, mask, eps=1e-5),
                  _patch_norm_mse64(pred, target, mask, eps=1e-7)):
        assert abs(float(other - want.detach())) > 1e-2  # the data tells eps apart
    t = target.double()
    biased = (t - t.mean(1, keepdim=True)) / torch.sqrt(t.var(1, keepdim=True, unbiased=False) + 1e-6)
    biased_loss = (((pred.double() - biased) ** 2).mean(-1) * mask).sum() / mask.sum()
    assert abs(float(biased_loss - want.detach())) > 1e-2
