"""The frozen base under autocast (tec_fast/training/precision.py): ``autocast_copy`` stores its
GEMM weights in the autocast dtype once, computes bitwise the targets the fp32 base computes under
the same autocast (reference path and Triton path), skips the per-step weight casts, leaves the
original alone, and ``fit`` hands a bf16 run's TEC objective such a copy."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode

from tec_fast import BaseModel, ViTConfig
from tec_fast.training import FitConfig, fit
from tec_fast.training.objectives import TECObjective
from tec_fast.training.precision import autocast_copy
from train_helpers import AugmentedImages, tiny_objective, tiny_tec


def _base(seed=0) -> BaseModel:
    """A tiny base with every parameter random (biases and norms too), so that a skipped or an
    extra rounding anywhere shows."""
    torch.manual_seed(seed)
    base = BaseModel(ViTConfig(img_size=24, patch_size=4, embed_dim=48, depth=3, num_heads=3), topk=5)
    with torch.no_grad():
        for p in base.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return base


class _Casts(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.casts = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.casts += func.overloadpacket is torch.ops.aten._to_copy
        return func(*args, **(kwargs or {}))


def _targets(base, images):
    with torch.autocast("cpu", dtype=torch.bfloat16), _Casts() as count:
        t = base(images)
    return t, count.casts


def test_copy_has_bf16_gemm_weights_and_leaves_the_original():
    base = _base()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    low = autocast_copy(base, torch.bfloat16)
    for name, p in low.named_parameters():
        is_gemm = name.startswith(("patch_embed.proj.", "blocks.")) and (".qkv." in name or ".proj." in name
                                                                       or ".fc1." in name or ".fc2." in name
                                                                       or name.startswith("patch_embed"))
        assert p.dtype == (torch.bfloat16 if is_gemm else torch.float32), name
        assert not p.requires_grad
    assert all(torch.equal(before[k], v) and v.dtype == before[k].dtype for k, v in base.state_dict().items())
    assert low.topk == base.topk and not low.training


def test_refuses_trainable_modules_and_other_dtypes():
    with pytest.raises(ValueError, match="must be frozen.*'weight'"):
        autocast_copy(nn.Linear(4, 4), torch.bfloat16)
    with pytest.raises(ValueError, match="bfloat16 or torch.float16"):
        autocast_copy(_base(), torch.float32)


@pytest.mark.parametrize("path", ["reference_path", "triton_path"])
def test_same_targets_as_the_fp32_base_under_autocast_with_fewer_casts(request, path):
    request.getfixturevalue(path)
    base = _base()
    images = torch.randn(3, 3, 24, 24, generator=torch.Generator().manual_seed(1))
    want, casts_fp32 = _targets(base, images)
    got, casts_low = _targets(autocast_copy(base, torch.bfloat16), images)
    for name in ("features", "relation", "topk_idx"):
        assert torch.equal(getattr(got, name), getattr(want, name)), name
    # the copy skips the casts of every GEMM layer's weight and bias: four per block, and the
    # patch embedding (what is left: the small tokens, the position table, the fp32 features)
    assert casts_fp32 - casts_low == 2 * (4 * len(base.blocks) + 1), (casts_fp32, casts_low)


def test_fit_gives_a_bf16_run_the_copy_and_an_fp32_run_the_base():
    base = _base()
    objective = TECObjective(base, 0.75, base.config.num_patches)
    assert objective.base is base
    objective.prepare(torch.device("cpu"), torch.bfloat16)
    assert objective.base is not base and objective.base.blocks[0].attn.qkv.weight.dtype == torch.bfloat16
    objective.prepare(torch.device("cpu"), None)  # a later fp32 fit: the base it was given
    assert objective.base is base

    seen = []
    objective = tiny_objective()

    class Recording(TECObjective):
        def prepare(self, device, amp_dtype):
            seen.append((device.type, amp_dtype))
            super().prepare(device, amp_dtype)

    recording = Recording(objective.base, 0.75, objective.patches)
    cfg = FitConfig(epochs=1, batch_size=8, lr=1e-3, warmup_steps=1, progress=False, seed=0, precision="bf16")
    fit(tiny_tec(), recording, AugmentedImages(n=16), cfg)
    assert seen == [("cpu", torch.bfloat16)]
    assert recording.base_source is objective.base
    assert recording.base.blocks[0].mlp.fc1.weight.dtype == torch.bfloat16
