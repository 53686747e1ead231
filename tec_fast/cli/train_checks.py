"""The train command's flags checked against each other, before anything is loaded: each value
passed its own type check (``flags``); here a value that contradicts another flag, or that the
chosen mode would silently ignore, is refused with one line naming the flag."""
from __future__ import annotations

import argparse
import os

from tec_fast.cli.flags import Parser, given
from tec_fast.presets import MODEL_PRESETS, parse_base, vit_preset

# what the embedded demo reads; every other flag applies to training with --data only
DEMO_FLAGS = {"output", "seed", "no_progress", "demo_long", "demo_from_scratch", "demo_tiny", "demo_steps",
              "demo_make_base", "demo_base"}
# the TEC flags MAE pretraining has no use for
TEC_ONLY = ("base", "base_model", "base_heads", "trust_checkpoint", "last_layers", "topk", "tau", "no_relation", "no_input_adapter",
            "native_resolution")
NATIVE_ONLY = ("max_patches", "tokens_per_batch")


def check_train_flags(p: Parser, args: argparse.Namespace) -> None:
    """``p.error`` (exit 2, one line) on the first incoherent flag."""
    set_flags = dict(given(p, args))
    if args.data is None:
        for dest, flag in set_flags.items():
            if dest not in DEMO_FLAGS:
                p.refuse(flag, "applies to training with --data; the embedded demo (no --data) has its "
                               "own fixed settings")
        _check_demo(p, set_flags)
        return
    for dest in sorted(DEMO_FLAGS - {"output", "seed", "no_progress"}):
        if dest in set_flags:
            p.refuse(set_flags[dest], "is for the embedded demo; it cannot be combined with --data")
    _check_objective(p, args, set_flags)
    _check_schedule(p, args, set_flags)
    base_vit = _check_architecture(p, args)
    if args.resume is not None and args.overwrite:
        p.refuse("--overwrite", "deletes an earlier run's checkpoints to start afresh; --resume continues from them "
                                "(choose one)")
    if args.resume not in (None, "auto"):
        last = os.path.join(args.resume, "checkpoint-last.pth") if os.path.isdir(args.resume) else args.resume
        if not os.path.isfile(last):
            p.refuse("--resume", f"{last!r}: no such checkpoint")
    if args.native_resolution:
        _check_native(p, args, base_vit)
    _check_data_pipeline(p, args)
    if args.cuda_graph and args.no_cuda_graph:
        p.refuse("--no-cuda-graph", "contradicts --cuda-graph (which requires the recorded steps)")
    if args.cuda_graph:
        _check_cuda_graph(p, args)


def _check_data_pipeline(p: Parser, args) -> None:
    """--decode gpu needs torchvision's nvjpeg decode and a CUDA device; --target-img-s is for
    --bench-loader."""
    if args.target_img_s is not None and not args.bench_loader:
        p.refuse("--target-img-s", "is the step rate --bench-loader sizes the workers for; add --bench-loader")
    if args.decode != "gpu":
        return
    if args.native_resolution:
        p.refuse("--decode", "gpu decodes fixed-size RandomResizedCrop batches; --native-resolution decodes on the CPU")
    import torch

    from tec_fast.data.gpu_decode import gpu_decode_reasons
    reasons = gpu_decode_reasons(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if reasons:
        p.refuse("--decode", "gpu is not available here: " + "; ".join(reasons) + " (or use --decode cpu)")


def _check_cuda_graph(p: Parser, args) -> None:
    """What --cuda-graph needs that the flags alone show (fit checks the rest: processes, optimizer)."""
    import torch

    for flag, bad, what in (("--precision", args.precision == "fp16", "bf16 or fp32 (fp16's loss scaler "
                                                                      "decides on the host)"),
                            ("--native-resolution", args.native_resolution, "fixed-size batches"),
                            ("--mask-ratio", isinstance(args.mask_ratio, tuple), "one mask ratio, not a range"),
                            ("--masking", args.masking != "random", "random masks"),
                            ("--compile", args.compile, "no --compile"),
                            ("--optimizer", args.optimizer == "apex", "torch's fused AdamW"),
                            ("--cuda-graph", not torch.cuda.is_available(), "a CUDA device (none is visible)")):
        if bad:
            p.refuse(flag, f"--cuda-graph needs {what}")


def _check_objective(p: Parser, args, set_flags: dict) -> None:
    if args.objective == "mae":
        for dest in TEC_ONLY:
            if dest in set_flags:
                p.refuse(set_flags[dest], "is a TEC setting; --objective mae pretrains a base without one")
        if isinstance(args.mask_ratio, tuple):
            p.refuse("--mask-ratio", "--objective mae takes one ratio (a range is a TEC mode)")
        if args.masking != "random":
            p.refuse("--masking", "--objective mae uses random masking (block masks are a TEC mode)")
        return
    if not args.base:
        p.refuse("--base", "TEC training needs --base KIND:PATH (or --objective mae to make a base)")
    try:
        _, path, _ = parse_base(args.base)
    except ValueError as exc:
        p.refuse("--base", str(exc).replace("--base ", ""))
    if not os.path.exists(path):  # a file, or a Hugging Face folder
        p.refuse("--base", f"{path!r}: no such file or folder")
    if args.no_relation:
        for dest in ("topk", "tau"):
            if dest in set_flags:
                p.refuse(set_flags[dest], "sets the relation targets, which --no-relation turns off")
    if not args.native_resolution:
        for dest in NATIVE_ONLY:
            if dest in set_flags:
                p.refuse(set_flags[dest], "applies to --native-resolution only")


def _check_schedule(p: Parser, args, set_flags: dict) -> None:
    if args.lr is not None and "blr" in set_flags:
        p.refuse("--lr", "give --lr (absolute) or --blr (scaled by the batch), not both")
    if args.lr is not None and args.min_lr > args.lr:
        p.refuse("--min-lr", f"{args.min_lr:g} is above the peak --lr {args.lr:g}")
    if args.save_every_steps is not None and args.max_steps is not None and args.save_every_steps > args.max_steps:
        p.refuse("--save-every-steps", f"{args.save_every_steps} is beyond the run's --max-steps {args.max_steps}")


def _check_architecture(p: Parser, args):
    """--model at --img-size, decoder widths, and the target settings against the base, whose
    architecture is read from its weights (as the run builds it). Returns that ViTConfig (None
    without --base)."""
    from tec_fast.training.builders import base_architecture

    try:
        recipe = parse_base(args.base)[2] if args.base else None
    except ValueError:
        return  # refused above
    base = None
    if args.base_heads and args.base_model:
        p.refuse("--base-heads", f"--base-model {args.base_model} sets the base's head count already "
                                 f"({MODEL_PRESETS[args.base_model][3]}); give one of the two")
    if recipe is not None:
        try:
            base = base_architecture(args)
        except ValueError as exc:
            flag, _, why = str(exc).partition(" ")
            p.refuse(flag, why)
    if args.model or base is None:
        name = args.model or "vit_base_patch16"
        patch = MODEL_PRESETS[name][0]
        if args.img_size % patch:
            p.refuse("--img-size", f"{args.img_size} is not a multiple of {name}'s patch size {patch}")
        try:
            vit_preset(name, args.img_size)
        except ValueError as exc:
            p.refuse("--model", str(exc))
    if args.decoder_dim % args.decoder_heads:
        p.refuse("--decoder-heads", f"{args.decoder_heads} does not divide --decoder-dim {args.decoder_dim}")
    if base is None:
        return
    if args.model and MODEL_PRESETS[args.model][0] != base.patch_size:
        p.refuse("--model", f"{args.model} has patch {MODEL_PRESETS[args.model][0]} but the base's is "
                            f"{base.patch_size}: the new model predicts the base's targets patch by patch, so "
                            f"both need one patch grid (pick a model with patch {base.patch_size}, or leave "
                            f"--model out to take the base's architecture)")
    if args.last_layers is not None and args.last_layers > base.depth:
        p.refuse("--last-layers", f"{args.last_layers} is more than the base's {base.depth} blocks")
    if args.topk is not None and not args.no_relation and args.topk > base.num_patches:
        p.refuse("--topk", f"{args.topk} is more than the base's {base.num_patches} patches at "
                           f"--img-size {args.img_size}")
    # the recipe's defaults, which the user did not pass: the refusal names the flag that made them too large
    if args.topk is None and not args.no_relation and recipe.topk > base.num_patches:
        p.refuse("--img-size", f"{args.img_size} gives the base only {base.num_patches} patches "
                               f"({base.grid_size}x{base.grid_size} of {base.patch_size} px), fewer than the "
                               f"top-k {recipe.topk} of its recipe's relation targets: use a larger --img-size, "
                               f"or a --topk up to {base.num_patches} (or --no-relation)")
    if args.last_layers is None and recipe.last_layers > base.depth:
        p.refuse("--base", f"the weights hold {base.depth} blocks, fewer than the {recipe.last_layers} last "
                           f"blocks its recipe's feature targets average: give --last-layers up to {base.depth}")
    return base


def _check_native(p: Parser, args, base_vit) -> None:
    from tec_fast.training.builders import native_plan

    for flag, bad, what in (("--mask-ratio", isinstance(args.mask_ratio, tuple), "a ratio range (give one ratio)"),
                            ("--masking", args.masking != "random", f"--masking {args.masking} (random only)"),
                            ("--compile", args.compile, "--compile (every batch has another shape)")):
        if bad:
            p.refuse(flag, f"--native-resolution does not support {what}")
    base_patch = base_vit.patch_size
    new_patch = vit_preset(args.model, args.img_size).patch_size if args.model else base_patch
    if base_patch != new_patch:
        p.refuse("--model", f"--native-resolution needs the base and the new model to share a patch "
                            f"size (base {base_patch}, new model {new_patch})")
    try:
        native_plan(args, base_vit)
    except ValueError as exc:
        flag = "--max-patches" if str(exc).startswith("--max-patches") else "--tokens-per-batch"
        p.refuse(flag, str(exc).split(" ", 1)[1])


def _check_demo(p: Parser, set_flags: dict) -> None:
    if "demo_make_base" in set_flags:
        for dest in ("demo_base", "demo_steps"):
            if dest in set_flags:
                p.refuse(set_flags[dest], "cannot be combined with --demo-make-base (it trains only the base)")
    scratch = set_flags.get("demo_from_scratch") or set_flags.get("demo_long")
    if scratch and "demo_base" in set_flags:
        p.refuse("--demo-base", f"cannot be combined with {scratch} (which trains its own base)")
