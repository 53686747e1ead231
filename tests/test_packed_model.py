"""The packed encoder path (variable visible counts): packed == padded, variable and block masks."""
import pytest
import torch

from tec_fast import BaseModel, TECConfig, TECModel, ViTConfig
from tec_fast.ops.attention import packed_attention
from tec_fast.masking import block_masking, variable_masking


def _models(seed=0):
    torch.manual_seed(seed)
    vit = ViTConfig(16, 4, 32, 3, 2)
    base = BaseModel(ViTConfig(16, 4, 24, 2, 3), topk=3)
    model = TECModel(TECConfig(encoder=vit, decoder_dim=16, decoder_depth=1, decoder_heads=2, tau=1.0,
                               pred_dim=24, pred_heads=3))
    return base, model


@pytest.mark.parametrize("backend", ["nested", "dense"])
def test_packed_attention_matches_per_image_sdpa(backend):
    torch.manual_seed(0)
    lens = [3, 1, 7, 5]
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)
    q, k, v = (torch.randn(sum(lens), 2, 4, requires_grad=True) for _ in range(3))
    out = packed_attention(q, k, v, cu, max(lens), backend=backend)
    ref = []
    for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
        ref.append(torch.nn.functional.scaled_dot_product_attention(
            q[s:e].transpose(0, 1), k[s:e].transpose(0, 1), v[s:e].transpose(0, 1)).transpose(0, 1))
    ref = torch.cat(ref)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), g)
    want = torch.autograd.grad(ref, (q, k, v), g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_packed_equals_padded_for_a_uniform_ratio():
    base, model = _models()
    x = torch.randn(3, 3, 16, 16)
    t = base(x)
    noise = torch.rand(3, 16)
    x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    dense = model(x1, t, 0.75, noise)
    packed = model(x2, t, torch.full((3,), 0.75), noise)  # a per-image ratio takes the packed path
    for key in dense:
        torch.testing.assert_close(dense[key], packed[key], rtol=1e-5, atol=1e-6)
    dense["loss"].backward()
    g_dense = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    packed["loss"].backward()
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-4, atol=1e-7)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, g_dense[n], rtol=1e-4, atol=1e-6, msg=lambda m: f"{n}: {m}")


def test_variable_ratios_match_per_image_dense_runs():
    base, model = _models(1)
    x = torch.randn(3, 3, 16, 16)
    t = base(x)
    noise = torch.rand(3, 16)
    ratios = [0.5, 0.75, 0.9]
    out = model(x, t, ratios, noise)
    # the feature loss is a ratio of sums over images: rebuild it from single-image dense runs
    keep, mask = variable_masking(3, 16, torch.tensor(ratios), noise=noise)
    num = 0.0
    for b, r in enumerate(ratios):
        tb = type(t)(*(v[b:b + 1] for v in t))
        single = model(x[b:b + 1], tb, r, noise[b:b + 1])
        num += single["feature"] * mask[b].sum()
        assert int(keep[b].sum()) == int(16 * (1 - r))
    torch.testing.assert_close(out["feature"], num / mask.sum(), rtol=1e-5, atol=1e-6)


def test_block_masks_train_through_the_packed_path():
    base, model = _models(2)
    x = torch.randn(4, 3, 16, 16)
    t = base(x)
    keep = block_masking(4, 4, 0.5, min_block=2, generator=torch.Generator().manual_seed(0))
    assert keep.shape == (4, 16) and keep.any(1).all() and (~keep).any(1).all()
    out = model(x, t, keep=keep)
    out["loss"].backward()
    assert torch.isfinite(out["loss"])
    with pytest.raises(ValueError, match="keep"):
        model(x, t, keep=torch.ones(4, 16, dtype=torch.bool))
    with pytest.raises(ValueError, match="keep"):
        model(x, t, keep=keep.float())


def test_block_masking_ratio_on_average():
    keep = block_masking(64, 14, 0.4, generator=torch.Generator().manual_seed(1))
    ratio = 1 - keep.float().mean().item()
    assert 0.3 < ratio <= 0.4 + 1e-6


def test_variable_masking_errors():
    with pytest.raises(ValueError, match="one ratio per image"):
        variable_masking(3, 16, torch.tensor([0.5, 0.6]))
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        variable_masking(2, 16, torch.tensor([0.5, 1.2]))
