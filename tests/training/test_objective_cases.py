"""What the TEC and MAE objectives hand the model for one step: the mask ratios they accept, the
per-image ratio drawn from the last noise column, block masks of the asked ratio, and the
engine's masking noise passed through (so masks follow (seed, step, micro))."""
from __future__ import annotations

import pytest
import torch

from tec_fast.training.objectives import MAEObjective, NativeTECObjective, TECObjective

L = 16  # a 4x4 patch grid


def _base(images):  # the targets are handed on untouched; nothing here looks at them
    return "targets"


class _Recorder:
    """A model that records what the objective calls it with and returns a 0-dim loss."""

    def __init__(self):
        self.calls = []

    def __call__(self, *args, **kwargs):
        self.calls.append((args, kwargs))
        return {"loss": torch.zeros(())}


@pytest.mark.parametrize("ratio", [0.0, 1.0, (0.0, 0.5), (0.5, 1.0)])
def test_tec_mask_ratios_outside_the_open_interval_are_refused(ratio):
    with pytest.raises(ValueError, match="mask_ratio must be in"):
        TECObjective(_base, ratio, L)


@pytest.mark.parametrize("ratio", [0.0, 1.0])
def test_mae_and_native_mask_ratios_outside_the_open_interval_are_refused(ratio):
    with pytest.raises(ValueError, match="mask_ratio must be in"):
        MAEObjective(ratio, L)
    with pytest.raises(ValueError, match="mask_ratio must be in"):
        NativeTECObjective(_base, ratio, 4, 100)


def test_a_ratio_range_whose_low_end_is_above_its_high_end_is_refused():
    with pytest.raises(ValueError, match=r"\(lo, hi\) range"):
        TECObjective(_base, (0.9, 0.6), L)
    TECObjective(_base, (0.6, 0.6), L)  # a range of one value is a range


def test_per_image_ratio_comes_from_the_last_noise_column():
    """Range (0.25, 0.75): column L = 0 gives ratio 0.25 (12 of 16 patches visible), 0.5 gives
    0.5 (8 visible); the first L columns only order the patches."""
    objective = TECObjective(_base, (0.25, 0.75), L)
    noise = torch.full((2, L + 1), 0.9)
    noise[:, :L] = torch.linspace(0.01, 0.99, L)
    noise[:, L] = torch.tensor([0.0, 0.5])
    model = _Recorder()
    objective(model, (torch.zeros(2, 3, 16, 16),), noise)
    keep = model.calls[0][1]["keep"]
    assert keep.shape == (2, L) and keep.sum(1).tolist() == [12, 8]
    # the patches of lowest noise are the visible ones
    assert keep[0].tolist() == [True] * 12 + [False] * 4 and keep[1].tolist() == [True] * 8 + [False] * 8


def test_block_masks_hide_the_asked_share_of_the_grid():
    """Block masking at 0.75 on a 4x4 grid hides round(16 * 0.75) = 12 patches of every image."""
    objective = TECObjective(_base, 0.75, L, masking="block")
    noise = torch.rand(5, L + 1, generator=torch.Generator().manual_seed(0))
    model = _Recorder()
    objective(model, (torch.zeros(5, 3, 16, 16),), noise)
    keep = model.calls[0][1]["keep"]
    assert keep.shape == (5, L) and (~keep).sum(1).tolist() == [12] * 5


def test_dense_tec_step_passes_the_engine_noise_and_ratio():
    objective = TECObjective(_base, 0.6, L)
    noise = torch.rand(2, L)
    model = _Recorder()
    images = torch.zeros(2, 3, 16, 16)
    objective(model, (images,), noise)
    (args, kwargs), = model.calls
    assert args[0] is images and args[1] == "targets"
    assert kwargs["mask_ratio"] == 0.6 and kwargs["noise"] is noise


def test_mae_step_passes_the_engine_noise_and_ratio():
    objective = MAEObjective(0.75, L)
    assert objective.noise_columns == L
    noise = torch.rand(2, L)
    model = _Recorder()
    images = torch.zeros(2, 3, 16, 16)
    objective(model, (images, torch.tensor([0, 1])), noise)
    (args, kwargs), = model.calls
    assert args == (images,) and kwargs == {"mask_ratio": 0.75, "noise": noise}


def test_mae_refuses_a_ratio_range():
    with pytest.raises(ValueError, match="MAE takes one mask ratio"):
        MAEObjective((0.5, 0.8), L)


def _tiny_base(topk=None):
    from tec_fast import BaseModel, ViTConfig
    torch.manual_seed(0)
    return BaseModel(ViTConfig(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2), topk=topk).eval()


def test_target_cache_rows_follow_the_sample_index():
    """The cache holds image i's targets in row i: a lookup by index gives what the base computes
    for those images (batches of 2, so the rows come from several loader batches)."""
    from tec_fast.training.objectives import IndexedDataset, TargetCache

    base = _tiny_base(topk=4)
    images = torch.randn(6, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    dataset = [(images[i], 0) for i in range(6)]
    torch.manual_seed(5)
    with torch.no_grad():
        cache = TargetCache(base, dataset, batch_size=2, device=torch.device("cpu"))
        index = torch.tensor([4, 0, 5])
        got = cache.lookup(index, torch.device("cpu"))
        want = base(images[index])
    torch.testing.assert_close(got.features, want.features.float())
    torch.testing.assert_close(got.relation, want.relation.float())
    assert torch.equal(got.topk_idx, want.topk_idx)
    assert IndexedDataset(dataset)[3][1] == 3


def test_a_cached_objective_keeps_its_fp32_base_under_autocast():
    """Targets from a cache never run the base: for_precision returns the objective itself."""
    base = _tiny_base()
    objective = TECObjective(base, 0.75, L, cache=object())
    assert objective.for_precision(torch.bfloat16) is objective
    plain = TECObjective(base, 0.75, L)
    assert plain.for_precision(torch.bfloat16) is not plain
