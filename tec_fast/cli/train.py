"""``python -m tec_fast.train``: TEC pretraining of a new ViT from a frozen base model, or MAE
pretraining of a first base model (``--objective mae``). No arguments: the embedded demo.

Linear on purpose: parse -> data -> models -> fit -> save. The loop is ``engine.fit``; the math
is in ``TECModel`` / ``MAEModel``.

    python -m tec_fast.train                                   # demo, <= 10 min on 2 CPU cores
    python -m tec_fast.train --data /imagenet --base mae_vit_base:mae_pretrain_vit_base.pth \\
        --epochs 100 --batch-size 256 --output runs/tec_b16
    torchrun --nproc-per-node 8 -m tec_fast.train --data /imagenet --base ... --output ...
    python -m tec_fast.train --objective mae --data /my/images --model vit_small_patch16 ...
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

from tec_fast.presets import BASE_RECIPES, MODEL_PRESETS, parse_base, vit_preset

EXIT_NONFINITE = 3


def parse_mask_ratio(text: str):
    """'0.75' -> 0.75; '0.6:0.9' -> (0.6, 0.9)."""
    try:
        parts = [float(v) for v in text.split(":")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a ratio like 0.75 or a range like 0.6:0.9, got {text!r}")
    if len(parts) > 2 or not all(0.0 <= v < 1.0 for v in parts) or (len(parts) == 2 and parts[0] > parts[1]):
        raise argparse.ArgumentTypeError(f"mask ratios must be in [0, 1) and LO <= HI, got {text!r}")
    return parts[0] if len(parts) == 1 else tuple(parts)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m tec_fast.train", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="TEC pretraining (SPEC.md section 4 recipe) or MAE base pretraining. "
                    "Run with no arguments for the embedded demo.",
        epilog="Base kinds and their recipe defaults (last_layers, topk, tau):\n" + "\n".join(
            f"  {k:14s} {r.model:18s} {r.last_layers}, {r.topk:2d}, {r.tau}   {r.note}"
            for k, r in BASE_RECIPES.items()))
    g = p.add_argument_group("data")
    g.add_argument("--data", metavar="PATH", help="image folder: PATH/train/<class>/*.jpg, class "
                   "folders, or a flat folder of images. Without it: the embedded demo")
    g.add_argument("--img-size", type=int, default=224)
    g.add_argument("--strict-data", action="store_true",
                   help="fail on an unreadable image instead of skipping it (with a warning)")
    g.add_argument("--num-workers", type=int, default=min(8, os.cpu_count() or 1),
                   help="DataLoader worker processes per training process (default: %(default)s)")
    g.add_argument("--no-pin-memory", action="store_true")
    g.add_argument("--native-resolution", action="store_true",
                   help="NaViT-style TEC: whole images, aspect ratio kept, resized to at most --max-patches "
                        "patches (+ flip), packed into batches of at most --tokens-per-batch tokens "
                        "(base and new model run packed). TEC, one --mask-ratio, random masking only")
    g.add_argument("--max-patches", type=int, metavar="N",
                   help="native resolution: patch budget per image (default: the --img-size grid, e.g. 196)")
    g.add_argument("--tokens-per-batch", type=int, metavar="N",
                   help="native resolution: tokens (CLS included) per micro-batch and process "
                        "(default: --batch-size x (max patches + 1))")
    g.add_argument("--bench-loader", action="store_true",
                   help="measure the data loader alone (decode + augment, no model), print img/s, exit")

    g = p.add_argument_group("model and base")
    g.add_argument("--objective", choices=("tec", "mae"), default="tec",
                   help="tec: train a new model from --base; mae: pretrain a first base model")
    g.add_argument("--base", metavar="KIND:PATH", help=f"frozen base model; KIND one of {', '.join(BASE_RECIPES)}")
    g.add_argument("--base-model", choices=list(MODEL_PRESETS), metavar="ARCH",
                   help="architecture of the base (default: the kind's, see below)")
    g.add_argument("--model", choices=list(MODEL_PRESETS), metavar="ARCH",
                   help="architecture of the new model (default: the base's; vit_base_patch16 for mae). "
                        f"ARCH: {', '.join(MODEL_PRESETS)}")
    g.add_argument("--last-layers", type=int, help="feature targets: mean of this many last base blocks")
    g.add_argument("--topk", type=int, help="relation targets: CLS + top-k attended patch rows")
    g.add_argument("--tau", type=float, help="relation-target temperature")
    g.add_argument("--no-relation", action="store_true", help="feature targets only")
    g.add_argument("--no-input-adapter", action="store_true", help="plain CLS token, no MLP")
    g.add_argument("--decoder-dim", type=int, default=512)
    g.add_argument("--decoder-depth", type=int, help="default: 2 for TEC, 8 for MAE")
    g.add_argument("--decoder-heads", type=int, default=16)
    g.add_argument("--mask-ratio", type=parse_mask_ratio, default=0.75, metavar="R|LO:HI",
                   help="fraction of patches hidden: one ratio (default %(default)s), or a range LO:HI "
                        "drawn per image (the encoder then runs packed, no padding)")
    g.add_argument("--masking", choices=("random", "block"), default="random",
                   help="random patches (MAE) or BEiT/iBOT block-wise masks (packed encoder)")

    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=100)
    g.add_argument("--max-steps", type=int, help="optimizer steps; overrides --epochs as the schedule length")
    g.add_argument("--batch-size", type=int, default=64, help="per process and micro-step")
    g.add_argument("--accum", type=int, default=1, help="gradient accumulation micro-steps")
    g.add_argument("--blr", type=float, default=1.5e-4, help="lr = blr * global batch / 256")
    g.add_argument("--lr", type=float, help="absolute peak lr (overrides --blr)")
    g.add_argument("--min-lr", type=float, default=0.0)
    g.add_argument("--warmup-epochs", type=float, default=40.0)
    g.add_argument("--weight-decay", type=float, default=0.05)
    g.add_argument("--clip-grad", type=float, help="max gradient norm (off by default, as the reference)")
    g.add_argument("--optimizer", choices=("torch", "apex"), default="torch",
                   help="torch AdamW (fused where supported) or apex FusedAdam if installed")

    g = p.add_argument_group("precision and speed")
    g.add_argument("--precision", choices=("auto", "bf16", "fp16", "fp32"), default="auto",
                   help="autocast dtype; fp16 adds loss scaling. auto: bf16 on a GPU that has it, else fp32")
    g.add_argument("--compile", action="store_true", help="torch.compile the new model and the base")

    g = p.add_argument_group("checkpointing")
    g.add_argument("--output", metavar="DIR", help="checkpoints, metrics.jsonl, exported encoder "
                   "(default: runs/<objective>, demo: runs/demo)")
    g.add_argument("--resume", nargs="?", const="auto", metavar="CKPT",
                   help="continue from CKPT (or, bare, from DIR/checkpoint-last.pth if present)")
    g.add_argument("--save-every", type=int, default=1, metavar="EPOCHS")
    g.add_argument("--save-every-steps", type=int, metavar="STEPS", help="also save checkpoint-last every STEPS")
    g.add_argument("--keep-last", type=int, default=2, help="epoch checkpoints kept (newest)")
    g.add_argument("--keep-every", type=int, default=20, help="and every K-th epoch's, kept for good")
    g.add_argument("--time-limit", type=float, metavar="SECONDS", help="stop (saving) after this wall time")

    g = p.add_argument_group("distributed (under torchrun)")
    g.add_argument("--shard", choices=("ddp", "fsdp"), default="ddp",
                   help="DDP (default) or FSDP2 fully_shard per block, for large encoders")
    g.add_argument("--device", help="default: cuda:LOCAL_RANK if CUDA is available, else cpu")

    g = p.add_argument_group("logging")
    g.add_argument("--log-every", type=int, default=20, metavar="STEPS")
    g.add_argument("--tensorboard", action="store_true", help="also log to DIR/tensorboard (if installed)")
    g.add_argument("--no-progress", action="store_true")
    g.add_argument("--seed", type=int, default=0)

    g = p.add_argument_group("demo (no --data)")
    g.add_argument("--demo-long", action="store_true",
                   help="fixed 3100 MAE + 1350 TEC steps (45 min measured on 2 busy cores): a saturated MAE base, then a full TEC schedule (where TEC beat it)")
    g.add_argument("--demo-tiny", action="store_true", help="~1-2 min smoke version (CI)")
    g.add_argument("--demo-steps", metavar="MAE,TEC",
                   help="fixed step counts for the two stages instead of the wall-clock budget")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.data is None:
        from tec_fast.demo.run import run_demo
        return run_demo(args)
    return train(args)


def train(args) -> int:
    from tec_fast.checkpoint import export_timm, save_atomic
    from tec_fast.data.images import ImageFolderDataset
    from tec_fast.training import FitConfig, NonFiniteLoss, TrainingInterrupted, bench_loader, fit, setup_distributed
    from tec_fast.training.monitor import format_duration, table

    d = setup_distributed(args.device)
    say = print if d.is_main else (lambda *a, **k: None)
    output = args.output or os.path.join("runs", args.objective)

    # ---- data
    native = check_native_args(args) if args.native_resolution else None
    if native is not None:
        dataset = ImageFolderDataset(args.data, args.img_size, train=True, strict=args.strict_data,
                                     native_patch=native["patch"], max_patches=native["max_patches"],
                                     min_patches=native["min_patches"])
    else:
        dataset = ImageFolderDataset(args.data, args.img_size, train=True, strict=args.strict_data)
    precision = args.precision
    if precision == "auto":
        precision = "bf16" if d.device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    cfg = FitConfig(name=args.objective, output_dir=output, epochs=args.epochs, max_steps=args.max_steps,
                    time_limit=args.time_limit, batch_size=args.batch_size, accum=args.accum, blr=args.blr,
                    lr=args.lr, min_lr=args.min_lr, warmup_epochs=args.warmup_epochs,
                    weight_decay=args.weight_decay, optimizer=args.optimizer, precision=precision,
                    clip_grad=args.clip_grad, compile=args.compile, shard=args.shard,
                    num_workers=args.num_workers, pin_memory=not args.no_pin_memory, seed=args.seed,
                    log_every=args.log_every, save_every_epochs=args.save_every,
                    save_every_steps=args.save_every_steps, keep_last=args.keep_last,
                    keep_every=args.keep_every, resume=args.resume, tensorboard=args.tensorboard,
                    progress=not args.no_progress)
    say(f"data: {len(dataset)} images under {dataset.root} ({len(dataset.classes)} classes)")
    batching = {}
    if native is not None:
        batching = native_batching(dataset, native, args.seed)
        say(f"native resolution: patch {native['patch']}, <= {native['max_patches']} patches per image "
            f"(>= {native['min_patches']}), <= {native['tokens_per_batch']} tokens per batch")
    if args.bench_loader:
        from tec_fast.training.objectives import NativeNoiseCollate, NativeNoiseSamples
        data = NativeNoiseSamples(dataset, native["patch"]) if native else dataset
        collate = NativeNoiseCollate(native["patch"]) if native else None
        r = bench_loader(data, cfg, collate_fn=collate, **batching)
        say(f"loader alone: {r['img_per_s']:.1f} img/s per process ({r['images']} images in "
            f"{r['seconds']:.1f} s, {r['num_workers']} workers, batch {r['batch_size']}; "
            f"first batch {r['first_batch_s']:.1f} s)")
        return 0

    # ---- models
    torch.manual_seed(args.seed)
    extra = {"kind": args.objective, "args": vars(args)}
    if args.objective == "mae":
        if isinstance(args.mask_ratio, tuple) or args.masking != "random":
            raise SystemExit("error: --objective mae takes one --mask-ratio and random masking "
                             "(variable and block masks are TEC modes)")
        from tec_fast.models.mae import MAEModel
        from tec_fast.training.objectives import MAEObjective
        vit = vit_preset(args.model or "vit_base_patch16", args.img_size)
        model = MAEModel(vit, args.decoder_dim, args.decoder_depth or 8, args.decoder_heads)
        objective = MAEObjective(args.mask_ratio, vit.num_patches)
        extra["model_config"] = model.config_dict()
    else:
        if not args.base:
            raise SystemExit("error: TEC training needs --base KIND:PATH (or --objective mae to make a base)")
        model, objective, extra["model_config"], extra["base"] = build_tec(args, d.device, native)
    say(f"model: {args.objective}, {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M trainable parameters")

    # ---- train
    try:
        if native is not None:
            result = fit(model, objective, objective.samples(dataset), cfg, checkpoint_extra=extra,
                         collate_fn=objective.collate, **batching)
        else:
            result = fit(model, objective, dataset, cfg, checkpoint_extra=extra)
    except NonFiniteLoss as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_NONFINITE
    except TrainingInterrupted as exc:
        say(str(exc))
        return 128 + exc.signum
    if hasattr(dataset, "num_skipped") and dataset.num_skipped:
        say(f"warning: {dataset.num_skipped} unreadable images were skipped")

    # ---- save the encoder in a loadable layout
    exported = None
    if d.is_main:
        if args.objective == "mae":
            exported = os.path.join(output, "encoder_mae.pth")  # valid --base mae_vit_*:PATH
            save_atomic({"model": result.model.encoder_state_dict()}, exported)
        else:
            exported = os.path.join(output, "encoder_timm.pth")
            save_atomic(export_timm(result.model), exported)
    say(table(["", ""], [
        ["stage", args.objective], ["steps", f"{result.steps} / {result.total_steps} ({result.stopped})"],
        ["epoch", result.epoch], ["global batch", result.global_batch], ["peak lr", f"{result.lr:.3g}"],
        ["optimizer", result.optimizer], ["precision", precision], ["processes", d.world],
        ["wall time", format_duration(result.seconds)], ["throughput", f"{result.img_per_s:.1f} img/s"],
        *[[k, f"{v:.4f}"] for k, v in result.metrics.items()],
        ["checkpoint", result.checkpoint], ["encoder", exported]], title="summary", align="ll"))
    return 0


def check_native_args(args) -> dict:
    """--native-resolution: refuse what the mode does not support; patch size and budgets."""
    from tec_fast.models.masking import num_visible

    def no(what):
        raise SystemExit(f"error: --native-resolution does not support {what}")

    if args.objective != "tec":
        no(f"--objective {args.objective} (TEC only)")
    if isinstance(args.mask_ratio, tuple):
        no("a --mask-ratio range (give one ratio)")
    if args.masking != "random":
        no(f"--masking {args.masking} (random masking only)")
    if args.compile:
        no("--compile (every batch has another shape)")
    if not args.base:
        raise SystemExit("error: TEC training needs --base KIND:PATH (or --objective mae to make a base)")
    kind, _, recipe = parse_base(args.base)
    base_vit = vit_preset(args.base_model or recipe.model, args.img_size)
    vit = vit_preset(args.model or args.base_model or recipe.model, args.img_size)
    if base_vit.patch_size != vit.patch_size:
        raise SystemExit(f"error: --native-resolution needs the base and the new model to share a patch "
                         f"size (base {base_vit.patch_size}, new model {vit.patch_size})")
    topk = None if args.no_relation else (args.topk or recipe.topk)
    # every image needs >= topk patches (relation targets), >= 2 (per-image target variance),
    # and at least one visible patch at the mask ratio
    min_patches = max(topk or 0, 2)
    while num_visible(min_patches, args.mask_ratio) < 1:
        min_patches += 1
    max_patches = args.max_patches or vit.num_patches
    if max_patches < min_patches:
        raise SystemExit(f"error: --max-patches {max_patches} is below the {min_patches} patches an image "
                         f"needs here (top-k {topk}, mask ratio {args.mask_ratio})")
    tokens = args.tokens_per_batch or args.batch_size * (max_patches + 1)
    if tokens < max_patches + 1:
        raise SystemExit(f"error: --tokens-per-batch {tokens} cannot hold one image of --max-patches "
                         f"{max_patches} (+1 CLS token)")
    return {"patch": vit.patch_size, "max_patches": max_patches, "min_patches": min_patches,
            "tokens_per_batch": tokens}


def native_batching(dataset, native: dict, seed: int) -> dict:
    """``fit`` keywords for native resolution: the global per-epoch plan of token-budget bins
    (``NativeBatchSampler``: seeded shuffle, ``packing.plan_bins``, seeded bin order)."""
    from tec_fast.models.native import NativeBatchSampler

    p = native["patch"]
    sizes = [(h * p, w * p) for h, w in dataset.native_grids()]  # exact grids: no further rounding
    return {"batch_sampler": NativeBatchSampler(sizes, p, native["max_patches"], native["tokens_per_batch"],
                                                shuffle=True, seed=seed)}


def build_tec(args, device, native: dict = None):
    """(TECModel, TECObjective, model config dict, base info dict) from --base and the recipe.
    ``native`` (from ``check_native_args``): a ``NativeTECModel`` and ``NativeTECObjective``."""
    from tec_fast.config import TECConfig
    from tec_fast.models.base import BaseModel
    from tec_fast.models.tec import TECModel
    from tec_fast.training.objectives import TECObjective

    kind, path, recipe = parse_base(args.base)
    base_vit = vit_preset(args.base_model or recipe.model, args.img_size)
    vit = vit_preset(args.model or args.base_model or recipe.model, args.img_size)
    last_layers = args.last_layers or recipe.last_layers
    topk = None if args.no_relation else (args.topk or recipe.topk)
    tau = args.tau or recipe.tau
    base = BaseModel(base_vit, last_layers=last_layers, topk=topk)
    report = base.load_checkpoint(path)
    base.to(device)
    tec_cfg = TECConfig(encoder=vit, decoder_dim=args.decoder_dim, decoder_depth=args.decoder_depth or 2,
                        decoder_heads=args.decoder_heads, input_adapter=not args.no_input_adapter,
                        relation=not args.no_relation, tau=tau, pred_dim=base_vit.embed_dim,
                        pred_heads=base_vit.num_heads)
    if native is not None:
        from tec_fast.models.native import NativeTECModel
        from tec_fast.training.objectives import NativeTECObjective
        model = NativeTECModel(tec_cfg)
        objective = NativeTECObjective(base, args.mask_ratio, native["patch"], native["tokens_per_batch"])
    else:
        model = TECModel(tec_cfg)
        if args.compile:
            base = torch.compile(base)
        objective = TECObjective(base, args.mask_ratio, vit.num_patches, masking=args.masking)
    info = {"kind": kind, "path": path, "vit": base_vit.to_dict(), "last_layers": last_layers,
            "topk": topk, "tau": tau, "load_report": report.summary()}
    return model, objective, tec_cfg.to_dict(), info


if __name__ == "__main__":
    sys.exit(main())
