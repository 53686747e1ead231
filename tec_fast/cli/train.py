"""``python -m tec_fast.train``: TEC pretraining of a new ViT from a frozen base model, or MAE
pretraining of a first base model (``--objective mae``). No arguments: the embedded demo.

Linear on purpose: parse (every flag checked) -> data -> the objective's builder -> ``fit`` ->
export the encoder. The loop is ``tec_fast.training.fit``; the math is in the models.

    python -m tec_fast.train                                   # the embedded demo
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

from tec_fast.cli.config import (CONFIG_FILE, add_config_flags, parse_with_config, resolved_config,
                                 write_text_atomic)
from tec_fast.cli.errors import run_command
from tec_fast.cli.flags import (NON_NEGATIVE, POSITIVE, SEED, Parser, data_source, device, existing_dir, mask_ratio,
                                output_dir, real)
from tec_fast.cli.train_checks import check_train_flags
from tec_fast.presets import BASE_RECIPES, MODEL_PRESETS

EXIT_NONFINITE = 3


# ------------------------------------------------------------------------------------ flags
def _data_flags(p: Parser) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--data", metavar="PATH", type=data_source,
                   help="image folder (PATH/train/<class>/*.jpg, class folders, or a flat folder of images), "
                        "webdataset-style tar shards (a .tar, a folder of them, or a pattern like "
                        "'shards-{0000..0099}.tar'; python -m tec_fast.make_shards writes them), or a local "
                        "Hugging Face datasets folder (save_to_disk or Parquet files). Without it: the embedded demo")
    g.add_argument("--img-size", type=POSITIVE, default=224,
                   help="side of the square training crops in pixels (a multiple of the patch size)")
    g.add_argument("--strict-data", action="store_true",
                   help="fail on an unreadable image instead of skipping it (with a warning)")
    g.add_argument("--num-workers", type=NON_NEGATIVE, default=min(8, os.cpu_count() or 1),
                   help="DataLoader worker processes per training process (default: %(default)s)")
    g.add_argument("--no-pin-memory", action="store_true",
                   help="do not pin the loader's host batches (pinned, their copy to the GPU overlaps the step)")
    g.add_argument("--native-resolution", action="store_true",
                   help="NaViT-style TEC: whole images, aspect ratio kept, resized to at most --max-patches "
                        "patches (+ flip), packed into batches of at most --tokens-per-batch tokens "
                        "(base and new model run packed). TEC, one --mask-ratio, random masking only")
    g.add_argument("--max-patches", type=POSITIVE, metavar="N",
                   help="native resolution: patch budget per image (default: the --img-size grid, e.g. 196)")
    g.add_argument("--tokens-per-batch", type=POSITIVE, metavar="N",
                   help="native resolution: tokens (CLS included) per micro-batch and process "
                        "(default: --batch-size x (max patches + 1))")
    g.add_argument("--bench-loader", action="store_true",
                   help="measure the data loader alone (decode + augment, no model; with --decode gpu, the GPU "
                        "decode too): img/s, img/s per worker core, bytes per image, and the workers one GPU "
                        "needs at --target-img-s; exit")
    g.add_argument("--target-img-s", type=real(0, lo_open=True), metavar="IMG_S",
                   help="--bench-loader: the step rate to feed (default: the newest committed step result "
                        "for this GPU class in benchmarks/results, any GPU's on a CPU machine)")
    g.add_argument("--decode", choices=("cpu", "gpu"), default="cpu",
                   help="cpu: workers decode and crop, send uint8 (default); gpu: workers send the JPEG "
                        "files, decoded in batches on the GPU (nvjpeg via torchvision) with the crop and "
                        "flip there")


def _model_flags(p: Parser) -> None:
    g = p.add_argument_group("model and base")
    g.add_argument("--objective", choices=("tec", "mae"), default="tec",
                   help="tec: train a new model from --base; mae: pretrain a first base model")
    g.add_argument("--base", metavar="KIND:PATH", help=f"frozen base model; KIND one of {', '.join(BASE_RECIPES)}")
    g.add_argument("--base-model", choices=list(MODEL_PRESETS), metavar="ARCH",
                   help="architecture of the base (default: read from its weights; this flag also sets "
                        "its head count, which weights do not store)")
    g.add_argument("--base-heads", type=POSITIVE, metavar="N",
                   help="the base's head count, for weights of no preset's size (weights do not store it; "
                        "default: a config stored with them, else the preset of their patch, width and depth, "
                        "else width/64 with a warning); the relation targets have a row per head")
    g.add_argument("--trust-checkpoint", action="store_true",
                   help="allow full unpickling of the --base file if it pickles objects other than an "
                        "argparse.Namespace (it can run code from the file: only for files you trust)")
    g.add_argument("--model", choices=list(MODEL_PRESETS), metavar="ARCH",
                   help="architecture of the new model (default: the base's; vit_base_patch16 for mae). "
                        f"ARCH: {', '.join(MODEL_PRESETS)}")
    g.add_argument("--last-layers", type=POSITIVE, help="feature targets: mean of this many last base blocks")
    g.add_argument("--topk", type=POSITIVE, help="relation targets: CLS + top-k attended patch rows")
    g.add_argument("--tau", type=real(0, lo_open=True), help="relation-target temperature (> 0)")
    g.add_argument("--no-relation", action="store_true", help="feature targets only")
    g.add_argument("--no-input-adapter", action="store_true", help="plain CLS token, no MLP")
    g.add_argument("--decoder-dim", type=POSITIVE, default=512,
                   help="decoder width (default %(default)s, ViT-B's recipe; whatever --model is: give a "
                        "smaller one, with --decoder-depth / --decoder-heads, for a small encoder)")
    g.add_argument("--decoder-depth", type=POSITIVE, help="decoder blocks (default: 2 for TEC, 8 for MAE)")
    g.add_argument("--decoder-heads", type=POSITIVE, default=16, help="decoder heads (default %(default)s)")
    g.add_argument("--mask-ratio", type=mask_ratio, default=0.75, metavar="R|LO:HI",
                   help="fraction of patches hidden, in (0, 1): one ratio (default %(default)s), or a range "
                        "LO:HI drawn per image (the encoder then runs packed, no padding)")
    g.add_argument("--masking", choices=("random", "block"), default="random",
                   help="random patches (MAE) or BEiT/iBOT block-wise masks (packed encoder)")


def _optim_flags(p: Parser) -> None:
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=POSITIVE, default=100,
                   help="passes over the data: the schedule length (unless --max-steps)")
    g.add_argument("--max-steps", type=POSITIVE, help="optimizer steps; overrides --epochs as the schedule length")
    g.add_argument("--batch-size", type=POSITIVE, default=64, help="per process and micro-step")
    g.add_argument("--accum", type=POSITIVE, default=1, help="gradient accumulation micro-steps")
    g.add_argument("--blr", type=real(0, lo_open=True), default=1.5e-4, help="lr = blr * global batch / 256")
    g.add_argument("--lr", type=real(0, lo_open=True), help="absolute peak lr (instead of --blr)")
    g.add_argument("--min-lr", type=real(0), default=0.0,
                   help="lr at the end of the half cosine that follows the warmup (at most the peak lr)")
    g.add_argument("--warmup-epochs", type=real(0), default=40.0,
                   help="linear warmup from 0 to the peak lr; one not shorter than the schedule is cut to "
                        "its first 10%% (with a warning)")
    g.add_argument("--weight-decay", type=real(0), default=0.05,
                   help="AdamW's decoupled weight decay (not on biases and other 1-D weights: norms)")
    g.add_argument("--clip-grad", type=real(0, lo_open=True),
                   help="max gradient norm, > 0 (off by default, as the reference)")
    g.add_argument("--optimizer", choices=("torch", "apex"), default="torch",
                   help="torch AdamW (fused where supported) or apex FusedAdam if installed")


def _run_flags(p: Parser) -> None:
    g = p.add_argument_group("precision and speed")
    g.add_argument("--precision", choices=("auto", "bf16", "fp16", "fp32"), default="auto",
                   help="autocast dtype; fp16 adds loss scaling. auto: bf16 on a GPU that has it, else fp32")
    g.add_argument("--compile", action="store_true", help="torch.compile the new model and the base")
    g.add_argument("--no-cuda-graph", action="store_true",
                   help="launch every step's kernels one by one. By default, where the step is static, "
                        "it is recorded into CUDA graphs (forward+backward per micro-step, optimizer "
                        "step) and replayed, which removes the host's launch work (it dominates below a "
                        "few hundred images per GPU): a CUDA device per process, one DDP process per GPU "
                        "or one process, fixed-size batches, one --mask-ratio with random masks, bf16 or "
                        "fp32, torch AdamW, no --compile; --accum is recorded too. The first step (11 "
                        "under DDP) runs eagerly; the summary says whether the steps replayed, or why not")
    g.add_argument("--cuda-graph", action="store_true",
                   help="require the recorded steps: refuse a run that cannot have them, naming why")
    g = p.add_argument_group("checkpointing")
    g.add_argument("--output", metavar="DIR", type=output_dir, help="checkpoints, metrics.jsonl, exported "
                   "encoder (default: runs/<objective>; the demo: runs/demo, --demo-make-base: runs/demo_base)")
    g.add_argument("--resume", nargs="?", const="auto", metavar="CKPT",
                   help="continue from CKPT (or, bare, from DIR/checkpoint-last.pth; with none there, "
                        "say so and start from step 0)")
    g.add_argument("--overwrite", action="store_true",
                   help="start afresh in an --output that holds an earlier run's checkpoints: delete its "
                        "checkpoint-*.pth, metrics.jsonl / .csv and wandb-run-id first (without it such a "
                        "folder is refused, unless --resume continues the run)")
    g.add_argument("--save-every", type=POSITIVE, default=1, metavar="EPOCHS",
                   help="an epoch checkpoint (checkpoint-NNNN.pth) every EPOCHS epochs, and after the last")
    g.add_argument("--save-every-steps", type=POSITIVE, metavar="STEPS", help="also save checkpoint-last every STEPS")
    g.add_argument("--keep-last", type=POSITIVE, default=2, help="epoch checkpoints kept (newest)")
    g.add_argument("--keep-every", type=NON_NEGATIVE, default=20,
                   help="and every K-th epoch's, kept for good (0: none)")
    g.add_argument("--time-limit", type=real(0, lo_open=True), metavar="SECONDS",
                   help="stop (saving) after this wall time")
    g = p.add_argument_group("distributed (under torchrun)")
    g.add_argument("--shard", choices=("ddp", "fsdp"), default="ddp",
                   help="DDP (default) or FSDP2 fully_shard per block, for large encoders")
    g.add_argument("--device", type=device, help="default: cuda:LOCAL_RANK if CUDA is available, else cpu")
    g = p.add_argument_group("logging")
    g.add_argument("--log-every", type=POSITIVE, default=20, metavar="STEPS",
                   help="a metrics.jsonl record (the means since the last one) and a progress update every STEPS "
                        "optimizer steps")
    g.add_argument("--tensorboard", action="store_true", help="also log to DIR/tensorboard (if installed)")
    g.add_argument("--wandb", metavar="PROJECT", help="also log to Weights & Biases under PROJECT (needs "
                   "pip install wandb; WANDB_MODE=offline logs to DIR/wandb without an account)")
    g.add_argument("--no-progress", action="store_true",
                   help="no progress line (the metrics log and the final table are written either way)")
    g.add_argument("--seed", type=SEED, default=0,
                   help="seeds the weights, the data order, each image's augmentation and the masks")


def _demo_flags(p: Parser) -> None:
    g = p.add_argument_group(
        "demo (no --data)", "The embedded demo starts from the MAE base shipped in the package and trains TEC "
        "and MAE-continued for the same counted FLOPs, side by side on half the cores each (fixed step counts and "
        "thread counts set by the core count: the numbers depend on --seed and the machine, never on its load; "
        "the README's runs took about 4 min on 2 CPU cores with nothing else of ours running).")
    mode = g.add_mutually_exclusive_group()
    mode.add_argument("--demo-from-scratch", action="store_true",
                      help="train the demo base first (its fixed recipe: 3100 MAE steps, several times the "
                           "demo's own training), then the same stages")
    mode.add_argument("--demo-long", action="store_true", help="old name of --demo-from-scratch")
    mode.add_argument("--demo-tiny", action="store_true",
                      help="smoke run on 512 training images, 20 TEC steps (CI; its "
                           "numbers mean nothing)")
    mode.add_argument("--demo-make-base", action="store_true",
                      help="only make the demo base (the recipe the shipped one was made with): writes "
                           "DIR/demo_base.pth and DIR/demo_base.json")
    g.add_argument("--demo-base", metavar="DIR", type=existing_dir,
                   help="use the base in DIR (made by --demo-make-base) instead of the shipped one")
    g.add_argument("--demo-steps", metavar="N", type=POSITIVE,
                   help="TEC steps instead of the mode's (MAE-continued gets the same FLOPs)")


def build_parser() -> Parser:
    p = Parser(prog="python -m tec_fast.train", formatter_class=argparse.RawDescriptionHelpFormatter,
               description="TEC pretraining (the reference recipe's defaults per base kind) or MAE base "
                           "pretraining. Run with no arguments for the embedded demo.",
               epilog="Base kinds and their recipe defaults (last_layers, topk, tau):\n" + "\n".join(
                   f"  {k:14s} {r.last_layers}, {r.topk:2d}, {r.tau}   {r.note}"
                   for k, r in BASE_RECIPES.items()))
    for add in (add_config_flags, _data_flags, _model_flags, _optim_flags, _run_flags, _demo_flags):
        add(p)
    for action in p._actions:  # every value default shown in --help (switches default to off)
        default = action.default
        if default is None or default is False or argparse.SUPPRESS in (default, action.help):
            continue
        if "default" not in (action.help or ""):
            action.help = f"{action.help} (default: %(default)s)" if action.help else "default: %(default)s"
    return p


def parse_args(argv=None) -> argparse.Namespace:
    """The flags (``--config FILE`` first, the command line over it), each checked."""
    args = parse_with_config(build_parser(), argv)
    p = build_parser()  # its defaults untouched by --config: which flags were set is judged against them
    check_train_flags(p, argparse.Namespace(**{k: v for k, v in vars(args).items()
                                               if k not in ("config", "print_config")}))
    if args.wandb is not None:
        import importlib.util
        if not args.wandb.strip():
            p.refuse("--wandb", "expected a project name, got an empty string")
        if importlib.util.find_spec("wandb") is None:
            p.refuse("--wandb", "wandb is not installed (pip install wandb), or leave --wandb out")
    return args


def run_config(args) -> str:
    """``config.yaml`` of a run: what ``--config`` reads back to run it again. Without --data only
    the demo's flags; with it, everything but the demo's and this invocation's (resume, bench-loader)."""
    from tec_fast.cli.train_checks import DEMO_FLAGS

    header = (f"python -m tec_fast.train --config {CONFIG_FILE} --resume continues this run; --overwrite "
              f"instead of --resume runs it again from step 0 (its --output holds this run's checkpoints: "
              f"without either flag it is refused). Flags given on the command line override these values")
    if args.data is None:
        return resolved_config(build_parser(), args, keep=DEMO_FLAGS | {"data"}, header=header)
    return resolved_config(build_parser(), args, header=header,
                           skip=(DEMO_FLAGS - {"output", "seed", "no_progress"})
                           | {"resume", "bench_loader", "overwrite"})


# -------------------------------------------------------------------------------------- run
def main(argv=None) -> int:
    """The command: exit status 0, 2 for a refused flag or input (one ``error:`` line), 3 for
    a run stopped by a non-finite loss or weights, 128 + N for signal N."""
    return run_command(_main, argv, on_interrupt="a checkpoint being written was abandoned (checkpoints are "
                                                "renamed into place only when complete: checkpoint-last.pth is "
                                                "the newest complete one, and --resume continues from it)")


def _main(argv) -> int:
    args = parse_args(argv)
    if args.print_config:
        sys.stdout.write(run_config(args))
        return 0
    if args.data is None:
        from tec_fast.demo.run import make_demo_base, run_demo
        if args.demo_make_base:
            return make_demo_base(args)
        _made_output(args.output or os.path.join("runs", "demo"))
        config = run_config(args)  # written under the run's lock
        return run_demo(args, on_locked=lambda out: write_text_atomic(os.path.join(out, CONFIG_FILE), config))
    return train(args)


def _made_output(path: str) -> str:
    """``path``, created where missing; a folder that cannot be made is a ValueError naming
    --output (the file system's own message alone would not say which flag)."""
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"--output {path}: cannot create the folder ({exc.strerror or exc})") from None
    return path


def train(args) -> int:
    from tec_fast.training.distributed import distributed_command

    output = _made_output(args.output or os.path.join("runs", args.objective))
    with distributed_command(args.device, output, lock=not args.bench_loader) as d:
        return _train(args, d, output)


def _train(args, d, output: str) -> int:
    from tec_fast.data.decode import decoder_name
    from tec_fast.data.sources import open_dataset
    from tec_fast.training import NonFiniteTraining, TrainingInterrupted, fit
    from tec_fast.training.builders import OBJECTIVE_BUILDERS, native_batching, native_plan
    from tec_fast.checkpoint import clean_stale_temp_files, save_atomic

    say = print if d.is_main else (lambda *a, **k: None)
    if d.is_main and not args.bench_loader:
        clean_stale_temp_files(output, say)
    if not args.bench_loader and args.resume is None and (d.is_main or not args.overwrite):
        fresh_output(output, args.overwrite, say)  # --overwrite: the main process deletes
    native = native_plan(args) if args.native_resolution else None
    dataset = open_dataset(args.data, img_size=args.img_size, train=True, strict=args.strict_data,
                           uint8=native is None,  # normalised on the device (native batches: in the workers)
                                 **({"native_patch": native["patch"], "max_patches": native["max_patches"],
                                     "min_patches": native["min_patches"]} if native else {}))
    precision = args.precision
    if precision == "auto":
        precision = "bf16" if d.device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    cfg = fit_config(args, output, precision)
    if d.is_main and not args.bench_loader:
        write_text_atomic(os.path.join(output, CONFIG_FILE), run_config(args))
    say(f"data: {len(dataset)} images, {dataset.kind} {dataset.root} ({len(dataset.classes)} classes; "
        f"decode: {'gpu' if args.decode == 'gpu' else decoder_name()})")
    batching = native_batching(dataset, native, args.seed) if native else {}
    if native:
        say(f"native resolution: patch {native['patch']}, <= {native['max_patches']} patches per image "
            f"(>= {native['min_patches']}), <= {native['tokens_per_batch']} tokens per batch")
    if args.bench_loader:
        return bench(dataset, cfg, native, batching, say, args, d)

    torch.manual_seed(args.seed)
    setup = OBJECTIVE_BUILDERS[args.objective](args, dataset, d.device, native)
    if args.decode == "gpu":
        from tec_fast.data.gpu_decode import gpu_decode_inputs
        setup.dataset, setup.collate_fn = gpu_decode_inputs(setup.dataset)
    say(f"model: {args.objective}, {sum(p.numel() for p in setup.model.parameters()) / 1e6:.1f} M trainable parameters")
    try:
        result = fit(setup.model, setup.objective, setup.dataset, cfg, checkpoint_extra=setup.checkpoint_extra,
                     collate_fn=setup.collate_fn, **batching)
    except NonFiniteTraining as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_NONFINITE
    except TrainingInterrupted as exc:
        say(str(exc))
        return 128 + exc.signum
    if result.unreadable:
        say(f"warning: {len(result.unreadable)} unreadable images were skipped, another image drawn in their "
            f"place (first: {result.unreadable[0]}; the end record of metrics.jsonl names up to 10)")
    exported = os.path.join(output, setup.encoder_file) if d.is_main else None
    if exported:  # the weights were checked finite by fit before it returned
        save_atomic(setup.encoder_state(result.model), exported)
    curves = write_curves(output) if d.is_main else None
    say(summary(args, result, precision, d.world, exported, curves))
    return 0


def fresh_output(output: str, overwrite: bool, say) -> None:
    """A run without --resume starts in a folder free of another run's checkpoints and logs:
    mixed in, checkpoints would be pruned against the new ones and resumed from later, and the
    new run's records appended to the old run's metrics. ``overwrite`` deletes them (the wandb
    run id too, so the new run is a new wandb run); otherwise such a folder is refused
    (ValueError). A run stopped before its first save leaves logs and no checkpoint: refused too."""
    from tec_fast.training.checkpoints import checkpoint_files
    from tec_fast.training.monitor import WANDB_ID_FILE

    old = checkpoint_files(output)
    logs = [f for f in (os.path.join(output, n) for n in ("metrics.jsonl", "metrics.csv", WANDB_ID_FILE))
            if os.path.exists(f)]
    if not old and not logs:
        return
    found = old + logs
    names = ", ".join(os.path.basename(f) for f in found[:8]) + (", ..." if len(found) > 8 else "")
    if not overwrite:
        what = "checkpoints" if old else "logs (it stopped before its first checkpoint)"
        cont = "add --resume to continue that run, " if old else ""
        raise ValueError(f"--output {output} holds an earlier run's {what} ({names}): {cont}--overwrite to "
                         f"delete them and start afresh, or choose another --output")
    for f in found:
        os.remove(f)
    say(f"--overwrite: deleted {len(found)} files of the earlier run in {output}: {names}")


# FitConfig fields no flag of the same name sets (derived from other flags, or FitConfig's default);
# every other field is filled from the flag of its name
DERIVED_FIT_FIELDS = ("name", "output_dir", "precision", "pin_memory", "save_every_epochs", "progress",
                      "warmup_steps", "betas", "cuda_graph")


def fit_config(args, output: str, precision: str):
    """The ``FitConfig`` of a run: every field named like a flag takes that flag's value (a new
    flag reaches ``fit`` by being declared once, in the parser, under the field's name)."""
    from dataclasses import fields

    from tec_fast.training import FitConfig

    named = {f.name: getattr(args, f.name) for f in fields(FitConfig)
             if f.name not in DERIVED_FIT_FIELDS and hasattr(args, f.name)}
    return FitConfig(**named, name=args.objective, output_dir=output, precision=precision,
                     pin_memory=not args.no_pin_memory, save_every_epochs=args.save_every,
                     progress=not args.no_progress,
                     cuda_graph="off" if args.no_cuda_graph else "on" if args.cuda_graph else "auto")


def bench(dataset, cfg, native, batching: dict, say, args, d) -> int:
    """--bench-loader: the data loader alone; a table, and one JSON line in DIR/bench_loader.jsonl."""
    import json

    from tec_fast.training import bench_loader
    from tec_fast.training.loader_bench import loader_report
    from tec_fast.training.monitor import table
    from tec_fast.training.objectives import NativeNoiseCollate, NativeNoiseSamples

    data = NativeNoiseSamples(dataset, native["patch"]) if native else dataset
    collate = NativeNoiseCollate(native["patch"]) if native else None
    if args.decode == "gpu":
        from tec_fast.data.gpu_decode import gpu_decode_inputs
        data, collate = gpu_decode_inputs(dataset)
    say(f"measuring the loader for up to 20 s ({cfg.num_workers} workers, batch {cfg.batch_size}) ...")
    r = loader_report(bench_loader(data, cfg, collate_fn=collate, device=d.device if args.decode == "gpu" else None,
                                   **batching), args.target_img_s, d.device, args.img_size)
    fmt = lambda v, spec: "n/a" if v is None else format(v, spec)  # noqa: E731
    say(table(["", ""], [
        ["images / s (this process)", f"{r['img_per_s']:.1f}"], ["images measured", r["images"]],
        ["workers", r["num_workers"]], ["batch", r["batch_size"]],
        ["images / s per worker core", fmt(r["per_worker_img_s"], ".1f")],
        ["bytes per image sent", f"{r['bytes_per_image']:.0f}"],
        ["first batch (s)", f"{r['first_batch_s']:.1f}"],
        ["step rate to feed (img/s)", fmt(r["target_img_s"], ".0f")], ["  from", r["target_source"]],
        ["workers needed per GPU", fmt(r["workers_needed"], "d")]], title="loader alone", align="ll"))
    if d.is_main:
        os.makedirs(cfg.output_dir, exist_ok=True)
        with open(os.path.join(cfg.output_dir, "bench_loader.jsonl"), "a") as f:
            f.write(json.dumps({"event": "bench_loader", "data": args.data, "decode": args.decode,
                                "img_size": args.img_size, **r}) + "\n")
    return 0


def write_curves(output: str, note: bool = True):
    """DIR/curves.png from DIR/metrics.jsonl; None where the log holds no step (a resume of a
    checkpoint that had completed its schedule trains none), and (said once, with ``note``)
    without matplotlib."""
    from tec_fast.training.curves import CURVES_FILE, plot_run, read_steps

    metrics = os.path.join(output, "metrics.jsonl")
    if os.path.isfile(metrics) and not any(read_steps(metrics).values()):
        return None
    path = plot_run(output)
    if path is None and note:
        print(f"note: no {CURVES_FILE} (matplotlib is not installed: pip install matplotlib)", file=sys.stderr)
    return path


def summary(args, result, precision: str, world: int, exported, curves=None) -> str:
    from tec_fast.training.monitor import format_duration, table

    return table(["", "this run"], [
        ["stage", args.objective], ["steps", f"{result.steps} / {result.total_steps} ({result.stopped})"],
        ["epoch", result.epoch], ["global batch", result.global_batch], ["peak lr", f"{result.lr:.3g}"],
        ["optimizer", result.optimizer], ["precision", precision], ["processes", world],
        ["CUDA graph", result.cuda_graph],
        ["wall time", format_duration(result.seconds)], ["throughput", f"{result.img_per_s:.1f} img/s"],
        *[[f"{k} (last step)", f"{v:.4f}"] for k, v in result.metrics.items()],
        ["unreadable images", f"{len(result.unreadable)} (skipped)"],
        ["checkpoint", result.checkpoint], ["encoder", exported], ["curves", curves]], title="summary",
        align="ll")


if __name__ == "__main__":
    sys.exit(main())
