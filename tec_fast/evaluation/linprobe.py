"""MAE's linear probe (``main_linprobe.py``): the frozen encoder's CLS token (after its final
LayerNorm), a BatchNorm without affine parameters, then a linear head, trained with LARS
(momentum 0.9, no weight decay, trust 0.001) at lr = 0.1 x batch / 256 over a 16 384-image batch
for 90 epochs with 10 warmup epochs; RandomResizedCrop + flip. The numbers are the defaults of
``protocol.RECIPES['linprobe']``."""
from __future__ import annotations

import torch
import torch.nn as nn

from tec_fast.evaluation.lars import LARS


class LinearProbeModel(nn.Module):
    """``encoder`` (a frozen ``BaseModel``, run without gradients) -> pooled features ->
    BatchNorm1d(affine=False, eps=1e-6) -> Linear(num_classes), head weights ~ N(0, 0.01),
    truncated at 2 std."""

    def __init__(self, encoder: nn.Module, num_classes: int, pool: str = "cls", init_std: float = 0.01):
        super().__init__()
        dim = encoder.config.embed_dim
        self.encoder = encoder.requires_grad_(False)
        self.pool = pool
        self.bn = nn.BatchNorm1d(dim, affine=False, eps=1e-6)
        self.head = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=init_std)  # MAE's (timm's): cut at +-2, not at 2 std
        nn.init.zeros_(self.head.bias)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            features = self.encoder.pooled_features(images, self.pool)  # [B, C]
        return self.head(self.bn(features.float()))


def lars_optimizer(weight_decay: float = 0.0, momentum: float = 0.9):
    """``fit``'s ``make_optimizer``: LARS over the trainable parameters (the head)."""
    def make(model: nn.Module, lr: float):
        params = [p for p in model.parameters() if p.requires_grad]
        return LARS(params, lr=lr, weight_decay=weight_decay, momentum=momentum), \
            f"LARS (momentum {momentum}, trust 0.001)"
    return make
