"""Export of the new model's encoder as a timm ViT state dict."""
from __future__ import annotations

import re
from typing import Dict

import torch
import torch.nn as nn

from tec_fast.checkpoint.formats import fold_cls_mlp
_ENCODER_KEY = re.compile(r"^(patch_embed\.|cls_token$|pos_embed$|blocks\.|norm\.)")


def export_timm(model: nn.Module) -> Dict[str, torch.Tensor]:
    """The new model's encoder as a timm-style ViT state dict (``patch_embed.proj``, ``cls_token``,
    ``pos_embed``, ``blocks.{i}``, ``norm``), with MLP(cls) folded into ``cls_token``. Loads into
    timm's ``vit_*`` (num_classes=0) and into ``BaseModel`` for the next round of TEC."""
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    if "cls_token_mlp.fc1.weight" in state:
        state = fold_cls_mlp(state)
    return {k: v for k, v in state.items() if _ENCODER_KEY.match(k)}
