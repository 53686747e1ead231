"""Model FLOPs of one TEC training step, counted from docs/tec.md (matmuls and the
attention products; LayerNorm, GELU, softmax and the optimizer are left out as usual).

A multiply-add is 2 FLOPs; backward costs 2x forward (grads to inputs and to weights), except the
patch embedding whose input (the image) needs no gradient (1x). ViT-B/16 at 224, mask 0.75,
base ViT-B/16, k = 15: 35.1 (base forward) + 26.2 (encoder fwd+bwd) + 5.9 (adapter) + 17.5
(two decoder streams) = 84.7 GFLOP per image.
"""
from __future__ import annotations

from tec_fast.config import TECConfig, ViTConfig
from tec_fast.masking import num_visible


def block_flops(tokens: int, dim: int, mlp_ratio: float = 4.0) -> float:
    """One pre-norm ViT block's forward: qkv + proj + MLP matmuls, q k^T and attn @ v."""
    hidden = int(dim * mlp_ratio)
    linear = 2 * tokens * dim * (3 * dim + dim + 2 * hidden)
    attention = 2 * 2 * tokens * tokens * dim
    return float(linear + attention)


def patch_embed_flops(vit: ViTConfig) -> float:
    return 2.0 * vit.num_patches * vit.in_chans * vit.patch_size ** 2 * vit.embed_dim


def tec_step_flops(base: ViTConfig, cfg: TECConfig, mask_ratio: float = 0.75, topk: int = 15) -> dict:
    """FLOPs per image of one TEC step, by part, and their ``total``."""
    enc = cfg.encoder
    L = enc.num_patches
    N = L + 1
    T = 1 + num_visible(L, mask_ratio)
    C, Cd = enc.embed_dim, cfg.decoder_dim
    base_fwd = patch_embed_flops(base) + base.depth * block_flops(base.num_patches + 1, base.embed_dim,
                                                                  base.mlp_ratio)
    if topk:  # the 1+k relation rows of the last block
        base_fwd += 2.0 * (1 + topk) * base.num_patches * base.embed_dim
    enc_fwd = enc.depth * block_flops(T, C, enc.mlp_ratio)
    if cfg.input_adapter:
        enc_fwd += 2.0 * 2 * C * enc.mlp_hidden  # once per step, not per image: negligible
    encoder = 3 * enc_fwd + 2 * patch_embed_flops(enc)
    adapter_fwd = 2.0 * T * enc.depth * C * C + cfg.num_adapters * 2.0 * T * C * 4 * Cd * 2
    adapter = 3 * adapter_fwd
    stream = cfg.decoder_depth * block_flops(N, Cd, enc.mlp_ratio) + 2.0 * T * C * Cd
    feature = stream + 2.0 * N * Cd * cfg.pred_dim
    decoders = 3 * feature
    if cfg.relation:
        relation = stream + 2.0 * N * Cd * 2 * cfg.pred_dim + 2.0 * (1 + topk) * L * cfg.pred_dim
        decoders += 3 * relation
    parts = {"base_forward": base_fwd, "encoder": encoder, "adapter": adapter, "decoders": decoders}
    parts["total"] = sum(parts.values())
    return parts
