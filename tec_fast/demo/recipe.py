"""The demo's recipes, in one place: how the shipped base was made (``BASE_RECIPE``, what
``--demo-make-base`` runs) and what each demo mode trains from it (``PLANS``).

Every stage has a fixed step count: a busy machine only takes longer, it never changes a number.
The MAE-continued stage gets the same compute as the TEC stage, matched by counted FLOPs
(``tec_fast.demo.compute``), not by wall-clock time.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Optional

DEMO_MODEL = "vit_demo_patch4"   # ViT dim 128, depth 6, 4 heads, patch 4 (tec_fast.presets)
DEMO_IMG = 32


@dataclass(frozen=True)
class BaseRecipe:
    """MAE pretraining of the demo base (the stand-in for a released checkpoint)."""

    steps: int = 3100
    batch_size: int = 128
    lr: float = 1.5e-3
    warmup_steps: int = 155            # 5% of the steps
    mask_ratio: float = 0.75
    decoder_dim: int = 128
    decoder_depth: int = 2
    decoder_heads: int = 4
    seed: int = 0
    data_seed: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class DemoPlan:
    """What the demo trains from the base: a TEC stage, and the base trained further with MAE for
    the same counted FLOPs (``mae_lr``, its own warmup + cosine)."""

    mode: str
    tec_steps: int
    tec_lr: float = 1.5e-3
    mae_lr: float = 1.5e-3
    batch_size: int = 128
    warmup_frac: float = 0.05
    mask_ratio: float = 0.75
    decoder_dim: int = 128
    decoder_depth: int = 2
    decoder_heads: int = 4
    topk: int = 15
    tau: float = 1.8
    last_layers: int = 2
    n_train: Optional[int] = None      # class-balanced subsets (tiny mode)
    n_test: Optional[int] = None
    make_base: bool = False            # train the base first (``--demo-from-scratch``)

    def warmup(self, steps: int) -> int:
        return max(1, int(self.warmup_frac * steps))

    def to_dict(self) -> dict:
        return asdict(self)


BASE_RECIPE = BaseRecipe()
PLANS = {
    "default": DemoPlan("default", tec_steps=1500, batch_size=32, decoder_dim=64),
    "tiny": DemoPlan("tiny", tec_steps=20, batch_size=64, n_train=512, n_test=200),
}
PLANS["from_scratch"] = replace(PLANS["default"], mode="from_scratch", make_base=True)
