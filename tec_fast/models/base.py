"""The frozen base model: a plain ViT that gives TEC its targets (SPEC.md §1)."""
from __future__ import annotations

from typing import NamedTuple, Optional, Union

import torch
import torch.nn as nn

from tec_fast import ops
from tec_fast.config import ViTConfig
from tec_fast.models.layers import LN_EPS, Block, PatchEmbed, check_images, init_vit_weights, sincos_pos_embed


class BaseTargets(NamedTuple):
    features: torch.Tensor             # [B, L, Cb] mean of the last blocks' patch outputs
    relation: Optional[torch.Tensor]   # [B, 1+k, Hb, L] last-block logits, CLS + top-k rows
    topk_idx: Optional[torch.Tensor]   # [B, k] patch indices, most attended first


class BaseModel(nn.Module):
    """A standard ViT (MAE / iBOT / DINO / TEC encoder), frozen, always in eval mode.

    ``base(images)`` runs on the full image under no_grad and returns ``BaseTargets``.
    ``topk=None`` gives feature targets only.
    """

    def __init__(self, vit: ViTConfig, last_layers: int = 2, topk: Optional[int] = 15):
        super().__init__()
        if not isinstance(vit, ViTConfig):
            raise ValueError(f"BaseModel: vit must be a ViTConfig, got {type(vit).__name__}")
        if isinstance(last_layers, bool) or not isinstance(last_layers, int) \
                or not 1 <= last_layers <= vit.depth:
            raise ValueError(f"BaseModel: last_layers must be an int in [1, depth={vit.depth}], "
                             f"got {last_layers!r}")
        if topk is not None and (isinstance(topk, bool) or not isinstance(topk, int)
                                 or not 1 <= topk <= vit.num_patches):
            raise ValueError(f"BaseModel: topk must be None or an int in [1, L={vit.num_patches}], "
                             f"got {topk!r}")
        self.config, self.last_layers, self.topk = vit, last_layers, topk
        C = vit.embed_dim
        self.patch_embed = PatchEmbed(vit.patch_size, vit.in_chans, C)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, C))
        # Learned for iBOT/DINO, sin-cos for MAE: whatever the checkpoint holds. Sin-cos until loaded.
        self.pos_embed = nn.Parameter(sincos_pos_embed(C, vit.grid_size).unsqueeze(0))
        self.blocks = nn.ModuleList([Block(C, vit.num_heads, vit.mlp_ratio) for _ in range(vit.depth)])
        self.norm = nn.LayerNorm(C, eps=LN_EPS)  # not used for targets; kept so checkpoints round-trip
        init_vit_weights(self)
        nn.init.normal_(self.cls_token, std=0.02)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "BaseModel":
        return super().train(False)  # frozen: always eval mode

    def load_checkpoint(self, path_or_state: Union[str, dict]):
        """Load MAE / iBOT / DINO / timm / TEC-released / TEC-raw weights (SPEC.md §5)."""
        from tec_fast.checkpoint import load_base_checkpoint
        return load_base_checkpoint(self, path_or_state)

    def _embed(self, images: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        check_images(images, cfg.in_chans, cfg.img_size)
        w = self.patch_embed.proj.weight
        if not torch.is_autocast_enabled(images.device.type):
            images = images.to(w.dtype)  # a base model cast to bf16 takes fp32 images
        x = self.patch_embed(images)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)
        return x + self.pos_embed.to(x.dtype)  # [B, N, C]

    @torch.no_grad()
    def encode(self, images: torch.Tensor, pool: str = "mean") -> torch.Tensor:
        """Frozen-feature embedding for evaluation (k-NN, linear probe): the final LayerNorm's
        output, averaged over the patch tokens (``pool='mean'``) or the CLS token (``'cls'``). [B, C]"""
        if pool not in ("mean", "cls"):
            raise ValueError(f"pool must be 'mean' or 'cls', got {pool!r}")
        x = self._embed(images)
        for blk in self.blocks:
            x = blk(x)
        x = self.norm(x)
        return (x[:, 1:].mean(dim=1) if pool == "mean" else x[:, 0]).float()

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> BaseTargets:
        cfg = self.config
        x = self._embed(images)
        feats = 0
        qk = None
        depth = len(self.blocks)
        for i, blk in enumerate(self.blocks):
            if i == depth - 1 and self.topk is not None:
                x, qk = blk(x, return_qk=True)
            else:
                x = blk(x)
            if i >= depth - self.last_layers:
                feats = feats + x[:, 1:].float()
        features = feats / self.last_layers  # [B, L, Cb], fp32
        if qk is None:
            return BaseTargets(features, None, None)
        scale = (cfg.embed_dim // cfg.num_heads) ** -0.5
        relation, topk_idx = ops.relation_targets(qk[0], qk[1], self.topk, scale)
        return BaseTargets(features, relation, topk_idx)
