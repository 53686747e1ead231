"""Native-resolution TEC (tec_fast.native): the packed base and new model agree with the dense
path on square images, images of mixed sizes do not leak into each other, and it trains."""
import math

import pytest
import torch

from tec_fast import BaseModel, TECConfig, TECModel, ViTConfig
from tec_fast import packing
from tec_fast.models.layers import sincos_pos_embed
from tec_fast.native import (NativeBatch, NativeBatchSampler, base_pos_embed, budget_grid,
                             collate_native, native_base_targets, native_tec_loss, resize_to_budget)

MIXED = [(16, 16), (8, 24), (24, 8)]  # patch 4: grids 4x4, 2x6, 6x2


def _models(seed=0, relation=True):
    torch.manual_seed(seed)
    base = BaseModel(ViTConfig(16, 4, 24, 2, 3), topk=3 if relation else None)
    model = TECModel(TECConfig(encoder=ViTConfig(16, 4, 32, 3, 2), decoder_dim=16, decoder_depth=1,
                               decoder_heads=2, tau=1.0, pred_dim=24, pred_heads=3, relation=relation))
    return base, model


def _images(sizes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(3, h, w, generator=g) for h, w in sizes]


def test_sincos_layout_for_non_square_grids():
    # docs/tec.md §2: first half of the channels encodes the column, last half the row, row-major tokens
    pe = sincos_pos_embed(8, 2, 3)  # 2 rows, 3 columns
    col_only, row_only = sincos_pos_embed(8, 1, 3)[1:], sincos_pos_embed(8, 2, 1)[1:]
    for r in range(2):
        for c in range(3):
            torch.testing.assert_close(pe[1 + r * 3 + c, :4], col_only[c, :4])
            torch.testing.assert_close(pe[1 + r * 3 + c, 4:], row_only[r, 4:])
    batch = NativeBatch(_images([(8, 12)]), 4)
    assert batch.positions.tolist() == [[r, c] for r in range(2) for c in range(3)]
    torch.testing.assert_close(batch.pos_embed(8), pe)


@pytest.mark.parametrize("relation", [True, False])
def test_square_images_match_the_dense_path(relation):
    base, model = _models(0, relation)
    x = torch.randn(3, 3, 16, 16)
    batch = NativeBatch(list(x), 4)
    dense_t, native_t = base(x), native_base_targets(base, batch)
    for b in range(3):
        torch.testing.assert_close(native_t.features[b], dense_t.features[b], rtol=1e-4, atol=1e-5)
        if relation:
            torch.testing.assert_close(native_t.relation[b], dense_t.relation[b], rtol=1e-4, atol=1e-5)
            assert native_t.topk_idx[b].tolist() == dense_t.topk_idx[b].tolist()
    noise = torch.rand(3, 16)
    dense = model(x, dense_t, 0.75, noise)
    g_dense = torch.autograd.grad(dense["loss"], list(model.parameters()))
    native = native_tec_loss(model, batch, native_t, 0.75, noise=list(noise))
    for key in dense:
        torch.testing.assert_close(native[key], dense[key], rtol=1e-4, atol=1e-6)
    g_native = torch.autograd.grad(native["loss"], list(model.parameters()))
    for (n, _), a, b in zip(model.named_parameters(), g_native, g_dense):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=lambda m: f"{n}: {m}")


def test_base_pos_embed_is_resampled_as_timm_does():
    base, _ = _models()
    with torch.no_grad():
        base.pos_embed.normal_(std=0.02)  # a learned table (iBOT / DINO)
    batch = NativeBatch(_images(MIXED), 4)
    pos = base_pos_embed(base, batch)  # token layout
    table = base.pos_embed[0, 1:].reshape(1, 4, 4, -1).permute(0, 3, 1, 2)
    resize = lambda aa: torch.nn.functional.interpolate(  # noqa: E731
        table, size=(2, 6), mode="bicubic", align_corners=False, antialias=aa)[0].flatten(1).t()
    s = batch.cu_tokens[1].item()  # image 1 (grid 2x6) starts here
    torch.testing.assert_close(pos[s], base.pos_embed[0, 0])
    torch.testing.assert_close(pos[s + 1:s + 13], resize(True), atol=1e-7, rtol=0)
    assert (resize(True) - resize(False)).abs().max() > 1e-3  # rows shrink: antialias matters here
    torch.testing.assert_close(pos[:17], base.pos_embed[0])  # the stored grid: the stored table


@pytest.mark.parametrize("learned", [True, False])
def test_dense_and_native_give_the_same_base_positions_and_targets(learned):
    """One resampler: a base run natively on a 3x3 or 5x5 grid sees the table a base loaded from
    the same weights at that image size holds (sin-cos MAE tables are resampled too), and gives
    the same targets."""
    base, _ = _models(3)
    if learned:
        with torch.no_grad():
            base.pos_embed.normal_(std=0.02)
    for grid in (3, 5):
        dense = BaseModel(ViTConfig(4 * grid, 4, 24, 2, 3), topk=3)
        dense.load_checkpoint(base.state_dict())
        img = _images([(4 * grid, 4 * grid)], seed=grid)[0]
        batch = NativeBatch([img], 4)
        torch.testing.assert_close(base.pos_table(batch.layout), dense.pos_embed[0], atol=0, rtol=0)
        native_t, dense_t = native_base_targets(base, batch), dense(img[None])
        torch.testing.assert_close(native_t.features[0], dense_t.features[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(native_t.relation[0], dense_t.relation[0], rtol=1e-5, atol=1e-5)


def test_mixed_sizes_do_not_leak_between_images():
    base, model = _models(1)
    imgs = _images(MIXED, seed=1)
    batch = NativeBatch(imgs, 4)
    t = native_base_targets(base, batch)
    noise = [torch.rand(L) for L in batch.lengths]
    mixed = native_tec_loss(model, batch, t, 0.75, noise=noise)
    feat_num, masked_total, rel = 0.0, 0, []
    for b, img in enumerate(imgs):
        single = NativeBatch([img], 4)
        ts = native_base_targets(base, single)
        torch.testing.assert_close(ts.features[0], t.features[b], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ts.relation[0], t.relation[b], rtol=1e-5, atol=1e-5)
        out = native_tec_loss(model, single, ts, 0.75, noise=[noise[b]])
        L = batch.lengths[b]
        masked = L - int(L * 0.25)
        feat_num = feat_num + out["feature"] * masked
        masked_total += masked
        rel.append(out["relation"])
    torch.testing.assert_close(mixed["feature"], feat_num / masked_total, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(mixed["relation"], torch.stack(rel).mean(), rtol=1e-5, atol=1e-6)
    mixed["loss"].backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert model.forward_att_decoder.mask_token.grad.abs().sum() > 0


def test_native_training_loss_falls():
    base, model = _models(2)
    batch = NativeBatch(_images(MIXED + [(12, 20)], seed=2), 4)
    t = native_base_targets(base, batch)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    losses = []
    for step in range(30):
        out = native_tec_loss(model, batch, t, 0.75, generator=torch.Generator().manual_seed(step % 3))
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(out["loss"].item())
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-3:]) < 0.9 * sum(losses[:3]), losses


def test_bad_inputs_are_named():
    base, model = _models()
    with pytest.raises(ValueError, match="multiple of patch"):
        NativeBatch([torch.randn(3, 10, 16)], 4)
    batch = NativeBatch(_images([(4, 8)]), 4)  # 2 patches < topk 3
    with pytest.raises(ValueError, match="topk"):
        native_base_targets(base, batch)
    batch = NativeBatch(_images(MIXED), 4)
    t = native_base_targets(base, batch)
    with pytest.raises(ValueError, match="noise"):
        native_tec_loss(model, batch, t, 0.75, noise=[torch.rand(3)] * 3)
    with pytest.raises(ValueError, match="features"):
        native_tec_loss(model, batch, t._replace(features=t.features[:2]), 0.75)


@pytest.mark.parametrize("size", [(64, 48), (37, 101), (300, 20), (9, 9), (4, 400)])
def test_resize_to_budget_respects_budget_and_aspect(size):
    H, W = size
    img = torch.rand(3, H, W)
    out = resize_to_budget(img, 4, 48)
    h, w = out.shape[1] // 4, out.shape[2] // 4
    assert out.shape[1] % 4 == 0 and out.shape[2] % 4 == 0 and 1 <= h * w <= 48
    assert (h, w) == budget_grid(H, W, 4, 48)
    if h > 1 and w > 1 and min(H, W) >= 8:  # away from the one-patch limit: aspect within rounding
        assert abs(math.log((h / w) / (H / W))) < math.log((h + 1) / h) + math.log((w + 1) / w)
    small = torch.rand(3, 8, 12)
    assert resize_to_budget(small, 4, 48) is small  # fits already: kept at native resolution
    assert budget_grid(8, 12, 4, 48, upscale=True)[0] * budget_grid(8, 12, 4, 48, upscale=True)[1] > 6


def test_collate_and_sampler_respect_the_token_budget():
    g = torch.Generator().manual_seed(0)
    sizes = [(int(torch.randint(8, 80, (1,), generator=g)), int(torch.randint(8, 80, (1,), generator=g)))
             for _ in range(23)]
    imgs = [torch.rand(3, h, w) for h, w in sizes]
    batches = collate_native(imgs, 4, 40, 100)
    assert sorted(i for b in batches for i in b.ids) == list(range(23))
    for b in batches:
        assert b.num_tokens <= 100
        for i, grid in zip(b.ids, b.grids):
            assert grid == budget_grid(*sizes[i], 4, 40)
    sampler = NativeBatchSampler(sizes, 4, 40, 100, seed=3)
    for epoch in range(2):
        sampler.set_epoch(epoch)
        bins = list(sampler)
        assert len(bins) == len(sampler)
        assert sorted(i for b in bins for i in b) == list(range(23))
        assert all(sum(sampler.lengths[i] for i in b) <= 100 for b in bins)
    assert len(bins) <= len(packing.plan_bins(sampler.lengths, 100)) + 1


def test_dataloader_with_sampler_and_collate():
    from tec_fast.native import NativeCollate

    sizes = [(16, 16), (8, 24), (24, 8), (40, 12), (12, 12), (20, 28)]
    data = [(torch.rand(3, h, w), i) for i, (h, w) in enumerate(sizes)]
    sampler = NativeBatchSampler(sizes, 4, 16, 40)
    loader = torch.utils.data.DataLoader(data, batch_sampler=sampler, collate_fn=NativeCollate(4, 16))
    batches = list(loader)
    assert sum(len(b) for b in batches) == len(sizes)
    assert all(b.num_tokens <= 40 and max(b.lengths) <= 16 for b in batches)


def test_random_keep_counts_and_per_image_ratios():
    from tec_fast.masking import ragged_keep, visible_counts

    batch = NativeBatch(_images(MIXED), 4)
    counts = visible_counts(batch.lengths, [0.5, 0.75, 0.9])
    assert counts == [8, 3, 1]
    noise = [torch.rand(L) for L in batch.lengths]
    keep = ragged_keep(batch.lengths, counts, noise).split(batch.lengths)
    for b, (kb, n) in enumerate(zip(keep, noise)):
        assert sorted(kb.nonzero().reshape(-1).tolist()) == sorted(torch.argsort(n)[:counts[b]].tolist())
    keep = ragged_keep(batch.lengths, counts, None, generator=torch.Generator().manual_seed(0))
    assert [int(k.sum()) for k in keep.split(batch.lengths)] == counts
    assert batch.positions[16 + 12:].tolist() == [[r, c] for r in range(6) for c in range(2)]
    with pytest.raises(ValueError, match="no visible patch"):
        visible_counts(NativeBatch(_images([(4, 4)]), 4).lengths, 0.75)


def test_bf16_autocast_runs():
    base, model = _models(3)
    batch = NativeBatch(_images(MIXED), 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        t = native_base_targets(base, batch)
        out = native_tec_loss(model, batch, t, 0.75, generator=torch.Generator().manual_seed(0))
    assert t.features[0].dtype == torch.float32 and out["loss"].dtype == torch.float32
    out["loss"].backward()
    assert torch.isfinite(model.blocks[0].attn.qkv.weight.grad).all()
