"""The frozen base model: a plain ViT that gives TEC its targets (docs/tec.md §1)."""
from __future__ import annotations

from typing import NamedTuple, Optional, Union

import torch
import torch.nn as nn

from tec_fast import ops
from tec_fast.checkpoint.resample import resample_pos_embed
from tec_fast.config import ViTConfig
from tec_fast.models.layers import Block, PatchEmbed, check_images, init_vit_weights, run_blocks, sincos_pos_embed
from tec_fast.models.layout import TokenLayout
from tec_fast.ops.reference import loss_dtype


class BaseTargets(NamedTuple):
    features: torch.Tensor             # [B, L, Cb] mean of the last blocks' patch outputs
    relation: Optional[torch.Tensor]   # [B, 1+k, Hb, L] last-block logits, CLS + top-k rows
    topk_idx: Optional[torch.Tensor]   # [B, k] patch indices, most attended first


class BaseModel(nn.Module):
    """A standard ViT (MAE / iBOT / DINO / TEC encoder), frozen, always in eval mode.

    ``base(images)`` runs on the full image under no_grad and returns ``BaseTargets``.
    ``topk=None`` gives feature targets only. The variants of released ViTs that ``ViTConfig``
    describes (LayerScale, registers, ``no_embed_class``, pre-norm, no CLS token, ...) are built
    as timm builds them, tokens ordered [CLS, registers, patches]; the targets use the patch
    tokens only (registers are neither feature nor relation targets).
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
        if topk is not None and not vit.class_token:
            raise ValueError("BaseModel: topk must be None for a base without a CLS token "
                             "(ViTConfig.class_token=False): relation targets rank patches by the CLS row")
        self.config, self.last_layers, self.topk = vit, last_layers, topk
        C = vit.embed_dim
        self.patch_embed = PatchEmbed(vit.patch_size, vit.in_chans, C, bias=vit.patch_bias)
        if vit.class_token:
            self.cls_token = nn.Parameter(torch.zeros(1, 1, C))
        if vit.reg_tokens:
            self.reg_token = nn.Parameter(torch.zeros(1, vit.reg_tokens, C))
        # Learned for iBOT/DINO, sin-cos for MAE: whatever the checkpoint holds. Sin-cos until loaded.
        pos = sincos_pos_embed(C, vit.grid_size, cls_token=False)
        pos = torch.cat([pos.new_zeros(vit.pos_embed_len - vit.num_patches, C), pos])
        self.pos_embed = nn.Parameter(pos.unsqueeze(0))  # [1, (prefix +) L, C]
        self.norm_pre = nn.LayerNorm(C, eps=vit.ln_eps) if vit.pre_norm else nn.Identity()
        self.blocks = nn.ModuleList([
            Block(C, vit.num_heads, vit.mlp_ratio, layer_scale=vit.layer_scale, qkv_bias=vit.qkv_bias,
                  ln_eps=vit.ln_eps, act=vit.mlp_act) for _ in range(vit.depth)])
        self.norm = nn.LayerNorm(C, eps=vit.ln_eps)  # not used for targets; the evaluation features use it
        init_vit_weights(self)
        for name in ("cls_token", "reg_token"):
            if hasattr(self, name):
                nn.init.normal_(getattr(self, name), std=0.02)
        self.requires_grad_(False)
        self.eval()

    @classmethod
    def from_checkpoint(cls, src, img_size: Optional[int] = None, num_heads: Optional[int] = None,
                        last_layers: int = 2, topk: Optional[int] = None, *, trust: bool = False,
                        config_overrides: Optional[dict] = None) -> "BaseModel":
        """A base model from any supported checkpoint (file, dict, safetensors file or Hugging Face
        folder), its architecture read from the weights (``tec_fast.checkpoint.infer``): width,
        depth, patch, MLP ratio, LayerScale, registers, class-token layout, pre-norm, biases.
        ``img_size`` (default: the stored position embedding's grid) resamples the position
        embedding; ``num_heads`` (default: a stored or Hugging Face config, a known preset, else
        width / 64). ``config_overrides``: a dict of ViTConfig fields the weights cannot tell
        (``mlp_act``, ``ln_eps``). ``trust=True`` allows full unpickling. ``base.load_report`` says what was done."""
        from tec_fast.checkpoint import infer_base_vit, load_base_checkpoint, read_base_weights
        weights = read_base_weights(src, trust=trust)
        vit, notes, _ = infer_base_vit(weights.state, hf_config=weights.hf_config, stored=weights.stored,
                                       img_size=img_size, num_heads=num_heads, overrides=config_overrides)
        base = cls(vit, last_layers=last_layers, topk=topk)
        weights.report.notes[:0] = notes
        base.load_report = load_base_checkpoint(base, weights)
        return base

    def train(self, mode: bool = True) -> "BaseModel":
        return super().train(False)  # frozen: always eval mode

    def load_checkpoint(self, path_or_state: Union[str, dict], trust: bool = False):
        """Load MAE / iBOT / DINO / timm / TEC-released / TEC-raw / Hugging Face weights (docs/tec.md
        §5) into this architecture; a position embedding of another grid is resampled. Weights
        holding NaN or inf, weights that are not floating-point (int, bool, complex) or have no
        data (meta), and keys that are not strings are refused (ValueError naming the key)."""
        from tec_fast.checkpoint import load_base_checkpoint
        return load_base_checkpoint(self, path_or_state, trust=trust)

    def embed(self, pixels: torch.Tensor, layout: Optional[TokenLayout] = None) -> torch.Tensor:
        """The tokens the blocks read: patch embedding, CLS (and register) tokens, position
        embedding, ``norm_pre``; the one embedding of the base, batched and packed.

        Without ``layout``: images [B, 3, S, S] on the model's grid -> [B, P + L, C], tokens
        ordered [CLS, registers, patches] (P = ``config.num_prefix_tokens``). With a
        ``TokenLayout`` (native resolution, one CLS token per image): flattened patches
        [sum L_b, 3*p*p] -> the layout's tokens, each image with the table of its own grid
        (``pos_table``)."""
        cfg = self.config
        if layout is not None:
            x = self.patch_embed(pixels)  # [sum L_b, C]
            return self.norm_pre(layout.encoder_input(x, self.cls_token, self.pos_table(layout)))
        check_images(pixels, cfg.in_chans, cfg.img_size)
        x = self.patch_embed(pixels)  # [B, L, C]
        prefix = [t.expand(x.shape[0], -1, -1).to(x.dtype)
                  for t in (getattr(self, "cls_token", None), getattr(self, "reg_token", None)) if t is not None]
        pos = self.pos_embed.to(x.dtype)
        if cfg.no_embed_class:  # DeiT-III / DINOv2-reg: the prefix tokens carry no position
            x = torch.cat(prefix + [x + pos], dim=1)
        else:
            x = torch.cat(prefix + [x], dim=1) + pos
        return self.norm_pre(x)  # [B, P + L, C]

    def pos_table(self, layout: TokenLayout) -> torch.Tensor:
        """The position embedding of every image of ``layout`` (``TokenLayout.pos_table``'s form,
        fp32): the stored table on the model's grid, on any other grid the stored table
        resampled by ``checkpoint.resample_pos_embed`` - the table a base loaded from the same
        checkpoint at that grid holds, so dense and native runs see the same positions. A table
        over the patches only (``no_embed_class``) gets a zero CLS row (no position for CLS)."""
        stored, g = self.pos_embed.detach(), self.config.grid_size
        if self.config.no_embed_class:
            stored = torch.cat([stored.new_zeros(1, 1, stored.shape[-1]), stored], dim=1)
        return layout.pos_table(stored.shape[-1], stored, (g, g),
                                lambda h, w: resample_pos_embed(stored, (h, w), (g, g), num_prefix=1)[0])

    @torch.no_grad()
    def encode(self, images: torch.Tensor, pool: str = "mean") -> torch.Tensor:
        """Frozen-feature embedding for evaluation (k-NN, linear probe): the final LayerNorm's
        output, averaged over the patch tokens (``pool='mean'``) or the CLS token (``'cls'``). [B, C]"""
        return self.pooled_features(images, pool).float()

    def pooled_features(self, images: torch.Tensor, pool: str = "mean") -> torch.Tensor:
        """``encode`` without ``no_grad``: what a fine-tuning head sees (on a trainable copy). [B, C]"""
        if pool not in ("mean", "cls"):
            raise ValueError(f"pool must be 'mean' or 'cls', got {pool!r}")
        if pool == "cls" and not self.config.class_token:
            raise ValueError("pool='cls' needs a CLS token; this base has none (use pool='mean')")
        h, m, _, _ = run_blocks(self.blocks, self.embed(images))
        x = self.norm(h + m)
        P = self.config.num_prefix_tokens
        return x[:, P:].mean(dim=1) if pool == "mean" else x[:, 0]

    def last_layers_mean(self, x: torch.Tensor, patch_rows, **attention):
        """x (embedded tokens) through the blocks (``run_blocks``; ``attention``: a packed
        sequence's ``cu_seqlens`` / ``max_len``): the fp32 (float64 in a float64 base) mean of the
        last ``last_layers`` blocks' outputs at the rows ``patch_rows(t)`` selects, and the last
        block's q, k (None without ``topk``). The target features of docs/tec.md §1, batched or
        packed."""
        depth = len(self.blocks)
        first = depth - self.last_layers
        h, m, outs, qk = run_blocks(self.blocks, x, outputs=range(first, depth - 1),
                                    qk_block=depth - 1 if self.topk is not None else None, **attention)
        outs[depth - 1] = h + m
        first_rows = patch_rows(outs[first])
        feats = first_rows.to(loss_dtype(first_rows.dtype), copy=True)  # summed in place
        for i in range(first + 1, depth):
            feats.add_(patch_rows(outs[i]))
        return feats.div_(self.last_layers), qk

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> BaseTargets:
        cfg = self.config
        P = cfg.num_prefix_tokens
        features, qk = self.last_layers_mean(self.embed(images), lambda t: t[:, P:])  # [B, L, Cb]
        if qk is None:
            return BaseTargets(features, None, None)
        q, k = qk  # [B, H, P + L, d]
        if cfg.reg_tokens:  # register tokens are neither ranked rows nor target columns
            q, k = (torch.cat([t[:, :, :1], t[:, :, P:]], dim=2) for t in (q, k))
        scale = (cfg.embed_dim // cfg.num_heads) ** -0.5
        relation, topk_idx = ops.relation_targets(q, k, self.topk, scale)
        return BaseTargets(features, relation, topk_idx)
