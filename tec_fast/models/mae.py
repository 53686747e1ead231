"""MAE (He et al., "Masked Autoencoders Are Scalable Vision Learners"): the standard way to make
a first base model. Masked patch-pixel reconstruction with per-patch normalised targets, loss on
the removed patches only.

Parameter names are those of the MAE release (``patch_embed.proj``, ``cls_token``, ``pos_embed``,
``blocks.{i}``, ``norm``, ``decoder_embed``, ``mask_token``, ``decoder_pos_embed``,
``decoder_blocks.{i}``, ``decoder_norm``, ``decoder_pred``), so a released MAE checkpoint with its
decoder loads into ``MAEModel`` by ``load_state_dict`` and ``encoder_state_dict()`` is a valid
base model for ``BaseModel.load_checkpoint``.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
import torch.nn as nn

from tec_fast.config import ViTConfig
from tec_fast.models.layers import (LN_EPS, Block, PatchEmbed, apply_norm, check_images, init_vit_weights,
                                    run_blocks, sincos_pos_embed)
from tec_fast.models.layout import TokenLayout
from tec_fast.models.masking import random_masking
from tec_fast.ops.reference import loss_dtype


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """[B, c, S, S] -> [B, L, p*p*c], patches row-major, pixels (row, column, channel) within a
    patch: MAE's layout, so released ``decoder_pred`` weights mean the same thing here."""
    B, c, S, _ = images.shape
    g = S // patch_size
    x = images.reshape(B, c, g, patch_size, g, patch_size)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(B, g * g, patch_size * patch_size * c)


class MAEModel(nn.Module):
    """``model(images, mask_ratio=0.75, noise=None) -> {'loss': 0-dim tensor}``.

    Defaults are MAE's ViT-B recipe decoder (512 wide, 8 blocks, 16 heads) and ``norm_pix_loss``
    (each target patch normalised by its own pixel mean and unbiased variance, eps 1e-6).
    Encoder and decoder run the path ``TECModel`` runs: a dense ``TokenLayout`` gathers and
    scatters the tokens, ``run_blocks`` runs the blocks, ``apply_norm`` the final norms.
    """

    def __init__(self, vit: ViTConfig, decoder_dim: int = 512, decoder_depth: int = 8,
                 decoder_heads: int = 16, norm_pix_loss: bool = True):
        super().__init__()
        if not isinstance(vit, ViTConfig):
            raise ValueError(f"MAEModel: vit must be a ViTConfig, got {type(vit).__name__}")
        for name, value in (("decoder_dim", decoder_dim), ("decoder_depth", decoder_depth),
                            ("decoder_heads", decoder_heads)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"MAEModel: {name} must be a positive int, got {value!r}")
        if decoder_dim % decoder_heads:
            raise ValueError(f"MAEModel: decoder_dim ({decoder_dim}) must be divisible by "
                             f"decoder_heads ({decoder_heads})")
        for name, dim in (("vit.embed_dim", vit.embed_dim), ("decoder_dim", decoder_dim)):
            if dim % 4:
                raise ValueError(f"MAEModel: {name} ({dim}) must be divisible by 4 for the 2-D "
                                 f"sin-cos position embedding")
        self.config = vit
        self._grid = (vit.grid_size, vit.grid_size)
        self.decoder_dim, self.decoder_depth, self.decoder_heads = decoder_dim, decoder_depth, decoder_heads
        self.norm_pix_loss = bool(norm_pix_loss)
        C, Cd, p = vit.embed_dim, decoder_dim, vit.patch_size

        self.patch_embed = PatchEmbed(p, vit.in_chans, C)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, C))
        self.register_buffer("pos_embed", sincos_pos_embed(C, vit.grid_size).unsqueeze(0))
        self.blocks = nn.ModuleList([Block(C, vit.num_heads, vit.mlp_ratio) for _ in range(vit.depth)])
        self.norm = nn.LayerNorm(C, eps=LN_EPS)

        self.decoder_embed = nn.Linear(C, Cd)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, Cd))
        self.register_buffer("decoder_pos_embed", sincos_pos_embed(Cd, vit.grid_size).unsqueeze(0))
        self.decoder_blocks = nn.ModuleList(
            [Block(Cd, decoder_heads, vit.mlp_ratio) for _ in range(decoder_depth)])
        self.decoder_norm = nn.LayerNorm(Cd, eps=LN_EPS)
        self.decoder_pred = nn.Linear(Cd, p * p * vit.in_chans)

        init_vit_weights(self)
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)

    def config_dict(self) -> dict:
        """Everything needed to rebuild this model: ``MAEModel(ViTConfig(**d['vit']), **rest)``."""
        return {"vit": self.config.to_dict(), "decoder_dim": self.decoder_dim,
                "decoder_depth": self.decoder_depth, "decoder_heads": self.decoder_heads,
                "norm_pix_loss": self.norm_pix_loss}

    def encode(self, layout: TokenLayout, images: torch.Tensor) -> torch.Tensor:
        """The visible tokens of ``layout`` (CLS first) through the encoder and its final
        LayerNorm, the path ``TECModel.encode`` takes: [B, 1+K, C] (dense layout)."""
        x = self.patch_embed(images)  # [B, L, C]
        x = layout.encoder_input(x, self.cls_token, layout.pos_table(x.shape[-1], self.pos_embed, self._grid))
        h, m, _, _ = run_blocks(self.blocks, x, **layout.encoder_attention())
        return apply_norm(self.norm, m, residual=h)  # norm(h + m)

    def decode(self, layout: TokenLayout, latent: torch.Tensor) -> torch.Tensor:
        """Mask tokens in, original order restored, decoder blocks; pixel predictions of every
        patch, [B, L, p*p*c]."""
        y = self.decoder_embed(latent)  # [B, 1+K, Cd]
        pos = layout.pos_table(y.shape[-1], self.decoder_pos_embed, self._grid)
        x = layout.decoder_input(y, self.mask_token, pos)  # [B, 1+L, Cd]
        h, m, _, _ = run_blocks(self.decoder_blocks, x, **layout.decoder_attention(1))
        return layout.patch_rows(self.decoder_pred(apply_norm(self.decoder_norm, m, residual=h)))

    def patch_loss(self, images: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean squared error per patch (over its pixels), averaged over the removed patches
        (mask = 1) only. Computed in fp32 (float64 in a float64 model)."""
        acc = loss_dtype(pred.dtype)
        target = patchify(images, self.config.patch_size).to(acc)  # [B, L, p*p*c]
        if self.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / torch.sqrt(var + 1e-6)
        per_patch = ((pred.to(acc) - target) ** 2).mean(dim=-1)  # [B, L]
        mask = mask.to(acc)
        return (per_patch * mask).sum() / mask.sum()

    def forward(self, images: torch.Tensor, mask_ratio: float = 0.75,
                noise: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
        vit = self.config
        check_images(images, vit.in_chans, vit.img_size)
        B = images.shape[0]
        layout = TokenLayout([self._grid] * B, images.device).with_masking(
            random_masking(B, vit.num_patches, mask_ratio, noise=noise, device=images.device))
        pred = self.decode(layout, self.encode(layout, images))
        return {"loss": self.patch_loss(images, pred, layout.mask)}

    def encoder_state_dict(self) -> Dict[str, torch.Tensor]:
        """The encoder in the MAE release layout (what ``{'model': sd}`` of
        ``mae_pretrain_vit_base.pth`` holds): patch_embed, cls_token, pos_embed, blocks, norm.
        Detached copies, safe to save while training goes on."""
        keep = ("patch_embed.", "cls_token", "pos_embed", "blocks.", "norm.")
        return {k: v.detach().clone() for k, v in self.state_dict().items() if k.startswith(keep)}
