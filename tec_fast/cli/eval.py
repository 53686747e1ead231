"""``python -m tec_fast.eval CKPT``: k-NN and linear-probe accuracy of a checkpoint's frozen encoder
(the quick probe, default), or a paper's protocol trained by ``fit``: ``--protocol linprobe`` (MAE's
linear probe) or ``--protocol finetune`` (MAE's fine-tuning), with checkpoints, resume, torchrun,
metrics.jsonl / .csv, curves.png and results.json in ``--output``. ``--plot DIR`` draws DIR/curves.png
of any run.

Any checkpoint ``BaseModel.load_checkpoint`` reads (MAE release, iBOT/DINO, timm, TEC released or
raw, the engine's own). The architecture comes from, first that applies: the flags
(``--model`` or ``--embed-dim/--depth/--num-heads/--patch-size``), a config stored in the
checkpoint, or the tensor shapes (width, patch, depth, MLP ratio and image size are in the
weights; the head count is not, so it is taken from the matching preset, else width / 64).

Data: ``--data demo`` (default; the embedded digits-on-photos set) or ``--data FOLDER`` with
``train/`` and ``val/`` class folders (eval transform on both: resize + center crop). An unreadable
image of a folder is left out of the features and the counts (never replaced by another image, which
would be scored twice, maybe under another class); the summary and the JSON say how many and which
(``--strict-data``: stop at the first instead). The protocols' training split replaces one as the
train command does.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
import warnings
from typing import Tuple

import torch

from tec_fast.checkpoint import nonfinite_keys
from tec_fast.checkpoint.infer import infer_vit
from tec_fast.cli.config import write_text_atomic
from tec_fast.cli.errors import run_command
from tec_fast.cli.flags import (NON_NEGATIVE, POSITIVE, SEED, Parser, device, existing_dir, given, output_dir,
                                output_file, real, same_file)
from tec_fast.config import ViTConfig
from tec_fast.evaluation.probe import whole_dataset
from tec_fast.evaluation.protocol import PROTOCOLS, RECIPES
from tec_fast.presets import MODEL_PRESETS, vit_preset


class _Help(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Defaults shown where there is one and the help does not show it already; the epilog's lines kept."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default is None or action.default is False or "default" in text:
            return text
        return super()._get_help_string(action)


def build_parser() -> Parser:
    p = Parser(
        prog="python -m tec_fast.eval",
        description="Top-1 accuracy of a checkpoint's encoder. By default k-NN (cosine, weighted, k=20)\n"
                    "and an L-BFGS linear probe on frozen features extracted once (the quick probe).\n"
                    "--protocol linprobe / finetune: MAE's linear-probe / fine-tuning recipes, trained\n"
                    "like the train command (defaults: the paper's numbers, each one a flag; torchrun).",
        formatter_class=_Help,
        epilog="examples:\n  python -m tec_fast.eval runs/tec/checkpoint-last.pth\n"
               "  python -m tec_fast.eval runs/demo/tec/checkpoint-last.pth --protocol linprobe "
               "--batch-size 256 --epochs 20 --warmup-epochs 2 --output runs/linprobe\n"
               "  torchrun --nproc-per-node 8 -m tec_fast.eval ENC.pth --data /imagenet --protocol finetune "
               "--output runs/ft\n  python -m tec_fast.eval --plot runs/ft")
    p.add_argument("checkpoint", nargs="?", type=existing_path,
                   help="checkpoint file (.pth, .safetensors) or Hugging Face folder loadable by "
                        "BaseModel.load_checkpoint (not needed with --plot)")
    p.add_argument("--protocol", choices=("quick",) + PROTOCOLS, default="quick",
                   help="quick: k-NN + L-BFGS probe on frozen features; linprobe: MAE's linear probe "
                        "(BatchNorm + linear head, LARS); finetune: MAE's fine-tuning (layer decay, drop "
                        "path, mixup/cutmix, RandAugment)")
    p.add_argument("--plot", metavar="DIR", type=existing_dir,
                   help="only draw DIR/curves.png from DIR/metrics.jsonl (of a train or eval run) and exit")
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="allow full unpickling of a checkpoint that pickles Python objects other than "
                        "argparse.Namespace (it can run code from the file: only for files you trust)")

    arch = p.add_argument_group("architecture (default: stored config, else inferred from the weights)")
    arch.add_argument("--model", "--vit-preset", dest="model", choices=sorted(MODEL_PRESETS),
                      help="named ViT architecture")
    arch.add_argument("--img-size", type=POSITIVE, help="input resolution (demo data: 32)")
    arch.add_argument("--patch-size", type=POSITIVE, help="patch side in pixels")
    arch.add_argument("--embed-dim", type=POSITIVE, help="encoder width")
    arch.add_argument("--depth", type=POSITIVE, help="encoder blocks")
    arch.add_argument("--num-heads", type=POSITIVE, help="attention heads per block")
    arch.add_argument("--mlp-ratio", type=real(0, lo_open=True), help="MLP hidden width / encoder width")

    data = p.add_argument_group("data")
    data.add_argument("--data", default="demo",
                      help="'demo' or a folder with train/ and val/ class folders")
    data.add_argument("--seed", type=SEED, default=0,
                      help="demo data seed; subset seed for folders; in the protocols also the training seed "
                           "(head init, augmentation, data order)")
    data.add_argument("--n-train", type=POSITIVE, help="use a (class-balanced for demo) subset of train")
    data.add_argument("--n-test", type=POSITIVE, help="use a subset of test/val")
    data.add_argument("--workers", type=NON_NEGATIVE, default=min(8, os.cpu_count() or 1),
                      help="DataLoader workers for folders (the demo is in memory)")
    data.add_argument("--strict-data", action="store_true",
                      help="fail on an unreadable image instead of skipping it (with a warning; a skipped "
                           "one is left out of the counts)")

    ev = p.add_argument_group("evaluation")
    ev.add_argument("--pool", choices=("mean", "cls"),
                    help="feature: final-LayerNorm output averaged over patches, or the CLS token "
                         "(default: mean; linprobe: cls as MAE; finetune: mean = patch average + a new "
                         "LayerNorm, MAE's global pool)")
    ev.add_argument("--k", type=POSITIVE, default=20, help="k-NN neighbours")
    ev.add_argument("--probe-dim", type=NON_NEGATIVE, default=256,
                    help="PCA width cap of the linear probe (0: no PCA)")
    ev.add_argument("--batch-size", type=POSITIVE,
                    help="quick: feature-extraction batch (default 256); protocols: the global batch per "
                         f"optimizer step (linprobe: {RECIPES['linprobe'].batch_size}, finetune: "
                         f"{RECIPES['finetune'].batch_size}; on small data give a smaller one)")
    ev.add_argument("--device", type=device,
                    help="default: cuda (cuda:LOCAL_RANK under torchrun) when CUDA is available, else cpu")
    ev.add_argument("--pixels", action="store_true",
                    help="also evaluate raw pixels as a baseline row (demo data only)")

    _protocol_flags(p)
    out = p.add_argument_group("output")
    out.add_argument("--json", metavar="OUT", type=output_file, help="write the results as JSON here")
    out.add_argument("--quiet", action="store_true",
                     help="no progress display (the load report and warnings are still printed)")
    return p


# the recipe fields' flags, each named like its Recipe field (--batch-size and --pool are the quick
# probe's too, declared above): type, help; the defaults shown come from RECIPES
_RECIPE_FLAGS = {
    "--epochs": (POSITIVE, "training epochs"),
    "--accum": (POSITIVE, "gradient accumulation micro-steps per optimizer step"),
    "--blr": (real(0, lo_open=True), "base lr: lr = blr x global batch / 256"),
    "--lr": (real(0, lo_open=True), "absolute peak lr (instead of --blr)"),
    "--min-lr": (real(0), "lr at the end of the half-cosine schedule"),
    "--warmup-epochs": (real(0), "linear warmup"),
    "--weight-decay": (real(0), "weight decay (LARS / AdamW; not on biases and norms)"),
    "--crop-scale": (real(0, 1, lo_open=True), "RandomResizedCrop's smallest area fraction (+ flip)"),
    "--layer-decay": (real(0, 1, lo_open=True), "finetune: layer-wise lr decay"),
    "--drop-path": (real(0, 1, hi_open=True), "finetune: stochastic depth of the last block"),
    "--mixup": (real(0), "finetune: mixup Beta alpha (0: off)"),
    "--cutmix": (real(0), "finetune: cutmix Beta alpha (0: off)"),
    "--smoothing": (real(0, 1, hi_open=True), "finetune: label smoothing"),
    "--randaug-n": (NON_NEGATIVE, "finetune: RandAugment ops per image (0: off)"),
    "--randaug-m": (real(0, 10), "finetune: RandAugment magnitude"),
    "--randaug-mstd": (real(0), "finetune: RandAugment magnitude jitter (std)"),
    "--reprob": (real(0, 1), "finetune: random-erasing probability"),
}


def _dest(flag: str) -> str:
    return flag[2:].replace("-", "_")


FINETUNE_ONLY = ("layer_decay", "drop_path", "mixup", "cutmix", "smoothing", "randaug_n", "randaug_m",
                 "randaug_mstd", "reprob")


def _protocol_flags(p: Parser) -> None:
    lp, ft = RECIPES["linprobe"], RECIPES["finetune"]
    g = p.add_argument_group("protocol recipe (--protocol linprobe / finetune; default: the paper's, shown as "
                             "linprobe / finetune)")
    for flag, (kind, text) in _RECIPE_FLAGS.items():
        name = _dest(flag)
        lp_value, ft_value = (v if v is not None else "-" for v in (getattr(lp, name), getattr(ft, name)))
        shown = f"{ft_value}" if name in FINETUNE_ONLY else f"{lp_value} / {ft_value}"
        g.add_argument(flag, type=kind, help=f"{text} (default: {shown})")
    g = p.add_argument_group("protocol run (as the train command's)")
    g.add_argument("--output", metavar="DIR", type=output_dir,
                   help="checkpoints, metrics.jsonl/.csv, curves.png, results.json (default: runs/eval_PROTOCOL)")
    g.add_argument("--resume", nargs="?", const="auto", metavar="CKPT",
                   help="continue from CKPT (bare: DIR/checkpoint-last.pth, if there is one)")
    g.add_argument("--overwrite", action="store_true",
                   help="start afresh in an --output that holds an earlier run's checkpoints: delete its "
                        "checkpoint-*.pth, metrics.jsonl / .csv and wandb-run-id first (without it such a "
                        "folder is refused, unless --resume continues the run)")
    g.add_argument("--max-steps", type=POSITIVE, help="optimizer steps; overrides --epochs as the schedule length")
    g.add_argument("--time-limit", type=real(0, lo_open=True), metavar="SECONDS",
                   help="stop (saving) after this wall time")
    g.add_argument("--save-every-steps", type=POSITIVE, metavar="STEPS",
                   help="also save checkpoint-last every STEPS (one is saved after every epoch)")
    g.add_argument("--log-every", type=POSITIVE, default=20, metavar="STEPS",
                   help="linprobe / finetune: a metrics.jsonl record and a progress update every STEPS steps")
    g.add_argument("--precision", choices=("auto", "bf16", "fp16", "fp32"), default="auto",
                   help="autocast dtype; auto: bf16 on a GPU that has it, else fp32")
    g.add_argument("--wandb", metavar="PROJECT", help="also log to Weights & Biases (pip install wandb)")


def existing_path(text: str) -> str:
    """A checkpoint file or a Hugging Face model folder."""
    if not os.path.exists(text):
        raise argparse.ArgumentTypeError(f"{text!r}: no such file or folder")
    return text


def parse_args(argv=None) -> argparse.Namespace:
    p = build_parser()
    args = p.parse_args(argv)
    if args.plot is not None:
        return args
    if args.checkpoint is None:
        p.error("the following arguments are required: checkpoint (or --plot DIR)")
    set_flags = dict(given(p, args))
    if args.protocol == "quick":
        for dest in [_dest(f) for f in _RECIPE_FLAGS] + ["output", "resume", "overwrite", "max_steps", "time_limit",
                                                         "save_every_steps", "log_every", "precision", "wandb"]:
            if dest in set_flags:
                p.refuse(set_flags[dest], "applies to --protocol linprobe / finetune, not to the quick probe")
    elif args.protocol == "linprobe":
        for dest in FINETUNE_ONLY:
            if dest in set_flags:
                p.refuse(set_flags[dest], "applies to --protocol finetune only")
    if args.protocol != "quick":
        for dest in ("k", "probe_dim", "pixels"):
            if dest in set_flags:
                p.refuse(set_flags[dest], "applies to the quick probe only (no --protocol)")
        if args.wandb is not None and importlib.util.find_spec("wandb") is None:
            p.refuse("--wandb", "wandb is not installed (pip install wandb), or leave --wandb out")
    if args.json is not None and same_file(args.json, args.checkpoint):
        p.refuse("--json", "is the checkpoint being read; write the results to another file")
    if args.data != "demo":
        for name in ("train", "val"):
            if not os.path.isdir(os.path.join(args.data, name)):
                p.refuse("--data", f"{args.data!r} has no {name}/ folder (expected 'demo', or train/ and "
                                   f"val/ class folders)")
        if args.pixels:
            p.refuse("--pixels", "the raw-pixel baseline is only available with --data demo")
    elif args.strict_data:
        p.refuse("--strict-data", "applies to --data FOLDER (the demo set is in memory, nothing to read)")
    return args


def resolve_vit(args, stored, state: dict) -> Tuple[ViTConfig, str]:
    """The architecture from the flags, else ``stored`` (a config recorded in the checkpoint),
    else the weights ``state`` (timm names); a ValueError names an --img-size off its patch grid."""
    if args.model:  # the image size, unless given, from the weights' position embedding
        try:
            held = infer_vit(state)[0].get("img_size")
        except ValueError:
            held = None
        patch = MODEL_PRESETS[args.model][0]  # built on its grid: --img-size is checked below, with --patch-size
        fields = {**vit_preset(args.model, patch).to_dict(), "img_size": args.img_size or held or 224}
        source = f"preset {args.model}"
    else:
        if stored:
            fields, source = dict(stored), "config stored in the checkpoint"
        else:
            fields, note = infer_vit(state)
            source = f"inferred from the weights; {note}"
    for name in ("img_size", "patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio"):
        value = getattr(args, name)
        if value is not None:
            fields[name] = value
    fields.setdefault("img_size", 224)
    _refuse_img_size_off_the_grid(args, fields.get("patch_size"), source)
    return ViTConfig(**fields), source


def _refuse_img_size_off_the_grid(args, patch, source: str) -> None:
    if args.img_size is not None and patch and args.img_size % patch:
        raise ValueError(f"argument --img-size: {args.img_size} is not a multiple of the encoder's patch size "
                         f"{patch} ({source}); use a multiple of {patch}")


# ------------------------------------------------------------------------------------- data
SHOWN_SKIPPED = 10  # unreadable files named in the summary and the JSON, per split


def build_data(args, img_size: int, drop_train: bool = True):
    """(train, test, data name, DataLoader workers). A folder's unreadable images are dropped
    (items ``None``, see ``ImageDataset``) from the test split, and from the training split when
    ``drop_train`` (the quick probe; a protocol trains on it, and training replaces them)."""
    from torch.utils.data import Subset

    if args.data == "demo":
        from tec_fast.data.images import DEMO_SIZE, demo_datasets
        if img_size != DEMO_SIZE:
            raise ValueError(f"--data demo: the demo images are {DEMO_SIZE}x{DEMO_SIZE} but the model "
                             f"expects img_size={img_size} (--img-size, or the checkpoint's)")
        train, test = demo_datasets(args.seed, args.n_train, args.n_test)
        return train, test, f"demo (seed {args.seed})", 0

    from tec_fast.data.images import ImageFolderDataset
    splits = []
    for name in ("train", "val"):
        folder = os.path.join(args.data, name)
        if not os.path.isdir(folder):
            raise ValueError(f"--data {args.data!r} has no {name}/ folder (expected train/ and val/)")
        splits.append(ImageFolderDataset(folder, img_size=img_size, train=False, strict=args.strict_data,
                                         drop_unreadable=drop_train or name == "val"))
    train, test = splits
    if not train.classes:
        raise ValueError(f"--data: {train.root!r} has no class folders; evaluation needs labels")
    if train.classes != test.classes:
        raise ValueError(f"--data: train/ has {len(train.classes)} classes and val/ {len(test.classes)}; "
                         f"they must be the same class folders ({_class_difference(train.classes, test.classes)})")
    g = torch.Generator().manual_seed(args.seed)
    if args.n_train:
        train = Subset(train, torch.randperm(len(train), generator=g)[:args.n_train].sort().values.tolist())
    if args.n_test:
        test = Subset(test, torch.randperm(len(test), generator=g)[:args.n_test].sort().values.tolist())
    return train, test, args.data, args.workers


def _class_difference(train: list, val: list) -> str:
    """Which class folders differ between train/ and val/, a few named."""
    def few(names):
        return ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
    only_train = [c for c in train if c not in set(val)]
    only_val = [c for c in val if c not in set(train)]
    parts = ([f"only in train/: {few(only_train)}"] if only_train else []) + \
            ([f"only in val/: {few(only_val)}"] if only_val else [])
    return "; ".join(parts) or "the same names in another order"


def class_names(ds) -> list:
    """The class names of ``ds`` (an image dataset, the demo set, or a Subset of one), by label;
    [] where it has none. What counts the classes: the labels read may miss some."""
    return list(getattr(whole_dataset(ds), "classes", None) or [])


def skipped_files(ds) -> list:
    """The unreadable files met in ``ds`` (an image dataset or a Subset of one), in index order;
    [] for in-memory data."""
    base = whole_dataset(ds)
    return base.skipped_paths() if hasattr(base, "skipped_paths") else []


def _skipped_note(data: dict, train_replaced: bool = False) -> str:
    """The summary's line on unreadable images left out (``train_replaced``: the training
    split's were replaced, as in training), or ''."""
    parts = []
    for split in ("train", "test"):
        n, shown = data["skipped"][split], data["skipped_files"][split]
        if n:
            more = f" and {n - len(shown)} more" if n > len(shown) else ""
            how = ("skipped (another image of the split drawn in their place, as the train command does)"
                   if split == "train" and train_replaced else "left out")
            parts.append(f"{n} of {split} {how} ({', '.join(shown)}{more})")
    return f"unreadable images: {'; '.join(parts)}" if parts else ""


# ---------------------------------------------------------------------------------- display
class _Progress:
    """One self-overwriting line on a terminal; a line every ~25% otherwise. ``what``: the work
    the line counts images of (feature extraction, a protocol's scoring of the test split)."""

    def __init__(self, quiet: bool, what: str = "features"):
        self.quiet, self.what, self.tty = quiet, what, sys.stderr.isatty()
        self.start, self.last_quarter = {}, {}

    def __call__(self, split: str, done: int, total: int) -> None:
        if self.quiet:
            return
        t0 = self.start.setdefault(split, time.perf_counter())
        rate = done / max(time.perf_counter() - t0, 1e-9)
        line = f"{self.what} {split:5s} {done:>7d}/{total} images  {rate:8.0f} img/s"
        if done == 0:
            return
        if self.tty:
            sys.stderr.write("\r" + line + ("\n" if done >= total else ""))
        elif done >= total or done * 4 // total > self.last_quarter.get(split, 0):
            self.last_quarter[split] = done * 4 // total
            sys.stderr.write(line + "\n")
        sys.stderr.flush()


def _table(rows) -> str:
    header = ("features", "k-NN top-1", "linear probe top-1")
    body = [(name, f"{r['knn'] * 100:.1f}%", f"{r['linear'] * 100:.1f}%") for name, r in rows]
    widths = [max(len(x[i]) for x in [header, *body]) for i in range(3)]
    fmt = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([fmt(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(fmt, body)])


# ------------------------------------------------------------------------------------- main
def load_encoder(args, show: bool = True):
    """(BaseModel on args.device, its ViTConfig, where the architecture came from, load report).
    Without architecture flags the architecture is read from the checkpoint (any supported file or
    folder, ``BaseModel.from_checkpoint``). Weights holding NaN or inf are refused (ValueError);
    an error that names neither the file nor a flag is given the file's name. ``show``: print
    the architecture, the load report and the load's warnings (not ``--quiet``'s business: they
    say what was evaluated; only the other processes of a torchrun run keep them to themselves)."""
    from tec_fast.checkpoint import read_base_weights
    from tec_fast.models.base import BaseModel

    explicit = args.model or any(getattr(args, n) is not None
                                 for n in ("patch_size", "embed_dim", "depth", "mlp_ratio"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            weights = read_base_weights(args.checkpoint, trust=args.trust_checkpoint)
            _refuse_heads_the_checkpoint_contradicts(args, weights.stored)
            if explicit:
                base, vit_source = _load_with_flags(args, weights)
            else:
                patch = weights.state.get("patch_embed.proj.weight")
                _refuse_img_size_off_the_grid(args, patch.shape[-1] if patch is not None else None,
                                              "read from the weights")
                base = BaseModel.from_checkpoint(weights, img_size=args.img_size, num_heads=args.num_heads)
                notes = [n for n in base.load_report.notes if "num_heads" in n or "config" in n]
                vit_source = "read from the checkpoint" + (f" ({'; '.join(notes)})" if notes else "")
        except ValueError as exc:  # a head count the width does not divide: say which flag set it
            if args.num_heads is not None and "num_heads" in str(exc) and "--num-heads" not in str(exc):
                raise ValueError(f"--num-heads {args.num_heads}: {exc}") from None
            if args.checkpoint not in str(exc) and not str(exc).startswith(("argument ", "--")):
                raise ValueError(f"{args.checkpoint}: {exc}") from None
            raise
    bad = nonfinite_keys(base.state_dict())
    if bad:
        raise ValueError(f"{args.checkpoint}: {len(bad)} weights hold NaN or inf values ({', '.join(bad[:3])}); "
                         f"features from them would be meaningless")
    report = base.load_report
    if show:
        print(f"encoder: {base.config.to_dict()} ({vit_source})", file=sys.stderr)
        print(f"load: {report.summary()}", file=sys.stderr)
        for w in caught:
            if "BaseModel.load_checkpoint" not in str(w.message):
                print(f"warning: {w.message}", file=sys.stderr)
    return base.to(args.device), base.config, vit_source, report


def _load_with_flags(args, weights):
    """(BaseModel, where the architecture came from) for ``weights`` (``read_base_weights``'
    reading of the checkpoint) with architecture flags, which must agree with the weights."""
    from tec_fast.models.base import BaseModel

    vit, vit_source = resolve_vit(args, weights.stored, weights.state)
    _refuse_flags_the_weights_contradict(args, vit, weights.state)
    base = BaseModel(vit, topk=None)
    base.load_report = base.load_checkpoint(weights)
    return base, vit_source


def _refuse_heads_the_checkpoint_contradicts(args, stored) -> None:
    """--num-heads against the head count a config stored in the checkpoint records (what the
    weights were trained as: another count changes the attention, and the scores, silently)."""
    if args.num_heads is not None and stored and "num_heads" in stored and stored["num_heads"] != args.num_heads:
        raise ValueError(f"{args.checkpoint} records num_heads={stored['num_heads']}, which --num-heads "
                         f"{args.num_heads} contradicts; leave --num-heads out")


def _refuse_flags_the_weights_contradict(args, vit: ViTConfig, state: dict) -> None:
    """A ValueError naming the architecture flag the weights contradict and the value that works
    (``--img-size`` is free: the position embedding is resampled)."""
    from tec_fast.checkpoint.infer import weight_mismatches

    bad = weight_mismatches(vit.to_dict(), state)
    if not bad:
        return
    field, given, held = bad[0]
    flag = "--" + field.replace("_", "-")
    if getattr(args, field) is None and args.model:  # the value came from the preset
        read = {f: vit.to_dict()[f] for f in ("patch_size", "embed_dim", "depth")}
        read.update((f, h) for f, _, h in bad if f in read)
        match = [n for n, (p, d, k, _) in MODEL_PRESETS.items() if (p, d, k) == tuple(read.values())]
        fix = f"use --model {match[0]}" if match else "leave --model out"
        held_all = ", ".join(f"{f}={h}" for f, _, h in bad)
        given_all = ", ".join(f"{f}={g}" for f, g, _ in bad)
        raise ValueError(f"{args.checkpoint}: the weights hold {held_all} but --model {args.model} has "
                         f"{given_all}; {fix} (without architecture flags it is read from the weights)")
    raise ValueError(f"{args.checkpoint}: the weights hold {field}={held} but {flag} is {given}; use {flag} "
                     f"{held} or leave it out (without architecture flags it is read from the weights)")


def main(argv=None) -> dict:
    """The command's work; returns its result record (what ``--json`` writes)."""
    args = parse_args(argv)
    if args.plot is not None:
        return plot_only(args.plot)
    if args.protocol != "quick":
        return run_protocol_command(args)
    args.batch_size = args.batch_size or 256
    args.pool = args.pool or "mean"
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    from tec_fast.evaluation import probe as E

    timings = {}
    t = time.perf_counter()
    base, vit, vit_source, report = load_encoder(args)
    timings["load_s"] = time.perf_counter() - t
    t = time.perf_counter()
    train, test, data_name, workers = build_data(args, vit.img_size)
    timings["data_s"] = time.perf_counter() - t

    progress = _Progress(args.quiet)
    t = time.perf_counter()
    feats = [E.extract_features(base, ds, batch_size=args.batch_size, pool=args.pool, num_workers=workers,
                                progress=lambda d, n, s=split: progress(s, d, n))
             for split, ds in (("train", train), ("test", test))]
    timings["features_s"] = time.perf_counter() - t
    # k-NN and probe on the evaluation device: a GPU makes an ImageNet-sized probe practical
    (tr_f, tr_y), (te_f, te_y) = [(f.to(args.device), y.to(args.device)) for f, y in feats]
    t = time.perf_counter()
    knn = E.knn_accuracy(tr_f, tr_y, te_f, te_y, k=args.k)
    timings["knn_s"] = time.perf_counter() - t
    t = time.perf_counter()
    linear = E.linear_probe_accuracy(tr_f, tr_y, te_f, te_y, max_dim=args.probe_dim)
    timings["linear_s"] = time.perf_counter() - t

    rows = [(f"{os.path.basename(args.checkpoint)} ({args.pool}-pooled)", {"knn": knn, "linear": linear})]
    skipped = {split: skipped_files(ds) for split, ds in (("train", train), ("test", test))}
    classes = class_names(train)
    unseen = sorted(set(range(len(classes))) - set(feats[0][1].tolist()))
    result = {"checkpoint": os.path.abspath(args.checkpoint), "knn": knn, "linear": linear,
              "vit": vit.to_dict(), "vit_source": vit_source, "pool": args.pool,
              "k": min(args.k, len(tr_y)), "k_requested": args.k,  # knn_accuracy cuts k to the training set
              "probe_dim": args.probe_dim, "load_report": report.summary(),
              # the images read: an unreadable one is left out, not replaced
              "data": {"name": data_name, "train": len(tr_y), "test": len(te_y),
                       "classes": len(classes),
                       # no training image read: the probes can never predict them
                       "classes_without_train_images": [classes[c] for c in unseen],
                       "test_images_of_those_classes": int(sum((feats[1][1] == c).sum() for c in unseen)),
                       "skipped": {split: len(paths) for split, paths in skipped.items()},
                       "skipped_files": {split: paths[:SHOWN_SKIPPED] for split, paths in skipped.items()}},
              "device": str(args.device)}
    if args.pixels:
        from tec_fast.data.demo import demo_arrays
        t = time.perf_counter()
        result["pixels"] = E.pixel_baseline(*demo_arrays(args.seed, args.n_train, args.n_test), k=args.k)
        timings["pixels_s"] = time.perf_counter() - t
        rows.append(("raw pixels (baseline)", result["pixels"]))
    result["timings_s"] = {k: round(v, 3) for k, v in timings.items()}
    report_results(args, result, rows)
    return result


def report_results(args, result: dict, rows) -> None:
    data, k = result["data"], result["k"]
    asked = result["k_requested"]
    cut = f" (--k {asked} cut to the {data['train']} training images)" if k < asked else ""
    print(f"\n{data['name']}: {data['train']} train / {data['test']} test images, {data['classes']} classes; "
          f"k-NN: cosine, k={k}{cut}, votes exp(sim/0.07); linear probe: standardised"
          f"{f', PCA<={args.probe_dim}' if args.probe_dim else ''}, L-BFGS logistic regression")
    note = _skipped_note(data)
    if note:
        print(note)
    unseen, n = data["classes_without_train_images"], data["test_images_of_those_classes"]
    if unseen:
        one = len(unseen) == 1
        print(f"warning: class{'' if one else 'es'} {', '.join(unseen)} {'has' if one else 'have'} no readable "
              f"training image: k-NN and the probe never predict {'it' if one else 'them'}, so "
              f"{n} test image{' counts' if n == 1 else 's count'} as wrong")
    print(_table(rows))
    if args.json:
        write_text_atomic(args.json, json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")


def plot_only(folder: str) -> dict:
    from tec_fast.training.curves import CURVES_FILE, plot_run

    path = plot_run(folder)
    if path is None:
        raise ValueError(f"--plot: drawing {CURVES_FILE} needs matplotlib (pip install matplotlib)")
    print(f"wrote {path}")
    return {"curves": path}


# ---------------------------------------------------------------------------------- protocols
def run_protocol_command(args) -> dict:
    """--protocol linprobe / finetune: rank 0 holds the output folder's lock for the whole run."""
    from tec_fast.training.distributed import distributed_command

    output = args.output or os.path.join("runs", f"eval_{args.protocol}")
    with distributed_command(args.device, output) as d:
        args.device = str(d.device)
        return _run_protocol(args, d, output)


def _run_protocol(args, d, output: str) -> dict:
    from tec_fast.checkpoint import clean_stale_temp_files
    from tec_fast.cli.train import fresh_output, write_curves
    from tec_fast.evaluation.protocol import RECIPE_FIELDS, recipe, run_protocol
    from tec_fast.training import NonFiniteTraining, TrainingInterrupted

    say = print if d.is_main else (lambda *a, **k: None)
    if d.is_main:  # this run holds the folder's lock
        clean_stale_temp_files(output, say)
    if args.resume is None and (d.is_main or not args.overwrite):
        fresh_output(output, args.overwrite, say)  # another run's checkpoints: refused, or deleted by rank 0
    base, vit, vit_source, report = load_encoder(args, show=d.is_main)
    train, test, data_name, workers = build_data(args, vit.img_size, drop_train=False)
    r = recipe(args.protocol, **{k: getattr(args, k) for k in RECIPE_FIELDS if hasattr(args, k)})
    mean, std, num_classes = _data_stats(train)
    precision = args.precision
    if precision == "auto":
        precision = "bf16" if d.device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    say(f"{args.protocol}: {data_name}, {len(train)} train / {len(test)} test images, {num_classes} classes; "
        f"global batch {r.batch_size}, {r.epochs} epochs, {d.world} process(es), {precision}")
    options = dict(output_dir=output, seed=args.seed, precision=precision, num_workers=workers,
                   log_every=args.log_every, save_every_steps=args.save_every_steps, max_steps=args.max_steps,
                   time_limit=args.time_limit, resume=args.resume, wandb=args.wandb, progress=not args.quiet,
                   device=args.device)
    progress = _Progress(args.quiet or not d.is_main, "top-1")
    try:
        result = run_protocol(args.protocol, base, train, test, num_classes, r, mean, std, options,
                              eval_batch=min(r.batch_size, 256),
                              test_progress=lambda done, n: progress("test", done, n))
    except NonFiniteTraining as exc:
        raise SystemExit(f"error: {exc}") from None
    except TrainingInterrupted as exc:
        say(str(exc))
        raise SystemExit(128 + exc.signum) from None
    result.update({"checkpoint_evaluated": os.path.abspath(args.checkpoint), "vit": vit.to_dict(),
                   "vit_source": vit_source, "data": data_name, "seed": args.seed})
    result.update(_protocol_skipped(result.pop("train_unreadable"), test))
    if d.is_main:
        note = _skipped_note(result, train_replaced=True)
        if note:
            print(note)
        write_text_atomic(os.path.join(output, "results.json"), json.dumps(result, indent=2, default=str) + "\n")
        result["curves"] = write_curves(output, note=False)
        _protocol_table(result, output)
        if args.json:
            write_text_atomic(args.json, json.dumps(result, indent=2, default=str) + "\n")
            print(f"wrote {args.json}")
    return result


def _protocol_skipped(train_unreadable: list, test) -> dict:
    """{skipped, skipped_files} of a protocol run: the unreadable images every process met, the
    training split's (replaced in training; gathered from every process by ``fit``) and the test
    split's (left out of top-1; under torchrun each process reads its own share)."""
    import torch.distributed as dist

    found = {"train": list(train_unreadable), "test": skipped_files(test)}
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, found["test"])
        found["test"] = sorted({p for part in gathered for p in part})
    return {"skipped": {split: len(paths) for split, paths in found.items()},
            "skipped_files": {split: paths[:SHOWN_SKIPPED] for split, paths in found.items()}}


def _data_stats(train):
    """(per-channel mean, std the images were normalised with, number of classes)."""
    from tec_fast.data.folder import IMAGENET_MEAN, IMAGENET_STD

    ds = whole_dataset(train)
    mean, std = getattr(ds, "mean", IMAGENET_MEAN), getattr(ds, "std", IMAGENET_STD)
    classes = class_names(ds)
    if classes:
        return tuple(mean), tuple(std), len(classes)
    labels = getattr(ds, "labels", None)
    return tuple(mean), tuple(std), int(max(labels)) + 1


def _protocol_table(result: dict, output: str) -> None:
    from tec_fast.training.monitor import format_duration, table

    r = result["recipe"]
    rows = [["protocol", result["protocol"]], ["test top-1", f"{100 * result['top1']:.2f}%"],
            ["steps", f"{result['steps']} / {result['total_steps']} ({result['stopped']})"],
            ["global batch", result["global_batch"]], ["peak lr", f"{result['peak_lr']:.3g}"],
            ["optimizer", result["optimizer"]], ["epochs", r["epochs"]], ["processes", result["world"]],
            ["wall time", format_duration(result["seconds"])], ["throughput", f"{result['img_per_s']:.1f} img/s"],
            ["checkpoint", result["checkpoint"]], ["results", os.path.join(output, "results.json")],
            ["curves", result.get("curves")]]
    print(table(["", ""], rows, title="summary", align="ll"))


def cli(argv=None) -> int:
    """Entry point: problems with the user's inputs end in one ``error:`` line, not a traceback."""
    return run_command(_run, argv)


def _run(argv) -> int:
    try:
        main(argv)
    except SystemExit as exc:  # a protocol run stopped by a signal or a non-finite loss
        if isinstance(exc.code, str):
            print(exc.code, file=sys.stderr)
            return 3
        return exc.code if exc.code is not None else 0
    return 0


if __name__ == "__main__":
    cli()
