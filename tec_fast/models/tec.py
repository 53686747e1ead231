"""The new model of TEC (SPEC.md §2-3): masked encoder, input and encoder adapters, and the
feature and relation decoders that share their transformer blocks."""
from __future__ import annotations

from typing import Dict, Optional, Union

import torch
import torch.nn as nn

from tec_fast import ops
from tec_fast.models.base import BaseTargets
from tec_fast.config import TECConfig
from tec_fast.models.layers import LN_EPS, Block, Mlp, PatchEmbed, check_images, init_vit_weights, sincos_pos_embed
from tec_fast.models.masking import random_masking, variable_masking
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

    def forward_encoder(self, images: torch.Tensor, ids_keep: torch.Tensor) -> torch.Tensor:
        """Visible tokens through the encoder; returns every block's output stacked, [D, B, 1+K, C]
        (the last one through the final LayerNorm), the encoder adapter's input."""
        x = self.patch_embed(images)  # [B, L, C]
        pos = self.pos_embed[0].to(x.dtype)
        x = ops.masked_gather(x, ids_keep, pos[1:])  # [B, K, C]
        cls = (self.cls_embedding() + self.pos_embed[:, :1]).to(x.dtype)
        x = torch.cat([cls.expand(x.shape[0], -1, -1), x], dim=1)  # [B, 1+K, C]
        outs = []
        for blk in self.blocks:
            x = blk(x)
            outs.append(x)
        outs[-1] = self.norm(x)
        # One copy into the [D, B, T, C] layout the adapter's fused LayerNorm reads. Writing the
        # blocks' outputs straight into a preallocated buffer would need a custom autograd
        # function: in-place writes bump the version of tensors the next block saved.
        return torch.stack(outs)

    def forward_encoder_packed(self, images: torch.Tensor, keep: torch.Tensor):
        """Variable visible counts: the CLS token and the kept patches of every image packed into
        one sequence, block-diagonal attention, no padding. Returns the stacked block outputs
        [D, T, C] and ``index`` [T] (each packed token's flat position b*N + j in the [B, N] grid)."""
        from tec_fast import packing

        x = self.patch_embed(images)  # [B, L, C]
        B = x.shape[0]
        pos = self.pos_embed.to(x.dtype)
        cls = (self.cls_embedding() + self.pos_embed[:, :1]).to(x.dtype).expand(B, -1, -1)
        tokens = torch.cat([cls, x + pos[:, 1:]], dim=1)  # [B, N, C]
        keep_all = torch.cat([torch.ones_like(keep[:, :1]), keep], dim=1)  # CLS always kept
        x, cu_seqlens, max_len, index = packing.pack(tokens, keep_all)  # [T, C]
        outs = []
        for blk in self.blocks:
            x = blk(x, cu_seqlens=cu_seqlens, max_len=max_len)
            outs.append(x)
        outs[-1] = self.norm(x)
        return torch.stack(outs), index

    def _decoder_input_packed(self, head: nn.Module, latent: torch.Tensor, index: torch.Tensor,
                              B: int) -> torch.Tensor:
        from tec_fast import packing

        y = head.decoder_embed(latent)  # [T, Cd]
        N = self.decoder_pos_embed.shape[1]
        out = packing.unpack(y, index, head.mask_token.reshape(-1).to(y.dtype), (B, N))
        return out + self.decoder_pos_embed.to(y.dtype)

    def _decoder_input(self, head: nn.Module, latent: torch.Tensor,
                       ids_restore: torch.Tensor) -> torch.Tensor:
        """decoder_embed, mask-token fill, unshuffle, CLS in front, decoder position add. [B, N, Cd]"""
        y = head.decoder_embed(latent)  # [B, 1+K, Cd]
        pos = self.decoder_pos_embed[0].to(y.dtype)
        patches = ops.scatter_masked(y[:, 1:], ids_restore, head.mask_token.reshape(-1), pos[1:])
        return torch.cat([y[:, :1] + pos[:1], patches], dim=1)

    def _check_targets(self, targets: BaseTargets, B: int) -> None:
        cfg = self.config
        L = cfg.encoder.num_patches
        feats = getattr(targets, "features", None)
        if not isinstance(feats, torch.Tensor) or tuple(feats.shape) != (B, L, cfg.pred_dim):
            raise ValueError(f"targets.features must be [B, L, pred_dim] = {(B, L, cfg.pred_dim)}, got "
                             f"{tuple(getattr(feats, 'shape', ())) or type(feats).__name__}")
        if cfg.relation:
            rel, idx = getattr(targets, "relation", None), getattr(targets, "topk_idx", None)
            if rel is None or idx is None:
                raise ValueError("targets.relation / targets.topk_idx are None but TECConfig.relation=True: "
                                 "build the BaseModel with topk set, or set relation=False")
            if idx.dim() != 2 or idx.shape[0] != B:
                raise ValueError(f"targets.topk_idx must be [B={B}, k], got {tuple(idx.shape)}")
            want = (B, 1 + idx.shape[1], cfg.pred_heads, L)
            if tuple(rel.shape) != want:
                raise ValueError(f"targets.relation must be [B, 1+k, pred_heads, L] = {want}, "
                                 f"got {tuple(rel.shape)}")

    def forward(self, images: torch.Tensor, targets: BaseTargets, mask_ratio=0.75,
                noise: Optional[torch.Tensor] = None,
                keep: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
        """One TEC loss evaluation.

        ``mask_ratio``: a float (every image keeps K = int(L * (1 - r)) patches: dense batched
        encoder), or one ratio per image ([B] tensor or sequence: packed encoder). ``keep`` [B, L]
        bool (True = visible), e.g. block-wise masks, overrides the ratio (packed encoder).
        ``noise`` [B, L] makes the random masking reproducible (SPEC.md §2).
        """
        cfg, enc = self.config, self.config.encoder
        check_images(images, enc.in_chans, enc.img_size)
        B, L = images.shape[0], enc.num_patches
        self._check_targets(targets, B)
        heads = [self.forward_fea_decoder] + ([self.forward_att_decoder] if cfg.relation else [])

        if keep is None and isinstance(mask_ratio, (int, float)):
            m = random_masking(B, L, mask_ratio, noise=noise, device=images.device)
            mask = m.mask
            feats = self.forward_encoder(images, m.ids_keep)  # [D, B, 1+K, C]
            latent = self.encoder_adaptor(feats)              # [B, 1+K, C]
            inputs = [self._decoder_input(h, latent, m.ids_restore) for h in heads]
        else:
            if keep is None:
                keep, mask = variable_masking(B, L, mask_ratio, noise=noise, device=images.device)
            else:
                if not isinstance(keep, torch.Tensor) or keep.dtype != torch.bool \
                        or tuple(keep.shape) != (B, L):
                    raise ValueError(f"keep must be a bool tensor of shape [B, L] = {(B, L)}, got "
                                     f"{getattr(keep, 'dtype', type(keep).__name__)} "
                                     f"{tuple(getattr(keep, 'shape', ()))}")
                if not bool(keep.any(dim=1).all()) or bool(keep.all(dim=1).any()):
                    raise ValueError("keep must leave every image at least one visible and one masked patch")
                keep = keep.to(images.device)
                mask = (~keep).float()
            feats, index = self.forward_encoder_packed(images, keep)  # [D, T, C]
            latent = self.encoder_adaptor(feats.unsqueeze(1))[0]      # [T, C]
            inputs = [self._decoder_input_packed(h, latent, index, B) for h in heads]

        # Both streams go through the shared decoder blocks in one pass, stacked along the batch.
        x = torch.cat(inputs, dim=0)
        for blk in self.decoder_blocks:
            x = blk(x)
        streams = x.split(B, dim=0)

        fea = self.forward_fea_decoder
        pred = fea.decoder_pred(fea.decoder_norm(streams[0]))[:, 1:]  # [B, L, Cb]
        loss_f = ops.patch_norm_mse(pred, targets.features, mask)
        if cfg.relation:
            att = self.forward_att_decoder
            qk = att.decoder_qk(att.decoder_norm(streams[1]))  # [B, N, 2*Cb]
            Hb = cfg.pred_heads
            qk = qk.reshape(B, L + 1, 2, Hb, cfg.pred_dim // Hb).permute(2, 0, 3, 1, 4)
            loss_r = ops.relation_loss(qk[0], qk[1], targets.topk_idx, targets.relation,
                                       cfg.tau, cfg.pred_dim ** -0.5)
        else:
            loss_r = torch.zeros((), device=images.device)
        loss = cfg.feature_weight * loss_f + cfg.relation_weight * loss_r
        return {"loss": loss, "feature": loss_f, "relation": loss_r}
