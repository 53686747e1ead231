"""Named architectures and the per-base recipe defaults of docs/tec.md §1 (one table each)."""
from __future__ import annotations

from typing import Dict, NamedTuple

from tec_fast.config import ViTConfig

# name -> (patch_size, embed_dim, depth, num_heads); img_size comes from --img-size.
MODEL_PRESETS: Dict[str, tuple] = {
    "vit_tiny_patch16": (16, 192, 12, 3),
    "vit_small_patch16": (16, 384, 12, 6),
    "vit_base_patch16": (16, 768, 12, 12),
    "vit_large_patch16": (16, 1024, 24, 16),
    "vit_huge_patch14": (14, 1280, 32, 16),
    "vit_demo_patch4": (4, 128, 6, 4),  # the embedded demo, img_size 32
}


def vit_preset(name: str, img_size: int = 224) -> ViTConfig:
    if name not in MODEL_PRESETS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODEL_PRESETS)}")
    patch, dim, depth, heads = MODEL_PRESETS[name]
    return ViTConfig(img_size=img_size, patch_size=patch, embed_dim=dim, depth=depth, num_heads=heads)


class BaseRecipe(NamedTuple):
    last_layers: int  # feature targets: mean of this many last blocks
    topk: int         # relation targets: CLS row + top-k patch rows
    tau: float        # temperature on the relation targets
    note: str


# docs/tec.md §1 table. DINO, TEC-released and timm bases have no published recipe: "other" row.
# The base's architecture is read from its weights, and the new model's defaults to it.
BASE_RECIPES: Dict[str, BaseRecipe] = {
    "mae_vit_base": BaseRecipe(2, 15, 1.8, "MAE ViT-B/16 (reference recipe)"),
    "mae_vit_large": BaseRecipe(2, 15, 1.4, "MAE ViT-L/16 (reference recipe)"),
    "ibot_vit_base": BaseRecipe(2, 9, 1.0, "iBOT ViT-B/16 teacher (reference recipe)"),
    "dino_vit_base": BaseRecipe(2, 15, 1.8, "DINO ViT-B/16 (untuned 'other' defaults)"),
    "tec": BaseRecipe(2, 15, 1.8, "a TEC encoder, next round (untuned 'other' defaults)"),
    "timm": BaseRecipe(2, 15, 1.8, "a timm ViT state dict (untuned 'other' defaults)"),
}


def parse_base(spec: str):
    """``KIND:PATH`` -> (kind, path, BaseRecipe)."""
    kind, sep, path = spec.partition(":")
    if not sep or not path:
        raise ValueError(f"--base must be KIND:PATH, got {spec!r} (KIND one of {', '.join(BASE_RECIPES)})")
    if kind not in BASE_RECIPES:
        raise ValueError(f"--base kind {kind!r} is unknown; choose one of {', '.join(BASE_RECIPES)}")
    return kind, path, BASE_RECIPES[kind]
