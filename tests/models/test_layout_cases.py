"""Token layouts and native batches on grids that share a patch count but not a shape (2x6 beside
6x2), images at the edges of the token and patch budgets, and the native sampler's epochs."""
import pytest
import torch

from tec_fast.models.layers import sincos_pos_embed
from tec_fast.models.layout import TokenLayout
from tec_fast.native import NativeBatch, NativeBatchSampler, budget_grid


def _grid_positions(h, w):
    return [[r, c] for r in range(h) for c in range(w)]


def test_transposed_grids_of_one_patch_count_are_not_one_grid():
    """2x6 and 6x2 both hold 12 patches, but each image keeps its own rows, columns and table."""
    lay = TokenLayout([(2, 6), (6, 2)])
    assert not lay.uniform
    assert lay.positions.tolist() == _grid_positions(2, 6) + _grid_positions(6, 2)
    table = lay.pos_table(8)
    assert table.shape == (2 * 13, 8)
    torch.testing.assert_close(table, torch.cat([sincos_pos_embed(8, 2, 6), sincos_pos_embed(8, 6, 2)]),
                               rtol=0, atol=0)
    batch = NativeBatch([torch.randn(3, 8, 24), torch.randn(3, 24, 8)], 4)
    assert batch.grids == [(2, 6), (6, 2)] and not batch.layout.uniform
    torch.testing.assert_close(batch.pos_embed(8), table, rtol=0, atol=0)


def test_uniform_batch_position_embedding_has_one_copy_per_image():
    batch = NativeBatch([torch.randn(3, 8, 12), torch.randn(3, 8, 12), torch.randn(3, 8, 12)], 4)
    assert batch.layout.uniform
    pe = batch.pos_embed(8)
    assert pe.shape == (3 * 7, 8)
    torch.testing.assert_close(pe, sincos_pos_embed(8, 2, 3).repeat(3, 1), rtol=0, atol=0)


@pytest.mark.parametrize("size, grid", [((64, 48), (8, 6)), ((100, 100), (7, 6)), ((48, 64), (6, 8)),
                                        ((4, 400), (1, 48)), ((400, 4), (48, 1))])
def test_budget_grid_fills_the_budget_exactly(size, grid):
    """A grid that fits the budget exactly is kept; one that rounds past it loses a patch row or
    column, not more (100x100 at 4 px: 25x25 scaled to 6.93 -> 7x7 = 49 > 48 -> 7x6)."""
    assert budget_grid(*size, 4, 48) == grid


def test_budget_grid_trims_the_side_that_is_too_long():
    """Rounding past the budget takes a patch off the side that is long for the image's aspect."""
    assert budget_grid(76, 28, 4, 48) == (11, 4)  # 19x7 patches -> 11.4x4.2 -> 11x4 = 44 fits
    # 30x10 patches, budget 20 -> 7.75x2.58 -> 8x3 = 24: 8/3 < 3, the columns are long -> 8x2
    assert budget_grid(120, 40, 4, 20) == (8, 2)
    assert budget_grid(40, 120, 4, 20) == (2, 8)  # and mirrored: the rows are long -> 2x8


def test_attention_keywords_name_the_longest_image():
    """max_len is the longest image's token count, CLS included, for the encoder and each of the
    decoder's streams."""
    lay = TokenLayout([(2, 3), (1, 2)])
    enc = lay.encoder_attention()
    assert enc["cu_seqlens"].tolist() == [0, 7, 10] and enc["max_len"] == 7 and enc["lengths"] == [7, 3]
    dec = lay.decoder_attention(2)
    assert dec["cu_seqlens"].tolist() == [0, 7, 10, 17, 20] and dec["max_len"] == 7
    assert dec["lengths"] == [7, 3, 7, 3]
    masked = lay.with_keep(torch.tensor([1, 0, 0, 0, 0, 0, 1, 1], dtype=torch.bool)).encoder_attention()
    assert masked["cu_seqlens"].tolist() == [0, 2, 5] and masked["max_len"] == 3
    assert masked["lengths"] == [2, 3]
    assert TokenLayout([(2, 2), (2, 2)]).encoder_attention() == {}  # uniform, unmasked: batched


def test_sampler_takes_an_image_of_exactly_the_token_budget():
    sampler = NativeBatchSampler([(16, 16), (8, 8)], 4, 16, 17)  # 1 + 4*4 = 17 tokens: fits alone
    assert sampler.lengths == [17, 5]
    assert sorted(i for b in sampler for i in b) == [0, 1]
    with pytest.raises(ValueError, match="an image takes 17 tokens, more than tokens_per_batch=16"):
        NativeBatchSampler([(16, 16)], 4, 16, 16)


def _sizes():
    return [(4 * h, 4 * w) for h, w in [(1, 1), (2, 1), (2, 2), (3, 2), (3, 3), (4, 3), (4, 4), (5, 4),
                                         (1, 3), (2, 3), (3, 4), (5, 3)]]


def test_sampler_regroups_and_reorders_bins_each_epoch():
    sampler = NativeBatchSampler(_sizes(), 4, 20, 24, seed=1)
    epochs = []
    for epoch in range(6):
        sampler.set_epoch(epoch)
        bins = list(sampler)
        assert sorted(i for b in bins for i in b) == list(range(12))
        assert all(sum(sampler.lengths[i] for i in b) <= 24 for b in bins)
        epochs.append(bins)
    groupings = {frozenset(frozenset(b) for b in bins) for bins in epochs}
    assert len(groupings) > 1, "the grouping must change from epoch to epoch"
    longest = max(range(12), key=lambda i: sampler.lengths[i])
    # best-fit-decreasing opens its first bin with the longest image: the bins' order is shuffled
    assert any(longest not in bins[0] for bins in epochs)
    sampler.set_epoch(3)
    assert list(sampler) == epochs[3]  # one epoch, one plan


def test_sampler_bins_hold_the_dataset_indices_they_were_planned_for():
    sizes = _sizes()
    sampler = NativeBatchSampler(sizes, 4, 20, 24, seed=2)
    lengths = [1 + budget_grid(h, w, 4, 20)[0] * budget_grid(h, w, 4, 20)[1] for h, w in sizes]
    assert sampler.lengths == lengths
    for epoch in range(4):
        sampler.set_epoch(epoch)
        bins = list(sampler)
        assert sorted(i for b in bins for i in b) == list(range(12))
        loads = sorted(sum(lengths[i] for i in b) for b in bins)
        # any-fit on decreasing sizes: no two bins could have been one
        assert loads[0] + loads[1] > 24, loads


def test_native_targets_take_an_image_of_exactly_topk_patches():
    from tec_fast import BaseModel, ViTConfig
    from tec_fast.native import native_base_targets

    torch.manual_seed(0)
    base = BaseModel(ViTConfig(16, 4, 24, 2, 3), topk=3)
    batch = NativeBatch([torch.randn(3, 4, 12), torch.randn(3, 8, 8)], 4)  # 1x3 and 2x2 patches
    t = native_base_targets(base, batch)
    assert [i.shape for i in t.topk_idx] == [(3,), (3,)]
    assert sorted(t.topk_idx[0].tolist()) == [0, 1, 2]  # every patch of the 1x3 image
    assert t.relation[0].shape == (4, 3, 3) and t.features[0].shape == (3, 24)
    with pytest.raises(ValueError, match="image 0 has 2 patches, fewer than the base model's topk=3"):
        native_base_targets(base, NativeBatch([torch.randn(3, 4, 8)], 4))


def test_base_pos_embed_of_a_uniform_batch_is_in_the_token_layout():
    """[B + T_p, Cb] for every batch: a uniform one repeats its one table per image."""
    from tec_fast import BaseModel, ViTConfig
    from tec_fast.native import base_pos_embed

    torch.manual_seed(1)
    base = BaseModel(ViTConfig(16, 4, 24, 2, 3), topk=3)
    with torch.no_grad():
        base.pos_embed.normal_(std=0.02)
    batch = NativeBatch([torch.randn(3, 8, 12), torch.randn(3, 8, 12)], 4)  # 2x3 grids, uniform
    pos = base_pos_embed(base, batch)
    assert pos.shape == (2 + 12, 24)
    one = base.pos_table(TokenLayout([(2, 3)]))
    torch.testing.assert_close(pos, torch.cat([one, one]), rtol=0, atol=0)
    mixed = NativeBatch([torch.randn(3, 8, 12), torch.randn(3, 12, 8)], 4)
    assert base_pos_embed(base, mixed).shape == (2 + 12, 24)


def test_native_model_refuses_a_keep_mask_on_a_native_batch():
    from tec_fast import BaseModel, TECConfig, ViTConfig
    from tec_fast.native import NativeTECModel, native_base_targets

    torch.manual_seed(2)
    base = BaseModel(ViTConfig(16, 4, 24, 2, 3), topk=3)
    model = NativeTECModel(TECConfig(encoder=ViTConfig(16, 4, 32, 3, 2), decoder_dim=16, decoder_depth=1,
                                     decoder_heads=2, tau=1.0, pred_dim=24, pred_heads=3))
    batch = NativeBatch([torch.randn(3, 16, 16), torch.randn(3, 8, 24)], 4)
    targets = native_base_targets(base, batch)
    keep = torch.zeros(sum(batch.lengths), dtype=torch.bool)
    keep[::2] = True
    with pytest.raises(ValueError, match="keep masks are not supported on a NativeBatch"):
        model(batch, targets, keep=keep)


def test_native_targets_refuse_a_base_without_a_class_token():
    from tec_fast import BaseModel, ViTConfig
    from tec_fast.native import native_base_targets

    torch.manual_seed(3)
    base = BaseModel(ViTConfig(16, 4, 24, 2, 3, class_token=False), topk=None)
    with pytest.raises(ValueError, match=r"one CLS token per image; this base has ViTConfig.class_token=False"):
        native_base_targets(base, NativeBatch([torch.randn(3, 8, 8), torch.randn(3, 8, 12)], 4))
