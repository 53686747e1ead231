"""The training recipe of docs/tec.md §4 and the per-base target recipes of §1, pinned: each value
written out here from the paper's recipe, never read from the code under test. A default
changed by mistake (betas, weight decay, blr, warmup, mask ratio, a base's top-k) trains a
different model without any other test noticing."""
from __future__ import annotations

import pytest
import torch

from tec_fast.presets import BASE_RECIPES, parse_base
from tec_fast.training import FitConfig, fit
from tec_fast.training.optim import plan_schedule
from train_helpers import AugmentedImages, tiny_objective, tiny_tec


def test_fit_config_defaults_are_the_reference_recipe():
    cfg = FitConfig()
    assert cfg.blr == 1.5e-4 and cfg.lr is None and cfg.min_lr == 0.0
    assert cfg.betas == (0.9, 0.95) and cfg.weight_decay == 0.05
    assert cfg.warmup_epochs == 40.0 and cfg.warmup_steps is None
    assert cfg.clip_grad is None


def test_train_command_defaults_are_the_reference_recipe():
    from tec_fast.cli.train import build_parser, fit_config
    args = build_parser().parse_args([])
    assert args.mask_ratio == 0.75 and args.blr == 1.5e-4 and args.lr is None
    assert args.weight_decay == 0.05 and args.warmup_epochs == 40.0 and args.min_lr == 0.0
    cfg = fit_config(args, None, "fp32")  # what the command hands to fit
    assert cfg.blr == 1.5e-4 and cfg.betas == (0.9, 0.95) and cfg.weight_decay == 0.05
    assert cfg.warmup_epochs == 40.0


def test_linear_scaling_rule_and_warmup_length():
    """lr = blr x global batch / 256: the paper's 4096 images a step give 1.5e-4 x 16 = 2.4e-3;
    40 warmup epochs of 10 steps are 400 steps."""
    cfg = FitConfig(epochs=100)
    s = plan_schedule(cfg, images_per_step=4096, steps_per_epoch=10)
    assert s.peak_lr == pytest.approx(2.4e-3, rel=1e-12) and s.global_batch == 4096
    assert s.warmup_steps == 400 and s.total_steps == 1000
    assert plan_schedule(FitConfig(epochs=100, blr=1e-3), 512, 10).peak_lr == pytest.approx(2e-3, rel=1e-12)
    assert plan_schedule(FitConfig(epochs=100, lr=0.01), 4096, 10).peak_lr == 0.01  # an absolute lr wins


def test_fit_builds_adamw_with_the_recipe(monkeypatch):
    """The optimizer fit() runs: AdamW with betas (0.9, 0.95), weight decay 0.05 on the weight
    matrices and 0 on the 1-D parameters, at the peak lr blr x batch / 256 (one warmup step, and
    the half cosine's first step is at its top)."""
    from tec_fast.training import loop

    made = {}
    build = loop.build_optimizer

    def spy(*args, **kwargs):
        made["opt"], name = build(*args, **kwargs)
        return made["opt"], name

    monkeypatch.setattr(loop, "build_optimizer", spy)
    model = tiny_tec()
    cfg = FitConfig(max_steps=2, batch_size=4, warmup_steps=1, progress=False, num_workers=0)
    fit(model, tiny_objective(), AugmentedImages(8), cfg)
    groups = made["opt"].param_groups
    assert all(g["betas"] == (0.9, 0.95) for g in groups)
    assert sorted(g["weight_decay"] for g in groups) == [0.0, 0.05]
    peak = 1.5e-4 * 4 / 256
    assert all(g["lr"] == pytest.approx(peak, rel=1e-12) for g in groups)
    assert isinstance(made["opt"], torch.optim.AdamW)


@pytest.mark.parametrize("kind, last_layers, topk, tau", [
    ("mae_vit_base", 2, 15, 1.8), ("mae_vit_large", 2, 15, 1.4), ("ibot_vit_base", 2, 9, 1.0),
    ("dino_vit_base", 2, 15, 1.8), ("tec", 2, 15, 1.8), ("timm", 2, 15, 1.8)])
def test_base_recipes(kind, last_layers, topk, tau):
    """docs/tec.md §1's table (an untuned base takes the 'other' row: 2, 15, 1.8)."""
    r = BASE_RECIPES[kind]
    assert (r.last_layers, r.topk, r.tau) == (last_layers, topk, tau)
    got_kind, path, recipe = parse_base(f"{kind}:/weights/{kind}.pth")
    assert (got_kind, path, recipe.topk, recipe.tau) == (kind, f"/weights/{kind}.pth", topk, tau)
