"""``python -m tec_fast.eval CKPT``: k-NN and linear-probe accuracy of a checkpoint's frozen encoder.

Any checkpoint ``BaseModel.load_checkpoint`` reads (MAE release, iBOT/DINO, timm, TEC released or
raw, the engine's own). The architecture comes from, first that applies: the flags
(``--model`` or ``--embed-dim/--depth/--num-heads/--patch-size``), a config stored in the
checkpoint, or the tensor shapes (width, patch, depth, MLP ratio and image size are in the
weights; the head count is not, so it is taken from the matching preset, else width / 64).

Data: ``--data demo`` (default; the embedded digits-on-photos set) or ``--data FOLDER`` with
``train/`` and ``val/`` class folders (eval transform on both: resize + center crop).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from typing import Tuple

import torch

from tec_fast.checkpoint.infer import infer_vit, stored_vit
from tec_fast.cli.errors import nonfinite_keys, run_command
from tec_fast.cli.flags import NON_NEGATIVE, POSITIVE, SEED, Parser, device, output_file, real
from tec_fast.config import ViTConfig
from tec_fast.presets import MODEL_PRESETS, vit_preset



def build_parser() -> Parser:
    p = Parser(
        prog="python -m tec_fast.eval",
        description="k-NN (cosine, weighted, k=20) and linear-probe top-1 accuracy of a "
                    "checkpoint's frozen encoder features.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("checkpoint", type=existing_path,
                   help="checkpoint file (.pth, .safetensors) or Hugging Face folder loadable by "
                        "BaseModel.load_checkpoint")
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="allow full unpickling of a checkpoint that pickles Python objects other than "
                        "argparse.Namespace (it can run code from the file: only for files you trust)")

    arch = p.add_argument_group("architecture (default: stored config, else inferred from the weights)")
    arch.add_argument("--model", "--vit-preset", dest="model", choices=sorted(MODEL_PRESETS),
                      help="named ViT architecture")
    arch.add_argument("--img-size", type=POSITIVE, help="input resolution (demo data: 32)")
    arch.add_argument("--patch-size", type=POSITIVE)
    arch.add_argument("--embed-dim", type=POSITIVE)
    arch.add_argument("--depth", type=POSITIVE)
    arch.add_argument("--num-heads", type=POSITIVE)
    arch.add_argument("--mlp-ratio", type=real(0, lo_open=True))

    data = p.add_argument_group("data")
    data.add_argument("--data", default="demo",
                      help="'demo' or a folder with train/ and val/ class folders")
    data.add_argument("--seed", type=SEED, default=0, help="demo data seed; subset seed for folders")
    data.add_argument("--n-train", type=POSITIVE, help="use a (class-balanced for demo) subset of train")
    data.add_argument("--n-test", type=POSITIVE, help="use a subset of test/val")
    data.add_argument("--workers", type=NON_NEGATIVE, default=min(8, os.cpu_count() or 1),
                      help="DataLoader workers for folders (the demo is in memory)")

    ev = p.add_argument_group("evaluation")
    ev.add_argument("--pool", choices=("mean", "cls"), default="mean",
                    help="feature: final-LayerNorm output averaged over patches, or the CLS token")
    ev.add_argument("--k", type=POSITIVE, default=20, help="k-NN neighbours")
    ev.add_argument("--probe-dim", type=NON_NEGATIVE, default=256,
                    help="PCA width cap of the linear probe (0: no PCA)")
    ev.add_argument("--batch-size", type=POSITIVE, default=256)
    ev.add_argument("--device", type=device, default="cuda" if torch.cuda.is_available() else "cpu")
    ev.add_argument("--pixels", action="store_true",
                    help="also evaluate raw pixels as a baseline row (demo data only)")

    out = p.add_argument_group("output")
    out.add_argument("--json", metavar="OUT", type=output_file, help="write the results as JSON here")
    out.add_argument("--quiet", action="store_true", help="no progress display")
    return p


def existing_path(text: str) -> str:
    """A checkpoint file or a Hugging Face model folder."""
    if not os.path.exists(text):
        raise argparse.ArgumentTypeError(f"{text!r}: no such file or folder")
    return text


def parse_args(argv=None) -> argparse.Namespace:
    p = build_parser()
    args = p.parse_args(argv)
    if args.data != "demo":
        for name in ("train", "val"):
            if not os.path.isdir(os.path.join(args.data, name)):
                p.refuse("--data", f"{args.data!r} has no {name}/ folder (expected 'demo', or train/ and "
                                   f"val/ class folders)")
        if args.pixels:
            p.refuse("--pixels", "the raw-pixel baseline is only available with --data demo")
    return args


def resolve_vit(args, obj: dict, state: dict) -> Tuple[ViTConfig, str]:
    if args.model:
        fields, source = vit_preset(args.model, args.img_size or 224).to_dict(), f"preset {args.model}"
    else:
        stored = stored_vit(obj)
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
    return ViTConfig(**fields), source


# ------------------------------------------------------------------------------------- data
def build_data(args, img_size: int):
    from torch.utils.data import Subset

    if args.data == "demo":
        from tec_fast.data.images import DEMO_SIZE, demo_datasets
        if img_size != DEMO_SIZE:
            raise SystemExit(f"error: the demo images are {DEMO_SIZE}x{DEMO_SIZE} but the model "
                             f"expects img_size={img_size}")
        train, test = demo_datasets(args.seed, args.n_train, args.n_test)
        return train, test, f"demo (seed {args.seed})", 0

    from tec_fast.data.images import ImageFolderDataset
    splits = []
    for name in ("train", "val"):
        folder = os.path.join(args.data, name)
        if not os.path.isdir(folder):
            raise SystemExit(f"error: {args.data!r} has no {name}/ folder (expected train/ and val/)")
        splits.append(ImageFolderDataset(folder, img_size=img_size, train=False))
    train, test = splits
    if not train.classes:
        raise SystemExit(f"error: {train.root!r} has no class folders; evaluation needs labels")
    if train.classes != test.classes:
        raise SystemExit(f"error: train/ has {len(train.classes)} classes and val/ {len(test.classes)}; "
                         f"they must be the same class folders")
    g = torch.Generator().manual_seed(args.seed)
    if args.n_train:
        train = Subset(train, torch.randperm(len(train), generator=g)[:args.n_train].sort().values.tolist())
    if args.n_test:
        test = Subset(test, torch.randperm(len(test), generator=g)[:args.n_test].sort().values.tolist())
    return train, test, args.data, args.workers


# ---------------------------------------------------------------------------------- display
class _Progress:
    """One self-overwriting line on a terminal; a line every ~25% otherwise."""

    def __init__(self, quiet: bool):
        self.quiet, self.tty = quiet, sys.stderr.isatty()
        self.start, self.last_quarter = {}, {}

    def __call__(self, split: str, done: int, total: int) -> None:
        if self.quiet:
            return
        t0 = self.start.setdefault(split, time.perf_counter())
        rate = done / max(time.perf_counter() - t0, 1e-9)
        line = f"features {split:5s} {done:>7d}/{total} images  {rate:8.0f} img/s"
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
def load_encoder(args):
    """(BaseModel on args.device, its ViTConfig, where the architecture came from, load report).
    Without architecture flags the architecture is read from the checkpoint (any supported file or
    folder, ``BaseModel.from_checkpoint``). Weights holding NaN or inf are refused (ValueError)."""
    from tec_fast.models.base import BaseModel

    explicit = args.model or any(getattr(args, n) is not None
                                 for n in ("patch_size", "embed_dim", "depth", "mlp_ratio"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if explicit:
            base, vit_source = _load_with_flags(args)
        else:
            base = BaseModel.from_checkpoint(args.checkpoint, img_size=args.img_size, num_heads=args.num_heads,
                                             trust=args.trust_checkpoint)
            notes = [n for n in base.load_report.notes if "num_heads" in n or "config" in n]
            vit_source = "read from the checkpoint" + (f" ({'; '.join(notes)})" if notes else "")
    bad = nonfinite_keys(base.state_dict())
    if bad:
        raise ValueError(f"{args.checkpoint}: {len(bad)} weights hold NaN or inf values ({', '.join(bad[:3])}); "
                         f"features from them would be meaningless")
    report = base.load_report
    if not args.quiet:
        print(f"encoder: {base.config.to_dict()} ({vit_source})", file=sys.stderr)
        print(f"load: {report.summary()}", file=sys.stderr)
        for w in caught:
            if "BaseModel.load_checkpoint" not in str(w.message):
                print(f"warning: {w.message}", file=sys.stderr)
    return base.to(args.device), base.config, vit_source, report


def _load_with_flags(args):
    from tec_fast.checkpoint import read_checkpoint, read_state_dict
    from tec_fast.models.base import BaseModel

    obj = read_checkpoint(args.checkpoint, trust=args.trust_checkpoint)
    state = read_state_dict(obj)
    vit, vit_source = resolve_vit(args, obj, state)
    _refuse_flags_the_weights_contradict(args, vit, state)
    base = BaseModel(vit, topk=None)
    base.load_report = base.load_checkpoint(obj)
    return base, vit_source


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
    args = parse_args(argv)
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
    result = {"checkpoint": os.path.abspath(args.checkpoint), "knn": knn, "linear": linear,
              "vit": vit.to_dict(), "vit_source": vit_source, "pool": args.pool, "k": args.k,
              "probe_dim": args.probe_dim, "load_report": report.summary(),
              "data": {"name": data_name, "train": len(train), "test": len(test),
                       "classes": int(tr_y.max()) + 1},
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
    data = result["data"]
    print(f"\n{data['name']}: {data['train']} train / {data['test']} test images, {data['classes']} classes; "
          f"k-NN: cosine, k={args.k}, votes exp(sim/0.07); linear probe: standardised"
          f"{f', PCA<={args.probe_dim}' if args.probe_dim else ''}, L-BFGS logistic regression")
    print(_table(rows))
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
        print(f"wrote {args.json}")


def cli(argv=None) -> int:
    """Entry point: problems with the user's inputs end in one ``error:`` line, not a traceback."""
    return run_command(_run, argv)


def _run(argv) -> int:
    main(argv)
    return 0


if __name__ == "__main__":
    cli()
