"""MAE base pretraining: loss, learning, where the loss looks, and the encoder export."""
from __future__ import annotations

import warnings

import pytest
import torch

from tec_fast import BaseModel, ViTConfig
from tec_fast.models.layout import TokenLayout
from tec_fast.models.mae import MAEModel, patchify

VIT = ViTConfig(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2)


def tiny_mae(seed=0, **kw):
    torch.manual_seed(seed)
    return MAEModel(VIT, decoder_dim=16, decoder_depth=1, decoder_heads=2, **kw)


def test_patchify_layout():
    x = torch.arange(2 * 3 * 16 * 16, dtype=torch.float32).reshape(2, 3, 16, 16)
    p = patchify(x, 4)  # [B, L, p*p*c]
    assert p.shape == (2, 16, 48)
    # patch 5 = grid row 1, column 1; its pixel (row 2, column 3), channel 1
    assert p[1, 5, (2 * 4 + 3) * 3 + 1] == x[1, 1, 4 + 2, 4 + 3]


def test_loss_finite_and_reproducible_with_noise():
    model = tiny_mae()
    images = torch.randn(3, 3, 16, 16)
    noise = torch.rand(3, VIT.num_patches)
    a = model(images, mask_ratio=0.75, noise=noise)["loss"]
    b = model(images, mask_ratio=0.75, noise=noise)["loss"]
    assert a.dim() == 0 and torch.isfinite(a) and torch.equal(a, b)
    a.backward()
    assert model.patch_embed.proj.weight.grad.abs().sum() > 0
    assert model.mask_token.grad.abs().sum() > 0


def test_loss_only_on_removed_patches():
    model = tiny_mae()
    images = torch.randn(2, 3, 16, 16)
    mask = (torch.rand(2, VIT.num_patches) < 0.75).float()
    mask[:, 0], mask[:, 1] = 1.0, 0.0
    pred = torch.randn(2, VIT.num_patches, 48, requires_grad=True)
    loss = model.patch_loss(images, pred, mask)
    loss.backward()
    per_patch = pred.grad.abs().sum(-1)
    assert (per_patch[mask == 0] == 0).all() and (per_patch[mask == 1] > 0).all()
    # the kept patches' pixels do not enter the target either
    changed = images.clone()
    kept = torch.nonzero(mask[0] == 0).flatten()
    for j in kept.tolist():
        r, c = divmod(j, VIT.grid_size)
        changed[0, :, 4 * r:4 * r + 4, 4 * c:4 * c + 4] += 5.0
    assert torch.equal(model.patch_loss(changed, pred, mask), loss.detach())


def test_norm_pix_target():
    """A perfect prediction of the per-patch normalised pixels gives zero loss."""
    model = tiny_mae()
    images = torch.randn(2, 3, 16, 16)
    t = patchify(images, 4)
    t = (t - t.mean(-1, keepdim=True)) / torch.sqrt(t.var(-1, keepdim=True) + 1e-6)
    mask = torch.ones(2, VIT.num_patches)
    assert model.patch_loss(images, t, mask) < 1e-10
    raw = tiny_mae(norm_pix_loss=False)
    assert raw.patch_loss(images, patchify(images, 4), mask) < 1e-10


def test_loss_falls():
    model = tiny_mae()
    g = torch.Generator().manual_seed(0)
    # a small fixed set of structured images (smooth blobs), reconstructable from context
    yy, xx = torch.meshgrid(torch.arange(16.0), torch.arange(16.0), indexing="ij")
    centers = torch.rand(8, 2, generator=g) * 16
    images = torch.exp(-((xx - centers[:, None, None, 0]) ** 2 + (yy - centers[:, None, None, 1]) ** 2) / 20)
    images = images.unsqueeze(1).repeat(1, 3, 1, 1) * torch.rand(8, 3, 1, 1, generator=g)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for step in range(30):
        noise = torch.rand(8, VIT.num_patches, generator=g)
        loss = model(images, mask_ratio=0.75, noise=noise)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.8 * first, (first, last)


def test_encoder_export_round_trip():
    model = tiny_mae()
    with torch.no_grad():  # not the init values, so a skipped key would show
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    sd = model.encoder_state_dict()
    assert set(sd) == {k for k in BaseModel(VIT, topk=None).state_dict()}
    assert not any(k.startswith(("decoder", "mask_token")) for k in sd)
    base = BaseModel(VIT, topk=None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report = base.load_checkpoint({"model": sd})
    assert not report.missing and not report.unexpected and not report.ignored

    images = torch.randn(4, 3, 16, 16)
    g = VIT.grid_size
    with torch.no_grad():  # a layout with nothing masked: every patch, original order
        tokens = model.encode(TokenLayout([(g, g)] * 4), images)  # [B, 1+L, C], after the final norm
    torch.testing.assert_close(base.encode(images, pool="mean"), tokens[:, 1:].mean(1))
    torch.testing.assert_close(base.encode(images, pool="cls"), tokens[:, 0])


def test_full_state_dict_loads_into_base_with_decoder_ignored():
    """A full MAE checkpoint (with decoder, like a training checkpoint) also loads; the decoder
    is reported as ignored."""
    model = tiny_mae()
    base = BaseModel(VIT, topk=None)
    with pytest.warns(UserWarning, match="ignored"):
        report = base.load_checkpoint({"model": model.state_dict()})
    assert not report.missing and any(k.startswith("decoder_") for k in report.ignored)


def test_invalid_configs():
    with pytest.raises(ValueError, match="decoder_dim"):
        MAEModel(VIT, decoder_dim=18, decoder_depth=1, decoder_heads=4)
    with pytest.raises(ValueError, match="divisible by 4"):
        MAEModel(VIT, decoder_dim=6, decoder_depth=1, decoder_heads=2)
    with pytest.raises(ValueError, match="images"):
        tiny_mae()(torch.randn(1, 3, 8, 8))


def _plain_mae_loss(sd: dict, images: torch.Tensor, noise: torch.Tensor, keep: int, heads: int, dec_heads: int):
    """MAE's forward written out in plain torch from a state dict (as the MAE release computes
    it: shuffle by noise, keep the first K, CLS in front, blocks, norm; decoder with mask tokens
    unshuffled; norm_pix loss on the removed patches), in the dtype of ``sd`` and ``images``."""
    F = torch.nn.functional

    def ln(x, name):
        return F.layer_norm(x, x.shape[-1:], sd[name + ".weight"], sd[name + ".bias"], 1e-6)

    def blocks(x, prefix, n_heads):
        i = 0
        while f"{prefix}.{i}.norm1.weight" in sd:
            p = f"{prefix}.{i}."
            B, N, C = x.shape
            qkv = F.linear(ln(x, p + "norm1"), sd[p + "attn.qkv.weight"], sd[p + "attn.qkv.bias"])
            q, k, v = qkv.reshape(B, N, 3, n_heads, C // n_heads).permute(2, 0, 3, 1, 4)
            att = ((q @ k.transpose(-2, -1)) * (C // n_heads) ** -0.5).softmax(-1)
            x = x + F.linear((att @ v).transpose(1, 2).reshape(B, N, C), sd[p + "attn.proj.weight"],
                             sd[p + "attn.proj.bias"])
            h = F.gelu(F.linear(ln(x, p + "norm2"), sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"]))
            x = x + F.linear(h, sd[p + "mlp.fc2.weight"], sd[p + "mlp.fc2.bias"])
            i += 1
        return x

    B = images.shape[0]
    x = F.conv2d(images, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=4)
    x = x.flatten(2).transpose(1, 2) + sd["pos_embed"][:, 1:]
    shuffle = noise.argsort(dim=1)
    restore = shuffle.argsort(dim=1)
    x = torch.gather(x, 1, shuffle[:, :keep, None].expand(-1, -1, x.shape[-1]))
    cls = (sd["cls_token"] + sd["pos_embed"][:, :1]).expand(B, -1, -1)
    x = ln(blocks(torch.cat([cls, x], 1), "blocks", heads), "norm")
    y = F.linear(x, sd["decoder_embed.weight"], sd["decoder_embed.bias"])
    L = noise.shape[1]
    full = torch.cat([y[:, 1:], sd["mask_token"].expand(B, L - keep, -1)], 1)
    full = torch.gather(full, 1, restore[:, :, None].expand(-1, -1, y.shape[-1]))
    y = torch.cat([y[:, :1], full], 1) + sd["decoder_pos_embed"]
    y = ln(blocks(y, "decoder_blocks", dec_heads), "decoder_norm")
    pred = F.linear(y, sd["decoder_pred.weight"], sd["decoder_pred.bias"])[:, 1:]
    target = patchify(images, 4)
    target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6) ** 0.5
    mask = torch.ones(B, L, dtype=images.dtype)
    mask[:, :keep] = 0
    mask = torch.gather(mask, 1, restore)
    return (((pred - target) ** 2).mean(-1) * mask).sum() / mask.sum()


def test_loss_matches_a_plain_float64_mae():
    """The engine's MAE (TEC's block path: token layout, fused residual norms) against MAE's
    forward written out in plain torch, in float64, on a model with every parameter random."""
    model = tiny_mae(3)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    images = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    noise = torch.rand(3, VIT.num_patches, generator=torch.Generator().manual_seed(2))
    got = model(images, mask_ratio=0.75, noise=noise)["loss"]
    sd = {k: v.double() for k, v in model.state_dict().items()}
    want = _plain_mae_loss(sd, images.double(), noise, keep=4, heads=2, dec_heads=2)
    assert abs(got.item() - want.item()) <= 2e-6 * max(1.0, abs(want.item())), (got.item(), want.item())
