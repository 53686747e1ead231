"""Model FLOPs of one TEC training step, counted from docs/tec.md (matmuls and the
attention products; LayerNorm, GELU, softmax and the optimizer are left out as usual).

A multiply-add is 2 FLOPs; backward costs 2x forward (grads to inputs and to weights), except the
patch embedding whose input (the image) needs no gradient (1x). ViT-B/16 at 224, mask 0.75,
base ViT-B/16, k = 15: 35.1 (base forward) + 26.2 (encoder fwd+bwd) + 5.9 (adapter) + 17.5
(two decoder streams) = 84.7 GFLOP per image.

    python -m benchmarks.flops                                # ViT-B/16 at 224, mask 0.75: 84.7 GFLOP per image
    python -m benchmarks.flops --model vit_large --batch 256  # ViT-L/16, per image and per step of 256 images
    python -m benchmarks.flops --img-size 384 --mask-ratio 0.6

The models are ``bench_step.py``'s presets (base and new model of the same size, its decoder and
top-k); ``bench_step`` divides this count by the measured step time for its MFU.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional

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


PART_NAMES = {"base_forward": "frozen base, forward", "encoder": "encoder, forward + backward",
              "adapter": "encoder adapter, forward + backward",
              "decoders": "decoder streams, forward + backward", "total": "total"}


def main(argv: Optional[List[str]] = None) -> Dict[str, float]:
    """Print the FLOPs of one step by part, per image and per step of ``--batch`` images; returns
    the parts per image."""
    from benchmarks.bench_step import PRESETS, build
    from benchmarks.common import format_table, make_parser, refuse_no_visible_patch
    from tec_fast.cli.flags import POSITIVE, real

    p = make_parser("flops", __doc__)
    p.add_argument("--model", choices=sorted(PRESETS), default="vit_base",
                   help="bench_step's preset: base and new model, decoder, top-k (default vit_base)")
    p.add_argument("--img-size", type=POSITIVE, default=None,
                   help="image side in pixels, a multiple of the patch size (default: the preset's: 224, tiny 32)")
    p.add_argument("--batch", type=POSITIVE, default=1, help="images per step, for the per-step column (default 1)")
    p.add_argument("--mask-ratio", type=real(0, 1, lo_open=True, hi_open=True), default=0.75,
                   help="share of the patches hidden from the encoder, in (0, 1) (default 0.75)")
    args = p.parse_args(argv)
    base, cfg, topk = build(args.model, "cpu")
    if args.img_size is not None:
        try:
            base = dataclasses.replace(base, img_size=args.img_size)
            cfg = dataclasses.replace(cfg, encoder=dataclasses.replace(cfg.encoder, img_size=args.img_size))
        except ValueError as exc:
            p.refuse("--img-size", str(exc))
    refuse_no_visible_patch(p, "--mask-ratio", args.mask_ratio, cfg.encoder.num_patches,
                            f"model {args.model} at {cfg.encoder.img_size} px")
    parts = tec_step_flops(base, cfg, args.mask_ratio, topk)
    enc = cfg.encoder
    print(f"{args.model}: new model {enc.depth} blocks x {enc.embed_dim} wide, base {base.depth} x "
          f"{base.embed_dim}, {enc.img_size} px / patch {enc.patch_size} ({enc.num_patches} patches), mask "
          f"ratio {args.mask_ratio:g} ({num_visible(enc.num_patches, args.mask_ratio)} visible), top-k {topk}")
    step = f"GFLOP/step (B={args.batch})"
    rows = [{"part": PART_NAMES[k], "GFLOP/image": f"{v / 1e9:.1f}", step: f"{v * args.batch / 1e9:.1f}"}
            for k, v in parts.items()]
    print(format_table(rows, ["part", "GFLOP/image", step]))
    print("(matmuls and attention products; a multiply-add is 2 FLOPs; LayerNorm, GELU, softmax and the "
          "optimizer left out)")
    return parts


if __name__ == "__main__":
    main()
