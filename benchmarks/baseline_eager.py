"""The eager TEC step, the way the public reference code computes it (written from docs/tec.md).

It is the baseline every speed figure is measured against, and an independent oracle for the
engine's math: eager attention (q k^T, softmax) everywhere, the base model materialising its full
last-block N x N logits, the encoder adapter concatenating all block outputs, the two decoder
streams run separately through the shared blocks, and cat + gather for the decoder input.
Parameter names are the engine's (and the official checkpoints'), so ``load_state_dict`` takes
an engine model's weights.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from tec_fast.config import TECConfig, ViTConfig


def mae_sincos_pos_embed(dim: int, grid: int) -> torch.Tensor:
    """MAE's fixed 2-D sin-cos table [1 + grid^2, dim], computed as its numpy code does (a meshgrid
    with the column coordinate first: the first dim/2 channels encode the column, the last dim/2
    the row; each half sin then cos of pos * 10000^(-i / (dim/4)); a zero row for CLS). Written
    here apart from the engine's, so the oracle checks the engine's table too."""
    cols, rows = np.meshgrid(np.arange(grid, dtype=np.float64), np.arange(grid, dtype=np.float64))

    def half(pos: np.ndarray) -> np.ndarray:
        omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4))
        angles = np.outer(pos.reshape(-1), omega)  # [grid^2, dim/4]
        return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

    table = np.concatenate([np.zeros((1, dim)), np.concatenate([half(cols), half(rows)], axis=1)], axis=0)
    return torch.from_numpy(table).float()


class EagerAttention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads, self.scale = heads, (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, return_logits=False):
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        logits = (q @ k.transpose(-2, -1)) * self.scale  # [B, H, N, N]
        out = self.proj((logits.softmax(dim=-1) @ v).transpose(1, 2).reshape(B, N, C))
        return (out, logits) if return_logits else out


class EagerMlp(nn.Module):
    def __init__(self, dim, hidden, out=None):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, out or dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class EagerBlock(nn.Module):
    def __init__(self, dim, heads, mlp_ratio):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim, eps=1e-6), nn.LayerNorm(dim, eps=1e-6)
        self.attn = EagerAttention(dim, heads)
        self.mlp = EagerMlp(dim, int(dim * mlp_ratio))

    def forward(self, x, return_logits=False):
        if return_logits:
            a, logits = self.attn(self.norm1(x), True)
            x = x + a
            return x + self.mlp(self.norm2(x)), logits
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class EagerBase(nn.Module):
    def __init__(self, vit: ViTConfig, last_layers=2, topk=15):
        super().__init__()
        C = vit.embed_dim
        self.last_layers, self.topk = last_layers, topk
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(vit.in_chans, C, vit.patch_size, vit.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, C))
        self.pos_embed = nn.Parameter(torch.zeros(1, vit.num_patches + 1, C))
        self.blocks = nn.ModuleList([EagerBlock(C, vit.num_heads, vit.mlp_ratio) for _ in range(vit.depth)])
        self.norm = nn.LayerNorm(C, eps=1e-6)

    @torch.no_grad()
    def forward(self, imgs):
        x = self.patch_embed.proj(imgs).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        feature, relation, idx = 0, None, None
        for i, blk in enumerate(self.blocks):
            if self.topk and i == len(self.blocks) - 1:
                x, att = blk(x, return_logits=True)  # [B, H, N, N]: the full matrix
                idx = torch.topk(att[:, :, 0, 1:].mean(dim=1), self.topk, dim=1).indices
                rows = torch.gather(att[:, :, 1:].transpose(1, 2), 1,
                                    idx[:, :, None, None].expand(-1, -1, att.shape[1], att.shape[3]))
                relation = torch.cat([att[:, :, 0].unsqueeze(1), rows], dim=1)[..., 1:]
            else:
                x = blk(x)
            if i >= len(self.blocks) - self.last_layers:
                feature = feature + x[:, 1:]
        return feature / self.last_layers, relation, idx


class _Decoder(nn.Module):
    def __init__(self, dim, dec, out, relation):
        super().__init__()
        self.decoder_embed = nn.Linear(dim, dec)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dec))
        self.decoder_norm = nn.LayerNorm(dec, eps=1e-6)
        if relation:
            self.decoder_qk = nn.Linear(dec, 2 * out)
        else:
            self.decoder_pred = nn.Linear(dec, out)

    def assemble(self, x, ids_restore, pos):
        x = self.decoder_embed(x)
        B, T, C = x.shape
        masks = self.mask_token.repeat(B, ids_restore.shape[1] + 1 - T, 1)
        x_ = torch.cat([x[:, 1:], masks], dim=1)
        x_ = torch.gather(x_, 1, ids_restore.unsqueeze(-1).repeat(1, 1, C))
        return torch.cat([x[:, :1], x_], dim=1) + pos


class EagerTEC(nn.Module):
    def __init__(self, cfg: TECConfig):
        super().__init__()
        enc = cfg.encoder
        C, Cd = enc.embed_dim, cfg.decoder_dim
        self.cfg = cfg
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(enc.in_chans, C, enc.patch_size, enc.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, C))
        self.register_buffer("pos_embed", mae_sincos_pos_embed(C, enc.grid_size)[None])
        self.blocks = nn.ModuleList([EagerBlock(C, enc.num_heads, enc.mlp_ratio) for _ in range(enc.depth)])
        self.norm = nn.LayerNorm(C, eps=1e-6)
        if cfg.input_adapter:
            self.cls_token_mlp = EagerMlp(C, enc.mlp_hidden)
        G, M = cfg.num_adapters, enc.depth // cfg.num_adapters
        self.encoder_adaptor = nn.Module()
        self.encoder_adaptor.adap_before = nn.LayerNorm(C * enc.depth)  # eps 1e-5, as the reference
        self.encoder_adaptor.fuse_fcs = nn.ModuleList([nn.Linear(C * M, C) for _ in range(G)])
        self.encoder_adaptor.adap_mlps = nn.ModuleList([EagerMlp(C, 4 * Cd) for _ in range(G)])
        self.encoder_adaptor.adap_after = nn.LayerNorm(C)
        self.forward_fea_decoder = _Decoder(C, Cd, cfg.pred_dim, relation=False)
        if cfg.relation:
            self.forward_att_decoder = _Decoder(C, Cd, cfg.pred_dim, relation=True)
        self.decoder_blocks = nn.ModuleList(
            [EagerBlock(Cd, cfg.decoder_heads, enc.mlp_ratio) for _ in range(cfg.decoder_depth)])
        self.register_buffer("decoder_pos_embed", mae_sincos_pos_embed(Cd, enc.grid_size)[None])

    def forward(self, imgs, targets, mask_ratio=0.75, noise: Optional[torch.Tensor] = None):
        cfg = self.cfg
        feature_t, relation_t, idx = targets
        x = self.patch_embed.proj(imgs).flatten(2).transpose(1, 2) + self.pos_embed[:, 1:]
        B, L, C = x.shape
        K = int(L * (1 - mask_ratio))
        noise = torch.rand(B, L, device=x.device) if noise is None else noise
        ids_shuffle = torch.argsort(noise, dim=1)
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        x = torch.gather(x, 1, ids_shuffle[:, :K, None].repeat(1, 1, C))
        mask = torch.ones(B, L, device=x.device)
        mask[:, :K] = 0
        mask = torch.gather(mask, 1, ids_restore)
        cls = self.cls_token_mlp(self.cls_token) if cfg.input_adapter else self.cls_token
        x = torch.cat([(cls + self.pos_embed[:, :1]).expand(B, -1, -1), x], dim=1)
        outs = []
        for blk in self.blocks:
            x = blk(x)
            outs.append(x)
        outs[-1] = self.norm(x)
        ad = self.encoder_adaptor
        z = ad.adap_before(torch.cat(outs, dim=-1))
        latent = 0
        for g, chunk in enumerate(z.chunk(cfg.num_adapters, dim=-1)):
            u = ad.fuse_fcs[g](chunk)
            latent = latent + ad.adap_mlps[g](u) + u
        latent = ad.adap_after(latent)

        fd = self.forward_fea_decoder
        y = fd.assemble(latent, ids_restore, self.decoder_pos_embed)
        for blk in self.decoder_blocks:
            y = blk(y)
        pred = fd.decoder_pred(fd.decoder_norm(y))[:, 1:]
        mean = feature_t.mean(dim=1, keepdim=True)
        var = feature_t.var(dim=1, keepdim=True)
        target = (feature_t - mean) / (var + 1e-6) ** 0.5
        loss_f = (((pred - target) ** 2).mean(dim=-1) * mask).sum() / mask.sum()
        loss_r = torch.zeros((), device=imgs.device)
        if cfg.relation:
            ad_ = self.forward_att_decoder
            y = ad_.assemble(latent, ids_restore, self.decoder_pos_embed)
            for blk in self.decoder_blocks:
                y = blk(y)
            qk = ad_.decoder_qk(ad_.decoder_norm(y))
            N, H = L + 1, cfg.pred_heads
            q, k = qk.reshape(B, N, 2, H, -1).permute(2, 0, 3, 1, 4)  # [B, H, N, d]
            rows = torch.cat([torch.zeros_like(idx[:, :1]), idx + 1], dim=1)
            q = torch.gather(q, 2, rows[:, None, :, None].expand(-1, H, -1, q.shape[-1]))
            att = ((q @ k.transpose(-2, -1)) * cfg.pred_dim ** -0.5)[..., 1:].transpose(1, 2)
            p = F.softmax(relation_t / cfg.tau, dim=-1)
            loss_r = torch.sum(-p * F.log_softmax(att, dim=-1), dim=-1).mean()
        loss = cfg.feature_weight * loss_f + cfg.relation_weight * loss_r
        return {"loss": loss, "feature": loss_f, "relation": loss_r}
