"""The new model of TEC (docs/tec.md §2-3): masked encoder, input and encoder adapters, and the
feature and relation decoders that share their transformer blocks."""
from __future__ import annotations

import numbers
from typing import Dict, Optional, Union

import torch
import torch.nn as nn

from tec_fast.models.base import BaseTargets
from tec_fast.config import TECConfig
from tec_fast.models.layers import (LN_EPS, Block, Mlp, PatchEmbed, apply_norm, check_images, init_vit_weights,
                                    run_blocks, sincos_pos_embed)
from tec_fast.models.layout import TokenLayout
from tec_fast.models.masking import check_mask_ratio, random_masking, variable_masking
from tec_fast.models.adapter import EncoderAdapter


class FeatureDecoderHead(nn.Module):
    """Stream-specific parts of the feature decoder (names as the official checkpoints)."""

    def __init__(self, dim: int, decoder_dim: int, pred_dim: int):
        super().__init__()
        self.decoder_embed = nn.Linear(dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        self.decoder_norm = nn.LayerNorm(decoder_dim, eps=LN_EPS)
        self.decoder_pred = nn.Linear(decoder_dim, pred_dim)


class RelationDecoderHead(nn.Module):
    """Stream-specific parts of the relation decoder: its own embed, mask token, norm and q/k head."""

    def __init__(self, dim: int, decoder_dim: int, pred_dim: int):
        super().__init__()
        self.decoder_embed = nn.Linear(dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        self.decoder_norm = nn.LayerNorm(decoder_dim, eps=LN_EPS)
        self.decoder_qk = nn.Linear(decoder_dim, 2 * pred_dim)


class TECModel(nn.Module):
    """``model(images, targets, mask_ratio=0.75, noise=None)`` -> {'loss', 'feature', 'relation'}."""

    def __init__(self, cfg: TECConfig):
        super().__init__()
        if not isinstance(cfg, TECConfig):
            raise ValueError(f"TECModel: cfg must be a TECConfig, got {type(cfg).__name__}")
        self.config = cfg
        enc = cfg.encoder
        C, Cd = enc.embed_dim, cfg.decoder_dim
        self.patch_embed = PatchEmbed(enc.patch_size, enc.in_chans, C)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, C))
        self.register_buffer("pos_embed", sincos_pos_embed(C, enc.grid_size).unsqueeze(0))
        self.blocks = nn.ModuleList([Block(C, enc.num_heads, enc.mlp_ratio) for _ in range(enc.depth)])
        self.norm = nn.LayerNorm(C, eps=LN_EPS)
        if cfg.input_adapter:
            self.cls_token_mlp = Mlp(C, enc.mlp_hidden)
        self.encoder_adaptor = EncoderAdapter(C, enc.depth, cfg.num_adapters, 4 * Cd)
        self.forward_fea_decoder = FeatureDecoderHead(C, Cd, cfg.pred_dim)
        if cfg.relation:
            self.forward_att_decoder = RelationDecoderHead(C, Cd, cfg.pred_dim)
        self.decoder_blocks = nn.ModuleList(
            [Block(Cd, cfg.decoder_heads, enc.mlp_ratio) for _ in range(cfg.decoder_depth)])
        self.register_buffer("decoder_pos_embed", sincos_pos_embed(Cd, enc.grid_size).unsqueeze(0))
        init_vit_weights(self)
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.forward_fea_decoder.mask_token, std=0.02)
        if cfg.relation:
            nn.init.normal_(self.forward_att_decoder.mask_token, std=0.02)

    # ----------------------------------------------------------------------------------------
    def load_checkpoint(self, path_or_state: Union[str, dict]):
        """Load the official TEC pretraining layout or the engine's own checkpoint."""
        from tec_fast.checkpoint import load_tec_checkpoint
        return load_tec_checkpoint(self, path_or_state)

    def cls_embedding(self) -> torch.Tensor:
        """The CLS token the encoder sees, before its position embedding: MLP(cls) or cls. [1, 1, C]"""
        return self.cls_token_mlp(self.cls_token) if self.config.input_adapter else self.cls_token

    def layout_for(self, batch: int, mask_ratio=0.75, noise: Optional[torch.Tensor] = None,
                   keep: Optional[torch.Tensor] = None, device=None) -> TokenLayout:
        """The token layout of one step on B images of the configured size: a float
        ``mask_ratio`` gives the dense layout (every image keeps K = int(L * (1 - r))), one ratio
        per image or a ``keep`` [B, L] bool mask (True = visible) the packed one."""
        enc = self.config.encoder
        layout = TokenLayout([(enc.grid_size, enc.grid_size)] * batch, device)
        if keep is not None:
            return layout.with_keep(keep)
        L = enc.num_patches
        check_mask_ratio(mask_ratio)  # its type (no value read): a number, or one per image
        if (isinstance(mask_ratio, torch.Tensor) and mask_ratio.dim() == 0) or isinstance(mask_ratio, numbers.Real):
            mask_ratio = float(mask_ratio)  # a 0-dim tensor or a NumPy scalar: one ratio for all
            return layout.with_masking(random_masking(batch, L, mask_ratio, noise=noise, device=device))
        keep, _ = variable_masking(batch, L, mask_ratio, noise=noise, device=device)
        return layout.with_keep(keep)

    def encode(self, layout: TokenLayout, pixels: torch.Tensor) -> torch.Tensor:
        """The visible tokens of ``layout`` through the encoder: every block's output stacked,
        [D, B, 1+K, C] (dense) or [D, T_e, C] (packed), the last one after the final LayerNorm.
        ``pixels``: images [B, 3, S, S] or flattened patches [sum L_b, 3*p*p]."""
        x = self.patch_embed(pixels)  # [B, L, C] or [sum L_b, C]
        x = layout.encoder_input(x, self.cls_embedding(), self.pos_table(layout, self.pos_embed))
        depth = len(self.blocks)
        h, m, outs, _ = run_blocks(self.blocks, x, outputs=range(depth - 1), **layout.encoder_attention())
        outs = [outs[i] for i in range(depth - 1)] + [apply_norm(self.norm, m, residual=h)]  # norm(h + m)
        # One copy into the [D, B, T, C] layout the adapter's fused LayerNorm reads. Writing the
        # blocks' outputs straight into a preallocated buffer would need a custom autograd
        # function: in-place writes bump the version of tensors the next block saved.
        return torch.stack(outs)

    def pos_table(self, layout: TokenLayout, stored: torch.Tensor) -> torch.Tensor:
        """``stored`` (the encoder's or the decoder's sin-cos table) for the model's own grid,
        sin-cos computed for any other grid of the layout."""
        g = self.config.encoder.grid_size
        return layout.pos_table(stored.shape[-1], stored, (g, g))

    def forward(self, images: torch.Tensor, targets: BaseTargets, mask_ratio=0.75,
                noise: Optional[torch.Tensor] = None,
                keep: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
        """One TEC loss evaluation.

        ``mask_ratio``: a float (every image keeps K = int(L * (1 - r)) patches: dense batched
        encoder), or one ratio per image ([B] tensor or sequence: packed encoder). ``keep`` [B, L]
        bool (True = visible), e.g. block-wise masks, overrides the ratio (packed encoder).
        ``noise`` [B, L] makes the random masking reproducible (docs/tec.md §2). A batch in which no
        patch is hidden (ratio 0) is refused; with per-image ratios or masks an image with no
        hidden patch is allowed and adds nothing to the feature loss.
        """
        enc = self.config.encoder
        check_images(images, enc.in_chans, enc.img_size)
        layout = self.layout_for(images.shape[0], mask_ratio, noise, keep, images.device)
        return self.forward_layout(layout, images, targets)

    def forward_layout(self, layout: TokenLayout, pixels: torch.Tensor, targets) -> Dict[str, torch.Tensor]:
        """The TEC loss (docs/tec.md §2-3) on any token layout: the one encoder, decoder and loss path."""
        cfg = self.config
        layout.check_hidden()
        features, relation, topk_idx = layout.targets(targets, cfg.pred_dim, cfg.pred_heads, cfg.relation)
        feats = self.encode(layout, pixels)
        packed = feats.dim() == 3  # [D, T_e, C]
        latent = self.encoder_adaptor(feats.unsqueeze(1) if packed else feats)
        latent = latent[0] if packed else latent  # [B, 1+K, C] or [T_e, C]

        heads = [self.forward_fea_decoder] + ([self.forward_att_decoder] if cfg.relation else [])
        dpos = self.pos_table(layout, self.decoder_pos_embed)
        # Both streams go through the shared decoder blocks in one pass, stacked along dim 0.
        x = torch.cat([layout.decoder_input(h.decoder_embed(latent), h.mask_token, dpos) for h in heads])
        h, m, _, _ = run_blocks(self.decoder_blocks, x, **layout.decoder_attention(len(heads)))
        streams = layout.split_streams(h + m)

        fea = self.forward_fea_decoder
        pred = layout.patch_rows(fea.decoder_pred(apply_norm(fea.decoder_norm, streams[0])))  # [B, L, Cb] / [T_p, Cb]
        qk = None
        if cfg.relation:
            att = self.forward_att_decoder
            qk = att.decoder_qk(apply_norm(att.decoder_norm, streams[1]))  # [B, N, 2*Cb] / [T_d, 2*Cb]
        with torch.autocast(pred.device.type, enabled=False):  # the loss ops compute in fp32
            loss_f = layout.feature_loss(pred, features)
            if qk is None:
                loss_r = torch.zeros((), device=pred.device)
            else:
                loss_r = layout.relation_loss(qk, cfg.pred_heads, topk_idx, relation, cfg.tau,
                                              cfg.pred_dim ** -0.5)
        loss = cfg.feature_weight * loss_f + cfg.relation_weight * loss_r
        return {"loss": loss, "feature": loss_f, "relation": loss_r}
